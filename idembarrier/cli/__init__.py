"""``idembarrier`` (or ``python -m idembarrier``): the command line.

Exit status, for every command: 0 success; 1 something needs a person or was refused: the demo (or the
lab's barrier) saw phantom writes, ``inspect`` found no record, ``unresolved`` listed UNKNOWN records or
stale leases, ``parked`` listed parked messages, ``resolve`` was refused (a live lease holds the key, or it
has no record or a finished one), ``release-parked`` or ``drop-parked`` named a message that is not parked,
``probe`` saw a MUST clause fail, ``reconcile`` escalated a key (or its listing was cut at ``--limit``),
``check-window`` found a scope at risk, or ``engine-check`` found a guarantee the barrier needs missing; 2 bad
usage or configuration (an unsupported URL or driver, in-memory SQLite, a ``--response`` that is not JSON, a
``--status``, age, limit or scope that ``list`` cannot use); 3
the database failed (unreachable, refused, no such database, authentication) or its schema is not
installed, or the probe's target could not be reached. A failure or a refusal prints one line on stderr,
with the server's or the OS's reason, and never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, NoReturn

import anyio

from .._barrier import PURGE_SHARE
from .._config import DEFAULT_TABLE
from .._record import Status
from . import _engine_check, _operator, _probe, _purge
from ._reconcile import add_parser as add_reconcile_parser
from ._reconcile import run as reconcile
from ._window import add_parser as add_window_parser
from ._window import run as check_window

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from .._barrier import Barrier
    from .._privacy import KeyedHash

__all__ = ["main"]

_DB_HELP = "SQLAlchemy async URL (default: IDEMBARRIER_DATABASE_URL)"


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (exit 2) instead of the usage text and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"idembarrier: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("idembarrier")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout that was never installed
        from .. import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _Parser(prog="idembarrier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="send bursts of duplicate payments through the barrier")
    demo.add_argument(
        "--database-url",
        default=os.environ.get("IDEMBARRIER_DATABASE_URL"),
        help="SQLAlchemy async URL (default: IDEMBARRIER_DATABASE_URL, else a temporary SQLite file)",
    )
    demo.add_argument("--orders", type=int, default=20, help="distinct orders (default 20)")
    demo.add_argument("--duplicates", type=int, default=8, help="concurrent copies of each order (default 8)")
    lab = commands.add_parser(
        "lab", help="reproduce the four phantom-write failure modes: naive designs vs the barrier"
    )
    lab.add_argument(
        "--database-url",
        default=os.environ.get("IDEMBARRIER_DATABASE_URL"),
        help="SQLAlchemy async URL (default: IDEMBARRIER_DATABASE_URL, else a temporary SQLite file)",
    )
    lab.add_argument("--json", action="store_true", help="print JSON instead of text")
    lab.add_argument(
        "--real", action="store_true", help="crash and race with real OS processes (SIGKILL, one connection each)"
    )
    lab.add_argument(
        "--broker", metavar="HOST:PORT", help="with --real: a Kafka-protocol broker for the layer mismatch"
    )
    _probe.add_parser(commands)
    _engine_check.add_parser(commands)
    add_reconcile_parser(commands)
    add_window_parser(commands)
    for name, text in (
        ("migrate", "install or update idembarrier's schema"),
        ("purge", "drop expired responses (keeping compact records), then delete expired records"),
        ("list", "list records by status, scope and age, newest first"),
        ("stats", "print the records' status distribution"),
        ("inspect", "print one record, with the fields its state gives meaning to (exit 1: no record)"),
        ("unresolved", "list UNKNOWN records and stale leases, oldest first (exit 1: there are some)"),
        ("resolve", "record an operator's outcome for an UNKNOWN record or a stale lease (exit 1: refused)"),
        ("parked", "list the outbox's parked messages, oldest first (exit 1: there are some)"),
        ("release-parked", "publish a parked message again, its refusals from 0 (exit 1: not parked)"),
        ("drop-parked", "delete a parked message for good (exit 1: not parked)"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--database-url", default=os.environ.get("IDEMBARRIER_DATABASE_URL"), help=_DB_HELP)
        command.add_argument("--table", default=DEFAULT_TABLE, help="records table (default %(default)s)")
        command.add_argument("--schema", default=None, help="PostgreSQL schema of the records table")
        command.add_argument("--json", action="store_true", help="print JSON instead of text")
        if name == "purge":
            command.add_argument(
                "--batch-size", type=_operator.positive, default=1000, help="records per transaction (default 1000)"
            )
            command.add_argument(
                "--max-share",
                type=_operator.share,
                default=PURGE_SHARE,
                help="largest share of the purge's wall-clock time its batches take: it pauses between them "
                "(default 1: no pause)",
            )
            command.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
        if name == "list":
            _list_options(command)
        if name in ("inspect", "resolve"):
            command.add_argument("scope")
            command.add_argument("key")
            command.add_argument(
                "--key-secret-env",
                metavar="VARIABLE",
                help="the application stores keys as keyed hashes (KeyedHash): the environment variable holding "
                "its secret (UTF-8); KEY is then the original key",
            )
        if name in ("unresolved", "parked"):
            command.add_argument("--limit", type=_operator.positive, default=100, help="most rows (default 100)")
        if name == "resolve":
            command.add_argument("--status", required=True, choices=[s.value for s in Status if s.finished])
            command.add_argument(
                "--response", required=True, type=_operator.json_value, help="the response to replay, as JSON"
            )
        if name in ("release-parked", "drop-parked"):
            command.add_argument("message_id")
    args = parser.parse_args(argv)
    if args.command == "list" and args.scope is not None:
        args.scope = _checked_scope(parser, args.scope)
    if args.command == "probe":
        return _probe.run(args)
    if args.command == "check-window":
        return check_window(args)
    if args.command == "lab" and args.broker is not None and not args.real:
        parser.error("--broker goes with --real")
    if args.command == "engine-check":
        args.database_url = args.url  # what a failure to reach it names
    if args.command not in ("demo", "lab") and not args.database_url:
        parser.error("give --database-url or set IDEMBARRIER_DATABASE_URL")
    run = {"demo": _run_demo, "lab": _run_lab, "engine-check": _engine_check.run}.get(args.command, _operate)
    try:
        return run(args)
    except Exception as exc:
        if (failure := _failure(exc, args.database_url)) is None:
            raise  # not a usage, configuration or database failure: a bug, whose traceback helps
        status, line = failure
        print(f"idembarrier: {line}", file=sys.stderr)
        return status


def _failure(exc: Exception, url: str | None) -> tuple[int, str] | None:
    """The exit status and the one line to print for ``exc``, or ``None`` when it is nobody's fault but ours."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from .._exceptions import (
        ConfigurationError,
        IdembarrierError,
        InvalidFingerprintError,
        InvalidKeyError,
        StorageError,
    )
    from ._reason import driver_reason

    if isinstance(exc, ExceptionGroup):  # the demo's and the lab's task groups
        failures = [_failure(leaf, url) for leaf in exc.exceptions if isinstance(leaf, Exception)]
        if len(failures) != len(exc.exceptions) or any(f is None for f in failures):
            return None
        return min(failure for failure in failures if failure is not None)
    if isinstance(exc, ConfigurationError | InvalidKeyError | InvalidFingerprintError):
        return 2, str(exc)
    if isinstance(exc, IdembarrierError) and not isinstance(exc, StorageError):
        return 3, str(exc)  # the schema is not installed, a record stands in the way: our message says it
    reason = driver_reason(exc)
    if reason is None:
        if not isinstance(exc, StorageError | SQLAlchemyError):
            return None
        reason = " ".join(str(exc).split())
    where = "database" if url is None else f"database {make_url(url).render_as_string(hide_password=True)}"
    return 3, f"{where}: {reason}"


def _list_options(command: argparse.ArgumentParser) -> None:
    """``list``'s filters."""
    statuses = ", ".join(s.value for s in Status)
    command.add_argument(
        "--status",
        action="extend",
        type=_operator.statuses,
        metavar="STATUS[,STATUS…]",
        help=f"only these statuses, repeatable or comma-separated ({statuses}; default: all)",
    )
    command.add_argument("--scope", default=None, help="only this scope (default: all)")
    command.add_argument(
        "--older-than", type=_operator.duration, metavar="AGE", help="only records created at least AGE ago (7d)"
    )
    command.add_argument(
        "--newer-than", type=_operator.duration, metavar="AGE", help="only records created less than AGE ago (2h)"
    )
    command.add_argument(
        "--limit",
        type=_operator.list_limit,
        default=100,
        help=f"most records, at most {_operator.LIST_LIMIT} (default 100)",
    )


def _checked_scope(parser: _Parser, scope: str) -> str:
    """``--scope`` as a usable scope, else a usage error (exit 2) before any connection."""
    from .._exceptions import InvalidKeyError
    from .._keys import validate_key

    try:
        return validate_key(scope, what="scope")
    except InvalidKeyError as exc:
        parser.error(f"argument --scope: {exc}")


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import format_report, run_demo

    report = anyio.run(lambda: run_demo(args.database_url, orders=args.orders, duplicates=args.duplicates))
    print(format_report(report))
    return 0 if report.ok else 1


def _run_lab(args: argparse.Namespace) -> int:
    from ._lab import format_report, run_lab

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = anyio.run(lambda: run_lab(args.database_url, on_progress=progress, real=args.real, broker=args.broker))
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


def _operate(args: argparse.Namespace) -> int:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from .._barrier import Barrier
    from .._migrate import upgrade
    from ._engine import create_engine

    engine = create_engine(args.database_url)

    async def run() -> int:
        try:
            if args.command == "migrate":
                await upgrade(engine, table=args.table, schema=args.schema)
                return _operator.emit(args, {"migrated": True}, "schema is at head")
            barrier: Barrier = Barrier(
                async_sessionmaker(engine), table=args.table, schema=args.schema, keyed_hash=_keyed_hash(args)
            )
            return await _COMMANDS[args.command](barrier, args)
        finally:
            await engine.dispose()

    return anyio.run(run)


def _keyed_hash(args: argparse.Namespace) -> KeyedHash | None:
    """The application's `KeyedHash`, from the variable ``--key-secret-env`` names (the secret is never an argument)."""
    from .._exceptions import ConfigurationError
    from .._privacy import KeyedHash

    variable = getattr(args, "key_secret_env", None)
    if variable is None:
        return None
    secret = os.environ.get(variable)
    if not secret:
        raise ConfigurationError(f"--key-secret-env: the environment variable {variable} is not set")
    return KeyedHash(secret.encode())


async def _stats(barrier: Barrier, args: argparse.Namespace) -> int:
    stats = await barrier.stats()
    oldest = stats.oldest_in_progress
    data = {
        "statuses": {status.value: count for status, count in sorted(stats.statuses.items())},
        "oldest_in_progress_seconds": None if oldest is None else oldest.total_seconds(),
        "outbox": {"pending": stats.outbox_pending, "parked": stats.outbox_parked},
    }
    lines = [f"  {status:<12}{count:>12}" for status, count in sorted(stats.statuses.items())]
    lines.append(f"  oldest IN_PROGRESS: {'none' if oldest is None else oldest}")
    lines.append(f"outbox: {stats.outbox_pending} pending, {stats.outbox_parked} of them parked")
    return _operator.emit(args, data, "\n".join(["records by status:", *lines]))


_COMMANDS: dict[str, Callable[[Barrier, argparse.Namespace], Awaitable[int]]] = {
    "purge": _purge.purge,
    "list": _operator.list_records,
    "stats": _stats,
    "inspect": _operator.inspect,
    "unresolved": _operator.unresolved,
    "resolve": _operator.resolve,
    "parked": _operator.parked,
    "release-parked": _operator.release_parked,
    "drop-parked": _operator.drop_parked,
    "reconcile": reconcile,
}

"""``idembarrier reconcile --provider MODULE:OBJECT``: settle the keys in doubt with what the provider says.

``OBJECT`` is a `Provider` (anything with ``async def lookup(downstream_key)``), or a callable taking no
arguments that returns one (awaited if it returns an awaitable); a provider that is an async context manager
is entered for the run. It may also define ``response(record, answer)``, the response recorded for a resolved
key (default: what the provider said, as JSON), and ``amount_of(record)``, the amount of a key the provider
gave none for. Exit status: 0 every key in doubt was resolved; 1 some are escalated (or the listing was
cut at ``--limit``), listed with the amount still in doubt; 2 bad usage or a provider that cannot be loaded;
3 the database failed.
"""

from __future__ import annotations

import importlib
import inspect
import os
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, TypeVar

from .._config import DEFAULT_TABLE
from .._exceptions import ConfigurationError
from .._reconcile import DEFAULT_CONFIRM_AFTER, DEFAULT_MIN_AGE, Reconciliation, Verdict, reconcile
from . import _operator

if TYPE_CHECKING:
    import argparse

    from .._barrier import Barrier
    from .._codec import JSON
    from .._reconcile import Provider

__all__ = ["add_parser", "load_provider", "run"]

_Parser = TypeVar("_Parser", bound="argparse.ArgumentParser")


def add_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Register ``reconcile`` and its options on the command line's subcommands."""
    command = commands.add_parser(
        "reconcile", help="ask the provider about UNKNOWN keys and resolve them (exit 1: some escalated)"
    )
    command.add_argument("--provider", required=True, help="MODULE:OBJECT, a provider or a factory of one")
    command.add_argument(
        "--database-url",
        default=os.environ.get("IDEMBARRIER_DATABASE_URL"),
        help="SQLAlchemy async URL (default: IDEMBARRIER_DATABASE_URL)",
    )
    command.add_argument("--table", default=DEFAULT_TABLE, help="records table (default %(default)s)")
    command.add_argument("--schema", default=None, help="PostgreSQL schema of the records table")
    command.add_argument("--json", action="store_true", help="print JSON instead of text")
    command.add_argument("--dry-run", action="store_true", help="ask the provider, write nothing")
    command.add_argument(
        "--min-age",
        type=_operator.duration,
        default=DEFAULT_MIN_AGE,
        help="trust 'not found' only for keys quiet this long (default 15m)",
    )
    command.add_argument(
        "--confirm-after",
        type=_operator.duration,
        default=DEFAULT_CONFIRM_AFTER,
        help="ask again this long after a first 'not found' (default 30s)",
    )
    command.add_argument(
        "--no-confirm", action="store_true", help="trust the first 'not found' (a strongly consistent provider)"
    )
    command.add_argument(
        "--include-stale", action="store_true", help="reconcile stale leases too, not only UNKNOWN records"
    )
    command.add_argument("--limit", type=_operator.positive, default=1000, help="most keys (default 1000)")
    command.add_argument("--concurrency", type=_operator.positive, default=8, help="most lookups at once (default 8)")
    command.add_argument("--lookup-timeout", type=float, default=10.0, help="seconds per lookup (default 10)")


async def load_provider(spec: str) -> Any:
    """The object ``MODULE:OBJECT`` names, called if it is a factory (see the module's docstring).

    Raises:
        ConfigurationError: The spec is malformed, its module or object cannot be loaded, or what it gives
            has no ``lookup``.
    """
    module_name, colon, path = spec.partition(":")
    if not colon or not module_name or not path:
        raise ConfigurationError(f"--provider takes MODULE:OBJECT, not {spec!r}")
    try:
        found: Any = importlib.import_module(module_name)
        for name in path.split("."):
            found = getattr(found, name)
        if not callable(getattr(found, "lookup", None)) and callable(found):
            found = found()
            if inspect.isawaitable(found):
                found = await found
    except Exception as exc:
        raise ConfigurationError(f"cannot load the provider {spec!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(found, "lookup", None)):
        raise ConfigurationError(f"the provider {spec!r} has no lookup(downstream_key) method")
    return found


async def run(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``reconcile``: look up the keys in doubt, resolve or escalate each; exit 1 when some stay in doubt."""
    async with AsyncExitStack() as stack:
        provider: Provider = await load_provider(args.provider)
        if hasattr(provider, "__aenter__"):
            provider = await stack.enter_async_context(provider)  # type: ignore[arg-type]
        report = await reconcile(
            barrier,
            provider,
            min_age=args.min_age,
            confirm_after=None if args.no_confirm else args.confirm_after,
            include_stale=args.include_stale,
            response=getattr(provider, "response", None),
            amount_of=getattr(provider, "amount_of", None),
            limit=args.limit,
            concurrency=args.concurrency,
            lookup_timeout=args.lookup_timeout,
            dry_run=args.dry_run,
        )
    _operator.emit(args, to_json(report), "\n".join(format_report(report)))
    return 0 if report.ok else 1


def to_json(report: Reconciliation) -> dict[str, object]:
    """The report as JSON: totals first, then one entry per key."""
    return {
        "dry_run": report.dry_run,
        "resolved": report.resolved,
        "completed": report.count(Verdict.COMPLETED),
        "completed_amount": report.amount(Verdict.COMPLETED),
        "failed": report.count(Verdict.FAILED),
        "escalated": report.escalated,
        "skipped": report.count(Verdict.SKIPPED),
        "in_doubt_amount": report.in_doubt_amount,
        "in_doubt_unknown": report.in_doubt_unknown,
        "stale_leases_left": report.stale_leases_left,
        "limit_reached": report.limit_reached,
        "keys": [
            {
                "scope": k.record.scope,
                "key": k.record.key,
                "downstream_key": k.downstream_key,
                "was": k.record.status.value,
                "verdict": k.verdict.value,
                "reason": k.reason,
                "provider_status": None if k.answer is None else k.answer.status.value,
                "reference": None if k.answer is None else k.answer.reference,
                "amount": k.amount,
            }
            for k in report.keys
        ],
    }


def format_report(report: Reconciliation) -> list[str]:
    """The report as text: a summary, the amount in doubt, and a table of the keys."""
    would = "would resolve" if report.dry_run else "resolved"
    lines = [
        f"{len(report.keys)} keys in doubt: {would} {report.resolved} "
        f"({report.count(Verdict.COMPLETED)} COMPLETED, amount {report.amount(Verdict.COMPLETED)}; "
        f"{report.count(Verdict.FAILED)} FAILED), escalated {report.escalated}, "
        f"skipped {report.count(Verdict.SKIPPED)}" + (" (dry run: nothing written)" if report.dry_run else ""),
        f"amount still in doubt: {report.in_doubt_amount}"
        + (f" (and {report.in_doubt_unknown} escalated keys of unknown amount)" if report.in_doubt_unknown else ""),
    ]
    if report.stale_leases_left:
        lines.append(
            f"{report.stale_leases_left} stale leases left to their retries (--include-stale to reconcile them)"
        )
    if report.limit_reached:
        lines.append("the listing was cut at --limit: there may be more keys in doubt")
    if report.keys:
        header = ("SCOPE", "KEY", "VERDICT", "AMOUNT", "REASON")
        rows = [
            (k.record.scope, k.record.key, k.verdict.value, "-" if k.amount is None else str(k.amount), k.reason)
            for k in report.keys
        ]
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)
        ]
    return lines

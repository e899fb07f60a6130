"""``idembarrier engine-check URL``: which of the barrier's guarantees hold on a database, measured there.

Each check runs the behaviour the barrier relies on against the database itself, on a table of its own
(``idembarrier_engine_check_<random>``, created and dropped; the user needs CREATE), with two connections
where the behaviour is between transactions:

============================ =========================================================================
exact_keys                   'Key-A', 'key-a' and 'Key-A ' are three keys, and a 300-character key is
                             kept whole (never truncated into a false duplicate)
duplicate_waits              a second claim of an uncommitted key waits on its holder, and a bounded
                             wait ends with a lock timeout (never a second row)
savepoint_releases           a claim rolled back to a savepoint frees the key for another transaction
advisory_locks               a transaction-scoped advisory lock excludes a second holder (the relay's
                             per-key order)
listen_notify                a NOTIFY reaches a LISTENing connection (the relay's wake-up; else it polls)
session_state                the connection is its server session (no transaction pooler: prepared
                             statements survive across transactions)
read_committed               transactions run at READ COMMITTED (a waiting claim then sees the winner)
clock_advances               the database clock moves within a transaction (leases and their deadlines)
single_primary               one node takes the writes (on a Galera cluster, measured on two nodes: row
                             locks, GET_LOCK and SKIP LOCKED do not coordinate across nodes)
commit_certifies             on a multi-primary cluster, a duplicate of an uncommitted key on another node
                             (which runs its body) is refused at COMMIT with 1213/40001, a lost race
============================ =========================================================================

A check is *required* when the barrier needs it on that database; others only change how it works (the
relay polls without LISTEN; behind a pooler the engine needs the settings the guide names). Exit status: 0
when every required check holds and the dialect is supported, 1 otherwise, 2 for a bad URL, 3 when the
database cannot be reached.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from sqlalchemy import NullPool, text
from sqlalchemy.engine import make_url

from .._engines import SUPPORTED
from .._errors import lock_not_available
from .._exceptions import ConfigurationError
from .._poolers import SAFE_CONNECT_ARGS, behind_pooler
from ._engine_galera import certified_commits, cluster_of, cross_node_locks

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Finding", "add_parser", "check", "run"]

_Parser = TypeVar("_Parser", bound="argparse.ArgumentParser")
_MYSQL_LOCK_WAIT_TIMEOUT = 1205  # ER_LOCK_WAIT_TIMEOUT, MySQL's and MariaDB's error number
_LONG = "k" * 300


@dataclass(frozen=True)
class Finding:
    """One check: whether it holds (``None``: not applicable here), whether the barrier needs it, and why."""

    name: str
    holds: bool | None
    required: bool
    detail: str


@dataclass(frozen=True)
class _Dialect:
    """What differs between databases for the checks: a few statements."""

    key_type: str
    lock_timeout: str | None  # run in the waiting transaction: bound its lock wait (about 0.3-1 s)
    clock: str  # the clock now, as text, re-read by each statement
    isolation: str | None
    savepoints: bool = True  # a rolled-back savepoint can free a row lock (SQLite locks the whole database)


_DIALECTS = {
    "postgresql": _Dialect(
        key_type="text",
        lock_timeout="SET LOCAL lock_timeout = '300ms'",
        clock="SELECT clock_timestamp()::text",
        isolation="SHOW transaction_isolation",
    ),
    "sqlite": _Dialect(
        key_type="TEXT",
        lock_timeout=None,  # the engine's busy timeout bounds it
        clock="SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')",
        isolation=None,
        savepoints=False,
    ),
    "mysql": _Dialect(
        key_type="VARCHAR(400)",
        lock_timeout="SET SESSION innodb_lock_wait_timeout = 1",
        clock="SELECT CAST(SYSDATE(6) AS CHAR)",
        isolation="SELECT @@tx_isolation",
    ),
}


def add_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Register ``engine-check`` on the command line."""
    command = commands.add_parser("engine-check", help="check which of the barrier's guarantees hold on a database")
    command.add_argument("url", help="SQLAlchemy async URL of the database to check")
    command.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    """Run the checks on ``args.url``, print them, and return the exit status."""
    findings, supported = anyio.run(check, args.url)
    passed = supported and all(f.holds is not False for f in findings if f.required)
    if args.json:
        print(json.dumps({"url": _shown(args.url), "supported": supported, "passed": passed,
                          "checks": [asdict(f) for f in findings]}, indent=2))  # fmt: skip
    else:
        print(f"{_shown(args.url)}: {'supported' if supported else 'not a supported dialect or driver'}")
        for f in findings:
            mark = "n/a" if f.holds is None else "holds" if f.holds else "FAILS" if f.required else "no"
            print(f"  {f.name:<19} {mark:<6}{' (required)' if f.required else '':<12} {f.detail}")
        print("every guarantee the barrier needs holds" if passed else "the barrier cannot keep its guarantees here")
    return 0 if passed else 1


async def check(url: str) -> tuple[list[Finding], bool]:
    """Every check on the database at ``url``, and whether the barrier supports its dialect and driver."""
    from sqlalchemy.ext.asyncio import create_async_engine

    parsed = _parsed(url)
    dialect = _DIALECTS.get(parsed.get_backend_name())
    if dialect is None:
        raise ConfigurationError(f"engine-check knows PostgreSQL, SQLite and MySQL/MariaDB, not {parsed.drivername}")
    options: dict[str, Any] = {"poolclass": NullPool}
    if parsed.get_backend_name() == "sqlite":
        options["connect_args"] = {"timeout": 0.3}  # the busy timeout that bounds a waiting writer
    else:
        options["connect_args"] = dict(SAFE_CONNECT_ARGS.get(parsed.drivername, {}))  # works behind a pooler
    try:
        engine = create_async_engine(parsed, **options)
    except ImportError as exc:
        raise ConfigurationError(f"the {parsed.drivername} driver is not installed ({exc.name})") from exc
    table = f"idembarrier_engine_check_{uuid.uuid4().hex[:12]}"
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"CREATE TABLE {table} (k {dialect.key_type} PRIMARY KEY)"))
        try:
            findings = [await probe(engine, dialect, table) for probe in _PROBES]
        finally:
            async with engine.begin() as conn:
                await conn.execute(text(f"DROP TABLE {table}"))
    finally:
        await engine.dispose()
    return findings, f"{parsed.get_backend_name()}+{parsed.get_driver_name()}" in SUPPORTED


def _parsed(url: str) -> URL:
    try:
        return make_url(url)
    except Exception as exc:  # ArgumentError, ValueError: not a URL
        raise ConfigurationError(f"not a SQLAlchemy database URL: {exc}") from None


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _name(engine: AsyncEngine) -> str:
    return engine.dialect.name


def _timed_out(exc: BaseException) -> bool:
    """A bounded lock wait that ran out: PostgreSQL's 55P03, SQLite's BUSY, MySQL's error 1205."""
    args: tuple[object, ...] = getattr(getattr(exc, "orig", None), "args", ())
    return lock_not_available(exc) or (len(args) > 0 and args[0] == _MYSQL_LOCK_WAIT_TIMEOUT)


async def _insert(conn: AsyncConnection, table: str, key: str) -> None:
    await conn.execute(text(f"INSERT INTO {table} (k) VALUES (:k)"), {"k": key})


async def _exact_keys(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    kept: list[str] = []
    refused: list[str] = []
    for key in ("Key-A", "key-a", "Key-A ", _LONG):
        try:
            async with engine.begin() as conn:
                await _insert(conn, table, key)
            kept.append(key)
        except Exception as exc:
            shown = repr(key) if len(key) < 10 else f"the {len(key)}-character key"
            refused.append(f"{shown} refused ({type(getattr(exc, 'orig', exc)).__name__})")
    async with engine.connect() as conn:
        stored = {str(k) for k in (await conn.execute(text(f"SELECT k FROM {table}"))).scalars()}
    async with engine.begin() as conn:
        await conn.execute(text(f"DELETE FROM {table}"))
    holds = stored == {"Key-A", "key-a", "Key-A ", _LONG}
    detail = "distinct keys stay distinct, long keys whole"
    if not holds:
        detail = f"of 'Key-A', 'key-a', 'Key-A ' and a {len(_LONG)}-character key, {len(stored)} stored"
        detail += "".join(f"; {r}" for r in refused)
    return Finding("exact_keys", holds, True, detail)


async def _duplicate_waits(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    async with engine.connect() as holder, engine.connect() as duplicate:
        await holder.begin()
        await _insert(holder, table, "dup")
        await duplicate.begin()
        if dialect.lock_timeout is not None:
            await duplicate.execute(text(dialect.lock_timeout))
        started = time.monotonic()
        try:
            await _insert(duplicate, table, "dup")
            outcome: BaseException | None = None
        except Exception as exc:
            outcome = exc
        waited = time.monotonic() - started
        await duplicate.rollback()
        await holder.rollback()
    if outcome is None:
        return Finding("duplicate_waits", False, True, "a second transaction inserted the uncommitted key too")
    if _timed_out(outcome):
        return Finding("duplicate_waits", True, True, f"waited {waited:.2f} s on the holder, then a lock timeout")
    return Finding("duplicate_waits", False, True, f"failed without waiting: {type(outcome).__name__}")


async def _savepoint_releases(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    if not dialect.savepoints:
        return Finding("savepoint_releases", None, False, "writers serialize: the database stays locked to the end")
    async with engine.connect() as first, engine.connect() as second:
        await first.begin()
        savepoint = await first.begin_nested()
        await _insert(first, table, "sp")
        await savepoint.rollback()
        await second.begin()
        if dialect.lock_timeout is not None:
            await second.execute(text(dialect.lock_timeout))
        try:
            await _insert(second, table, "sp")
            freed = True
        except Exception as exc:
            if not _timed_out(exc):
                raise
            freed = False
        await second.rollback()
        await first.rollback()
    detail = "the key is free again" if freed else "the rolled-back claim still holds its lock"
    return Finding("savepoint_releases", freed, True, detail)


async def _advisory_locks(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    if _name(engine) == "sqlite":
        return Finding("advisory_locks", None, False, "none; writers serialize, which keeps the relay's order")
    if _name(engine) == "mysql":
        return Finding("advisory_locks", False, True, "GET_LOCK is session-scoped and survives ROLLBACK")
    number = uuid.uuid4().int % (2**62)
    async with engine.connect() as first, engine.connect() as second:
        await first.begin()
        await first.execute(text("SELECT pg_advisory_xact_lock(:n)"), {"n": number})
        await second.begin()
        taken = (await second.execute(text("SELECT pg_try_advisory_xact_lock(:n)"), {"n": number})).scalar_one()
        await second.rollback()
        await first.rollback()
    holds = not taken
    return Finding("advisory_locks", holds, True, "exclusive" if holds else "a second holder got the lock too")


async def _listen_notify(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    if _name(engine) != "postgresql":
        return Finding("listen_notify", None, False, "no LISTEN: the relay polls")
    channel = table
    heard = anyio.Event()
    async with engine.connect() as listener:
        raw: Any = (await listener.get_raw_connection()).driver_connection
        if hasattr(raw, "add_listener"):  # asyncpg
            await raw.add_listener(channel, lambda *_: heard.set())
            wait_for: Callable[[], Awaitable[None]] = heard.wait
        else:  # psycopg: autocommit, LISTEN, then read its notifications
            await raw.set_autocommit(True)
            await raw.execute(f'LISTEN "{channel}"')

            async def wait_for() -> None:
                async for _ in raw.notifies(timeout=2.0, stop_after=1):
                    heard.set()

        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": channel})
        with anyio.move_on_after(2.0):
            await wait_for()
        await listener.invalidate()  # it listens, or is in autocommit: never back into a pool
    if heard.is_set():
        return Finding("listen_notify", True, False, "a NOTIFY arrived: the relay is woken at once")
    return Finding("listen_notify", False, False, "no NOTIFY arrived in 2 s: the relay polls (or give it a listen_url)")


async def _session_state(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    if _name(engine) != "postgresql":
        return Finding("session_state", None, False, "no pooler check for this database")
    async with engine.connect() as conn:
        pooled = await behind_pooler(conn)
    if not pooled:
        return Finding("session_state", True, False, "a direct connection")
    setting = (
        "connect_args={'prepare_threshold': None}"
        if "psycopg" in engine.url.drivername
        else ("connect_args={'statement_cache_size': 0}")
    )
    return Finding("session_state", False, False, f"a transaction pooler: build the engine with {setting}")


async def _read_committed(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    if dialect.isolation is None:
        return Finding("read_committed", None, False, "writers serialize: every transaction sees what committed")
    async with engine.connect() as conn:
        level = str((await conn.execute(text(dialect.isolation))).scalar_one())
    holds = level.replace("-", " ").lower() == "read committed"
    return Finding("read_committed", holds, True, f"transactions run at {level}")


async def _clock_advances(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    async with engine.begin() as conn:
        first = str((await conn.execute(text(dialect.clock))).scalar_one())
        await anyio.sleep(0.01)  # the database clock must move between two statements of one transaction
        second = str((await conn.execute(text(dialect.clock))).scalar_one())
    holds = second > first
    return Finding("clock_advances", holds, True, f"{first} then {second}")


async def _single_primary(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    if _name(engine) != "mysql":
        return Finding("single_primary", None, False, "one primary")
    galera = await cluster_of(engine)
    if galera is None:
        return Finding("single_primary", True, False, "one primary")
    if galera.size <= 1:
        return Finding("single_primary", True, False, f"a Galera node alone in its cluster (size {galera.size})")
    seen = await cross_node_locks(engine, galera, table)
    return Finding(
        "single_primary",
        False,
        False,
        f"Galera, {galera.size} nodes: row locks, GET_LOCK and SKIP LOCKED hold on one node only ({seen}); "
        "a duplicate on another node runs its body and loses at COMMIT; leases and the relay need one writer node",
    )


async def _commit_certifies(engine: AsyncEngine, dialect: _Dialect, table: str) -> Finding:
    galera = await cluster_of(engine) if _name(engine) == "mysql" else None
    if galera is None or galera.size <= 1:
        return Finding("commit_certifies", None, False, "one primary: a duplicate waits on the holder's row lock")
    holds, detail = await certified_commits(engine, galera, table)
    return Finding("commit_certifies", holds, True, detail)


_PROBES = (
    _exact_keys,
    _duplicate_waits,
    _savepoint_releases,
    _advisory_locks,
    _listen_notify,
    _session_state,
    _read_committed,
    _clock_advances,
    _single_primary,
    _commit_certifies,
)

"""The dialect seam: every statement on idembarrier's tables, each one atomic, behind one small protocol.

A `Storage` is bound to one connection (a unit of work's, or a transaction of idembarrier's own). `open_storage`
picks the implementation from the connection's dialect in `DIALECTS`: adding a dialect means adding one module
that defines its `Dialect`, and one entry there. Nothing outside the dialect modules knows which database it
talks to.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module
from typing import TYPE_CHECKING, NamedTuple, Protocol

import anyio

from ._engines import check_url
from ._outbox import notify_channel
from ._record import Record
from ._schema import failures_name, outbox_name

if TYPE_CHECKING:
    import uuid
    from collections.abc import Awaitable, Callable, Mapping, Sequence
    from datetime import timedelta

    from anyio.abc import TaskStatus
    from sqlalchemy.engine import URL
    from sqlalchemy.engine import Dialect as SQLAlchemyDialect
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.pool import PoolProxiedConnection

    from ._config import Retention
    from ._outbox import Message, Parked
    from ._record import Status

__all__ = [
    "DIALECTS",
    "Claim",
    "Claimed",
    "Dialect",
    "Existing",
    "Listen",
    "Names",
    "Raced",
    "Storage",
    "TableName",
    "check_connection",
    "listen",
    "open_storage",
    "pool_connection",
]


@dataclass(frozen=True, slots=True)
class TableName:
    """Where the records table lives."""

    name: str
    schema: str | None = None


@dataclass(frozen=True, slots=True)
class Names:
    """The quoted names of the tables of one records table, as its dialect's statements spell them."""

    records: str
    outbox: str
    failures: str
    channel: str
    """The notification channel of the outbox (PostgreSQL): its unquoted, schema-qualified name."""


# -- what a claim found --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """The claim inserted the record: the key is this caller's."""


@dataclass(frozen=True, slots=True)
class Existing:
    """The claim met a record, which the same statement could read."""

    record: Record


@dataclass(frozen=True, slots=True)
class Raced:
    """The claim inserted nothing and could not see the record in its way: look it up."""


Claim = Claimed | Existing | Raced
"""What a claim statement found."""


class Storage(Protocol):
    """The atomic operations on idembarrier's tables, bound to one connection."""

    lookup_first: bool
    """Whether a unit of work looks the key up before it opens its transaction to claim it."""

    connection: AsyncConnection
    """The connection this storage is bound to."""

    async def lookup(self, scope: str, key: str) -> Record | None:
        """Read the record of (scope, key) in one statement."""
        ...

    async def begin(self, wait: float | None) -> None:
        """Make sure the connection's transaction is open, in the form the engine needs for a claim.

        Where opening it waits for a lock (SQLite's write lock), the wait is bounded by ``wait`` seconds
        (``None``: fail at once); past that the driver raises an error that `lock_not_available` knows.
        """
        ...

    def in_transaction(self) -> bool:
        """Whether the connection is inside a transaction (the unit of work's, or the caller's)."""
        ...

    async def claim(
        self,
        scope: str,
        key: str,
        fingerprint: bytes | None,
        token: uuid.UUID,
        wait: float | None,
        *,
        fingerprint_version: int | None = None,
        retention: Retention | None = None,
    ) -> Claim:
        """Insert an IN_PROGRESS record unless one exists, with the fingerprint and the version that made it.

        ``retention`` is what the completion will record, when known: PostgreSQL sets the record's cleanup
        horizon from it at the claim, so that the completion changes no indexed column (a HOT update).

        Returns `Claimed` when this call inserted it, else `Existing` where the statement could read the
        record at no extra cost, else `Raced` (look it up).

        Waits at most ``wait`` seconds (``None``: fail at once) for a concurrent, uncommitted claim of
        the same key; past that it raises an error that `lock_not_available` knows.
        """
        ...

    async def finish(
        self, scope: str, key: str, token: uuid.UUID, status: Status, response: bytes, retention: Retention
    ) -> bool:
        """Record the outcome and its two horizons, conditioned on ``token``; return whether it was ours."""
        ...

    async def retake(self, scope: str, key: str, token: uuid.UUID, wait: float | None) -> bool:
        """In the open transaction: make a compact record (response dropped) IN_PROGRESS under ``token``.

        Returns whether it was still compact (a concurrent late request may have taken it first).
        """
        ...

    # -- leased work: each statement is its own transaction unless said otherwise ----------------------

    async def lease_claim(
        self,
        scope: str,
        key: str,
        fingerprint: bytes | None,
        token: uuid.UUID,
        lease: timedelta,
        wait: float,
        *,
        fingerprint_version: int | None = None,
    ) -> Claim:
        """Insert an IN_PROGRESS record whose lease ends ``lease`` from now (database clock).

        Waits at most ``wait`` seconds for a row another transaction has locked (a holder finishing).
        Returns `Claimed`, else `Existing` (its ``stale`` read by the database's clock) when visible, else
        `Raced`.
        """
        ...

    async def inspect(self, scope: str, key: str) -> Record | None:
        """Read the record of (scope, key) with its lease, its checkpoint and its ``stale``."""
        ...

    async def reclaim(
        self, scope: str, key: str, stale: uuid.UUID, token: uuid.UUID, lease: timedelta, max_reclaims: int
    ) -> Record | None:
        """Take over the stale lease held by token ``stale``, or turn it UNKNOWN past ``max_reclaims``.

        Returns the record as updated, or ``None`` when the lease was not stale or not ``stale``'s anymore.
        """
        ...

    async def renew(self, scope: str, key: str, token: uuid.UUID, lease: timedelta) -> bool:
        """Extend the lease ``token`` holds to ``lease`` from now; return whether it still held it."""
        ...

    async def checkpoint(self, scope: str, key: str, token: uuid.UUID, name: str, data: bytes) -> bool:
        """Record progress under the lease ``token`` holds; return whether it still held it."""
        ...

    async def fence(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """In the open transaction: lock the record if ``token`` still holds it; return whether it does."""
        ...

    async def release(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Delete the IN_PROGRESS record ``token`` holds; return whether it still held it."""
        ...

    async def unresolved(self, limit: int) -> list[tuple[Record, timedelta]]:
        """UNKNOWN records and stale leases, oldest first, each with its age (database clock)."""
        ...

    async def resolve(self, scope: str, key: str, status: Status, response: bytes, retention: Retention) -> bool:
        """Finish an UNKNOWN record or a stale lease with an operator's outcome; return whether it matched."""
        ...

    async def records(
        self,
        statuses: Sequence[Status] | None,
        scope: str | None,
        older_than: timedelta | None,
        newer_than: timedelta | None,
        limit: int,
    ) -> list[Record]:
        """Up to ``limit`` records, newest first, with their horizons, lease and ``stale``.

        Only those in ``statuses`` and ``scope`` (``None``: any), created at least ``older_than`` and less
        than ``newer_than`` ago (``None``: no bound), by the database's clock.
        """
        ...

    # -- operations --------------------------------------------------------------------------------------

    async def distribution(self) -> tuple[dict[Status, int], timedelta | None]:
        """Records per status, and the age of the oldest IN_PROGRESS one (database clock), in one query."""
        ...

    async def compact(self, limit: int) -> int:
        """Drop up to ``limit`` responses past ``response_expires_at``, skipping locked rows; return how many."""
        ...

    async def purge(self, limit: int) -> int:
        """Delete up to ``limit`` finished records past ``expires_at``, skipping locked ones; return how many."""
        ...

    async def purgeable(self) -> tuple[int, int]:
        """What `compact` and `purge` would take now, locked rows included: (responses, records), in one query."""
        ...

    # -- the outbox ----------------------------------------------------------------------------------------

    async def write_outbox(self, rows: Sequence[Mapping[str, object]]) -> None:
        """In the open transaction: insert the messages ``rows`` (the outbox's columns by name).

        Where relays can be woken (PostgreSQL), the commit also notifies the outbox's channel.
        """
        ...

    async def claim_outbox(self, limit: int) -> list[Message]:
        """In the open transaction: hold the next ``limit`` pending messages, oldest first, none behind a parked one."""
        ...

    async def mark_sent(self, ids: Sequence[int]) -> None:
        """In the open transaction: mark the held messages ``ids`` sent."""
        ...

    async def refuse(self, id: int, error: str, max_attempts: int) -> tuple[int, bool]:
        """Count a refusal of the held message ``id``, parking it at ``max_attempts``; return (attempts, parked)."""
        ...

    async def parked(self, limit: int) -> list[Parked]:
        """The parked messages, oldest first."""
        ...

    async def release_parked(self, message_id: str) -> bool:
        """Unpark a message, its refusals back to 0; return whether it was parked."""
        ...

    async def drop_parked(self, message_id: str) -> bool:
        """Delete a parked message; return whether it was parked."""
        ...

    async def outbox_counts(self) -> tuple[int, int]:
        """How many messages are pending (parked included), and how many of them are parked."""
        ...

    async def purge_sent(self, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` messages marked sent more than ``older_than`` ago; return how many."""
        ...

    # -- the consumer's failures ---------------------------------------------------------------------------

    async def count_failure(self, scope: str, key: str, error: str) -> int:
        """Count one more handler failure of (scope, key), with ``error``; return the count so far."""
        ...

    async def forget_failure(self, scope: str, key: str) -> None:
        """In the open transaction: drop the failure count of (scope, key)."""
        ...


class Listen(Protocol):
    """Call ``wake`` for every notification on ``channel`` until cancelled (see `idembarrier._listen`)."""

    async def __call__(
        self,
        engine: AsyncEngine,
        listen_url: str | None,
        channel: str,
        wake: Callable[[], object],
        *,
        task_status: TaskStatus[None] = ...,
    ) -> None: ...


class Dialect(NamedTuple):
    """What one dialect module registers: how to open its storage, and how to listen (if it can)."""

    open: Callable[[AsyncConnection, Names], Awaitable[Storage]]
    listen: Listen | None = None
    """Where the database can notify (PostgreSQL), the relay's way to be woken; else the relay polls."""
    check: Callable[[AsyncConnection], Awaitable[None]] | None = None
    """Run once per barrier on its first connection: raises `ConfigurationError` where the engine cannot keep
    the barrier's guarantees (PostgreSQL behind a transaction pooler, see `idembarrier._poolers`)."""


DIALECTS: Mapping[str, str] = {
    "postgresql+asyncpg": "._postgres",
    "postgresql+psycopg": "._psycopg",
    "sqlite+aiosqlite": "._sqlite",
    "mysql+asyncmy": "._mysql",
    "mysql+aiomysql": "._mysql",
    "mariadb+asyncmy": "._mysql",
    "mariadb+aiomysql": "._mysql",
}
"""SQLAlchemy's dialect+driver → the module that defines its `Dialect` as ``DIALECT``, imported on first use."""


def _dialect(dialect: SQLAlchemyDialect) -> Dialect:
    """The `Dialect` registered for SQLAlchemy's ``dialect`` and its driver."""
    entry: Dialect = import_module(DIALECTS[_pair(dialect)], __package__).DIALECT
    return entry


def _pair(dialect: SQLAlchemyDialect) -> str:
    """The key of ``dialect`` in `DIALECTS`: PostgreSQL's two drivers are two entries."""
    return f"{dialect.name}+{dialect.driver}"


async def pool_connection(conn: AsyncConnection) -> PoolProxiedConnection:
    """The pool's connection under ``conn``, without the greenlet hop of ``get_raw_connection()``.

    ``conn`` was just opened by the session, so reading it needs no I/O; only an invalidated connection,
    which must reconnect, goes through SQLAlchemy's async path.
    """
    sync = conn.sync_connection
    if sync is None or sync.invalidated:
        return await conn.get_raw_connection()
    return sync.connection


async def open_storage(conn: AsyncConnection, table: TableName) -> Storage:
    """Return the storage for ``conn``'s database.

    Raises:
        ConfigurationError: The engine is one the barrier's guarantees do not hold on (see `check_url`).
    """
    dialect, names = _resolve(conn.dialect, conn.engine.url, table)
    return await dialect.open(conn, names)


async def check_connection(conn: AsyncConnection) -> None:
    """Run the dialect's check of ``conn`` (`Dialect.check`), where it has one.

    Raises:
        ConfigurationError: The engine is one the barrier's guarantees do not hold on (see `check_url`).
    """
    check_url(conn.engine.url)
    if (check := _dialect(conn.dialect).check) is not None:
        await check(conn)


async def listen(
    engine: AsyncEngine | None,
    listen_url: str | None,
    channel: str,
    wake: Callable[[], object],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``wake`` for every notification on ``channel``, where ``engine``'s database can notify.

    Elsewhere (no engine, or a dialect without `Dialect.listen`) it reports started and returns at once.
    """
    if engine is None or _pair(engine.dialect) not in DIALECTS or (entry := _dialect(engine.dialect).listen) is None:
        task_status.started()
        return
    await entry(engine, listen_url, channel, wake, task_status=task_status)


@lru_cache(maxsize=64)
def _resolve(dialect: SQLAlchemyDialect, url: URL, table: TableName) -> tuple[Dialect, Names]:
    """The `Dialect` for ``dialect`` and the table names it quotes: worked out once per engine."""
    check_url(url)
    quote = dialect.identifier_preparer.quote

    def qualified(name: str) -> str:
        return f"{quote(table.schema)}.{quote(name)}" if table.schema else quote(name)

    names = Names(
        records=qualified(table.name),
        outbox=qualified(outbox_name(table.name)),
        failures=qualified(failures_name(table.name)),
        channel=notify_channel(table),
    )
    return _dialect(dialect), names

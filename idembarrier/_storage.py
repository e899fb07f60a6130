"""The dialect seam: the few atomic operations a unit of work needs, each one SQL statement.

A `Storage` is bound to the connection of one unit of work. `open_storage` picks the implementation from
the connection's dialect; nothing outside this seam knows which database it talks to.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ._engines import check_url

if TYPE_CHECKING:
    import uuid
    from datetime import timedelta

    from sqlalchemy.engine import URL, Dialect
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.pool import PoolProxiedConnection

    from ._config import Retention
    from ._postgres import PostgresStorage
    from ._record import Record, Status
    from ._sqlite import SqliteStorage

__all__ = ["Found", "Storage", "TableName", "open_storage", "pool_connection"]


@dataclass(frozen=True, slots=True)
class TableName:
    """Where the records table lives."""

    name: str
    schema: str | None = None


class Found(NamedTuple):
    """An existing record, and whether its lease (if IN_PROGRESS) is stale by the database's clock."""

    record: Record
    stale: bool


class Storage(Protocol):
    """The atomic operations on the records table, bound to one connection."""

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
        self, scope: str, key: str, fingerprint: bytes | None, token: uuid.UUID, wait: float | None
    ) -> bool | Record:
        """Insert an IN_PROGRESS record unless one exists.

        Returns ``True`` when this call inserted it, else the existing record where the statement could
        read it at no extra cost, else ``False`` (look it up).

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
        self, scope: str, key: str, fingerprint: bytes | None, token: uuid.UUID, lease: timedelta, wait: float
    ) -> bool | Found:
        """Insert an IN_PROGRESS record whose lease ends ``lease`` from now (database clock).

        Waits at most ``wait`` seconds for a row another transaction has locked (a holder finishing).
        Returns ``True`` when inserted, else the existing record when visible, else ``False``.
        """
        ...

    async def inspect(self, scope: str, key: str) -> Found | None:
        """Read the record of (scope, key) with its lease and checkpoint."""
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
    kind, qualified = _resolve(conn.dialect, conn.engine.url, table)
    return await kind.open(conn, qualified)


@lru_cache(maxsize=64)
def _resolve(dialect: Dialect, url: URL, table: TableName) -> tuple[type[PostgresStorage | SqliteStorage], str]:
    """The storage class for ``dialect`` and the table's quoted name: worked out once per engine."""
    check_url(url)
    quote = dialect.identifier_preparer.quote
    qualified = f"{quote(table.schema)}.{quote(table.name)}" if table.schema else quote(table.name)
    if dialect.name == "postgresql":
        from ._postgres import PostgresStorage

        return PostgresStorage, qualified
    from ._sqlite import SqliteStorage

    return SqliteStorage, qualified

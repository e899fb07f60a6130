"""SQLite through aiosqlite: the records table's atomic statements for the embedded engine.

SQLite has one writer at a time. A unit of work takes the write lock when its transaction begins
(``BEGIN IMMEDIATE``), so claims never race: a concurrent duplicate waits for the lock (up to the
connection's busy timeout), then finds the winner's committed record.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

from ._record import Record, Status
from ._storage import pool_connection

if TYPE_CHECKING:
    from datetime import timedelta

    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["SqliteStorage"]

_COLUMNS = "scope, key, status, fingerprint, response, token, attempt, created_at, completed_at, expires_at"


def _timestamp(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


class SqliteStorage:
    """`Storage` for sqlite+aiosqlite."""

    lookup_first = True
    """Replays read the record before the transaction takes the database-wide write lock."""

    def __init__(self, conn: AsyncConnection, driver: Any, table: str) -> None:
        self._conn = conn
        self._driver = driver  # the aiosqlite.Connection under `conn`
        self._lookup = f"SELECT {_COLUMNS} FROM {table} WHERE scope = ? AND key = ?"
        # Runs under BEGIN IMMEDIATE, i.e. holding the database's write lock: no other claim can interleave.
        self._claim = f"""
            INSERT INTO {table} (scope, key, fingerprint, status, token)
            VALUES (?, ?, ?, 'IN_PROGRESS', ?)
            ON CONFLICT (scope, key) DO NOTHING
            RETURNING token"""
        # Fenced completion, under the same write lock as the claim.
        self._finish = f"""
            UPDATE {table}
            SET status = ?, response = ?, completed_at = CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP,
                expires_at = datetime('now', ?), locked_until = NULL
            WHERE scope = ? AND key = ? AND token = ?
            RETURNING 1"""

    @classmethod
    async def open(cls, conn: AsyncConnection, table: str) -> Self:
        """Bind to ``conn`` and the aiosqlite connection under it."""
        return cls(conn, (await pool_connection(conn)).driver_connection, table)

    async def lookup(self, scope: str, key: str) -> Record | None:
        """Read the record of (scope, key); see `Storage.lookup`."""
        row: Any = (await self._conn.exec_driver_sql(self._lookup, (scope, key))).first()
        if row is None:
            return None
        return Record(
            scope=row[0],
            key=row[1],
            status=Status(row[2]),
            fingerprint=row[3],
            response=row[4],
            token=uuid.UUID(row[5]),
            attempt=row[6],
            created_at=_timestamp(row[7]),
            completed_at=_timestamp(row[8]),
            expires_at=_timestamp(row[9]),
        )

    async def begin(self, wait: float | None) -> None:
        """Open the transaction with the write lock held, unless one is open already.

        BEGIN IMMEDIATE waits for the write lock up to the connection's busy timeout: for this statement
        the timeout is the unit of work's own wait (1 ms to fail fast), then the connection gets its own back.
        """
        if self._driver.in_transaction:
            return
        busy_timeout = (await self._conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
        await self._conn.exec_driver_sql(f"PRAGMA busy_timeout = {max(1, round((wait or 0) * 1000))}")
        try:
            await self._conn.exec_driver_sql("BEGIN IMMEDIATE")
        finally:
            await self._conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(busy_timeout)}")

    async def claim(
        self, scope: str, key: str, fingerprint: bytes | None, token: uuid.UUID, wait: float | None
    ) -> bool:
        """Insert the IN_PROGRESS record; see `Storage.claim` (the write lock makes the wait moot)."""
        result = await self._conn.exec_driver_sql(self._claim, (scope, key, fingerprint, token.hex))
        return result.first() is not None

    async def finish(
        self, scope: str, key: str, token: uuid.UUID, status: Status, response: bytes, retention: timedelta
    ) -> bool:
        """Record the outcome; see `Storage.finish`."""
        modifier = f"+{retention.total_seconds()} seconds"
        result = await self._conn.exec_driver_sql(
            self._finish, (status.value, response, modifier, scope, key, token.hex)
        )
        return result.first() is not None

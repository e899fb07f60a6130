"""SQLite through aiosqlite: the records table's atomic statements for the embedded engine.

SQLite has one writer at a time. A unit of work takes the write lock when its transaction begins
(``BEGIN IMMEDIATE``), so claims never race: a concurrent duplicate waits for the lock (up to the
connection's busy timeout), then finds the winner's committed record.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Self

import anyio

from ._record import Record, Status
from ._storage import Found, pool_connection

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._config import Retention

__all__ = ["SqliteStorage"]

_COLUMNS = "scope, key, status, fingerprint, response, token, attempt, created_at, completed_at, expires_at"
# Lease ends are written and compared in one text format with milliseconds, so text order is time order.
_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
_LATER = "strftime('%Y-%m-%d %H:%M:%f', 'now', ?)"
_STALE = f"coalesce(locked_until, '') <= {_NOW}"  # no end at all counts as stale, as on PostgreSQL
_LEASE_COLUMNS = f"{_COLUMNS}, locked_until, checkpoint_name, checkpoint_data, {_STALE}"


def _timestamp(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _record(row: Any) -> Record:
    """The record in ``row``'s `_COLUMNS` (and the lease's, if present)."""
    leased = len(row) >= 13
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
        locked_until=_timestamp(row[10]) if leased else None,
        checkpoint=row[11] if leased else None,
        checkpoint_data=row[12] if leased else None,
    )


_HELD = "scope = ? AND key = ? AND token = ? AND status = 'IN_PROGRESS'"


def _later(delta: timedelta) -> str:
    """The SQLite date modifier for ``delta`` from now."""
    return f"+{delta.total_seconds()} seconds"


class SqliteStorage:
    """`Storage` for sqlite+aiosqlite."""

    lookup_first = True
    """Replays read the record before the transaction takes the database-wide write lock."""

    def __init__(self, conn: AsyncConnection, driver: Any, table: str) -> None:
        self._table = table
        self.connection = self._conn = conn
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
                response_expires_at = datetime('now', ?), expires_at = datetime('now', ?), locked_until = NULL
            WHERE scope = ? AND key = ? AND token = ?
            RETURNING 1"""

    @classmethod
    async def open(cls, conn: AsyncConnection, table: str) -> Self:
        """Bind to ``conn`` and the aiosqlite connection under it."""
        return cls(conn, (await pool_connection(conn)).driver_connection, table)

    async def lookup(self, scope: str, key: str) -> Record | None:
        """Read the record of (scope, key); see `Storage.lookup`."""
        row: Any = (await self._conn.exec_driver_sql(self._lookup, (scope, key))).first()
        return None if row is None else _record(row)

    async def begin(self, wait: float | None) -> None:
        """Open the transaction with the write lock held, unless one is open already.

        BEGIN IMMEDIATE waits for the write lock up to the connection's busy timeout: for this statement
        the timeout is the unit of work's own wait (1 ms to fail fast), then the connection gets its own back.
        """
        if self._driver.in_transaction:
            return
        busy_timeout = (await self._conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
        await self._conn.exec_driver_sql(f"PRAGMA busy_timeout = {max(1, round((wait or 0) * 1000))}")
        restore = f"PRAGMA busy_timeout = {int(busy_timeout)}"
        try:
            await self._conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException as exc:
            # Straight on the driver and shielded: after a failed or cancelled BEGIN, SQLAlchemy's side of
            # the connection refuses statements (or has closed the connection), and the BEGIN's own error
            # or cancellation must be what propagates.
            with anyio.CancelScope(shield=True):
                try:
                    await self._driver.execute(restore)
                except Exception as cleanup:
                    exc.add_note(f"idembarrier: the connection's busy timeout was not restored: {cleanup!r}")
            raise
        await self._conn.exec_driver_sql(restore)

    def in_transaction(self) -> bool:
        """Whether the connection is inside a transaction; see `Storage.in_transaction`."""
        return bool(self._driver.in_transaction)

    async def claim(
        self, scope: str, key: str, fingerprint: bytes | None, token: uuid.UUID, wait: float | None
    ) -> bool:
        """Insert the IN_PROGRESS record; see `Storage.claim` (the write lock makes the wait moot)."""
        result = await self._conn.exec_driver_sql(self._claim, (scope, key, fingerprint, token.hex))
        return result.first() is not None

    async def finish(
        self, scope: str, key: str, token: uuid.UUID, status: Status, response: bytes, retention: Retention
    ) -> bool:
        """Record the outcome; see `Storage.finish`."""
        return await self._one(
            self._finish,
            status.value,
            response,
            _later(retention.response),
            _later(retention.record),
            scope,
            key,
            token.hex,
        )

    async def retake(self, scope: str, key: str, token: uuid.UUID, wait: float | None) -> bool:
        """Take a compact record over for a late request (under the write lock); see `Storage.retake`."""
        sql = f"""UPDATE {self._table}
                  SET status = 'IN_PROGRESS', token = ?, attempt = attempt + 1, updated_at = CURRENT_TIMESTAMP,
                      completed_at = NULL, response_expires_at = NULL, expires_at = NULL,
                checkpoint_name = NULL, checkpoint_data = NULL
                  WHERE scope = ? AND key = ? AND status IN ('COMPLETED', 'FAILED') AND response IS NULL
                  RETURNING 1"""
        return await self._one(sql, token.hex, scope, key)

    # -- leased work ------------------------------------------------------------------------------------
    # Each statement takes the write lock, so none interleaves with another; the caller commits it.

    async def lease_claim(
        self, scope: str, key: str, fingerprint: bytes | None, token: uuid.UUID, lease: timedelta, wait: float
    ) -> bool | Found:
        """Claim the key with a lease; see `Storage.lease_claim` (`begin` bounded the write lock's wait)."""
        inserted = await self._conn.exec_driver_sql(
            f"""INSERT INTO {self._table} (scope, key, fingerprint, status, token, locked_until)
                VALUES (?, ?, ?, 'IN_PROGRESS', ?, {_LATER})
                ON CONFLICT (scope, key) DO NOTHING RETURNING 1""",
            (scope, key, fingerprint, token.hex, _later(lease)),
        )
        if inserted.first() is not None:
            return True
        return await self.inspect(scope, key) or False

    async def inspect(self, scope: str, key: str) -> Found | None:
        """Read the record with its lease; see `Storage.inspect`."""
        sql = f"SELECT {_LEASE_COLUMNS} FROM {self._table} WHERE scope = ? AND key = ?"
        row: Any = (await self._conn.exec_driver_sql(sql, (scope, key))).first()
        return None if row is None else Found(_record(row), bool(row[13]))

    async def reclaim(
        self, scope: str, key: str, stale: uuid.UUID, token: uuid.UUID, lease: timedelta, max_reclaims: int
    ) -> Record | None:
        """Take over a stale lease (the same conditions as PostgreSQL's); see `Storage.reclaim`."""
        row: Any = (
            await self._conn.exec_driver_sql(
                f"""UPDATE {self._table}
                    SET token = ?, updated_at = CURRENT_TIMESTAMP,
                        attempt = CASE WHEN attempt > ? THEN attempt ELSE attempt + 1 END,
                        status = CASE WHEN attempt > ? THEN 'UNKNOWN' ELSE 'IN_PROGRESS' END,
                        locked_until = CASE WHEN attempt > ? THEN NULL ELSE {_LATER} END
                    WHERE {_HELD} AND {_STALE}
                    RETURNING {_LEASE_COLUMNS}""",
                (token.hex, max_reclaims, max_reclaims, max_reclaims, _later(lease), scope, key, stale.hex),
            )
        ).first()
        return None if row is None else _record(row)

    async def renew(self, scope: str, key: str, token: uuid.UUID, lease: timedelta) -> bool:
        """Extend a held lease; see `Storage.renew`."""
        sql = f"UPDATE {self._table} SET locked_until = {_LATER}, updated_at = CURRENT_TIMESTAMP WHERE {_HELD}"
        return await self._one(f"{sql} RETURNING 1", _later(lease), scope, key, token.hex)

    async def checkpoint(self, scope: str, key: str, token: uuid.UUID, name: str, data: bytes) -> bool:
        """Record a held lease's progress; see `Storage.checkpoint`."""
        sql = f"""UPDATE {self._table} SET checkpoint_name = ?, checkpoint_data = ?, updated_at = CURRENT_TIMESTAMP
                  WHERE {_HELD} RETURNING 1"""
        return await self._one(sql, name, data, scope, key, token.hex)

    async def fence(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Check ``token`` still holds the record; the write lock of BEGIN IMMEDIATE keeps it so."""
        return await self._one(f"SELECT 1 FROM {self._table} WHERE {_HELD}", scope, key, token.hex)

    async def release(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Delete a held lease; see `Storage.release`."""
        return await self._one(f"DELETE FROM {self._table} WHERE {_HELD} RETURNING 1", scope, key, token.hex)

    async def unresolved(self, limit: int) -> list[tuple[Record, timedelta]]:
        """List records that need a person; see `Storage.unresolved`."""
        sql = f"""SELECT {_LEASE_COLUMNS}, (julianday('now') - julianday(created_at)) * 86400 FROM {self._table}
                  WHERE status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE})
                  ORDER BY created_at LIMIT ?"""
        rows: list[Any] = list(await self._conn.exec_driver_sql(sql, (limit,)))
        return [(_record(row), timedelta(seconds=row[14])) for row in rows]

    async def resolve(self, scope: str, key: str, status: Status, response: bytes, retention: Retention) -> bool:
        """Record an operator's outcome; see `Storage.resolve`."""
        sql = f"""UPDATE {self._table}
                  SET status = ?, response = ?, completed_at = CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP,
                      response_expires_at = datetime('now', ?), expires_at = datetime('now', ?),
                      locked_until = NULL
                  WHERE scope = ? AND key = ?
                    AND (status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE}))
                  RETURNING 1"""
        return await self._one(
            sql, status.value, response, _later(retention.response), _later(retention.record), scope, key
        )

    async def _one(self, sql: str, *args: object) -> bool:
        """Run a statement that returns a row when it matched its record."""
        return (await self._conn.exec_driver_sql(sql, args)).first() is not None

    # -- operations -------------------------------------------------------------------------------------

    async def distribution(self) -> tuple[dict[Status, int], timedelta | None]:
        """Records per status and the oldest IN_PROGRESS age; see `Storage.distribution`."""
        sql = f"""SELECT status, count(*),
                         (julianday('now') - julianday(min(created_at))) * 86400
                  FROM {self._table} GROUP BY status"""
        rows: list[Any] = list(await self._conn.exec_driver_sql(sql))
        statuses = {Status(row[0]): row[1] for row in rows}
        oldest = [timedelta(seconds=row[2]) for row in rows if row[0] == Status.IN_PROGRESS]
        return statuses, (oldest[0] if oldest else None)

    async def compact(self, limit: int) -> int:
        """Drop responses past retention (under the write lock); see `Storage.compact`."""
        sql = f"""UPDATE {self._table} SET response = NULL, updated_at = CURRENT_TIMESTAMP WHERE rowid IN (
                      SELECT rowid FROM {self._table}
                      WHERE status IN ('COMPLETED', 'FAILED') AND response IS NOT NULL
                        AND response_expires_at <= datetime('now')
                      ORDER BY response_expires_at LIMIT ?)"""
        return (await self._conn.exec_driver_sql(sql, (limit,))).rowcount

    async def purge(self, limit: int) -> int:
        """Delete expired finished records (under the write lock, so nothing is locked to skip)."""
        sql = f"""DELETE FROM {self._table} WHERE rowid IN (
                      SELECT rowid FROM {self._table}
                      WHERE status IN ('COMPLETED', 'FAILED') AND expires_at <= datetime('now')
                      ORDER BY expires_at LIMIT ?)"""
        return (await self._conn.exec_driver_sql(sql, (limit,))).rowcount

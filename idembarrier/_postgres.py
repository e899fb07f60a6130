"""PostgreSQL through asyncpg: the records table's atomic statements.

The statements run on the unit of work's own connection, in its transaction, but go straight to the
asyncpg connection under SQLAlchemy's: that skips SQLAlchemy's per-statement overhead, about 100 µs of
client CPU each, which is most of what the barrier costs (see benchmarks/). SQLAlchemy still opens,
commits and rolls back the transaction, so the session's bookkeeping and the pool's reset stay exact.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from ._record import Record, Status
from ._storage import pool_connection

if TYPE_CHECKING:
    import uuid
    from datetime import timedelta

    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["PostgresStorage"]

_COLUMNS = "scope, key, status, fingerprint, response, token, attempt, created_at, completed_at, expires_at"


def _record(row: Any, at: int = 0) -> Record:
    """The record in ``row``'s columns from ``at`` on (in ``_COLUMNS`` order)."""
    return Record(
        scope=row[at],
        key=row[at + 1],
        status=Status(row[at + 2]),
        fingerprint=row[at + 3],
        response=row[at + 4],
        token=row[at + 5],
        attempt=row[at + 6],
        created_at=row[at + 7],
        completed_at=row[at + 8],
        expires_at=row[at + 9],
    )


class _Statements(NamedTuple):
    lookup: str
    claim: str
    claim_nowait: str
    finish: str


@cache
def _statements(table: str) -> _Statements:
    """The statements on ``table``, built once per table."""
    return _Statements(
        # Read committed: each statement sees what committed before it started, so this sees a record
        # committed while our claim waited for it.
        lookup=f"SELECT {_COLUMNS} FROM {table} WHERE scope = $1 AND key = $2",
        # The atomic claim. ON CONFLICT DO NOTHING takes the key or does nothing, with no window between
        # check and insert: if another transaction inserted the key and has not committed, this INSERT
        # waits for it, then inserts (it rolled back) or does nothing (it committed). The wait is bounded
        # by the driver's statement timeout, which cancels the statement. When nothing was inserted, the
        # second branch returns the existing record, if this statement's snapshot, taken before any wait,
        # can see it: a replay costs one statement; a record committed during the wait needs a lookup.
        claim=f"""
            WITH claimed AS (
                INSERT INTO {table} (scope, key, fingerprint, status, token)
                VALUES ($1, $2, $3, 'IN_PROGRESS', $4)
                ON CONFLICT (scope, key) DO NOTHING
                RETURNING token
            )
            SELECT true, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM claimed
            UNION ALL
            SELECT false, {_COLUMNS} FROM {table}
            WHERE scope = $1 AND key = $2 AND NOT EXISTS (SELECT FROM claimed)""",
        # The same claim, failing fast: its wait is bounded by a 1 ms lock_timeout (PostgreSQL's smallest)
        # instead, set for this statement only: `applied` runs before the insert that reads it, and the
        # outer SELECT restores the caller's value after `claimed` has produced its row, so the body's own
        # statements keep the caller's lock_timeout. A timeout raises 55P03 and aborts the statement.
        claim_nowait=f"""
            WITH saved AS MATERIALIZED (
                SELECT current_setting('lock_timeout') AS lock_timeout
            ), applied AS MATERIALIZED (
                SELECT set_config('lock_timeout', '1ms', true) AS lock_timeout FROM saved
            ), claimed AS (
                INSERT INTO {table} (scope, key, fingerprint, status, token)
                SELECT $1, $2, $3::bytea, 'IN_PROGRESS', $4::uuid FROM applied
                ON CONFLICT (scope, key) DO NOTHING
                RETURNING token
            )
            SELECT claimed.token, set_config('lock_timeout', saved.lock_timeout, true)
            FROM saved LEFT JOIN claimed ON true""",
        # Fenced completion: only the holder of `token` may record the outcome. In a unit of work the row
        # was inserted by this same transaction, so no one else can hold it; for leases the token decides.
        finish=f"""
            UPDATE {table}
            SET status = $4, response = $5, completed_at = now(), updated_at = now(),
                expires_at = now() + $6::interval, locked_until = NULL
            WHERE scope = $1 AND key = $2 AND token = $3
            RETURNING 1""",
    )


class PostgresStorage:
    """`Storage` for postgresql+asyncpg."""

    lookup_first = False
    """A claim that meets a finished record costs about what a lookup costs: no separate lookup first."""

    def __init__(self, conn: AsyncConnection, adapted: Any, table: str) -> None:
        self._conn = conn
        self._adapted = adapted  # SQLAlchemy's adapter around the asyncpg connection
        self._driver = adapted.driver_connection  # the asyncpg.Connection
        self._sql = _statements(table)

    @classmethod
    async def open(cls, conn: AsyncConnection, table: str) -> Self:
        """Bind to ``conn`` and the asyncpg connection under it."""
        return cls(conn, (await pool_connection(conn)).dbapi_connection, table)

    async def lookup(self, scope: str, key: str) -> Record | None:
        """Read the record of (scope, key); see `Storage.lookup`."""
        row = await self._driver.fetchrow(self._sql.lookup, scope, key)
        return None if row is None else _record(row)

    async def begin(self, wait: float | None) -> None:
        """Open the transaction the way SQLAlchemy would at its first statement (isolation level included).

        SQLAlchemy's asyncpg adapter opens it lazily, inside its next statement; the claim bypasses the
        adapter, so it asks the adapter to open it now. Where that (private) entry point is missing, an
        empty statement through SQLAlchemy opens it instead, for one more round trip.
        """
        if getattr(self._adapted, "_transaction", None) is not None:
            return
        start = getattr(self._adapted, "_start_transaction", None)
        if start is not None:
            await start()
        else:  # pragma: no cover - SQLAlchemy versions without the adapter's entry point
            await self._conn.exec_driver_sql(";")

    async def claim(
        self, scope: str, key: str, fingerprint: bytes | None, token: uuid.UUID, wait: float | None
    ) -> bool | Record:
        """Insert the IN_PROGRESS record; see `Storage.claim`.

        A wait that runs out raises TimeoutError (asyncpg cancels the statement); failing fast raises
        SQLSTATE 55P03.
        """
        if wait is None:
            claimed = await self._driver.fetchval(self._sql.claim_nowait, scope, key, fingerprint, token)
            return claimed is not None
        row = await self._driver.fetchrow(self._sql.claim, scope, key, fingerprint, token, timeout=wait)
        if row is None:
            return False
        return True if row[0] else _record(row, 1)

    async def finish(
        self, scope: str, key: str, token: uuid.UUID, status: Status, response: bytes, retention: timedelta
    ) -> bool:
        """Record the outcome; see `Storage.finish`."""
        updated: object = await self._driver.fetchval(
            self._sql.finish, scope, key, token, status.value, response, retention
        )
        return updated == 1

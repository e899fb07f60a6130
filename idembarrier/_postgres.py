"""PostgreSQL through asyncpg: the records table's atomic statements.

The statements run on the unit of work's own connection, in its transaction, but go straight to the
asyncpg connection under SQLAlchemy's: that skips SQLAlchemy's per-statement overhead, about 100 µs of
client CPU each, which is most of what the barrier costs (see benchmarks/). SQLAlchemy still opens,
commits and rolls back the transaction, so the session's bookkeeping and the pool's reset stay exact.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from ._exceptions import UnitOfWorkError
from ._record import Record, Status
from ._storage import Found, pool_connection

if TYPE_CHECKING:
    import uuid
    from datetime import timedelta

    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._config import Retention

__all__ = ["PostgresStorage"]

_COLUMNS = "scope, key, status, fingerprint, response, token, attempt, created_at, completed_at, expires_at"
# A lease's view of a record adds its lease, its checkpoint, and whether the lease is stale.
# A lease is stale once its end has passed on the database's clock (clock_timestamp(): the wall clock, not
# the transaction's start). An IN_PROGRESS record without an end is stale too: only a unit of work whose
# session was committed from inside its body can leave one behind.
_STALE = "coalesce(locked_until, '-infinity') <= clock_timestamp()"
_LEASE_COLUMNS = f"{_COLUMNS}, locked_until, checkpoint_name, checkpoint_data, {_STALE}"


def _found(row: Any) -> Found:
    """The record and staleness in ``row``'s `_LEASE_COLUMNS`."""
    return Found(_record(row), bool(row[13]))


def _record(row: Any, at: int = 0) -> Record:
    """The record in ``row``'s columns from ``at`` on (in ``_COLUMNS`` order, then the lease's, if any)."""
    leased = len(row) >= at + 13
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
        locked_until=row[at + 10] if leased else None,
        checkpoint=row[at + 11] if leased else None,
        checkpoint_data=row[at + 12] if leased else None,
    )


class _Statements(NamedTuple):
    lookup: str
    claim: str
    claim_nowait: str
    finish: str
    retake_nowait: str
    retake: str


def _failing_fast(dml: str) -> str:
    """``dml`` with its lock waits bounded by a 1 ms lock_timeout (PostgreSQL's smallest), for it alone.

    ``dml`` reads the CTE ``applied`` (so the timeout is set before it runs) and returns a ``result``
    column. The outer SELECT restores the caller's lock_timeout after ``done`` has produced its row, so the
    statements that follow keep the caller's value. A timeout raises 55P03 and aborts the statement. Always
    one row: ``result`` is NULL when ``dml`` matched nothing.
    """
    return f"""
        WITH saved AS MATERIALIZED (
            SELECT current_setting('lock_timeout') AS lock_timeout
        ), applied AS MATERIALIZED (
            SELECT set_config('lock_timeout', '1ms', true) AS lock_timeout FROM saved
        ), done AS (
            {dml}
        )
        SELECT done.result, set_config('lock_timeout', saved.lock_timeout, true)
        FROM saved LEFT JOIN done ON true"""


@cache
def _statements(table: str) -> _Statements:
    """The statements on ``table``, built once per table."""
    retake = f"""
        UPDATE {table}
        SET status = 'IN_PROGRESS', token = $3, attempt = attempt + 1, updated_at = clock_timestamp(),
            completed_at = NULL, response_expires_at = NULL, expires_at = NULL,
            checkpoint_name = NULL, checkpoint_data = NULL
        WHERE scope = $1 AND key = $2 AND status IN ('COMPLETED', 'FAILED') AND response IS NULL"""
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
        # The same claim, failing fast (see `_failing_fast`).
        claim_nowait=_failing_fast(
            f"""INSERT INTO {table} (scope, key, fingerprint, status, token)
                SELECT $1, $2, $3::bytea, 'IN_PROGRESS', $4::uuid FROM applied
                ON CONFLICT (scope, key) DO NOTHING
                RETURNING token AS result"""
        ),
        # Fenced completion: only the holder of `token` may record the outcome. In a unit of work the row
        # was inserted by this same transaction, so no one else can hold it; for leases the token decides.
        finish=f"""
            UPDATE {table}
            SET status = $4, response = $5, completed_at = at.now, updated_at = at.now,
                response_expires_at = at.now + $6::interval, expires_at = at.now + $7::interval,
                locked_until = NULL
            FROM (SELECT clock_timestamp() AS now) AS at
            WHERE scope = $1 AND key = $2 AND token = $3
            RETURNING 1""",
        # Takes over a compact record (its response dropped past retention) for a late request that the
        # policy lets run again: inside the unit of work's transaction, so a rollback restores it. The row
        # lock makes a concurrent late duplicate wait, then find the record IN_PROGRESS no more.
        retake=f"{retake} RETURNING 1",
        retake_nowait=_failing_fast(f"{retake} AND EXISTS (SELECT FROM applied) RETURNING 1 AS result"),
    )


@cache
def _operations(table: str) -> tuple[str, str, str]:
    """The statements of `distribution`, `purge` and `compact` on ``table``."""
    distribution = f"""
        SELECT status, count(*), clock_timestamp() - min(created_at) FILTER (WHERE status = 'IN_PROGRESS')
        FROM {table} GROUP BY status"""
    # SKIP LOCKED: a purger never waits for, nor deletes under, a row another transaction holds; the
    # partial index on expires_at serves the scan. IN_PROGRESS and UNKNOWN records are never selected.
    purge = f"""
        WITH doomed AS (
            SELECT scope, key FROM {table}
            WHERE status IN ('COMPLETED', 'FAILED') AND expires_at <= clock_timestamp()
            ORDER BY expires_at LIMIT $1
            FOR UPDATE SKIP LOCKED
        ), deleted AS (
            DELETE FROM {table} AS t USING doomed
            WHERE t.scope = doomed.scope AND t.key = doomed.key
            RETURNING 1
        )
        SELECT count(*) FROM deleted"""
    # Drops responses past their horizon, keeping the compact record; the same SKIP LOCKED discipline.
    compact = f"""
        WITH due AS (
            SELECT scope, key FROM {table}
            WHERE status IN ('COMPLETED', 'FAILED') AND response IS NOT NULL
              AND response_expires_at <= clock_timestamp()
            ORDER BY response_expires_at LIMIT $1
            FOR UPDATE SKIP LOCKED
        ), compacted AS (
            UPDATE {table} AS t SET response = NULL, updated_at = clock_timestamp() FROM due
            WHERE t.scope = due.scope AND t.key = due.key
            RETURNING 1
        )
        SELECT count(*) FROM compacted"""
    return distribution, purge, compact


class _LeaseStatements(NamedTuple):
    claim: str
    inspect: str
    reclaim: str
    renew: str
    checkpoint: str
    fence: str
    release: str
    unresolved: str
    resolve: str


@cache
def _lease_statements(table: str) -> _LeaseStatements:
    """The statements of leased work on ``table``, built once per table; each runs as its own transaction
    unless said otherwise, so its effect is durable (or absent) as soon as it returns."""
    held = "scope = $1 AND key = $2 AND token = $3 AND status = 'IN_PROGRESS'"
    return _LeaseStatements(
        # The same atomic claim as a unit of work's, committed at once with a lease ending on the
        # database's clock. A conflicting row is returned when visible, with its staleness.
        claim=f"""
            WITH claimed AS (
                INSERT INTO {table} (scope, key, fingerprint, status, token, locked_until)
                VALUES ($1, $2, $3, 'IN_PROGRESS', $4, clock_timestamp() + $5::interval)
                ON CONFLICT (scope, key) DO NOTHING
                RETURNING token
            )
            SELECT true, {", ".join(["NULL"] * 14)} FROM claimed
            UNION ALL
            SELECT false, {_LEASE_COLUMNS} FROM {table}
            WHERE scope = $1 AND key = $2 AND NOT EXISTS (SELECT FROM claimed)""",
        inspect=f"SELECT {_LEASE_COLUMNS} FROM {table} WHERE scope = $1 AND key = $2",
        # Takes over a stale lease. Conditioned on the token the reclaimer saw, so of two reclaimers of the
        # same lease exactly one matches (the other finds the new token); conditioned on staleness by the
        # database's clock. SKIP LOCKED: a row another transaction holds (its holder renewing, another
        # reclaimer) is not waited for; the caller treats it as still held. Past max_reclaims the record
        # becomes UNKNOWN instead, for a person to resolve.
        reclaim=f"""
            UPDATE {table}
            SET token = $4, updated_at = clock_timestamp(),
                attempt = CASE WHEN attempt > $6 THEN attempt ELSE attempt + 1 END,
                status = CASE WHEN attempt > $6 THEN 'UNKNOWN' ELSE 'IN_PROGRESS' END,
                locked_until = CASE WHEN attempt > $6 THEN NULL ELSE clock_timestamp() + $5::interval END
            WHERE ctid = (
                SELECT ctid FROM {table} WHERE {held} AND {_STALE} FOR UPDATE SKIP LOCKED
            )
            RETURNING {_LEASE_COLUMNS}""",
        # Renewal, checkpoint and release are fenced by the token: a holder whose lease was reclaimed
        # matches no row and learns it lost the lease.
        renew=f"""
            UPDATE {table} SET locked_until = clock_timestamp() + $4::interval, updated_at = clock_timestamp()
            WHERE {held} RETURNING 1""",
        checkpoint=f"""
            UPDATE {table} SET checkpoint_name = $4, checkpoint_data = $5, updated_at = clock_timestamp()
            WHERE {held} RETURNING 1""",
        # Inside the completing transaction: the row lock keeps a reclaimer out (its SKIP LOCKED passes the
        # row by) until the outcome commits, after which the record is no longer IN_PROGRESS.
        fence=f"SELECT 1 FROM {table} WHERE {held} FOR UPDATE",
        release=f"DELETE FROM {table} WHERE {held} RETURNING 1",
        unresolved=f"""
            SELECT {_LEASE_COLUMNS}, clock_timestamp() - created_at FROM {table}
            WHERE status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE})
            ORDER BY created_at LIMIT $1""",
        # An operator's resolution: only of an UNKNOWN record or a stale lease, never of a live holder's.
        resolve=f"""
            UPDATE {table}
            SET status = $3, response = $4, completed_at = at.now, updated_at = at.now,
                response_expires_at = at.now + $5::interval, expires_at = at.now + $6::interval,
                locked_until = NULL
            FROM (SELECT clock_timestamp() AS now) AS at
            WHERE scope = $1 AND key = $2
              AND (status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE}))
            RETURNING 1""",
    )


class PostgresStorage:
    """`Storage` for postgresql+asyncpg."""

    lookup_first = False
    """A claim that meets a finished record costs about what a lookup costs: no separate lookup first."""

    def __init__(self, conn: AsyncConnection, adapted: Any, table: str) -> None:
        self.connection = self._conn = conn
        self._adapted = adapted  # SQLAlchemy's adapter around the asyncpg connection
        self._driver = adapted.driver_connection  # the asyncpg.Connection
        self._table = table
        self._sql = _statements(table)
        self._lease = _lease_statements(table)

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
        if not self.in_transaction():
            raise UnitOfWorkError(
                "the barrier needs a transaction, but this connection is in AUTOCOMMIT mode: "
                "use an engine or session without isolation_level='AUTOCOMMIT'"
            )

    def in_transaction(self) -> bool:
        """Whether the connection is inside a transaction; see `Storage.in_transaction`."""
        return bool(self._driver.is_in_transaction())

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
        self, scope: str, key: str, token: uuid.UUID, status: Status, response: bytes, retention: Retention
    ) -> bool:
        """Record the outcome; see `Storage.finish`."""
        return await self._one(
            self._sql.finish, scope, key, token, status.value, response, retention.response, retention.record
        )

    async def retake(self, scope: str, key: str, token: uuid.UUID, wait: float | None) -> bool:
        """Take a compact record over for a late request; see `Storage.retake`."""
        matched: object
        if wait is None:
            matched = await self._driver.fetchval(self._sql.retake_nowait, scope, key, token)
        else:
            matched = await self._driver.fetchval(self._sql.retake, scope, key, token, timeout=wait)
        return matched == 1

    # -- leased work ------------------------------------------------------------------------------------

    async def lease_claim(
        self, scope: str, key: str, fingerprint: bytes | None, token: uuid.UUID, lease: timedelta, wait: float
    ) -> bool | Found:
        """Claim the key with a lease; see `Storage.lease_claim` (asyncpg bounds the wait)."""
        row = await self._driver.fetchrow(self._lease.claim, scope, key, fingerprint, token, lease, timeout=wait)
        if row is None:
            return False
        return True if row[0] else _found(tuple(row)[1:])

    async def inspect(self, scope: str, key: str) -> Found | None:
        """Read the record with its lease; see `Storage.inspect`."""
        row = await self._driver.fetchrow(self._lease.inspect, scope, key)
        return None if row is None else _found(row)

    async def reclaim(
        self, scope: str, key: str, stale: uuid.UUID, token: uuid.UUID, lease: timedelta, max_reclaims: int
    ) -> Record | None:
        """Take over a stale lease; see `Storage.reclaim`."""
        row = await self._driver.fetchrow(self._lease.reclaim, scope, key, stale, token, lease, max_reclaims)
        return None if row is None else _record(row)

    async def renew(self, scope: str, key: str, token: uuid.UUID, lease: timedelta) -> bool:
        """Extend a held lease; see `Storage.renew`."""
        return await self._one(self._lease.renew, scope, key, token, lease)

    async def checkpoint(self, scope: str, key: str, token: uuid.UUID, name: str, data: bytes) -> bool:
        """Record a held lease's progress; see `Storage.checkpoint`."""
        return await self._one(self._lease.checkpoint, scope, key, token, name, data)

    async def fence(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Lock the record if ``token`` still holds it; see `Storage.fence`."""
        return await self._one(self._lease.fence, scope, key, token)

    async def release(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Delete a held lease; see `Storage.release`."""
        return await self._one(self._lease.release, scope, key, token)

    async def unresolved(self, limit: int) -> list[tuple[Record, timedelta]]:
        """List records that need a person; see `Storage.unresolved`."""
        return [(_record(row), row[14]) for row in await self._driver.fetch(self._lease.unresolved, limit)]

    async def resolve(self, scope: str, key: str, status: Status, response: bytes, retention: Retention) -> bool:
        """Record an operator's outcome; see `Storage.resolve`."""
        return await self._one(
            self._lease.resolve, scope, key, status.value, response, retention.response, retention.record
        )

    async def _one(self, sql: str, *args: object) -> bool:
        """Run a statement that returns ``1`` when it matched its row."""
        matched: object = await self._driver.fetchval(sql, *args)
        return matched == 1

    # -- operations -------------------------------------------------------------------------------------

    async def distribution(self) -> tuple[dict[Status, int], timedelta | None]:
        """Records per status and the oldest IN_PROGRESS age; see `Storage.distribution`."""
        rows = await self._driver.fetch(_operations(self._table)[0])
        oldest = [row[2] for row in rows if row[2] is not None]
        return {Status(row[0]): row[1] for row in rows}, (max(oldest) if oldest else None)

    async def purge(self, limit: int) -> int:
        """Delete expired finished records; see `Storage.purge`."""
        deleted: int = await self._driver.fetchval(_operations(self._table)[1], limit)
        return deleted

    async def compact(self, limit: int) -> int:
        """Drop responses past retention; see `Storage.compact`."""
        compacted: int = await self._driver.fetchval(_operations(self._table)[2], limit)
        return compacted

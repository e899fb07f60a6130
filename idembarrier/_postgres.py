"""PostgreSQL through asyncpg: every statement on idembarrier's tables, named, with its concurrency condition.

The statements run on the unit of work's own connection, in its transaction, but go straight to the
asyncpg connection under SQLAlchemy's: that skips SQLAlchemy's per-statement overhead, about 100 µs of
client CPU each, which is most of what the barrier costs (see benchmarks/). SQLAlchemy still opens,
commits and rolls back the transaction, so the session's bookkeeping and the pool's reset stay exact.
Rows are read by column name. `idembarrier._psycopg` runs this same storage, statement for statement, over
psycopg 3: it calls its driver only through asyncpg's ``fetchrow``/``fetchval``/``fetch``/``execute``.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from ._exceptions import UnitOfWorkError
from ._listen import listen
from ._outbox import Message, Parked, decode_headers
from ._poolers import check_asyncpg
from ._record import Record, Status
from ._storage import Claim, Claimed, Dialect, Existing, Raced, pool_connection

if TYPE_CHECKING:
    import uuid
    from collections.abc import Mapping, Sequence
    from datetime import timedelta

    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._config import Retention
    from ._storage import Names

__all__ = ["DIALECT", "PostgresStorage"]

_COLUMNS = (
    "scope, key, status, fingerprint, fingerprint_version, response, token, attempt, created_at, completed_at, "
    "expires_at"
)
_LEASE_COLUMNS = f"{_COLUMNS}, locked_until, checkpoint_name, checkpoint_data"
_HORIZON_COLUMNS = f"{_LEASE_COLUMNS}, response_expires_at"  # what an operator reads: every horizon
# A lease is stale once its end has passed on the database's clock (clock_timestamp(): the wall clock, not
# the transaction's start). An IN_PROGRESS record without an end is stale too: only a unit of work whose
# session was committed from inside its body can leave one behind.
_STALE = "coalesce(locked_until, '-infinity') <= clock_timestamp()"
_HELD = "scope = $1 AND key = $2 AND token = $3 AND status = 'IN_PROGRESS'"
_EXPIRES_IN = "extract(epoch FROM response_expires_at - clock_timestamp())::float8 AS response_expires_in"
_OUTBOX_COLUMNS = ("message_id", "topic", "key", "value", "headers", "scope", "record_key", "position")


def _record(row: Any, *, stale: bool = False) -> Record:
    """The record in ``row``'s columns, read by name (the lease's columns where the statement reads them)."""
    return Record(
        scope=row["scope"],
        key=row["key"],
        status=(status := Status(row["status"])),
        fingerprint=row["fingerprint"],
        fingerprint_version=row.get("fingerprint_version"),
        response=row["response"],
        token=row["token"],
        attempt=row["attempt"],
        created_at=row["created_at"],
        completed_at=row["completed_at"],
        expires_at=row["expires_at"],
        locked_until=row.get("locked_until"),
        response_expires_at=row.get("response_expires_at"),
        response_expires_in=row.get("response_expires_in"),
        checkpoint=row.get("checkpoint_name"),
        checkpoint_data=row.get("checkpoint_data"),
        stale=stale and status is Status.IN_PROGRESS,  # a lease's word: a finished record has none
    )


def _claimed(row: Any) -> Claim:
    """What a claim's row says: ``claimed``, else the record beside it when the statement saw one."""
    if row["claimed"]:
        return Claimed()
    if row["status"] is None:
        return Raced()
    return Existing(_record(row, stale=bool(row.get("stale", False))))


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


def _claim_or_read(insert: str, table: str, columns: str) -> str:
    """``insert`` (``RETURNING 1``), then in the same statement the record in its way, if its snapshot sees it.

    Always one row: ``claimed`` is true when the insert took the key; else ``columns`` are the existing
    record's, or NULL when the snapshot, taken before any wait, cannot see it.
    """
    return f"""
        WITH claimed AS ({insert})
        SELECT EXISTS (SELECT FROM claimed) AS claimed, existing.*
        FROM (SELECT) AS one LEFT JOIN (
            SELECT {columns} FROM {table} WHERE scope = $1 AND key = $2
        ) AS existing ON NOT EXISTS (SELECT FROM claimed)"""


class _Statements(NamedTuple):
    """Every statement on one records table, its outbox and its failures, by name."""

    lookup: str
    claim: str
    claim_nowait: str
    finish: str
    retake: str
    retake_nowait: str
    lease_claim: str
    inspect: str
    reclaim: str
    renew: str
    checkpoint: str
    fence: str
    release: str
    unresolved: str
    resolve: str
    records: str
    distribution: str
    purge: str
    compact: str
    purgeable: str
    write_outbox: str
    notify: str
    claim_outbox: str
    mark_sent: str
    refuse: str
    parked: str
    release_parked: str
    drop_parked: str
    outbox_counts: str
    purge_sent: str
    count_failure: str
    forget_failure: str


@cache
def _statements(names: Names) -> _Statements:
    """The statements on ``names``' tables, built once per records table."""
    table, outbox = names.records, names.outbox
    retake = f"""
        UPDATE {table}
        SET status = 'IN_PROGRESS', token = $3, attempt = attempt + 1, updated_at = clock_timestamp(),
            completed_at = NULL, response_expires_at = NULL, expires_at = NULL, cleanup_at = NULL,
            checkpoint_name = NULL, checkpoint_data = NULL
        WHERE scope = $1 AND key = $2 AND status IN ('COMPLETED', 'FAILED') AND response IS NULL"""
    parked_one = "message_id = $1 AND parked_at IS NOT NULL AND sent_at IS NULL"
    return _Statements(
        # Read committed: each statement sees what committed before it started, so this sees a record
        # committed while our claim waited for it.
        # What the response has left, on the database's clock: a replay may be answered from memory that long.
        lookup=f"SELECT {_COLUMNS}, {_EXPIRES_IN} FROM {table} WHERE scope = $1 AND key = $2",
        # The atomic claim. ON CONFLICT DO NOTHING takes the key or does nothing, with no window between
        # check and insert: if another transaction inserted the key and has not committed, this INSERT
        # waits for it, then inserts (it rolled back) or does nothing (it committed). The wait is bounded
        # by the driver's statement timeout, which cancels the statement. When nothing was inserted, the
        # same statement returns the existing record, if its snapshot, taken before any wait, can see it:
        # a replay costs one statement; a record committed during the wait needs a lookup.
        # cleanup_at: claim time + the response retention ($6; NULL when not given), a lower bound of the
        # response horizon the completion sets, which then leaves it alone (see `finish`).
        claim=_claim_or_read(
            f"""INSERT INTO {table} (scope, key, fingerprint, status, token, fingerprint_version, cleanup_at)
                VALUES ($1, $2, $3, 'IN_PROGRESS', $4, $5, clock_timestamp() + $6::interval)
                ON CONFLICT (scope, key) DO NOTHING
                RETURNING 1""",
            table,
            _COLUMNS,
        ),
        # The same claim, failing fast (see `_failing_fast`).
        claim_nowait=_failing_fast(
            f"""INSERT INTO {table} (scope, key, fingerprint, status, token, fingerprint_version, cleanup_at)
                SELECT $1, $2, $3::bytea, 'IN_PROGRESS', $4::uuid, $5::integer, clock_timestamp() + $6::interval
                FROM applied
                ON CONFLICT (scope, key) DO NOTHING
                RETURNING token AS result"""
        ),
        # Fenced completion: only the holder of `token` may record the outcome. In a unit of work the row
        # was inserted by this same transaction, so no one else can hold it; for leases the token decides.
        # A HOT update: no column it changes is indexed. cleanup_at keeps the claim's value, already the
        # least (claim time + the same retention); only a claim that set none (a lease) gets it here.
        finish=f"""
            UPDATE {table}
            SET status = $4, response = $5, completed_at = at.now, updated_at = at.now,
                response_expires_at = at.now + $6::interval, expires_at = at.now + $7::interval,
                locked_until = NULL, cleanup_at = least(cleanup_at, at.now + $6::interval)
            FROM (SELECT clock_timestamp() AS now) AS at
            WHERE scope = $1 AND key = $2 AND token = $3
            RETURNING 1""",
        # Takes over a compact record (its response dropped past retention) for a late request that the
        # policy lets run again: inside the unit of work's transaction, so a rollback restores it. The row
        # lock makes a concurrent late duplicate wait, then find the record IN_PROGRESS no more.
        retake=f"{retake} RETURNING 1",
        retake_nowait=_failing_fast(f"{retake} AND EXISTS (SELECT FROM applied) RETURNING 1 AS result"),
        # -- leased work: each statement runs as its own transaction unless said otherwise, so its effect
        # is durable (or absent) as soon as it returns.
        # The same atomic claim as a unit of work's, committed at once with a lease ending on the
        # database's clock. A conflicting row is returned when visible, with its staleness.
        lease_claim=_claim_or_read(
            f"""INSERT INTO {table} (scope, key, fingerprint, status, token, locked_until, fingerprint_version)
                VALUES ($1, $2, $3, 'IN_PROGRESS', $4, clock_timestamp() + $5::interval, $6::integer)
                ON CONFLICT (scope, key) DO NOTHING
                RETURNING 1""",
            table,
            f"{_LEASE_COLUMNS}, {_STALE} AS stale",
        ),
        inspect=f"SELECT {_HORIZON_COLUMNS}, {_STALE} AS stale FROM {table} WHERE scope = $1 AND key = $2",
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
                SELECT ctid FROM {table} WHERE {_HELD} AND {_STALE} FOR UPDATE SKIP LOCKED
            )
            RETURNING {_LEASE_COLUMNS}""",
        # Renewal, checkpoint and release are fenced by the token: a holder whose lease was reclaimed
        # matches no row and learns it lost the lease.
        renew=f"""
            UPDATE {table} SET locked_until = clock_timestamp() + $4::interval, updated_at = clock_timestamp()
            WHERE {_HELD} RETURNING 1""",
        checkpoint=f"""
            UPDATE {table} SET checkpoint_name = $4, checkpoint_data = $5, updated_at = clock_timestamp()
            WHERE {_HELD} RETURNING 1""",
        # Inside the completing transaction: the row lock keeps a reclaimer out (its SKIP LOCKED passes the
        # row by) until the outcome commits, after which the record is no longer IN_PROGRESS.
        fence=f"SELECT 1 FROM {table} WHERE {_HELD} FOR UPDATE",
        release=f"DELETE FROM {table} WHERE {_HELD} RETURNING 1",
        unresolved=f"""
            SELECT {_LEASE_COLUMNS}, clock_timestamp() - created_at AS age FROM {table}
            WHERE status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE})
            ORDER BY created_at LIMIT $1""",
        # An operator's resolution: only of an UNKNOWN record or a stale lease, never of a live holder's.
        resolve=f"""
            UPDATE {table}
            SET status = $3, response = $4, completed_at = at.now, updated_at = at.now,
                response_expires_at = at.now + $5::interval, expires_at = at.now + $6::interval,
                locked_until = NULL, cleanup_at = least(cleanup_at, at.now + $5::interval)
            FROM (SELECT clock_timestamp() AS now) AS at
            WHERE scope = $1 AND key = $2
              AND (status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE}))
            RETURNING 1""",
        # A read, and a plain one: it takes no lock and sees what committed before it started. A NULL
        # filter is no filter; the ages are measured on the database's clock. Newest first; ties (one
        # transaction's records) in key order.
        records=f"""
            SELECT {_HORIZON_COLUMNS}, {_STALE} AS stale FROM {table}
            WHERE ($1::text[] IS NULL OR status = ANY($1::text[]))
              AND ($2::text IS NULL OR scope = $2::text)
              AND ($3::interval IS NULL OR created_at <= clock_timestamp() - $3::interval)
              AND ($4::interval IS NULL OR created_at > clock_timestamp() - $4::interval)
            ORDER BY created_at DESC, scope, key LIMIT $5""",
        # -- operations
        distribution=f"""
            SELECT status, count(*) AS records,
                   clock_timestamp() - min(created_at) FILTER (WHERE status = 'IN_PROGRESS') AS oldest
            FROM {table} GROUP BY status""",
        # SKIP LOCKED: a purger never waits for, nor deletes under, a row another transaction holds. The
        # index on cleanup_at serves the scan: cleanup_at <= expires_at always (a lower bound at the claim,
        # expires_at itself once compacted), and statement_timestamp() is stable where clock_timestamp() is
        # not, so it bounds the range; expires_at decides. IN_PROGRESS and UNKNOWN records are never selected.
        purge=f"""
            WITH doomed AS (
                SELECT scope, key FROM {table}
                WHERE cleanup_at <= statement_timestamp()
                  AND status IN ('COMPLETED', 'FAILED') AND expires_at <= clock_timestamp()
                ORDER BY cleanup_at LIMIT $1
                FOR UPDATE SKIP LOCKED
            ), deleted AS (
                DELETE FROM {table} AS t USING doomed
                WHERE t.scope = doomed.scope AND t.key = doomed.key
                RETURNING 1
            )
            SELECT count(*) FROM deleted""",
        # Drops responses past their horizon, keeping the compact record; the same SKIP LOCKED discipline
        # and the same index: cleanup_at <= response_expires_at while the response is there. Each compact
        # record's cleanup_at moves on to its record horizon, out of the range compaction scans.
        compact=f"""
            WITH due AS (
                SELECT scope, key FROM {table}
                WHERE cleanup_at <= statement_timestamp()
                  AND status IN ('COMPLETED', 'FAILED') AND response IS NOT NULL
                  AND response_expires_at <= clock_timestamp()
                ORDER BY cleanup_at LIMIT $1
                FOR UPDATE SKIP LOCKED
            ), compacted AS (
                UPDATE {table} AS t SET response = NULL, cleanup_at = t.expires_at, updated_at = clock_timestamp()
                FROM due
                WHERE t.scope = due.scope AND t.key = due.key
                RETURNING 1
            )
            SELECT count(*) FROM compacted""",
        # What compact and purge would take, counted with their own conditions over the same index range.
        # A plain read: it counts rows a purger or a claim holds too, which the real batches would skip.
        purgeable=f"""
            SELECT (
                SELECT count(*) FROM {table}
                WHERE cleanup_at <= statement_timestamp()
                  AND status IN ('COMPLETED', 'FAILED') AND response IS NOT NULL
                  AND response_expires_at <= statement_timestamp()
            ) AS compacted, (
                SELECT count(*) FROM {table}
                WHERE cleanup_at <= statement_timestamp()
                  AND status IN ('COMPLETED', 'FAILED') AND expires_at <= statement_timestamp()
            ) AS deleted""",
        # -- the outbox
        # In the unit of work's transaction: the messages exist if and only if it commits.
        write_outbox=f"""
            INSERT INTO {outbox} ({", ".join(_OUTBOX_COLUMNS)})
            VALUES ({", ".join(f"${i}" for i in range(1, len(_OUTBOX_COLUMNS) + 1))})""",
        # Delivered at the commit, and never if it rolls back: a listening relay wakes exactly when there
        # is something to relay.
        notify="SELECT pg_notify($1, '')",
        # The next pending rows, oldest first. A parked message holds back the later messages of its
        # (topic, key): order per key is kept; unkeyed messages have no order to keep (NULL = NULL is not
        # true), so they are never held. SKIP LOCKED: a relay never waits for, nor re-claims, a row another
        # relay holds; a row that relay then marks sent is re-checked after its commit and dropped. The
        # transaction-scoped advisory lock on (topic, key) keeps the other relays off that key's later rows
        # until this one commits: order per key.
        claim_outbox=f"""
            SELECT id, message_id, topic, key, value, headers FROM {outbox} AS o
            WHERE sent_at IS NULL AND parked_at IS NULL
              AND NOT EXISTS (
                  SELECT FROM {outbox} AS parked
                  WHERE parked.parked_at IS NOT NULL AND parked.sent_at IS NULL
                    AND parked.topic = o.topic AND parked.key = o.key AND parked.id < o.id
              )
              AND pg_try_advisory_xact_lock(hashtextextended(topic || ':' || coalesce(encode(key, 'hex'), ''), 0))
            ORDER BY id LIMIT $1
            FOR UPDATE OF o SKIP LOCKED""",
        # On rows this batch's claim holds.
        mark_sent=f"UPDATE {outbox} SET sent_at = now() WHERE id = ANY($1::bigint[])",
        refuse=f"""
            UPDATE {outbox}
            SET attempts = attempts + 1, last_error = $2,
                parked_at = CASE WHEN attempts + 1 >= $3 THEN now() END
            WHERE id = $1
            RETURNING attempts, parked_at""",
        parked=f"""
            SELECT message_id, topic, key, attempts, last_error, parked_at FROM {outbox}
            WHERE parked_at IS NOT NULL AND sent_at IS NULL
            ORDER BY id LIMIT $1""",
        release_parked=f"UPDATE {outbox} SET parked_at = NULL, attempts = 0 WHERE {parked_one} RETURNING 1",
        drop_parked=f"DELETE FROM {outbox} WHERE {parked_one} RETURNING 1",
        outbox_counts=f"SELECT count(*) AS pending, count(parked_at) AS parked FROM {outbox} WHERE sent_at IS NULL",
        # SKIP LOCKED: a row a relay claimed is pending in its eyes; never wait for it nor delete under it.
        purge_sent=f"""
            WITH doomed AS (
                SELECT id FROM {outbox}
                WHERE sent_at IS NOT NULL AND sent_at <= now() - $1::interval
                ORDER BY id LIMIT $2
                FOR UPDATE SKIP LOCKED
            ), deleted AS (
                DELETE FROM {outbox} AS o USING doomed WHERE o.id = doomed.id RETURNING 1
            )
            SELECT count(*) FROM deleted""",
        # -- the consumer's failures
        # The upsert counts atomically: two consumers of one message (a rebalance) each add one.
        count_failure=f"""
            INSERT INTO {names.failures} AS f (scope, key, attempts, last_error) VALUES ($1, $2, 1, $3)
            ON CONFLICT (scope, key) DO UPDATE
            SET attempts = f.attempts + 1, last_error = excluded.last_error, last_failed_at = excluded.last_failed_at
            RETURNING attempts""",
        # In the transaction that applied the message (or dead-lettered it): the count goes with it.
        forget_failure=f"DELETE FROM {names.failures} WHERE scope = $1 AND key = $2",
    )


class PostgresStorage:
    """`Storage` for postgresql+asyncpg."""

    lookup_first = False
    """A claim that meets a finished record costs about what a lookup costs: no separate lookup first."""

    def __init__(self, conn: AsyncConnection, adapted: Any, names: Names) -> None:
        self.connection = self._conn = conn
        self._adapted = adapted  # SQLAlchemy's adapter around the asyncpg connection
        self._driver = adapted.driver_connection  # the asyncpg.Connection
        self._names = names
        self._sql = _statements(names)

    @classmethod
    async def open(cls, conn: AsyncConnection, names: Names) -> Self:
        """Bind to ``conn`` and the asyncpg connection under it."""
        return cls(conn, (await pool_connection(conn)).dbapi_connection, names)

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
        """Insert the IN_PROGRESS record; see `Storage.claim`.

        A wait that runs out raises TimeoutError (asyncpg cancels the statement); failing fast raises
        SQLSTATE 55P03. With the ``retention`` the completion will record, the completion is a HOT update.
        """
        version, horizon = fingerprint_version, None if retention is None else retention.response
        if wait is None:
            claimed = await self._driver.fetchval(
                self._sql.claim_nowait, scope, key, fingerprint, token, version, horizon
            )
            return Raced() if claimed is None else Claimed()
        row = await self._driver.fetchrow(
            self._sql.claim, scope, key, fingerprint, token, version, horizon, timeout=wait
        )
        return _claimed(row)

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
        """Claim the key with a lease; see `Storage.lease_claim` (asyncpg bounds the wait)."""
        sql, version = self._sql.lease_claim, fingerprint_version
        return _claimed(await self._driver.fetchrow(sql, scope, key, fingerprint, token, lease, version, timeout=wait))

    async def inspect(self, scope: str, key: str) -> Record | None:
        """Read the record with its lease; see `Storage.inspect`."""
        row = await self._driver.fetchrow(self._sql.inspect, scope, key)
        return None if row is None else _record(row, stale=row["stale"])

    async def reclaim(
        self, scope: str, key: str, stale: uuid.UUID, token: uuid.UUID, lease: timedelta, max_reclaims: int
    ) -> Record | None:
        """Take over a stale lease; see `Storage.reclaim`."""
        row = await self._driver.fetchrow(self._sql.reclaim, scope, key, stale, token, lease, max_reclaims)
        return None if row is None else _record(row)

    async def renew(self, scope: str, key: str, token: uuid.UUID, lease: timedelta) -> bool:
        """Extend a held lease; see `Storage.renew`."""
        return await self._one(self._sql.renew, scope, key, token, lease)

    async def checkpoint(self, scope: str, key: str, token: uuid.UUID, name: str, data: bytes) -> bool:
        """Record a held lease's progress; see `Storage.checkpoint`."""
        return await self._one(self._sql.checkpoint, scope, key, token, name, data)

    async def fence(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Lock the record if ``token`` still holds it; see `Storage.fence`."""
        return await self._one(self._sql.fence, scope, key, token)

    async def release(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Delete a held lease; see `Storage.release`."""
        return await self._one(self._sql.release, scope, key, token)

    async def unresolved(self, limit: int) -> list[tuple[Record, timedelta]]:
        """List records that need a person; see `Storage.unresolved`."""
        return [(_record(row), row["age"]) for row in await self._driver.fetch(self._sql.unresolved, limit)]

    async def resolve(self, scope: str, key: str, status: Status, response: bytes, retention: Retention) -> bool:
        """Record an operator's outcome; see `Storage.resolve`."""
        return await self._one(
            self._sql.resolve, scope, key, status.value, response, retention.response, retention.record
        )

    async def records(
        self,
        statuses: Sequence[Status] | None,
        scope: str | None,
        older_than: timedelta | None,
        newer_than: timedelta | None,
        limit: int,
    ) -> list[Record]:
        """List records, newest first; see `Storage.records`."""
        values = None if statuses is None else [status.value for status in statuses]
        rows = await self._driver.fetch(self._sql.records, values, scope, older_than, newer_than, limit)
        return [_record(row, stale=row["stale"]) for row in rows]

    async def _one(self, sql: str, *args: object) -> bool:
        """Run a statement that returns ``1`` when it matched its row."""
        matched: object = await self._driver.fetchval(sql, *args)
        return matched == 1

    # -- operations -------------------------------------------------------------------------------------

    async def distribution(self) -> tuple[dict[Status, int], timedelta | None]:
        """Records per status and the oldest IN_PROGRESS age; see `Storage.distribution`."""
        rows = await self._driver.fetch(self._sql.distribution)
        oldest = [row["oldest"] for row in rows if row["oldest"] is not None]
        return {Status(row["status"]): row["records"] for row in rows}, (max(oldest) if oldest else None)

    async def purge(self, limit: int) -> int:
        """Delete expired finished records; see `Storage.purge`."""
        deleted: int = await self._driver.fetchval(self._sql.purge, limit)
        return deleted

    async def compact(self, limit: int) -> int:
        """Drop responses past retention; see `Storage.compact`."""
        compacted: int = await self._driver.fetchval(self._sql.compact, limit)
        return compacted

    async def purgeable(self) -> tuple[int, int]:
        """Count what compact and purge would take; see `Storage.purgeable`."""
        row = await self._driver.fetchrow(self._sql.purgeable)
        return int(row["compacted"]), int(row["deleted"])

    # -- the outbox -------------------------------------------------------------------------------------

    async def write_outbox(self, rows: Sequence[Mapping[str, object]]) -> None:
        """Insert messages and notify the outbox's channel at the commit; see `Storage.write_outbox`."""
        await self._driver.executemany(self._sql.write_outbox, [[row[c] for c in _OUTBOX_COLUMNS] for row in rows])
        await self._driver.execute(self._sql.notify, self._names.channel)

    async def claim_outbox(self, limit: int) -> list[Message]:
        """Hold the next pending messages; see `Storage.claim_outbox`."""
        rows = await self._driver.fetch(self._sql.claim_outbox, limit)
        return [
            Message(r["id"], r["message_id"], r["topic"], r["key"], r["value"], decode_headers(r["headers"]))
            for r in rows
        ]

    async def mark_sent(self, ids: Sequence[int]) -> None:
        """Mark held messages sent; see `Storage.mark_sent`."""
        await self._driver.execute(self._sql.mark_sent, list(ids))

    async def refuse(self, id: int, error: str, max_attempts: int) -> tuple[int, bool]:
        """Count a refusal; see `Storage.refuse`."""
        row = await self._driver.fetchrow(self._sql.refuse, id, error, max_attempts)
        return row["attempts"], row["parked_at"] is not None

    async def parked(self, limit: int) -> list[Parked]:
        """The parked messages; see `Storage.parked`."""
        rows = await self._driver.fetch(self._sql.parked, limit)
        return [
            Parked(r["message_id"], r["topic"], r["key"], r["attempts"], r["last_error"], r["parked_at"]) for r in rows
        ]

    async def release_parked(self, message_id: str) -> bool:
        """Unpark a message; see `Storage.release_parked`."""
        return await self._one(self._sql.release_parked, message_id)

    async def drop_parked(self, message_id: str) -> bool:
        """Delete a parked message; see `Storage.drop_parked`."""
        return await self._one(self._sql.drop_parked, message_id)

    async def outbox_counts(self) -> tuple[int, int]:
        """Pending and parked messages; see `Storage.outbox_counts`."""
        row = await self._driver.fetchrow(self._sql.outbox_counts)
        return int(row["pending"]), int(row["parked"])

    async def purge_sent(self, older_than: timedelta, limit: int) -> int:
        """Delete old sent messages; see `Storage.purge_sent`."""
        deleted: int = await self._driver.fetchval(self._sql.purge_sent, older_than, limit)
        return deleted

    # -- the consumer's failures ------------------------------------------------------------------------

    async def count_failure(self, scope: str, key: str, error: str) -> int:
        """Count a handler failure; see `Storage.count_failure`."""
        attempts: int = await self._driver.fetchval(self._sql.count_failure, scope, key, error)
        return attempts

    async def forget_failure(self, scope: str, key: str) -> None:
        """Drop a failure count; see `Storage.forget_failure`."""
        await self._driver.execute(self._sql.forget_failure, scope, key)


DIALECT = Dialect(open=PostgresStorage.open, listen=listen, check=check_asyncpg)
"""PostgreSQL's entry in `idembarrier._storage.DIALECTS`."""

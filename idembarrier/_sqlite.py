"""SQLite through aiosqlite: every statement on idembarrier's tables for the embedded engine, named.

SQLite has one writer at a time. A unit of work takes the write lock when its transaction begins
(``BEGIN IMMEDIATE``), so claims never race: a concurrent duplicate waits for the lock (up to the
connection's busy timeout), then finds the winner's committed record. The statements keep the names of
`idembarrier._postgres`'s; rows are read by column name.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple, Self

import anyio

from ._outbox import Message, Parked, decode_headers
from ._record import Record, Status
from ._storage import Claim, Claimed, Dialect, Existing, Raced, pool_connection

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._config import Retention
    from ._storage import Names

__all__ = ["DIALECT", "SqliteStorage"]

_COLUMNS = (
    "scope, key, status, fingerprint, fingerprint_version, response, token, attempt, created_at, completed_at, "
    "expires_at"
)
_LEASE_COLUMNS = f"{_COLUMNS}, locked_until, checkpoint_name, checkpoint_data"
_HORIZON_COLUMNS = f"{_LEASE_COLUMNS}, response_expires_at"  # what an operator reads: every horizon
# Lease ends are written and compared in one text format with milliseconds, so text order is time order.
_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
_LATER = "strftime('%Y-%m-%d %H:%M:%f', 'now', ?)"
_STALE = f"coalesce(locked_until, '') <= {_NOW}"  # no end at all counts as stale, as on PostgreSQL
_HELD = "scope = ? AND key = ? AND token = ? AND status = 'IN_PROGRESS'"
_EXPIRES_IN = "(julianday(response_expires_at) - julianday('now')) * 86400.0 AS response_expires_in"
_OUTBOX_COLUMNS = ("message_id", "topic", "key", "value", "headers", "scope", "record_key", "position")


def _timestamp(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _record(row: Any, *, stale: bool = False) -> Record:
    """The record in ``row``'s columns, read by name (the lease's columns where the statement reads them)."""
    columns = row._mapping
    return Record(
        scope=columns["scope"],
        key=columns["key"],
        status=(status := Status(columns["status"])),
        fingerprint=columns["fingerprint"],
        fingerprint_version=columns.get("fingerprint_version"),
        response=columns["response"],
        token=uuid.UUID(columns["token"]),
        attempt=columns["attempt"],
        created_at=_timestamp(columns["created_at"]),
        completed_at=_timestamp(columns["completed_at"]),
        expires_at=_timestamp(columns["expires_at"]),
        locked_until=_timestamp(columns.get("locked_until")),
        response_expires_at=_timestamp(columns.get("response_expires_at")),
        response_expires_in=columns.get("response_expires_in"),
        checkpoint=columns.get("checkpoint_name"),
        checkpoint_data=columns.get("checkpoint_data"),
        stale=stale and status is Status.IN_PROGRESS,  # a lease's word: a finished record has none
    )


def _later(delta: timedelta) -> str:
    """The SQLite date modifier for ``delta`` from now."""
    return f"+{delta.total_seconds()} seconds"


def _earlier(delta: timedelta | None) -> str | None:
    """The SQLite date modifier for ``delta`` ago (``None`` as is)."""
    return None if delta is None else f"-{delta.total_seconds()} seconds"


class _Statements(NamedTuple):
    """Every statement on one records table, its outbox and its failures, by name (as on PostgreSQL)."""

    lookup: str
    claim: str
    finish: str
    retake: str
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
    """The statements on ``names``' tables, built once per records table.

    Every statement that writes runs under BEGIN IMMEDIATE, i.e. holding the database's write lock: none
    interleaves with another writer's, so what PostgreSQL needs row locks and SKIP LOCKED for holds here by
    construction.
    """
    table, outbox = names.records, names.outbox
    parked_one = "message_id = ? AND parked_at IS NOT NULL AND sent_at IS NULL"
    return _Statements(
        # What the response has left, on the database's clock: a replay may be answered from memory that long.
        lookup=f"SELECT {_COLUMNS}, {_EXPIRES_IN} FROM {table} WHERE scope = ? AND key = ?",
        # Under the write lock no other claim can interleave: a conflict is a committed record.
        claim=f"""
            INSERT INTO {table} (scope, key, fingerprint, status, token, fingerprint_version)
            VALUES (?, ?, ?, 'IN_PROGRESS', ?, ?)
            ON CONFLICT (scope, key) DO NOTHING
            RETURNING token""",
        # Fenced completion, under the same write lock as the claim.
        finish=f"""
            UPDATE {table}
            SET status = ?, response = ?, completed_at = CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP,
                response_expires_at = datetime('now', ?), expires_at = datetime('now', ?), locked_until = NULL
            WHERE scope = ? AND key = ? AND token = ?
            RETURNING 1""",
        # Takes over a compact record for a late request, under the write lock.
        retake=f"""
            UPDATE {table}
            SET status = 'IN_PROGRESS', token = ?, attempt = attempt + 1, updated_at = CURRENT_TIMESTAMP,
                completed_at = NULL, response_expires_at = NULL, expires_at = NULL,
                checkpoint_name = NULL, checkpoint_data = NULL
            WHERE scope = ? AND key = ? AND status IN ('COMPLETED', 'FAILED') AND response IS NULL
            RETURNING 1""",
        # -- leased work: each statement takes the write lock; the caller commits it.
        lease_claim=f"""
            INSERT INTO {table} (scope, key, fingerprint, status, token, locked_until, fingerprint_version)
            VALUES (?, ?, ?, 'IN_PROGRESS', ?, {_LATER}, ?)
            ON CONFLICT (scope, key) DO NOTHING RETURNING 1""",
        inspect=f"SELECT {_HORIZON_COLUMNS}, {_STALE} AS stale FROM {table} WHERE scope = ? AND key = ?",
        # The same conditions as PostgreSQL's: the token the reclaimer saw, and staleness.
        reclaim=f"""
            UPDATE {table}
            SET token = ?, updated_at = CURRENT_TIMESTAMP,
                attempt = CASE WHEN attempt > ? THEN attempt ELSE attempt + 1 END,
                status = CASE WHEN attempt > ? THEN 'UNKNOWN' ELSE 'IN_PROGRESS' END,
                locked_until = CASE WHEN attempt > ? THEN NULL ELSE {_LATER} END
            WHERE {_HELD} AND {_STALE}
            RETURNING {_LEASE_COLUMNS}""",
        # Renewal, checkpoint and release are fenced by the token.
        renew=f"UPDATE {table} SET locked_until = {_LATER}, updated_at = CURRENT_TIMESTAMP WHERE {_HELD} RETURNING 1",
        checkpoint=f"""
            UPDATE {table} SET checkpoint_name = ?, checkpoint_data = ?, updated_at = CURRENT_TIMESTAMP
            WHERE {_HELD} RETURNING 1""",
        # The write lock of BEGIN IMMEDIATE keeps the record ``token``'s until the commit.
        fence=f"SELECT 1 FROM {table} WHERE {_HELD}",
        release=f"DELETE FROM {table} WHERE {_HELD} RETURNING 1",
        unresolved=f"""
            SELECT {_LEASE_COLUMNS}, (julianday('now') - julianday(created_at)) * 86400 AS age FROM {table}
            WHERE status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE})
            ORDER BY created_at LIMIT ?""",
        # An operator's resolution: only of an UNKNOWN record or a stale lease.
        resolve=f"""
            UPDATE {table}
            SET status = ?, response = ?, completed_at = CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP,
                response_expires_at = datetime('now', ?), expires_at = datetime('now', ?), locked_until = NULL
            WHERE scope = ? AND key = ?
              AND (status = 'UNKNOWN' OR (status = 'IN_PROGRESS' AND {_STALE}))
            RETURNING 1""",
        # A read: it sees what committed before it started. A NULL filter is no filter (the statuses
        # come as a JSON array); created_at and datetime() share one text format, so text order is time
        # order. Newest first; ties (created_at is to the second) in the order the rows were inserted.
        records=f"""
            SELECT {_HORIZON_COLUMNS}, {_STALE} AS stale FROM {table}
            WHERE (?1 IS NULL OR status IN (SELECT value FROM json_each(?1)))
              AND (?2 IS NULL OR scope = ?2)
              AND (?3 IS NULL OR created_at <= datetime('now', ?3))
              AND (?4 IS NULL OR created_at > datetime('now', ?4))
            ORDER BY created_at DESC, rowid DESC LIMIT ?5""",
        # -- operations
        distribution=f"""
            SELECT status, count(*) AS records, (julianday('now') - julianday(min(created_at))) * 86400 AS oldest
            FROM {table} GROUP BY status""",
        # Under the write lock, so nothing is locked to skip.
        purge=f"""
            DELETE FROM {table} WHERE rowid IN (
                SELECT rowid FROM {table}
                WHERE status IN ('COMPLETED', 'FAILED') AND expires_at <= datetime('now')
                ORDER BY expires_at LIMIT ?)""",
        compact=f"""
            UPDATE {table} SET response = NULL, updated_at = CURRENT_TIMESTAMP WHERE rowid IN (
                SELECT rowid FROM {table}
                WHERE status IN ('COMPLETED', 'FAILED') AND response IS NOT NULL
                  AND response_expires_at <= datetime('now')
                ORDER BY response_expires_at LIMIT ?)""",
        # What compact and purge would take, counted with their own conditions ('now' is one instant for
        # the whole statement).
        purgeable=f"""
            SELECT (
                SELECT count(*) FROM {table}
                WHERE status IN ('COMPLETED', 'FAILED') AND response IS NOT NULL
                  AND response_expires_at <= datetime('now')
            ) AS compacted, (
                SELECT count(*) FROM {table}
                WHERE status IN ('COMPLETED', 'FAILED') AND expires_at <= datetime('now')
            ) AS deleted""",
        # -- the outbox
        # In the unit of work's transaction: the messages exist if and only if it commits.
        write_outbox=f"""
            INSERT INTO {outbox} ({", ".join(_OUTBOX_COLUMNS)})
            VALUES ({", ".join("?" for _ in _OUTBOX_COLUMNS)})""",
        # The write lock of the relay's transaction keeps every other relay out: no row locks to take. A
        # parked message holds back the later messages of its (topic, key), as on PostgreSQL.
        claim_outbox=f"""
            SELECT id, message_id, topic, key, value, headers FROM {outbox} AS o
            WHERE sent_at IS NULL AND parked_at IS NULL
              AND NOT EXISTS (
                  SELECT 1 FROM {outbox} AS parked
                  WHERE parked.parked_at IS NOT NULL AND parked.sent_at IS NULL
                    AND parked.topic = o.topic AND parked.key = o.key AND parked.id < o.id
              )
            ORDER BY id LIMIT ?""",
        mark_sent=f"UPDATE {outbox} SET sent_at = CURRENT_TIMESTAMP WHERE id = ?",
        refuse=f"""
            UPDATE {outbox}
            SET attempts = attempts + 1, last_error = ?,
                parked_at = CASE WHEN attempts + 1 >= ? THEN CURRENT_TIMESTAMP END
            WHERE id = ?
            RETURNING attempts, parked_at""",
        parked=f"""
            SELECT message_id, topic, key, attempts, last_error, parked_at FROM {outbox}
            WHERE parked_at IS NOT NULL AND sent_at IS NULL
            ORDER BY id LIMIT ?""",
        release_parked=f"UPDATE {outbox} SET parked_at = NULL, attempts = 0 WHERE {parked_one}",
        drop_parked=f"DELETE FROM {outbox} WHERE {parked_one}",
        outbox_counts=f"SELECT count(*) AS pending, count(parked_at) AS parked FROM {outbox} WHERE sent_at IS NULL",
        # The database clock is stored as text, 'YYYY-MM-DD HH:MM:SS'.
        purge_sent=f"""
            DELETE FROM {outbox} WHERE id IN (
                SELECT id FROM {outbox}
                WHERE sent_at IS NOT NULL AND sent_at <= datetime('now', ?)
                ORDER BY id LIMIT ?)""",
        # -- the consumer's failures
        # The upsert counts atomically: two consumers of one message (a rebalance) each add one.
        count_failure=f"""
            INSERT INTO {names.failures} AS f (scope, key, attempts, last_error) VALUES (?, ?, 1, ?)
            ON CONFLICT (scope, key) DO UPDATE
            SET attempts = f.attempts + 1, last_error = excluded.last_error, last_failed_at = excluded.last_failed_at
            RETURNING attempts""",
        # In the transaction that applied the message (or dead-lettered it): the count goes with it.
        forget_failure=f"DELETE FROM {names.failures} WHERE scope = ? AND key = ?",
    )


class SqliteStorage:
    """`Storage` for sqlite+aiosqlite."""

    lookup_first = True
    """Replays read the record before the transaction takes the database-wide write lock."""

    def __init__(self, conn: AsyncConnection, driver: Any, names: Names) -> None:
        self.connection = self._conn = conn
        self._driver = driver  # the aiosqlite.Connection under `conn`
        self._sql = _statements(names)

    @classmethod
    async def open(cls, conn: AsyncConnection, names: Names) -> Self:
        """Bind to ``conn`` and the aiosqlite connection under it."""
        return cls(conn, (await pool_connection(conn)).driver_connection, names)

    async def lookup(self, scope: str, key: str) -> Record | None:
        """Read the record of (scope, key); see `Storage.lookup`."""
        row = await self._first(self._sql.lookup, scope, key)
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
        """Insert the IN_PROGRESS record; see `Storage.claim` (the write lock makes the wait moot; the
        horizons are all set by the completion, so ``retention`` is not needed)."""
        claimed = await self._first(self._sql.claim, scope, key, fingerprint, token.hex, fingerprint_version)
        return Raced() if claimed is None else Claimed()

    async def finish(
        self, scope: str, key: str, token: uuid.UUID, status: Status, response: bytes, retention: Retention
    ) -> bool:
        """Record the outcome; see `Storage.finish`."""
        later = _later(retention.response), _later(retention.record)
        return await self._one(self._sql.finish, status.value, response, *later, scope, key, token.hex)

    async def retake(self, scope: str, key: str, token: uuid.UUID, wait: float | None) -> bool:
        """Take a compact record over for a late request (under the write lock); see `Storage.retake`."""
        return await self._one(self._sql.retake, token.hex, scope, key)

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
        """Claim the key with a lease; see `Storage.lease_claim` (`begin` bounded the write lock's wait)."""
        version = fingerprint_version
        if await self._one(self._sql.lease_claim, scope, key, fingerprint, token.hex, _later(lease), version):
            return Claimed()
        found = await self.inspect(scope, key)
        return Raced() if found is None else Existing(found)

    async def inspect(self, scope: str, key: str) -> Record | None:
        """Read the record with its lease; see `Storage.inspect`."""
        row = await self._first(self._sql.inspect, scope, key)
        return None if row is None else _record(row, stale=bool(row.stale))

    async def reclaim(
        self, scope: str, key: str, stale: uuid.UUID, token: uuid.UUID, lease: timedelta, max_reclaims: int
    ) -> Record | None:
        """Take over a stale lease (the same conditions as PostgreSQL's); see `Storage.reclaim`."""
        row = await self._first(self._sql.reclaim, token.hex, *[max_reclaims] * 3, _later(lease), scope, key, stale.hex)
        return None if row is None else _record(row)

    async def renew(self, scope: str, key: str, token: uuid.UUID, lease: timedelta) -> bool:
        """Extend a held lease; see `Storage.renew`."""
        return await self._one(self._sql.renew, _later(lease), scope, key, token.hex)

    async def checkpoint(self, scope: str, key: str, token: uuid.UUID, name: str, data: bytes) -> bool:
        """Record a held lease's progress; see `Storage.checkpoint`."""
        return await self._one(self._sql.checkpoint, name, data, scope, key, token.hex)

    async def fence(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Check ``token`` still holds the record; the write lock of BEGIN IMMEDIATE keeps it so."""
        return await self._one(self._sql.fence, scope, key, token.hex)

    async def release(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Delete a held lease; see `Storage.release`."""
        return await self._one(self._sql.release, scope, key, token.hex)

    async def unresolved(self, limit: int) -> list[tuple[Record, timedelta]]:
        """List records that need a person; see `Storage.unresolved`."""
        return [(_record(row), timedelta(seconds=row.age)) for row in await self._all(self._sql.unresolved, limit)]

    async def resolve(self, scope: str, key: str, status: Status, response: bytes, retention: Retention) -> bool:
        """Record an operator's outcome; see `Storage.resolve`."""
        later = _later(retention.response), _later(retention.record)
        return await self._one(self._sql.resolve, status.value, response, *later, scope, key)

    async def records(
        self,
        statuses: Sequence[Status] | None,
        scope: str | None,
        older_than: timedelta | None,
        newer_than: timedelta | None,
        limit: int,
    ) -> list[Record]:
        """List records, newest first; see `Storage.records`."""
        values = None if statuses is None else json.dumps([status.value for status in statuses])
        rows = await self._all(self._sql.records, values, scope, _earlier(older_than), _earlier(newer_than), limit)
        return [_record(row, stale=bool(row.stale)) for row in rows]

    # -- operations -------------------------------------------------------------------------------------

    async def distribution(self) -> tuple[dict[Status, int], timedelta | None]:
        """Records per status and the oldest IN_PROGRESS age; see `Storage.distribution`."""
        rows = await self._all(self._sql.distribution)
        statuses = {Status(row.status): row.records for row in rows}
        oldest = [timedelta(seconds=row.oldest) for row in rows if row.status == Status.IN_PROGRESS]
        return statuses, (oldest[0] if oldest else None)

    async def compact(self, limit: int) -> int:
        """Drop responses past retention (under the write lock); see `Storage.compact`."""
        return await self._count(self._sql.compact, limit)

    async def purge(self, limit: int) -> int:
        """Delete expired finished records (under the write lock, so nothing is locked to skip)."""
        return await self._count(self._sql.purge, limit)

    async def purgeable(self) -> tuple[int, int]:
        """Count what compact and purge would take; see `Storage.purgeable`."""
        row = await self._first(self._sql.purgeable)
        assert row is not None  # aggregates: always one row
        return int(row.compacted), int(row.deleted)

    # -- the outbox -------------------------------------------------------------------------------------

    async def write_outbox(self, rows: Sequence[Mapping[str, object]]) -> None:
        """Insert messages; see `Storage.write_outbox` (nothing listens on SQLite: relays poll)."""
        params = [tuple(row[c] for c in _OUTBOX_COLUMNS) for row in rows]
        await self._conn.exec_driver_sql(self._sql.write_outbox, params)

    async def claim_outbox(self, limit: int) -> list[Message]:
        """Hold the next pending messages (the write lock holds them all); see `Storage.claim_outbox`."""
        return [
            Message(r.id, r.message_id, r.topic, r.key, r.value, decode_headers(r.headers))
            for r in await self._all(self._sql.claim_outbox, limit)
        ]

    async def mark_sent(self, ids: Sequence[int]) -> None:
        """Mark held messages sent; see `Storage.mark_sent`."""
        await self._conn.exec_driver_sql(self._sql.mark_sent, [(id,) for id in ids])

    async def refuse(self, id: int, error: str, max_attempts: int) -> tuple[int, bool]:
        """Count a refusal; see `Storage.refuse`."""
        row = await self._first(self._sql.refuse, error, max_attempts, id)
        assert row is not None  # the row is held by this batch
        return row.attempts, row.parked_at is not None

    async def parked(self, limit: int) -> list[Parked]:
        """The parked messages; see `Storage.parked`."""
        return [
            # The database clock as SQLAlchemy reads it back on SQLite: a naive datetime.
            Parked(r.message_id, r.topic, r.key, r.attempts, r.last_error, datetime.fromisoformat(r.parked_at))
            for r in await self._all(self._sql.parked, limit)
        ]

    async def release_parked(self, message_id: str) -> bool:
        """Unpark a message; see `Storage.release_parked`."""
        return await self._count(self._sql.release_parked, message_id) == 1

    async def drop_parked(self, message_id: str) -> bool:
        """Delete a parked message; see `Storage.drop_parked`."""
        return await self._count(self._sql.drop_parked, message_id) == 1

    async def outbox_counts(self) -> tuple[int, int]:
        """Pending and parked messages; see `Storage.outbox_counts`."""
        row = await self._first(self._sql.outbox_counts)
        assert row is not None  # an aggregate: always one row
        return int(row.pending), int(row.parked)

    async def purge_sent(self, older_than: timedelta, limit: int) -> int:
        """Delete old sent messages (under the write lock); see `Storage.purge_sent`."""
        return await self._count(self._sql.purge_sent, f"-{older_than.total_seconds()} seconds", limit)

    # -- the consumer's failures ------------------------------------------------------------------------

    async def count_failure(self, scope: str, key: str, error: str) -> int:
        """Count a handler failure; see `Storage.count_failure`."""
        row = await self._first(self._sql.count_failure, scope, key, error)
        assert row is not None  # an upsert: always one row
        attempts: int = row.attempts
        return attempts

    async def forget_failure(self, scope: str, key: str) -> None:
        """Drop a failure count; see `Storage.forget_failure`."""
        await self._conn.exec_driver_sql(self._sql.forget_failure, (scope, key))

    # -- running statements -----------------------------------------------------------------------------

    async def _first(self, sql: str, *args: object) -> Any:
        """The first row of ``sql``, or ``None``."""
        return (await self._conn.exec_driver_sql(sql, args)).first()

    async def _all(self, sql: str, *args: object) -> list[Any]:
        """Every row of ``sql``."""
        return list(await self._conn.exec_driver_sql(sql, args))

    async def _one(self, sql: str, *args: object) -> bool:
        """Run a statement that returns a row when it matched its record."""
        return await self._first(sql, *args) is not None

    async def _count(self, sql: str, *args: object) -> int:
        """Run a statement; return how many rows it changed."""
        return (await self._conn.exec_driver_sql(sql, args)).rowcount


DIALECT = Dialect(open=SqliteStorage.open)
"""SQLite's entry in `idembarrier._storage.DIALECTS` (it cannot notify: relays poll)."""

"""MariaDB through asyncmy or aiomysql: every statement on idembarrier's tables, named, with its concurrency condition.

MariaDB (10.6 or later, InnoDB) offers what the barrier needs, in its own words: a claim is a plain
``INSERT``, which waits on a concurrent uncommitted insert of the same key and then succeeds (it rolled back)
or fails with 1062 (it committed); the wait is bounded per statement with ``SET STATEMENT
max_statement_time=…, innodb_lock_wait_timeout=… FOR`` (1969 or 1205; the transaction stays usable), and
``innodb_lock_wait_timeout=0`` fails at once. There is no ``UPDATE … RETURNING`` and no data-modifying CTE, so
where PostgreSQL reads what it changed in the same statement, MariaDB locks the row first (``FOR UPDATE``, or
``FOR UPDATE SKIP LOCKED`` where a holder must be passed by) and reads it after, in the same transaction. A
read after a 1062 is a locking read (``LOCK IN SHARE MODE``): it sees the latest committed row whatever
snapshot REPEATABLE READ (MariaDB's default) took earlier. Timestamps are the database's clock in UTC
(``UTC_TIMESTAMP(6)``, the statement's start, so each statement of a transaction sees a fresh time). There is
no LISTEN: relays poll.

The statements go straight to the driver's connection under SQLAlchemy's, inside SQLAlchemy's transaction,
as on PostgreSQL; the column types they rely on (keys compared byte for byte, microsecond UTC timestamps)
are the migrations' (see `idembarrier._mysql_ddl`). MySQL itself has neither ``SET STATEMENT`` nor ``INSERT …
RETURNING``: a MySQL server is refused at the first connection.
"""

from __future__ import annotations

import inspect
import math
import uuid
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any, Self

from ._errors import mysql_code
from ._exceptions import ConfigurationError, UnitOfWorkError
from ._mysql_sql import OUTBOX_COLUMNS, statements
from ._outbox import Message, Parked, decode_headers
from ._record import Record, Status
from ._storage import Claim, Claimed, Dialect, Existing, Raced, pool_connection

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._config import Retention
    from ._storage import Names

__all__ = ["DIALECT", "MysqlStorage", "check_server"]

_DUPLICATE = 1062  # ER_DUP_ENTRY: the key is taken by a committed record
_MINIMUM = (10, 6)  # SKIP LOCKED and NOWAIT arrived in MariaDB 10.6


def _utc(value: datetime | None) -> datetime | None:
    """A ``DATETIME(6)`` as read back (naive, holding UTC), made aware."""
    return None if value is None else value.replace(tzinfo=UTC)


def _micros(delta: timedelta) -> int:
    return delta // timedelta(microseconds=1)


def _record(row: Mapping[str, Any], *, stale: bool = False) -> Record:
    """The record in ``row``'s columns, read by name (the lease's columns where the statement reads them)."""
    return Record(
        scope=row["scope"],
        key=row["key"],
        status=(status := Status(row["status"])),
        fingerprint=row["fingerprint"],
        fingerprint_version=row.get("fingerprint_version"),
        response=row["response"],
        token=uuid.UUID(str(row["token"])),
        attempt=row["attempt"],
        created_at=_utc(row["created_at"]),
        completed_at=_utc(row["completed_at"]),
        expires_at=_utc(row["expires_at"]),
        locked_until=_utc(row.get("locked_until")),
        response_expires_at=_utc(row.get("response_expires_at")),
        response_expires_in=None if (left := row.get("response_expires_in")) is None else float(left),
        checkpoint=row.get("checkpoint_name"),
        checkpoint_data=row.get("checkpoint_data"),
        stale=stale and status is Status.IN_PROGRESS,
    )


def _bounded(sql: str, wait: float | None) -> str:
    """``sql`` with its lock waits bounded by ``wait`` seconds (``None``: not at all), for it alone.

    ``max_statement_time`` has microsecond precision and ends a statement blocked on a row lock (1969);
    ``innodb_lock_wait_timeout`` (whole seconds, 1205) is the backstop, and at 0 fails at once. Either error
    ends the statement only: the transaction stays usable, as after PostgreSQL's lock_timeout inside a
    savepoint.
    """
    if wait is None or wait <= 0:
        return f"SET STATEMENT innodb_lock_wait_timeout=0 FOR {sql}"
    return f"SET STATEMENT max_statement_time={wait:.6f}, innodb_lock_wait_timeout={math.ceil(wait) + 1} FOR {sql}"


def _pairs(count: int) -> str:
    """``count`` (scope, key) placeholders for ``(scope, `key`) IN (…)``."""
    return ", ".join(["(%s, %s)"] * count)


class MysqlStorage:
    """`Storage` for MariaDB, through asyncmy or aiomysql."""

    lookup_first = False
    """A claim that meets a finished record reads it in the next statement, under its lock: no lookup first."""

    def __init__(self, conn: AsyncConnection, driver: Any, names: Names) -> None:
        self.connection = self._conn = conn
        self._driver = driver  # the asyncmy or aiomysql connection under `conn`
        self._rows = _dict_cursor(driver)
        self._sql = statements(names)

    @classmethod
    async def open(cls, conn: AsyncConnection, names: Names) -> Self:
        """Bind to ``conn`` and the driver's connection under it."""
        return cls(conn, (await pool_connection(conn)).driver_connection, names)

    async def lookup(self, scope: str, key: str) -> Record | None:
        """Read the record of (scope, key); see `Storage.lookup`."""
        row = await self._first(self._sql.lookup, scope, key)
        return None if row is None else _record(row)

    async def begin(self, wait: float | None) -> None:
        """Make sure the claim runs in a transaction: with autocommit off, the server opens one at the claim."""
        if self._driver.get_autocommit():
            raise UnitOfWorkError(
                "the barrier needs a transaction, but this connection is in AUTOCOMMIT mode: "
                "use an engine or session without isolation_level='AUTOCOMMIT'"
            )

    def in_transaction(self) -> bool:
        """Whether SQLAlchemy's connection is inside a transaction; see `Storage.in_transaction`."""
        sync = self._conn.sync_connection
        return sync is not None and not sync.closed and sync.in_transaction()

    async def claim(
        self,
        scope: str,
        key: str,
        fingerprint: bytes | None,
        token: uuid.UUID,
        wait: float | None,
        *,
        fingerprint_version: int | None = None,
        retention: Retention | None = None,  # the completion sets every horizon here
    ) -> Claim:
        """Insert the IN_PROGRESS record; see `Storage.claim` (a wait that runs out raises 1969 or 1205)."""
        args = (scope, key, fingerprint, str(token), fingerprint_version)
        if await self._insert(_bounded(self._sql.claim, wait), *args):
            return Claimed()
        row = await self._first(_bounded(self._sql.existing, wait), scope, key)
        return Raced() if row is None else Existing(_record(row))

    async def finish(
        self, scope: str, key: str, token: uuid.UUID, status: Status, response: bytes, retention: Retention
    ) -> bool:
        """Record the outcome; see `Storage.finish`."""
        horizons = _micros(retention.response), _micros(retention.record)
        return await self._count(self._sql.finish, status.value, response, *horizons, scope, key, str(token)) == 1

    async def retake(self, scope: str, key: str, token: uuid.UUID, wait: float | None) -> bool:
        """Take a compact record over for a late request; see `Storage.retake`."""
        return await self._count(_bounded(self._sql.retake, wait), str(token), scope, key) == 1

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
        """Claim the key with a lease; see `Storage.lease_claim`."""
        args = (scope, key, fingerprint, str(token), _micros(lease), fingerprint_version)
        if await self._insert(_bounded(self._sql.lease_claim, wait), *args):
            return Claimed()
        row = await self._first(_bounded(self._sql.lease_existing, wait), scope, key)
        return Raced() if row is None else Existing(_record(row, stale=bool(row["stale"])))

    async def inspect(self, scope: str, key: str) -> Record | None:
        """Read the record with its lease; see `Storage.inspect`."""
        row = await self._first(self._sql.inspect, scope, key)
        return None if row is None else _record(row, stale=bool(row["stale"]))

    async def reclaim(
        self, scope: str, key: str, stale: uuid.UUID, token: uuid.UUID, lease: timedelta, max_reclaims: int
    ) -> Record | None:
        """Take over a stale lease (lock, update, read, in one transaction); see `Storage.reclaim`."""
        if await self._first(self._sql.reclaim_lock, scope, key, str(stale)) is None:
            return None
        cases = (max_reclaims, max_reclaims, _micros(lease), max_reclaims)
        await self._count(self._sql.reclaim, str(token), *cases, scope, key, str(stale))
        row = await self._first(self._sql.reclaimed, scope, key)
        return None if row is None else _record(row)

    async def renew(self, scope: str, key: str, token: uuid.UUID, lease: timedelta) -> bool:
        """Extend a held lease; see `Storage.renew`."""
        return await self._count(self._sql.renew, _micros(lease), scope, key, str(token)) == 1

    async def checkpoint(self, scope: str, key: str, token: uuid.UUID, name: str, data: bytes) -> bool:
        """Record a held lease's progress; see `Storage.checkpoint`."""
        return await self._count(self._sql.checkpoint, name, data, scope, key, str(token)) == 1

    async def fence(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Lock the record if ``token`` still holds it; see `Storage.fence`."""
        return await self._first(self._sql.fence, scope, key, str(token)) is not None

    async def release(self, scope: str, key: str, token: uuid.UUID) -> bool:
        """Delete a held lease; see `Storage.release`."""
        return await self._count(self._sql.release, scope, key, str(token)) == 1

    async def unresolved(self, limit: int) -> list[tuple[Record, timedelta]]:
        """List records that need a person; see `Storage.unresolved`."""
        rows = await self._all(self._sql.unresolved, limit)
        return [(_record(row), timedelta(microseconds=int(row["age"]))) for row in rows]

    async def resolve(self, scope: str, key: str, status: Status, response: bytes, retention: Retention) -> bool:
        """Record an operator's outcome; see `Storage.resolve`."""
        horizons = _micros(retention.response), _micros(retention.record)
        return await self._count(self._sql.resolve, status.value, response, *horizons, scope, key) == 1

    async def records(
        self,
        statuses: Sequence[Status] | None,
        scope: str | None,
        older_than: timedelta | None,
        newer_than: timedelta | None,
        limit: int,
    ) -> list[Record]:
        """List records, newest first; see `Storage.records`."""
        values = None if statuses is None else ",".join(status.value for status in statuses)
        older = None if older_than is None else _micros(older_than)
        newer = None if newer_than is None else _micros(newer_than)
        rows = await self._all(self._sql.records, values, values, scope, scope, older, older, newer, newer, limit)
        return [_record(row, stale=bool(row["stale"])) for row in rows]

    # -- operations -------------------------------------------------------------------------------------

    async def distribution(self) -> tuple[dict[Status, int], timedelta | None]:
        """Records per status and the oldest IN_PROGRESS age; see `Storage.distribution`."""
        rows = await self._all(self._sql.distribution)
        statuses = {Status(row["status"]): int(row["records"]) for row in rows}
        oldest = [int(row["oldest"]) for row in rows if row["status"] == Status.IN_PROGRESS]
        return statuses, (timedelta(microseconds=oldest[0]) if oldest else None)

    async def compact(self, limit: int) -> int:
        """Drop responses past retention, skipping locked rows; see `Storage.compact`."""
        held = await self._all(self._sql.compact_lock, limit)
        if not held:
            return 0
        flat = [value for row in held for value in (row["scope"], row["key"])]
        return await self._count(self._sql.compact.format(pairs=_pairs(len(held))), *flat)

    async def purge(self, limit: int) -> int:
        """Delete expired finished records, skipping locked ones; see `Storage.purge`."""
        held = await self._all(self._sql.purge_lock, limit)
        if not held:
            return 0
        flat = [value for row in held for value in (row["scope"], row["key"])]
        return await self._count(self._sql.purge.format(pairs=_pairs(len(held))), *flat)

    async def purgeable(self) -> tuple[int, int]:
        """Count what compact and purge would take; see `Storage.purgeable`."""
        row = await self._first(self._sql.purgeable)
        assert row is not None  # aggregates: always one row
        return int(row["compacted"]), int(row["deleted"])

    # -- the outbox -------------------------------------------------------------------------------------

    async def write_outbox(self, rows: Sequence[Mapping[str, object]]) -> None:
        """Insert messages; see `Storage.write_outbox` (nothing listens on MariaDB: relays poll)."""
        cursor = await self._cursor()
        try:
            await cursor.executemany(self._sql.write_outbox, [tuple(row[c] for c in OUTBOX_COLUMNS) for row in rows])
        finally:
            await _maybe(cursor.close())

    async def claim_outbox(self, limit: int) -> list[Message]:
        """Hold the next pending messages; of each (topic, key), only a run from its oldest pending one."""
        rows = await self._all(self._sql.claim_outbox, limit)
        if not rows:
            return []
        topics = list(dict.fromkeys(r["topic"] for r in rows))
        sql = self._sql.outbox_pending.format(topics=", ".join(["%s"] * len(topics)))
        pending: dict[tuple[str, bytes | None], list[int]] = {}
        for p in await self._all(sql, *topics, rows[-1]["id"]):
            pending.setdefault((p["topic"], p["key"]), []).append(int(p["id"]))
        sent: dict[tuple[str, bytes | None], int] = {}
        batch = []
        for r in rows:  # in id order: the n-th held row of a key goes only if it is the key's n-th pending one
            pair = (r["topic"], r["key"])
            position = sent.get(pair, 0)
            ids = pending.get(pair, [])
            if position < 0 or position >= len(ids) or ids[position] != r["id"]:
                sent[pair] = -1  # a gap: this key's later rows wait for the next claim
                continue
            sent[pair] = position + 1
            batch.append(
                Message(r["id"], r["message_id"], r["topic"], r["key"], r["value"], decode_headers(r["headers"]))
            )
        return batch

    async def mark_sent(self, ids: Sequence[int]) -> None:
        """Mark held messages sent; see `Storage.mark_sent`."""
        if ids:
            await self._count(self._sql.mark_sent.format(ids=", ".join(["%s"] * len(ids))), *ids)

    async def refuse(self, id: int, error: str, max_attempts: int) -> tuple[int, bool]:
        """Count a refusal (the row is held by this batch, so the read after sees the update)."""
        await self._count(self._sql.refuse, error, max_attempts, id)
        row = await self._first(self._sql.refused, id)
        assert row is not None  # the row is held by this batch
        return int(row["attempts"]), row["parked_at"] is not None

    async def parked(self, limit: int) -> list[Parked]:
        """The parked messages; see `Storage.parked`."""
        return [
            Parked(
                r["message_id"],
                r["topic"],
                r["key"],
                r["attempts"],
                r["last_error"],
                r["parked_at"].replace(tzinfo=UTC),
            )
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
        return int(row["pending"]), int(row["parked"])

    async def purge_sent(self, older_than: timedelta, limit: int) -> int:
        """Delete old sent messages, skipping held ones; see `Storage.purge_sent`."""
        held = [row["id"] for row in await self._all(self._sql.purge_sent_lock, _micros(older_than), limit)]
        if not held:
            return 0
        return await self._count(self._sql.purge_sent.format(ids=", ".join(["%s"] * len(held))), *held)

    # -- the consumer's failures ------------------------------------------------------------------------

    async def count_failure(self, scope: str, key: str, error: str) -> int:
        """Count a handler failure; see `Storage.count_failure`."""
        row = await self._first(self._sql.count_failure, scope, key, error)
        assert row is not None  # an upsert: always one row
        return int(row["attempts"])

    async def forget_failure(self, scope: str, key: str) -> None:
        """Drop a failure count; see `Storage.forget_failure`."""
        await self._count(self._sql.forget_failure, scope, key)

    # -- running statements -----------------------------------------------------------------------------

    async def _cursor(self) -> Any:
        return await _maybe(self._driver.cursor(self._rows))

    async def _run(self, sql: str, args: Sequence[object]) -> tuple[list[dict[str, Any]], int]:
        cursor = await self._cursor()
        try:
            await cursor.execute(sql, tuple(args))
            rows = await _maybe(cursor.fetchall()) if cursor.description else []
            return list(rows), int(cursor.rowcount)
        finally:
            await _maybe(cursor.close())

    async def _first(self, sql: str, *args: object) -> dict[str, Any] | None:
        rows, _ = await self._run(sql, args)
        return rows[0] if rows else None

    async def _all(self, sql: str, *args: object) -> list[dict[str, Any]]:
        rows, _ = await self._run(sql, args)
        return rows

    async def _count(self, sql: str, *args: object) -> int:
        """Run a statement; return how many rows it matched."""
        _, count = await self._run(sql, args)
        return count

    async def _insert(self, sql: str, *args: object) -> bool:
        """Run an INSERT of a key; return False where the key was taken (1062), which ends this statement only."""
        try:
            await self._run(sql, args)
        except Exception as exc:
            if mysql_code(exc) == _DUPLICATE:
                return False
            raise
        return True


def _dict_cursor(driver: Any) -> Any:
    """The driver's cursor class that returns rows as dicts (asyncmy's, or `_aiomysql_rows`)."""
    if type(driver).__module__.startswith("aiomysql"):
        return _aiomysql_rows()
    from asyncmy.cursors import DictCursor

    return DictCursor


@cache
def _aiomysql_rows() -> Any:
    """aiomysql's DictCursor, sending bytes as hexadecimal literals.

    aiomysql 0.3 escapes bytes with PyMySQL's ``escape_bytes_prefixed``, which PyMySQL 2.2 replaced by a string
    ("DO NOT IMPORT THIS!!!"): every bytes parameter raises TypeError. ``X'…'`` is binary-safe whatever the
    connection's character set.
    """
    from aiomysql.cursors import DictCursor

    class Rows(DictCursor):  # type: ignore[misc]
        def _escape_args(self, args: object, conn: Any) -> object:
            if isinstance(args, tuple | list):
                return tuple(f"X'{arg.hex()}'" if isinstance(arg, bytes) else conn.escape(arg) for arg in args)
            return super()._escape_args(args, conn)

    return Rows


async def _maybe(value: Any) -> Any:
    """``value``, awaited where the driver returned an awaitable (aiomysql's cursors, fetches and closes)."""
    return await value if inspect.isawaitable(value) else value


async def check_server(conn: AsyncConnection) -> None:
    """Refuse a server the statements do not run on: MySQL (no SET STATEMENT, no INSERT … RETURNING), MariaDB < 10.6."""
    dialect = conn.dialect
    version = tuple(getattr(dialect, "server_version_info", None) or ())
    if not getattr(dialect, "is_mariadb", False):
        raise ConfigurationError(
            f"this server is MySQL {'.'.join(map(str, version))}, not MariaDB: idembarrier's statements for "
            "mysql+ URLs need MariaDB 10.6 or later (SET STATEMENT, INSERT ... RETURNING, SKIP LOCKED)"
        )
    if version < _MINIMUM:
        raise ConfigurationError(
            f"MariaDB {'.'.join(map(str, version))} is too old: idembarrier needs 10.6 or later (SKIP LOCKED)"
        )


DIALECT = Dialect(open=MysqlStorage.open, check=check_server)
"""MariaDB's entry in `idembarrier._storage.DIALECTS` (it cannot notify: relays poll)."""

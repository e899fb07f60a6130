"""The entry point: a `Barrier` hands out units of work over one records table."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Generic, NamedTuple

import anyio
from typing_extensions import TypeVar

from ._codec import JSON, Codec, JSONCodec, round_trip
from ._config import (
    DEFAULT_CLEANUP_TIMEOUT,
    DEFAULT_LEASE,
    DEFAULT_RETENTION,
    DEFAULT_TABLE,
    DEFAULT_WAIT_TIMEOUT,
    ExpiredReplay,
    OnConflict,
    Options,
    Retention,
    as_retention,
    check_wait_timeout,
)
from ._exceptions import ConfigurationError, ConflictError, KeyInProgressError, RecordedFailureError
from ._keys import Fingerprint, FingerprintVersions, validate_key
from ._lease import Lease
from ._metrics import Outcome, Stats
from ._record import Record, Status
from ._relay import outbox_counts
from ._runtime import Runtime
from ._uow import UnitOfWork

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from ._privacy import KeyedHash
    from ._storage import Storage

__all__ = ["Barrier"]

PURGE_SHARE = 1.0
"""`Barrier.purge`'s default ``max_share``: the share of wall-clock time its batches may take."""

R = TypeVar("R", default=JSON)


class Barrier(Generic[R]):
    """Makes writes idempotent: one record per (scope, key), committed with the business writes.

    Args:
        sessionmaker: Opens the sessions of units of work that are not given one.
        codec: Encodes responses for their records (default: JSON values).
        table: Name of the records table.
        schema: PostgreSQL schema of the records table.
        on_conflict: What a concurrent duplicate does by default: wait for the holder, or fail fast.
        wait_timeout: Longest wait for a concurrent holder, in seconds.
        retention: The horizons of finished records: a `Retention`, or a timedelta for the response's
            (the compact record then stays at least 30 days).
        retention_by_scope: `Retention` per scope, overriding ``retention``.
        on_expired_replay: What a replay that finds only the compact record does (default: reject).
        max_replay_window: The longest a replay may lag its request (Kafka retention, consumer-lag bound);
            refused with `ConfigurationError` when some record retention is shorter.
        check_schema: On first use, raise `SchemaError` unless the table is at the migrations' head.
        on_reclaim: Called with the record each time a stale lease is reclaimed (or turned UNKNOWN).
        fingerprint_versions: The fingerprint functions by version (`FingerprintVersions`): each call's
            ``fingerprint=`` is the request they map; a record made by an older, still-registered version is
            compared by that version, so a deploy may change what is fingerprinted.
        cleanup_timeout: Longest wait, in seconds, for a unit of work's rollback after a failure or a
            cancellation. A connection that does not answer within it is invalidated, never pooled again,
            so a caller's own deadline is overrun by at most about this much.
        keyed_hash: Store each key as a keyed hash instead (`KeyedHash`): the key itself is never written, and
            records, errors and the outbox's headers carry the hash. Every call still takes the key itself.
        replay_from_memory: Answer a replay of a key whose finished record was read in this process from
            that record, without a connection, until 1 s before its response expires by the database's clock
            (a finished record cannot change before then). Not with a caller's session, nor with
            ``lookup_first=False``. ``False``: every replay asks the database.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        codec: Codec[R] | None = None,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        on_conflict: OnConflict = OnConflict.WAIT,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        retention: timedelta | Retention = DEFAULT_RETENTION,
        retention_by_scope: Mapping[str, Retention] | None = None,
        on_expired_replay: ExpiredReplay = ExpiredReplay.REJECT,
        max_replay_window: timedelta | None = None,
        check_schema: bool = True,
        on_reclaim: Callable[[Record], object] | None = None,
        cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
        fingerprint_versions: FingerprintVersions | None = None,
        keyed_hash: KeyedHash | None = None,
        replay_from_memory: bool = True,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.codec: Codec[R] = codec if codec is not None else JSONCodec()  # type: ignore[assignment]
        self.options = Options(
            table=table,
            schema=schema,
            on_conflict=on_conflict,
            wait_timeout=wait_timeout,
            retention=as_retention(retention),
            retention_by_scope=retention_by_scope or {},
            on_expired_replay=on_expired_replay,
            max_replay_window=max_replay_window,
            check_schema=check_schema,
            cleanup_timeout=cleanup_timeout,
            replay_from_memory=replay_from_memory,
        )
        self._runtime = Runtime(sessionmaker, codec=self.codec, options=self.options, on_reclaim=on_reclaim)
        self._fingerprint_versions = fingerprint_versions
        self._keyed_hash = keyed_hash

    @property
    def runtime(self) -> Runtime[R]:
        """What this barrier hands down to the work it serves: units of work, leases, relays, consumers."""
        return self._runtime

    def unit_of_work(
        self,
        key: str,
        *,
        scope: str,
        fingerprint: object = None,
        session: AsyncSession | None = None,
        on_conflict: OnConflict | None = None,
        wait_timeout: float | None = None,
        retention: timedelta | Retention | None = None,
        lookup_first: bool | None = None,
    ) -> UnitOfWork[R]:
        """Return the unit of work for ``key`` in ``scope``, to be entered with ``async with``.

        Args:
            key: The idempotency key: 1-255 characters, no control characters.
            scope: Namespace of the key (tenant, operation…); the same key in two scopes is two records.
            fingerprint: The request (bytes, a JSON value, typed values), hashed; a replay with another one raises
                `FingerprintMismatchError`. ``None``: the key alone identifies the request.
            session: Join this session's transaction instead of opening one. The barrier then never
                commits: on a clean exit the record and the body's writes are left in the caller's
                transaction (inside a released savepoint) for the caller to commit or roll back; if the
                body raises, the savepoint is rolled back and the caller's transaction stays usable.
            on_conflict: Overrides the barrier's choice for a concurrent duplicate.
            wait_timeout: Overrides the barrier's longest wait, in seconds.
            retention: Overrides the horizons of this record (see `Barrier`'s ``retention``).
            lookup_first: Read the record before claiming, outside any transaction, so that a replay costs one
                read (no BEGIN, claim, ROLLBACK) and a first execution one more round trip. ``None`` (the
                default): where claims serialize (SQLite), and for a key that finished in this process lately
                (a retry landing where its first request ran). Only the order of statements changes: the
                lookup replays what the database says is finished; everything else goes on to the claim.
                ``False`` also skips the barrier's memory of finished records (``replay_from_memory``).

        Raises:
            InvalidKeyError: The key or scope is unusable; raised here, before any SQL.
            InvalidFingerprintError: The fingerprint has no canonical form.
        """
        scope, key = self._identify(scope, key)
        return UnitOfWork(
            self._runtime,
            key=key,
            scope=scope,
            fingerprint=Fingerprint.of(fingerprint, self._fingerprint_versions),
            session=session,
            on_conflict=self.options.on_conflict if on_conflict is None else OnConflict(on_conflict),
            wait_timeout=self.options.wait_timeout if wait_timeout is None else check_wait_timeout(wait_timeout),
            retention=self.options.retention_for(scope) if retention is None else self._checked(retention),
            lookup_first=lookup_first,
        )

    def _identify(self, scope: str, key: str) -> tuple[str, str]:
        """The scope and the key as stored: both validated, the key hashed when the barrier hashes keys."""
        scope, key = validate_key(scope, what="scope"), validate_key(key)
        return scope, key if self._keyed_hash is None else self._keyed_hash(scope, key)

    def _checked(self, retention: timedelta | Retention) -> Retention:
        """A per-call retention, refused if it would drop records inside the declared replay window."""
        horizons, window = as_retention(retention), self.options.max_replay_window
        if window is not None and horizons.record < window:
            raise ConfigurationError(
                f"this call keeps its record {horizons.record}, less than the maximum replay window {window}"
            )
        return horizons

    async def execute(
        self,
        key: str,
        handler: Callable[[AsyncSession], Awaitable[R]],
        *,
        scope: str,
        fingerprint: object = None,
        session: AsyncSession | None = None,
        on_conflict: OnConflict | None = None,
        wait_timeout: float | None = None,
        retention: timedelta | Retention | None = None,
        lookup_first: bool | None = None,
    ) -> R:
        """Run ``handler(session)`` once per key and return its response; replays return the stored one.

        The handler does the business writes through the session it is given and returns the response,
        which is recorded as COMPLETED in the same transaction. Takes the options of `unit_of_work`.

        Raises:
            RecordedFailureError: The key's recorded outcome is FAILED (recorded with `UnitOfWork.fail`).
        """
        async with self.unit_of_work(
            key,
            scope=scope,
            fingerprint=fingerprint,
            session=session,
            on_conflict=on_conflict,
            wait_timeout=wait_timeout,
            retention=retention,
            lookup_first=lookup_first,
        ) as uow:
            if not uow.replayed:
                uow.complete(await handler(uow.session))
        if uow.record is not None and uow.record.status is Status.FAILED:
            raise RecordedFailureError(uow.record, uow.response, replayed=True)
        return uow.response

    # -- leased work ------------------------------------------------------------------------------------

    def leased(
        self,
        key: str,
        *,
        scope: str,
        fingerprint: object = None,
        lease: timedelta = DEFAULT_LEASE,
        heartbeat: float | None = None,
        max_reclaims: int = 2,
        on_conflict: OnConflict | None = None,
        wait_timeout: float | None = None,
    ) -> Lease[R]:
        """Return a lease on ``key`` for work with external side effects, to be entered with ``async with``.

        Args:
            key: The idempotency key.
            scope: Namespace of the key.
            fingerprint: The request, hashed; checked on replays and reclaims alike.
            lease: How long the claim stays this caller's without renewal (database clock).
            heartbeat: Renew the lease every this many seconds while the block runs (``None``: only by
                `Lease.renew`). A renewal that finds the lease gone marks it lost.
            max_reclaims: How many times a stale lease may be reclaimed before the key turns UNKNOWN.
            on_conflict: A live lease held by someone else: wait for it to finish or go stale (polling,
                up to ``wait_timeout``), or fail fast with `KeyInProgressError`.
            wait_timeout: Overrides the barrier's longest wait, in seconds.

        Raises:
            InvalidKeyError: The key or scope is unusable.
            InvalidFingerprintError: The fingerprint has no canonical form.
        """
        if not lease > timedelta(0):
            raise ConfigurationError(f"lease must be a positive timedelta, not {lease!r}")
        if heartbeat is not None:
            check_wait_timeout(heartbeat)
        if max_reclaims < 0:
            raise ConfigurationError(f"max_reclaims must be at least 0, not {max_reclaims!r}")
        scope, key = self._identify(scope, key)
        return Lease(
            self._runtime,
            key=key,
            scope=scope,
            fingerprint=Fingerprint.of(fingerprint, self._fingerprint_versions),
            lease=lease,
            heartbeat=heartbeat,
            max_reclaims=max_reclaims,
            on_conflict=self.options.on_conflict if on_conflict is None else OnConflict(on_conflict),
            wait_timeout=self.options.wait_timeout if wait_timeout is None else check_wait_timeout(wait_timeout),
        )

    async def inspect(self, key: str, *, scope: str) -> Record | None:
        """Read the record of ``key`` in ``scope`` as it stands (``None`` if there is none).

        Its ``stale`` tells whether an IN_PROGRESS record's lease had run out when it was read.
        """
        scope, key = self._identify(scope, key)
        return await self._runtime.atomically(lambda storage: storage.inspect(scope, key))

    async def unresolved(self, *, limit: int = 100) -> list[Unresolved]:
        """List the keys that need a person, oldest first: UNKNOWN records and leases gone stale."""
        found = await self._runtime.atomically(lambda storage: storage.unresolved(limit))
        return [Unresolved(record, age) for record, age in found]

    async def records(
        self,
        *,
        status: Status | Iterable[Status] | None = None,
        scope: str | None = None,
        older_than: timedelta | None = None,
        newer_than: timedelta | None = None,
        limit: int = 100,
    ) -> list[Record]:
        """List records, newest first, with every horizon (``response_expires_at`` included), in one query.

        Args:
            status: Only records in this status, or in one of these (``None``: any).
            scope: Only records of this scope (``None``: any).
            older_than: Only records created at least this long ago (database clock).
            newer_than: Only records created less than this long ago (database clock).
            limit: The most records returned.

        Raises:
            ConfigurationError: A filter is unusable (no status, a negative age, a limit below 1).
            InvalidKeyError: The scope is unusable.
        """
        statuses = None if status is None else _statuses(status)
        scope = None if scope is None else validate_key(scope, what="scope")
        for name, age in (("older_than", older_than), ("newer_than", newer_than)):
            if age is not None and not (isinstance(age, timedelta) and age >= timedelta(0)):
                raise ConfigurationError(f"{name} must be a timedelta of at least 0, not {age!r}")
        if limit < 1:
            raise ConfigurationError(f"limit must be at least 1, not {limit!r}")
        return await self._runtime.atomically(
            lambda storage: storage.records(statuses, scope, older_than, newer_than, limit)
        )

    async def resolve(
        self, key: str, *, scope: str, status: Status, response: R, retention: timedelta | Retention | None = None
    ) -> None:
        """Record an operator's outcome for an UNKNOWN record or a stale lease.

        Raises:
            KeyInProgressError: A live lease holds the key; it may still finish by itself.
            ConflictError: The key has no record, or one that is already finished.
        """
        if not status.finished:
            raise ConfigurationError(f"a key is resolved to COMPLETED or FAILED, not {status}")
        encoded, _ = round_trip(self.codec, response)  # refused here if it could never replay
        keep = self.options.retention_for(scope) if retention is None else self._checked(retention)
        scope, key = self._identify(scope, key)
        if await self._runtime.atomically(lambda storage: storage.resolve(scope, key, status, encoded, keep)):
            return
        found = await self._runtime.atomically(lambda storage: storage.inspect(scope, key))
        if found is not None and found.status is Status.IN_PROGRESS:
            raise KeyInProgressError(scope=scope, key=key, record=found)
        state = "has no record" if found is None else f"is already {found.status}"
        raise ConflictError(f"key {key!r} in scope {scope!r} {state}", scope=scope, key=key, record=found)

    def observe(self, observer: Callable[[Outcome, str], object]) -> None:
        """Call ``observer(outcome, scope)`` for every outcome this barrier counts (metrics exporters use it).

        Observers run inline and must be quick; an exception from one propagates to the call it observes.
        """
        self._runtime.observe(observer)

    # -- operations -------------------------------------------------------------------------------------

    async def stats(self) -> Stats:
        """This process's outcome counts, the table's status distribution and the outbox's backlog (two queries)."""
        statuses, oldest = await self._runtime.atomically(lambda storage: storage.distribution())
        pending, parked = await outbox_counts(self._runtime)
        return Stats(
            outcomes=self._runtime.outcomes,
            statuses=statuses,
            oldest_in_progress=oldest,
            outbox_pending=pending,
            outbox_parked=parked,
        )

    async def purge(
        self,
        *,
        batch_size: int = 1000,
        max_share: float = PURGE_SHARE,
        on_batch: Callable[[str, int], object] | None = None,
    ) -> Purged:
        """Apply retention, in batches: drop responses past their horizon, then delete expired records.

        A record whose response is dropped stays as a compact record until ``expires_at``, so a late replay
        is still recognised (see ``on_expired_replay``). Only COMPLETED and FAILED records are touched, never
        IN_PROGRESS or UNKNOWN ones. Each batch is its own short transaction and skips rows another purger
        (or a claim) has locked, so several purgers and live traffic run side by side. ``on_batch`` is
        called with ``"compacted"`` or ``"deleted"`` and each batch's count.

        ``max_share`` paces the purge so that it leaves room for live traffic: after a full batch that took
        *d* seconds it pauses *d* * (1 - share) / share, so its batches take at most that share of the
        purge's wall-clock time. The default, 1, pauses never (as fast as the database goes); 0.5 makes a
        purge take about twice as long.
        """
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size!r}")
        if not 0 < max_share <= 1:
            raise ConfigurationError(f"max_share must be in (0, 1], not {max_share!r}")
        pause = (1 - max_share) / max_share
        compacted = await self._in_batches(
            "compacted", lambda storage: storage.compact(batch_size), batch_size, pause, on_batch
        )
        deleted = await self._in_batches(
            "deleted", lambda storage: storage.purge(batch_size), batch_size, pause, on_batch
        )
        return Purged(compacted=compacted, deleted=deleted)

    async def purgeable(self) -> Purged:
        """Count what `purge` would do now, changing nothing (one query).

        A purge that follows reports these counts, give or take the records that expire, are retaken or
        are locked (by a claim, or another purger) in between.
        """
        compacted, deleted = await self._runtime.atomically(lambda storage: storage.purgeable())
        return Purged(compacted=compacted, deleted=deleted)

    async def _in_batches(
        self,
        kind: str,
        batch: Callable[[Storage], Awaitable[int]],
        size: int,
        pause: float,
        on_batch: Callable[[str, int], object] | None,
    ) -> int:
        """Run ``batch`` until one takes fewer than ``size``, pausing its duration times ``pause`` after each."""
        total = 0
        while True:
            started = time.monotonic()
            done = await self._runtime.atomically(batch)
            took = time.monotonic() - started
            total += done
            if on_batch is not None:
                on_batch(kind, done)
            if done < size:
                return total
            if pause:
                await anyio.sleep(took * pause)


def _statuses(status: Status | Iterable[Status]) -> tuple[Status, ...]:
    """A status filter as a tuple of statuses, refused when empty or holding something else."""
    wanted = (status,) if isinstance(status, str) else tuple(status)
    try:
        statuses = tuple(dict.fromkeys(Status(s) for s in wanted))
    except ValueError as exc:
        raise ConfigurationError(f"not a status: {exc}") from None
    if not statuses:
        raise ConfigurationError("the status filter names no status")
    return statuses


class Purged(NamedTuple):
    """What `Barrier.purge` did (or, from `Barrier.purgeable`, would do)."""

    compacted: int
    """Records whose response was dropped (past the response retention); they stay as compact records."""
    deleted: int
    """Records deleted (past the record retention)."""


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A key that needs a person: an UNKNOWN record, or a lease that went stale without being reclaimed."""

    record: Record
    age: timedelta
    """Time since the key was first claimed (database clock)."""

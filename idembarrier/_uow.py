"""The unit of work: what a record's state means for one call, and when its transaction commits.

Sequence (first request): open the transaction → claim the key with an IN_PROGRESS row → the body writes
through the same session → the outcome is recorded → one COMMIT makes the business rows and the finished
record visible together (with the messages the body published, in the outbox). Any failure before that
COMMIT rolls them all back. A claim that finds a finished record replays it and rolls back its (empty)
transaction.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Generic, Self, TypeVar

import anyio
from sqlalchemy import event
from sqlalchemy.exc import InvalidRequestError

from ._claim import Decision, decide
from ._codec import decode_response, round_trip
from ._config import ExpiredReplay, OnConflict
from ._errors import checkout, connection_lost, lock_not_available, translate, translating
from ._exceptions import (
    ConnectError,
    ConnectionLostError,
    IdembarrierError,
    KeyInProgressError,
    LeaseLostError,
    SerializationError,
    StorageError,
    UnitOfWorkError,
)
from ._lost_race import lost_race
from ._metrics import Outcome, outcome_of
from ._observe import Phases, Work
from ._outbox import contract_headers, encode_headers
from ._record import Record, Status
from ._savepoint import Savepoint, open_savepoint
from ._storage import Claimed, Existing

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.pool import ConnectionPoolEntry

    from ._config import Retention
    from ._keys import Fingerprint
    from ._runtime import Runtime
    from ._storage import Storage

__all__ = ["UnitOfWork"]

R = TypeVar("R")

_CLAIM_ATTEMPTS = 3
"""Claims of one key in one transaction: it can change hands between a claim and the read after it (the
holder rolled back, or a compact record was taken over first), so the claim is tried again."""

_CONNECTION_ATTEMPTS = 3
"""Transactions one unit of work opens at most: a serialization failure, or a pooled connection that had
died while idle, is retried once more in a fresh transaction of our own."""


class UnitOfWork(Generic[R]):
    """One idempotent operation: the claim of a key and the business writes, in one transaction.

    Obtained from `Barrier.unit_of_work` and used as ``async with``. Inside the block, either
    ``uow.replayed`` is true and ``uow.response`` is the recorded outcome (the body must write nothing),
    or the body writes through ``uow.session`` and ends with `complete` or `fail`. Where no block can span
    the work (an ASGI middleware settling from inside the application's ``send``), `start`, `commit` and
    `rollback` do what entering and leaving the block do.

    On a clean exit the business writes and the finished record commit together (or, with a caller's
    session, are released into the caller's transaction for the caller to commit). If the body raises,
    everything it wrote is rolled back, no record remains, and the exception propagates unchanged.
    """

    __slots__ = (
        "_driver",
        "_entered",
        "_fenced",
        "_fingerprint",
        "_key",
        "_lookup_first",
        "_messages",
        "_on_conflict",
        "_outcome",
        "_owned",
        "_phases",
        "_record",
        "_response",
        "_retention",
        "_runtime",
        "_savepoint",
        "_scope",
        "_sent",
        "_session",
        "_storage",
        "_token",
        "_wait_timeout",
    )

    def __init__(
        self,
        runtime: Runtime[R],
        *,
        key: str,
        scope: str,
        fingerprint: Fingerprint,
        session: AsyncSession | None,
        on_conflict: OnConflict,
        wait_timeout: float,
        retention: Retention,
        lease_token: uuid.UUID | None = None,
        lookup_first: bool | None = None,
    ) -> None:
        self._runtime = runtime
        self._lookup_first = lookup_first
        self._key = key
        self._scope = scope
        self._fingerprint = fingerprint
        self._session = session
        self._owned = session is None
        self._on_conflict = on_conflict
        self._wait_timeout = wait_timeout
        self._retention = retention
        self._token = lease_token or uuid.uuid4()
        self._fenced = lease_token is not None
        self._entered = False
        # Whether a statement that takes the key was sent (a claim or a fence). A lookup is not one: a plain read
        # outside any transaction, so a connection that dies under it leaves nothing, and a fresh one is taken.
        self._sent = False
        self._driver: object = None  # the driver's connection, to be closed at once when it stops answering
        self._storage: Storage | None = None
        self._savepoint: Savepoint | None = None
        self._record: Record | None = None
        self._outcome: tuple[Status, bytes] | None = None
        self._response: R | None = None
        self._messages: list[dict[str, object]] = []
        self._phases: Phases | None = None  # the clock readings the watchers get; taken at start()

    # -- what the body sees -----------------------------------------------------------------------------

    @property
    def key(self) -> str:
        """The idempotency key."""
        return self._key

    @property
    def scope(self) -> str:
        """The scope of the key."""
        return self._scope

    @property
    def session(self) -> AsyncSession:
        """The session the business writes go through: the caller's, or one the barrier opened."""
        if self._session is None or not self._entered:
            raise UnitOfWorkError("the unit of work has no session before `async with` enters it")
        return self._session

    @property
    def replayed(self) -> bool:
        """Whether the key already had an outcome: the body must not write, ``response`` holds it."""
        return self._record is not None

    @property
    def record(self) -> Record | None:
        """The stored record being replayed, or ``None`` when this call executes."""
        return self._record

    @property
    def status(self) -> Status | None:
        """COMPLETED or FAILED once known (replayed, or set by `complete`/`fail`); else ``None``."""
        if self._record is not None:
            return self._record.status
        return None if self._outcome is None else self._outcome[0]

    @property
    def response(self) -> R:
        """The outcome's response: the replayed one, or the one given to `complete`/`fail`."""
        if self._record is not None:
            if self._response is None and self._record.response is not None:
                self._response = decode_response(self._runtime.codec, self._record.response)
            return self._response  # type: ignore[return-value]  # None is what a None response decodes to
        if self._outcome is None:
            raise UnitOfWorkError("the unit of work has no response yet: call complete() or fail() first")
        return self._response  # type: ignore[return-value]

    def complete(self, response: R) -> None:
        """Record success with ``response``; it commits with the business writes when the block exits.

        Raises:
            ResponseEncodingError: The codec cannot encode ``response`` (nothing is recorded).
        """
        self._set_outcome(Status.COMPLETED, response)

    def fail(self, response: R) -> None:
        """Record a deterministic business failure (a declined card) that retries must replay.

        Whatever the body wrote commits with it. An exception, by contrast, rolls everything back and
        records nothing, so that a retry runs again.

        Raises:
            ResponseEncodingError: The codec cannot encode ``response`` (nothing is recorded).
        """
        self._set_outcome(Status.FAILED, response)

    def publish(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Mapping[str, bytes] | None = None
    ) -> str:
        """Publish a message: it goes into the outbox in this unit of work's transaction, at its commit.

        The message exists if and only if the unit of work commits; a relay (`idembarrier.kafka.OutboxRelay`)
        delivers it afterwards. It carries the headers ``idempotency-message-id``, ``idempotency-key`` and
        ``idempotency-scope`` besides ``headers``.

        Args:
            topic: Where the relay publishes it.
            value: The message's payload.
            key: The partition key; messages with the same topic and key are published in this order.
            headers: More headers; the three above are reserved.

        Returns:
            The message id: `idembarrier.kafka.message_id` of (scope, key, execution, position), the execution
            being this claim's token and the position counting this unit of work's messages from 0. A relay's
            re-publish carries the same id; another execution of the key publishes other ids.

        Raises:
            UnitOfWorkError: Outside ``async with``, or in a replay (the original already published).
        """
        if not self._entered:
            raise UnitOfWorkError("publish() is called inside `async with`")
        if self._record is not None:
            raise UnitOfWorkError(f"key {self._key!r} is replayed: its messages were published by the original")
        if not isinstance(value, bytes) or not isinstance(key, bytes | None):
            raise UnitOfWorkError("a message's value and key are bytes")
        position = len(self._messages)
        mid, all_headers = contract_headers(self._scope, self._key, position, self._token, headers)
        self._messages.append(
            {
                "message_id": mid,
                "topic": topic,
                "key": key,
                "value": value,
                "headers": encode_headers(all_headers),
                "scope": self._scope,
                "record_key": self._key,
                "position": position,
            }
        )
        return mid

    def _set_outcome(self, status: Status, response: R) -> None:
        if not self._entered:
            raise UnitOfWorkError("complete() and fail() are called inside `async with`")
        if self._record is not None:
            raise UnitOfWorkError(f"key {self._key!r} is replayed: its outcome is already recorded")
        if self._outcome is not None:
            raise UnitOfWorkError(f"the outcome of key {self._key!r} was already set to {self._outcome[0]}")
        # The first caller gets what every replay will: the response as the codec gives it back (a dict's
        # int keys as strings, tuples as lists, a copy that later changes to ``response`` do not reach).
        data, decoded = round_trip(self._runtime.codec, response)
        self._outcome, self._response = (status, data), decoded

    # -- entering: replay, or claim ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.commit()
        else:
            await self.rollback(exc)  # anything the body raised propagates unchanged, unless translated here

    async def start(self) -> Self:
        """Replay the key's record, or claim the key and open the transaction; what ``async with`` enters.

        Raises:
            KeyInProgressError: A concurrent holder has the key (``FAIL``, or ``WAIT`` past ``wait_timeout``).
            FingerprintMismatchError: The key was used for another request.
            ReconciliationRequiredError: The key is UNKNOWN.
            ResponseExpiredError: Only the compact record remains and the policy rejects late replays.
            StorageError: The database failed; nothing was claimed.
        """
        if self._entered:
            raise UnitOfWorkError("a unit of work is entered once; ask the barrier for another")
        self._entered = True
        phases = self._phases = Phases()
        if not self._owned:
            # The caller's pending writes are the caller's: flushed here, their errors propagate unchanged.
            assert self._session is not None
            await self._session.flush()
        reconnected = False
        attempt = 0
        while True:
            attempt += 1
            if self._owned:
                self._session = self._runtime.sessionmaker()
            assert self._session is not None  # the caller's, or just opened
            self._sent = False
            try:
                await self._replay_or_claim(self._session)
            except BaseException as exc:
                await self._abandon(exc)
                ours = _storage_error(exc, "claiming the key")
                # Under REPEATABLE READ or SERIALIZABLE a claim that waited for a duplicate which then
                # committed fails to serialize; a fresh transaction of our own sees that duplicate's record.
                if isinstance(ours, SerializationError) and self._owned and attempt < _CONNECTION_ATTEMPTS:
                    self._runtime.count(exc, self._scope)
                    continue
                # A pooled connection that died idle, unseen by the driver until the schema check or BEGIN
                # failed on it (asyncpg's InternalClientError, say): nothing touching the key was sent, and
                # no COMMIT, so nothing ran; one fresh connection of our own is safe. Not after the claim was
                # sent: a claim cut while it waited was someone's decision (pg_terminate_backend), told as is.
                lost = ours if ours is not None else exc
                retry = isinstance(lost, ConnectionLostError) and not isinstance(lost, ConnectError)
                if retry and self._owned and not self._sent and not reconnected and attempt < _CONNECTION_ATTEMPTS:
                    reconnected = True
                    continue
                if not self._fenced:  # a lease's finish is counted and observed with its lease
                    self._runtime.count(exc, self._scope)
                    self._report(outcome_of(exc), ours or exc)
                if ours is not None:
                    raise ours from exc
                raise
            phases.claim()
            if not self._fenced:
                self._runtime.count(Outcome.REPLAYED if self._record is not None else Outcome.EXECUTED, self._scope)
            return self

    async def _replay_or_claim(self, session: AsyncSession) -> None:
        # A finished record read in this process answers its replay without a connection while its response
        # lasts: nothing can change it before then, and it gets the decision the database's copy would get.
        memory = self._runtime.memory if self._runtime.options.replay_from_memory else None
        if memory is not None and self._owned and not self._fenced and self._lookup_first is not False:
            remembered = memory.recall(self._scope, self._key)
            if remembered is not None and self._adopt(remembered):
                return
        try:
            conn = await checkout(session, "connecting to claim the key", replace=self._owned)
        except InvalidRequestError as exc:
            raise UnitOfWorkError(f"the session cannot run the unit of work: {exc}") from exc
        self._driver = _close_at_once_when_invalidated(conn)
        # With the caller's session the schema check waits for our savepoint: a missing table must not
        # abort the caller's transaction.
        storage = await self._runtime.storage_on(conn, check=self._owned)
        if self._fenced:
            await self._fence(session, storage)
            return
        # A lookup before the claim pays off where claims serialize (SQLite's write lock), and where a replay
        # is likely (a key this process saw finish, or the caller says so): one read outside any transaction
        # replays, with no BEGIN, claim or ROLLBACK. What it does not find (a holder's uncommitted claim, no
        # record) goes on to the claim, which alone decides. Not with the caller's session: a replay keeps
        # its savepoint open, so that nothing the body writes survives.
        lookup = self._lookup_first
        if lookup is None:
            lookup = storage.lookup_first or self._runtime.finished_here(self._scope, self._key)
        if self._owned and lookup:
            read_at = self._runtime.memory.clock()  # before the statement: the time left is counted from here
            record = await storage.lookup(self._scope, self._key)
            if record is not None and self._adopt(record):
                if memory is not None:
                    memory.remember(record, read_at=read_at)
                return
        waits = self._on_conflict is OnConflict.WAIT
        wait = self._wait_timeout if waits else None
        try:
            await self._claim(session, storage, wait)
        except Exception as exc:
            if not lock_not_available(exc):
                raise
            # The wait ran out: on a concurrent holder, or on cleanup busy with a finished record (its
            # compaction holds the row). A plain read, which waits for nobody, tells which.
            record = await self._look_again(session, storage)
            if record is not None and record.status.finished and self._adopt(record):
                await self._open_savepoint(session, storage.connection)  # a replay keeps it until the block ends
                return
            raise KeyInProgressError(scope=self._scope, key=self._key, waited=wait or 0.0) from exc

    async def _look_again(self, session: AsyncSession, storage: Storage) -> Record | None:
        """Read the record after a claim that gave up waiting, its failed transaction rolled back first."""
        if self._owned:
            await session.rollback()
            storage = await self._runtime.storage_on(await session.connection(), check=False)
        else:
            await self._release_savepoint(commit=False)
        return await storage.lookup(self._scope, self._key)

    async def _fence(self, session: AsyncSession, storage: Storage) -> None:
        """Hold the record for a lease's completion, if the lease's token still holds the key."""
        await storage.begin(self._wait_timeout)
        await self._open_savepoint(session, storage.connection)
        self._sent = True
        if not await storage.fence(self._scope, self._key, self._token):
            raise LeaseLostError(scope=self._scope, key=self._key)
        self._storage = storage

    async def _open_savepoint(self, session: AsyncSession, conn: AsyncConnection) -> None:
        if not self._owned:
            # A savepoint lets a conflict or a failing body undo our part and leave the caller's transaction
            # usable; an IN_PROGRESS row must never reach the caller's COMMIT. The session's own nested
            # transaction, its SAVEPOINT sent on the driver (see `idembarrier._savepoint`).
            self._savepoint = await open_savepoint(session, conn)
            await self._runtime.check_schema(conn)

    async def _claim(self, session: AsyncSession, storage: Storage, wait: float | None) -> None:
        """Claim the key, waiting at most ``wait`` seconds (None: not at all) for a concurrent holder.

        Settles for the record instead when the holder committed.
        """
        await storage.begin(wait)
        await self._open_savepoint(session, storage.connection)
        self._sent = True
        for _ in range(_CLAIM_ATTEMPTS):
            fingerprint = self._fingerprint
            claimed = await storage.claim(
                self._scope,
                self._key,
                fingerprint.digest,
                self._token,
                wait,
                fingerprint_version=fingerprint.version,
                retention=self._retention,
            )
            if isinstance(claimed, Claimed):
                self._storage = storage
                return
            # Someone else holds a committed record: seen by the claim, or committed while it waited.
            if isinstance(claimed, Existing):
                record: Record | None = claimed.record
            else:
                record = await storage.lookup(self._scope, self._key)
            if record is None:
                continue
            if self._adopt(record):
                return  # a replay: the savepoint stays open until the block ends
            # A late request the policy lets run again: take the compact record over, in our transaction.
            if await storage.retake(self._scope, self._key, self._token, wait):
                if self._runtime.options.on_expired_replay is ExpiredReplay.ALERT:
                    self._runtime.count(Outcome.LATE_REPLAY, self._scope)
                self._storage = storage
                return
        # The key kept changing hands (claimed, then rolled back or deleted) faster than we could look.
        raise KeyInProgressError(scope=self._scope, key=self._key)

    def _adopt(self, record: Record) -> bool:
        """Adopt ``record`` as this call's replay (True), let a late request run again (False), or raise why not."""
        policy = self._runtime.options.on_expired_replay
        decision = decide(record, fingerprint=self._fingerprint, on_expired_replay=policy)
        if decision is Decision.WAIT:  # a unit of work never waits on a committed IN_PROGRESS record
            raise KeyInProgressError(scope=self._scope, key=self._key, record=record)
        if decision is Decision.RETAKE:
            return False
        self._record = record
        return True

    # -- leaving: commit, or roll back ------------------------------------------------------------------

    async def commit(self) -> None:
        """End the work cleanly, as leaving the block without an exception does.

        A replay gives its session back; an execution commits its writes with the recorded outcome (with a
        caller's session: releases them into the caller's transaction).

        Raises:
            UnitOfWorkError: No outcome was set, or a replay wrote something; everything rolled back.
            ConnectionLostError: The connection was lost; ``outcome_unknown`` tells whether a COMMIT was in
                flight (then only a retry with the same key can tell whether it took effect).
        """
        if self._phases is not None:
            self._phases.end_body()
        try:
            await self._finish()
        except BaseException as err:
            await self._abandon(err)
            race = await self._lost_race(err)
            self._report_end(err if race is None else race)
            if race is not None:
                raise race from err
            raise  # already ours where it is the database's doing; see _commit
        if self._owned:  # committed (or replayed): a retry of this key in this process looks it up first
            self._runtime.finished(self._scope, self._key, executed=self._record is None)
        self._report_end(None)

    async def rollback(self, cause: BaseException) -> None:
        """Roll everything back because of ``cause``, as leaving the block with it does.

        Returns normally when ``cause`` is to propagate as it is (the body's own exception); raises our
        `StorageError` from it when it is the database's doing (a lost connection, a serialization failure).
        """
        if self._phases is not None:
            self._phases.end_body()
        await self._abandon(cause)
        lost: StorageError | KeyInProgressError | None = _body_error(cause)
        lost = await self._lost_race(lost) or lost
        self._report_end(cause if lost is None else lost)
        if lost is not None:
            raise lost from cause

    async def _lost_race(self, error: BaseException | None) -> StorageError | KeyInProgressError | None:
        """A serialization failure of our own execution, after its body ran, that a duplicate's COMMIT caused."""
        if error is None or not self._owned or self._fenced or self._record is not None:
            return None
        return await lost_race(self._runtime, error, scope=self._scope, key=self._key, token=self._token)

    def _report_end(self, error: BaseException | None) -> None:
        """Report how the claimed call ended (once; a lease's finish is reported by its lease)."""
        if not self._fenced and self._phases is not None:
            self._report(Outcome.REPLAYED if self._record is not None else Outcome.EXECUTED, error)

    def _report(self, outcome: Outcome | None, error: BaseException | None) -> None:
        phases, self._phases = self._phases, None
        if phases is not None:
            attempt = 1 if self._record is None else self._record.attempt
            self._runtime.report(
                Work.UNIT_OF_WORK,
                phases,
                scope=self._scope,
                key=self._key,
                outcome=outcome,
                attempt=attempt,
                status=self.status,
                error=error,
            )

    async def _finish(self) -> None:
        if self._record is not None:
            self._check_replay_wrote_nothing()
            await self._abandon(None)
        elif self._outcome is None:
            raise UnitOfWorkError(
                f"the unit of work for key {self._key!r} ended without complete() or fail(); "
                "its writes were rolled back"
            )
        else:
            await self._commit(self._outcome)

    def _check_replay_wrote_nothing(self) -> None:
        session = self.session
        if session.new or session.dirty or session.deleted:
            raise UnitOfWorkError(
                f"key {self._key!r} was replayed, yet the body added, changed or deleted objects "
                "(check `uow.replayed` before writing)"
            )

    async def _commit(self, outcome: tuple[Status, bytes]) -> None:
        session, storage = self.session, self._storage
        assert storage is not None  # claimed in start()
        status, response = outcome
        if not storage.in_transaction():
            raise UnitOfWorkError(
                f"the unit of work's transaction for key {self._key!r} was ended inside its body "
                "(session.commit() or rollback()); nothing more was written. Whatever the body committed stays, "
                "and the key is left IN_PROGRESS: Barrier.unresolved() lists it"
            )
        with translating("recording the outcome"):
            if self._messages:
                await storage.write_outbox(self._messages)
            finished = await storage.finish(self._scope, self._key, self._token, status, response, self._retention)
        if not finished:
            raise StorageError(f"the claim on key {self._key!r} in scope {self._scope!r} disappeared")
        # The body's pending writes are flushed first. Their errors are the body's: an IntegrityError from the
        # business tables propagates unchanged; a lost connection or serialization failure is ours.
        try:
            if self._owned:
                await session.flush()
            else:
                await self._release_savepoint(commit=True)
        except IdembarrierError:
            raise  # the savepoint's RELEASE failed: already classified (`idembarrier._savepoint`)
        except Exception as exc:
            if (lost := _body_error(exc)) is not None:
                raise lost from exc
            raise
        if self._owned:
            # Flushed apart, so that a connection lost here is lost with the COMMIT in flight: it may have
            # committed, and the caller must be told so (a deferred constraint's error stays the body's).
            try:
                await session.commit()
            except Exception as exc:
                lost = translate(exc, "committing the unit of work")
                if isinstance(lost, ConnectionLostError):
                    lost.outcome_unknown = True
                if isinstance(lost, ConnectionLostError | SerializationError):
                    raise lost from exc
                raise
            await session.close()
            # Closing gives the connection back without yielding to the event loop: a caller that began its
            # next unit of work at once would take it straight back, and callers queued for one would starve.
            # The commit is done: no cancellation is delivered here.
            await anyio.lowlevel.cancel_shielded_checkpoint()

    async def _release_savepoint(self, *, commit: bool) -> None:
        savepoint, self._savepoint = self._savepoint, None
        if savepoint is not None:
            await (savepoint.commit() if commit else savepoint.rollback())

    async def _abandon(self, cause: BaseException | None) -> None:
        """Roll back our part and give back an owned session; never hide the exception that got us here.

        Bounded by the barrier's ``cleanup_timeout``: a connection that does not answer the rollback in time
        is closed at once and invalidated, never handed back to the pool. With no ``cause`` (a replay, whose
        response is in hand and whose transaction wrote nothing) a failed cleanup only discards the connection.
        """
        session = self._session
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._runtime.options.cleanup_timeout) as bounded:
                try:
                    if self._savepoint is not None:
                        await self._release_savepoint(commit=False)
                    if self._owned and session is not None:
                        if cause is not None and (connection_lost(cause) or not isinstance(cause, Exception)):
                            # Our own statements bypass SQLAlchemy, which then cannot see that the connection
                            # died: discard it rather than hand a dead connection back to the pool. Likewise
                            # after a cancellation, which may have interrupted a statement of ours mid-reply
                            # (SQLAlchemy invalidates a connection whose own statement was interrupted). The
                            # socket is closed first: SQLAlchemy's invalidation waits up to 2 s for a goodbye,
                            # and asyncpg for a cancel request it sent, on a connection that may never answer.
                            self._terminate_driver()
                            await session.invalidate()
                        await session.close()  # rolls back whatever is open
                        await anyio.lowlevel.checkpoint()  # let a queued caller take the connection (see _commit)
                except Exception as cleanup:
                    if cause is not None:
                        cause.add_note(f"idembarrier: rolling back after it also failed: {cleanup!r}")
                    elif not self._owned and (ours := translate(cleanup, "ending the replay")) is not None:
                        raise ours from cleanup  # the caller's transaction is broken: the caller must know
                    elif not self._owned:
                        raise
                    await self._discard(session)
            if bounded.cancelled_caught:
                silent = f"the rollback got no answer within {self._runtime.options.cleanup_timeout} s"
                await self._discard(session)
                if cause is not None:
                    cause.add_note(f"idembarrier: {silent}; the connection was closed and invalidated")
                elif not self._owned:  # the caller's transaction went with it: the caller must know
                    raise ConnectionLostError(f"ending the replay: {silent}; the connection was closed")

    def _terminate_driver(self) -> None:
        """Close the driver's socket now, without a round trip (asyncpg's ``terminate``; others have none)."""
        terminate = getattr(self._driver, "terminate", None)
        if callable(terminate):
            terminate()

    async def _discard(self, session: AsyncSession | None) -> None:
        """Close the driver's connection without a round trip, then invalidate it: it never goes back to the pool."""
        self._terminate_driver()
        if not self._owned or session is None:
            return  # the caller's session: its next use fails, as its connection is closed
        with anyio.move_on_after(self._runtime.options.cleanup_timeout):
            try:
                await session.invalidate()
            except Exception:  # the connection is closed already; the session is given up
                return


_CLOSE_AT_ONCE = "idembarrier.close_at_once"
"""Marks, in a pooled connection's ``info``, that it served a unit of work: see `_close_at_once`."""


def _close_at_once_when_invalidated(conn: AsyncConnection) -> object:
    """Mark ``conn``'s pooled connection for `_close_at_once`; return the driver's connection."""
    pooled = conn.sync_connection.connection if conn.sync_connection is not None else None
    if pooled is None:  # pragma: no cover - a connection just checked out has its pooled connection
        return None
    pool = conn.sync_engine.pool
    if not event.contains(pool, "invalidate", _close_at_once):
        event.listen(pool, "invalidate", _close_at_once)
    pooled.info[_CLOSE_AT_ONCE] = True
    return pooled.driver_connection


def _close_at_once(dbapi_connection: object, record: ConnectionPoolEntry, exception: BaseException | None) -> None:
    """Close an invalidated connection that served a unit of work without waiting for the server.

    SQLAlchemy closes an invalidated asyncpg connection gracefully, waiting up to 2 s for the server's
    reply, shielded from cancellation: a body's statement cancelled by its caller's deadline on a silent
    connection would hold the caller that long. Closing the socket first makes that close return at once.
    """
    if record.info.get(_CLOSE_AT_ONCE):
        terminate = getattr(getattr(dbapi_connection, "driver_connection", None), "terminate", None)
        if callable(terminate):
            terminate()


def _storage_error(exc: BaseException, doing: str) -> StorageError | None:
    """Our translation of a driver error raised by our own statements, or ``None`` to re-raise ``exc``."""
    if isinstance(exc, IdembarrierError):
        return None
    return translate(exc, doing)


def _body_error(exc: BaseException) -> StorageError | None:
    """Our translation of a driver error raised by the body's writes, when it is the database's doing.

    A lost connection or a serialization failure is translated; anything else (an IntegrityError from the
    business tables, say) is the caller's and propagates unchanged.
    """
    lost = translate(exc, "running the unit of work's body", ours=False)
    return lost if isinstance(lost, ConnectionLostError | SerializationError) else None

"""Leased work: a claim committed before work with external side effects, fenced by its token.

Sequence: the claim commits at once as IN_PROGRESS with a lease ending on the database's clock → the body
calls external systems with `Lease.downstream_key` and records `checkpoint`s → `finish()` runs the business
writes and the outcome in one transaction, conditioned on the token. A holder that dies leaves the lease to
expire; the next caller reclaims it (new token, attempt + 1, the last checkpoint in hand), and a holder that
comes back after that finds its token gone (`LeaseLostError`). Past ``max_reclaims`` the key turns UNKNOWN.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Generic, Self, TypeVar

import anyio

from ._claim import Decision, decide
from ._codec import JSONCodec, decode_response, encode_response
from ._config import ExpiredReplay, OnConflict
from ._errors import lock_not_available
from ._exceptions import (
    KeyInProgressError,
    LeaseLostError,
    ReconciliationRequiredError,
    UnitOfWorkError,
)
from ._keys import NO_FINGERPRINT
from ._metrics import Outcome, outcome_of
from ._observe import Phases, Work
from ._record import Record, Status
from ._storage import Claimed, Raced
from ._uow import UnitOfWork

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from datetime import timedelta

    from sqlalchemy.ext.asyncio import AsyncSession

    from ._codec import JSON
    from ._keys import Fingerprint
    from ._runtime import Runtime

__all__ = ["Lease", "downstream_key"]

R = TypeVar("R")

_log = logging.getLogger("idembarrier")

_CHECKPOINTS = JSONCodec()
_POLL_FIRST, _POLL_MAX = 0.05, 1.0
"""Backoff, in seconds, between looks at a live lease that a waiting caller hopes to see finished."""


def downstream_key(scope: str, key: str) -> str:
    """The idempotency key to hand to external systems for (scope, key): ``idb-`` + 32 hex digits.

    The first 128 bits of SHA-256 over the scope, a unit separator and the key: the same for every attempt
    and every process, so a reclaimer's retry of an external call is deduplicated by the other side too.
    """
    return "idb-" + hashlib.sha256(f"{scope}\x1f{key}".encode()).hexdigest()[:32]


class Lease(anyio.AsyncContextManagerMixin, Generic[R]):
    """A committed claim on a key for work with external side effects; entered with ``async with``.

    Inside the block, either ``lease.replayed`` is true and ``lease.response`` is the recorded outcome, or
    this caller holds the lease: it calls external systems with ``lease.downstream_key``, may record
    progress with `checkpoint`, and ends with ``async with lease.finish() as uow: … uow.complete(…)``.

    If the body raises, the lease stays until it expires (the external call may have happened, so the
    key cannot simply be freed); call `release` first when you know nothing happened outside.
    """

    def __init__(
        self,
        runtime: Runtime[R],
        *,
        key: str,
        scope: str,
        fingerprint: Fingerprint,
        lease: timedelta,
        heartbeat: float | None,
        max_reclaims: int,
        on_conflict: OnConflict,
        wait_timeout: float,
    ) -> None:
        self._runtime = runtime
        self.key = key
        self.scope = scope
        self.downstream_key = downstream_key(scope, key)
        self._fingerprint = fingerprint
        self._lease = lease
        self._heartbeat = heartbeat
        self._max_reclaims = max_reclaims
        self._on_conflict = on_conflict
        self._wait_timeout = wait_timeout
        self.token = uuid.uuid4()
        self.attempt = 1
        self.checkpoint_name: str | None = None
        self._checkpoint_data: bytes | None = None
        self.record: Record | None = None
        self._finished = False
        self._lost = False
        self._entered = False
        self._holding = False
        self._phases = Phases()  # the clock readings the watchers get; taken anew when the block is entered
        self._finishing: UnitOfWork[R] | None = None
        self._reclaimed = False

    # -- what the body sees -----------------------------------------------------------------------------

    @property
    def replayed(self) -> bool:
        """Whether the key already had an outcome: the body must do nothing, ``response`` holds it."""
        return self.record is not None and self.record.status.finished

    @property
    def response(self) -> R:
        """The recorded outcome's response (replays only)."""
        if self.record is None or self.record.response is None:
            raise UnitOfWorkError(f"key {self.key!r} has no recorded response to replay")
        return decode_response(self._runtime.codec, self.record.response)

    @property
    def checkpoint_data(self) -> JSON:
        """The data of the last checkpoint (``None`` if none): where a reclaimer resumes from."""
        return None if self._checkpoint_data is None else _CHECKPOINTS.decode(self._checkpoint_data)

    @property
    def lost(self) -> bool:
        """Whether a heartbeat found the lease gone; the next fenced write will raise `LeaseLostError`."""
        return self._lost

    async def renew(self) -> None:
        """Extend the lease to its full length from now (database clock).

        Raises:
            LeaseLostError: The lease was reclaimed or released meanwhile.
        """
        self._check_held()
        if not await self._runtime.atomically(
            lambda storage: storage.renew(self.scope, self.key, self.token, self._lease)
        ):
            self._lose()

    async def checkpoint(self, name: str, data: JSON = None) -> None:
        """Durably record progress (a name and JSON data) under the lease, for a reclaimer to resume from.

        Raises:
            LeaseLostError: The lease was reclaimed or released meanwhile; nothing was recorded.
        """
        self._check_held()
        encoded = encode_response(_CHECKPOINTS, data)
        if not await self._runtime.atomically(
            lambda storage: storage.checkpoint(self.scope, self.key, self.token, name, encoded)
        ):
            self._lose()
        self.checkpoint_name, self._checkpoint_data = name, encoded

    async def release(self) -> None:
        """Give the key up (delete the IN_PROGRESS record), so that a retry runs at once.

        Only for when nothing happened outside: the retry will run the external calls again.

        Raises:
            LeaseLostError: The lease was reclaimed or released meanwhile.
        """
        self._check_held()
        if not await self._runtime.atomically(lambda storage: storage.release(self.scope, self.key, self.token)):
            self._lose()
        self._finished = True
        self._phases.end_body()

    def finish(self, *, session: AsyncSession | None = None) -> UnitOfWork[R]:
        """The unit of work that ends the lease: business writes and outcome in one fenced transaction.

        Entering it locks the record if this lease still holds it, else raises `LeaseLostError` and writes
        nothing. Use it like `Barrier.unit_of_work`'s, and end it with ``complete()`` or ``fail()``.
        """
        self._check_held()
        self._finished = True
        self._phases.end_body()
        options = self._runtime.options
        self._finishing = UnitOfWork(
            self._runtime,
            key=self.key,
            scope=self.scope,
            fingerprint=NO_FINGERPRINT,  # the lease's claim checked it; the fence below checks the token
            session=session,
            on_conflict=options.on_conflict,
            wait_timeout=options.wait_timeout,
            retention=options.retention_for(self.scope),
            lease_token=self.token,
        )
        return self._finishing

    def _check_held(self) -> None:
        if not self._holding or self.replayed:
            raise UnitOfWorkError(f"key {self.key!r}: only the holder of a lease, inside its block, may do this")
        if self._lost:
            raise LeaseLostError(scope=self.scope, key=self.key, record=self.record)

    def _lose(self) -> None:
        self._lost = True
        raise LeaseLostError(scope=self.scope, key=self.key, record=self.record)

    # -- the block ------------------------------------------------------------------------------------

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[Self]:
        if self._entered:
            raise UnitOfWorkError("a lease is entered once; ask the barrier for another")
        self._entered = True
        self._phases = Phases()
        try:
            await self._acquire()
        except BaseException as exc:
            self._runtime.count(exc, self.scope)
            self._report(outcome_of(exc), exc)
            raise
        self._phases.claim()
        outcome = Outcome.REPLAYED if self.replayed else Outcome.EXECUTED
        self._runtime.count(outcome, self.scope)
        error: BaseException | None = None
        try:
            async with self._block():
                yield self
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._report(outcome, error)

    def _report(self, outcome: Outcome | None, error: BaseException | None) -> None:
        """Report how the lease ended: its claim's answer, and the status its finish or replay gave."""
        status = None
        if self.replayed and self.record is not None:
            status = self.record.status
        elif self._finishing is not None:
            status = self._finishing.status
        self._runtime.report(
            Work.LEASE,
            self._phases,
            scope=self.scope,
            key=self.key,
            outcome=outcome,
            attempt=self.record.attempt if self.replayed and self.record is not None else self.attempt,
            status=status,
            error=error,
            reclaimed=self._reclaimed,
        )

    @asynccontextmanager
    async def _block(self) -> AsyncIterator[None]:
        """The holder's block (a replay's: nothing to hold); the body's exception propagates unchanged."""
        if self.replayed:
            yield
            return
        self._holding = True
        try:
            if self._heartbeat is None:
                yield  # the body's exception, if any, comes out here and propagates: the lease stays
            else:
                failure: BaseException | None = None
                async with anyio.create_task_group() as beats:
                    beats.start_soon(self._beat, self._heartbeat)
                    try:
                        yield
                    except BaseException as exc:  # kept out of the task group, which would wrap it in a group
                        failure = exc
                    finally:
                        beats.cancel_scope.cancel()  # the block is over: no more renewals
                if failure is not None:
                    raise failure  # the body's exception, unchanged: the lease stays
        finally:
            self._holding = False  # the holder's operations belong to its block, and it is over
        if not self._finished:
            self._finished = True
            if self._lost:
                raise LeaseLostError(scope=self.scope, key=self.key, record=self.record)
            raise UnitOfWorkError(
                f"leased work on key {self.key!r} ended without finish() or release(); the lease stays until it expires"
            )

    async def _acquire(self) -> None:
        deadline = anyio.current_time() + self._wait_timeout
        delay = _POLL_FIRST
        while True:
            try:
                claimed = await self._runtime.atomically(
                    lambda storage: storage.lease_claim(
                        self.scope,
                        self.key,
                        self._fingerprint.digest,
                        self.token,
                        self._lease,
                        self._wait_timeout,
                        fingerprint_version=self._fingerprint.version,
                    ),
                    wait=self._wait_timeout,
                )
            except Exception as exc:
                # The record is locked by a transaction that outlasted the wait: a holder finishing (or
                # stopped while finishing). Even failing fast waits this long for it: its outcome is due.
                if lock_not_available(exc):
                    raise KeyInProgressError(scope=self.scope, key=self.key, waited=self._wait_timeout) from exc
                raise
            if isinstance(claimed, Claimed):
                return
            if isinstance(claimed, Raced):
                continue  # the record changed between the insert and the read: look again
            record = claimed.record
            # Leases never take a compact record over: their external effects happened once already.
            decision = decide(
                record, fingerprint=self._fingerprint, on_expired_replay=ExpiredReplay.REJECT, stale=record.stale
            )
            if decision is Decision.REPLAY:
                self.record = record
                return
            if decision is Decision.RECLAIM and await self._reclaim(record):
                return
            # Held: a live lease, or a stale one that its holder or another reclaimer has in hand right now.
            waited = self._wait_timeout - (deadline - anyio.current_time())
            if self._on_conflict is OnConflict.FAIL or anyio.current_time() >= deadline:
                raise KeyInProgressError(scope=self.scope, key=self.key, record=record, waited=max(0.0, waited))
            await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
            delay = min(delay * 2, _POLL_MAX)

    async def _reclaim(self, stale: Record) -> bool:
        """Take the stale lease over; return whether this caller now holds it."""
        taken = await self._runtime.atomically(
            lambda storage: storage.reclaim(
                self.scope, self.key, stale.token, self.token, self._lease, self._max_reclaims
            )
        )
        if taken is None:
            return False  # another caller reclaimed it first, or its holder renewed it
        self._runtime.reclaimed(taken)
        self._reclaimed = True
        if taken.status is Status.UNKNOWN:
            raise ReconciliationRequiredError(scope=self.scope, key=self.key, record=taken)
        self.attempt = taken.attempt
        self.checkpoint_name, self._checkpoint_data = taken.checkpoint, taken.checkpoint_data
        return True

    async def _beat(self, every: float) -> None:
        """Renew the lease every ``every`` seconds until the block ends or a renewal finds it gone.

        A renewal that fails (the database unreachable for a moment) is tried again at the next beat; only
        a renewal that finds another token, or no record, marks the lease lost. Whether a lease that was
        not renewed in time still holds is decided where it matters: at the fenced completion.
        """
        while not self._finished:
            await anyio.sleep(every)
            if self._finished:
                return
            try:
                held = await self._runtime.atomically(
                    lambda storage: storage.renew(self.scope, self.key, self.token, self._lease)
                )
            except Exception:
                _log.warning("idembarrier: renewing the lease on key %r failed; trying again", self.key, exc_info=True)
                continue
            if not held:
                self._lost = True
                return

"""The Kafka consumer loop: each message's effect once, whatever the broker redelivers.

`consume` runs one message's handler in a unit of work keyed by its id; `run_consumer` is the loop around
it, on `idembarrier._delivery.ConsumerBarrier` (which tells transient, poison and fatal failures apart), with
this retry contract: whatever goes wrong (the handler, the database, the broker, a cancellation, a stop),
before the loop goes on or returns, the offsets of what was applied are committed and every partition of the
fetched batch is sought back to its first message not yet applied and committed, so a retry of the loop, a
restart or a rebalance loses nothing, and what was applied is a duplicate when it comes again.

Offsets are committed once per fetched batch (and before any retry, stop or raise), each after the database
commits of the messages it covers: a crash in between means the batch's applied messages come again, which
are duplicates.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import anyio

from ._backoff import Backoff, Retries, cancel_on
from ._delivery import (
    Applied,
    Consumed,
    ConsumerBarrier,
    DeadLetter,
    DeadLetterDestination,
    DeadLettered,
    Duplicate,
    MissingMessageId,
    Retry,
    consume_once,
    message_key,
)
from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier
    from ._codec import JSON
    from ._uow import UnitOfWork

__all__ = ["ConsumerMessage", "KafkaDelivery", "OffsetConsumer", "consume", "run_consumer"]

R = TypeVar("R")
M = TypeVar("M", bound="ConsumerMessage")
P = TypeVar("P")
M_co = TypeVar("M_co", bound="ConsumerMessage", covariant=True)

_log = logging.getLogger("idembarrier.consumer")

_IDLE_REPORT = 10.0
"""Seconds without an assigned partition after which the loop says so in the log."""


def _closed(exc: Exception) -> bool:
    """Whether ``exc`` says the consumer itself is closed, which no retry reopens: the caller made it.

    ``anyio.ClosedResourceError`` from an adapter (`idembarrier.confluent`'s), or aiokafka's
    ``ConsumerStoppedError``, looked up where it is loaded: an aiokafka error means aiokafka is imported.
    """
    if isinstance(exc, anyio.ClosedResourceError):
        return True
    aiokafka_errors = sys.modules.get("aiokafka.errors")
    return aiokafka_errors is not None and isinstance(exc, aiokafka_errors.ConsumerStoppedError)


class ConsumerMessage(Protocol):
    """What `consume` reads from a consumed message (an aiokafka ``ConsumerRecord`` has all of it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True, slots=True)
class KafkaDelivery(Generic[M]):
    """A Kafka record as a `idembarrier.messaging.Delivery`: its source the topic, its position ``partition:offset``."""

    record: M

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]:
        """The record's headers."""
        return self.record.headers

    @property
    def value(self) -> bytes | None:
        """The record's value."""
        return self.record.value

    @property
    def key(self) -> bytes | None:
        """The record's key."""
        return self.record.key

    @property
    def source(self) -> str:
        """The record's topic."""
        return self.record.topic

    @property
    def position(self) -> str:
        """``<partition>:<offset>``."""
        return f"{self.record.partition}:{self.record.offset}"

    @property
    def partition(self) -> int:
        """The record's partition."""
        return self.record.partition

    @property
    def offset(self) -> int:
        """The record's offset."""
        return self.record.offset


async def consume(
    barrier: Barrier[R],
    message: M,
    handler: Callable[[AsyncSession, M], Awaitable[R]],
    *,
    group: str,
    on_missing_id: MissingMessageId = MissingMessageId.REJECT,
) -> Consumed[R]:
    """Run ``handler(session, message)`` once per message id, in a unit of work of the consumer's own.

    The key is the message's ``idempotency-message-id`` header, the scope ``consumer:<group>`` and the
    fingerprint the message's value. The handler's writes and the record commit together; commit the
    consumer's offset only after this returns, so a crash in between means a redelivery, which is a
    duplicate here. A handler that raises commits nothing and propagates unchanged.

    Raises:
        MissingMessageIdError: The header is missing and ``on_missing_id`` is REJECT.
        MalformedMessageError: The headers cannot be read.
        FingerprintMismatchError: Another message with the same id but another value was consumed.
    """
    delivery = KafkaDelivery(message)
    return await consume_once(message_key(delivery, on_missing_id), barrier, delivery, _unwrapped(handler), group=group)


def _unwrapped(
    handler: Callable[[AsyncSession, M], Awaitable[R]],
) -> Callable[[AsyncSession, KafkaDelivery[M]], Awaitable[R]]:
    """``handler`` called with the Kafka record a `KafkaDelivery` wraps, as the user wrote it."""

    async def call(session: AsyncSession, delivery: KafkaDelivery[M]) -> R:
        return await handler(session, delivery.record)

    return call


class _UnwrappedDestination(Generic[M]):
    """A dead-letter destination written for Kafka records, called with the record a `KafkaDelivery` wraps."""

    def __init__(self, destination: DeadLetterDestination[M]) -> None:
        self.destination = destination

    async def __call__(self, uow: UnitOfWork[JSON], message: KafkaDelivery[M], letter: DeadLetter, /) -> None:
        await self.destination(uow, message.record, letter)


class OffsetConsumer(Protocol[P, M_co]):
    """The part of an ``aiokafka.AIOKafkaConsumer`` that `run_consumer` uses (started, auto-commit off)."""

    async def getmany(self, *, timeout_ms: int = 0, max_records: int | None = None) -> Mapping[P, Sequence[M_co]]:
        """Up to ``max_records`` messages, by partition, waiting at most ``timeout_ms`` for the first."""
        ...

    async def commit(self, offsets: dict[P, int]) -> None:
        """Commit, per partition, the offset of the next message to consume."""
        ...

    def seek(self, partition: P, offset: int) -> None:
        """Make the next fetch of ``partition`` start at ``offset``."""
        ...


async def run_consumer(
    consumer: OffsetConsumer[P, M],
    barrier: Barrier[R],
    handler: Callable[[AsyncSession, M], Awaitable[R]],
    *,
    group: str,
    stop: anyio.Event | None = None,
    on_missing_id: MissingMessageId = MissingMessageId.REJECT,
    poll_timeout: float = 1.0,
    max_records: int = 100,
    max_attempts: int | None = 5,
    dead_letter: DeadLetterDestination[M] | None = None,
    max_retries: int | None = None,
    backoff: tuple[float, float] = (0.1, 30.0),
) -> int:
    """Consume until ``stop`` is set: each message through `consume`, the batch's offsets committed after.

    Offsets are committed after the database commits they cover, once per fetched batch (and before any
    retry, stop or raise): a crash in between means a redelivery of what was applied, which `consume`
    recognises as duplicates. Failures are handled as `idembarrier.messaging.ConsumerBarrier` tells them
    apart: transient ones retried, poison messages dead-lettered, and before any retry or return the
    offsets of what was applied are committed and every partition of the batch is sought back to its first
    message not yet applied. When ``stop`` is set the loop finishes the message in flight, commits the
    offsets of what it applied, seeks back the rest and returns.

    What a caller may retry: anything that propagates (a fatal error, the handler's exception when
    ``max_attempts`` is ``None``, the last transient error past ``max_retries``, a cancellation) left the
    consumer's positions at the first unapplied message, so calling `run_consumer` again on the same
    consumer, or restarting, applies every message exactly once. The caller starts and stops ``consumer``,
    with ``enable_auto_commit=False``.

    Args:
        consumer: A started consumer, e.g. ``aiokafka.AIOKafkaConsumer``.
        barrier: The consumer's barrier.
        handler: Called as ``handler(session, message)`` once per message id; see `consume`.
        group: The consumer group: the barrier's scope is ``consumer:<group>``.
        stop: Set it to shut down gracefully; without it, cancel the task.
        on_missing_id: The policy for a message without the id header (REJECT: its dead letter).
        poll_timeout: Longest wait, in seconds, for one fetch.
        max_records: Most messages per fetch: the most a failure seeks back over, and the longest
            stretch between two fetches.
        max_attempts: Handler failures of one message id after which it goes to its dead letter;
            ``None``: never, the handler's exception propagates after the seek.
        dead_letter: Also called for each poison message, in the transaction that records it FAILED.
        max_retries: Consecutive transient failures after which the last one propagates; ``None``: retry
            forever.
        backoff: The first and the longest delay, in seconds, between retries (with jitter).

    Returns:
        How many messages the handler applied (duplicates and dead letters not counted).

    Raises:
        anyio.ClosedResourceError: The consumer was closed under the loop (an adapter's; aiokafka's own
            ``ConsumerStoppedError`` propagates as it is): a fetch or a commit cannot succeed again, so it is
            not retried. The messages applied before are committed in the database; their offsets are not.
    """
    if max_records < 1:
        raise ConfigurationError(f"max_records must be at least 1, not {max_records!r}")
    if max_attempts is not None and max_attempts < 1:
        raise ConfigurationError(f"max_attempts must be at least 1 or None, not {max_attempts!r}")
    if not 0 < backoff[0] <= backoff[1]:
        raise ConfigurationError("backoff must be (first, longest) with 0 < first <= longest")
    loop = _Loop(
        consumer,
        barrier,
        handler,
        group=group,
        stop=stop,
        on_missing_id=on_missing_id,
        poll_timeout=poll_timeout,
        max_records=max_records,
        max_attempts=max_attempts,
        dead_letter=dead_letter,
        max_retries=max_retries,
        backoff=Backoff(*backoff),
    )
    return await loop.run()


class _Retry(Exception):
    """A transient failure (or a handler failure under its limit): seek back, wait, fetch again."""

    def __init__(self, cause: BaseException, what: str) -> None:
        super().__init__(what)
        self.cause = cause
        self.what = what


class _Loop(Generic[P, M, R]):
    """The state of one `run_consumer` call."""

    def __init__(
        self,
        consumer: OffsetConsumer[P, M],
        barrier: Barrier[R],
        handler: Callable[[AsyncSession, M], Awaitable[R]],
        *,
        group: str,
        stop: anyio.Event | None,
        on_missing_id: MissingMessageId,
        poll_timeout: float,
        max_records: int,
        max_attempts: int | None,
        dead_letter: DeadLetterDestination[M] | None,
        max_retries: int | None,
        backoff: Backoff,
    ) -> None:
        self.consumer, self.group, self.stop = consumer, group, stop
        self.gate: ConsumerBarrier[KafkaDelivery[M], R] = ConsumerBarrier(
            barrier,
            _unwrapped(handler),
            group=group,
            on_missing_id=on_missing_id,
            max_attempts=max_attempts,
            dead_letter=None if dead_letter is None else _UnwrappedDestination(dead_letter),
        )
        self.timeout_ms, self.max_records = int(poll_timeout * 1000), max_records
        self.retries = Retries(backoff, max_retries, stop, _log)
        self.applied = 0  # messages whose handler's writes committed, in this call
        self.idle_since: float | None = None

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def run(self) -> int:
        while not self.stopped():
            batches = await self._fetch()
            # Per partition, the first message of the batch not yet applied (or its record not yet committed).
            positions = {partition: messages[0].offset for partition, messages in batches.items() if messages}
            committed = dict(positions)
            try:
                try:
                    await self._apply_batch(batches, positions)
                except Exception:
                    await self._commit(positions, committed, quietly=True)  # what was applied, where it can
                    raise
                await self._commit(positions, committed)
            except _Retry as retry:
                await self.retries.after(retry.cause, retry.what)
                continue
            finally:
                self._seek_back(batches, positions)
            self.retries.reset()
        return self.applied

    async def _apply_batch(self, batches: Mapping[P, Sequence[M]], positions: dict[P, int]) -> None:
        """Apply the batch in order, noting in ``positions`` each partition's next message; stop when asked."""
        for partition, messages in batches.items():
            for message in messages:
                if self.stopped():
                    return
                self.applied += await self._apply(message)
                positions[partition] = message.offset + 1

    async def _fetch(self) -> Mapping[P, Sequence[M]]:
        """One fetch, given up (nothing fetched) as soon as ``stop`` is set; a client error is retried."""
        while True:
            fetched: Mapping[P, Sequence[M]] = {}
            failed: Exception | None = None
            async with anyio.create_task_group() as tg:
                if self.stop is not None:
                    tg.start_soon(cancel_on, self.stop, tg.cancel_scope)
                try:  # caught here, inside: the task group would wrap it in an exception group
                    fetched = await self.consumer.getmany(timeout_ms=self.timeout_ms, max_records=self.max_records)
                except Exception as exc:
                    failed = exc
                tg.cancel_scope.cancel()
            if failed is not None:
                if _closed(failed):
                    raise failed
                await self.retries.after(failed, "fetching from the broker")
                continue
            self._say_what_we_wait_for(fetched)
            return fetched

    def _say_what_we_wait_for(self, fetched: Mapping[P, Sequence[M]]) -> None:
        """Log once per stretch when fetches come back empty because no partition is assigned."""
        if fetched:
            self.idle_since = None
            return
        now = anyio.current_time()
        if self.idle_since is None:
            self.idle_since = now
            return
        assignment = getattr(self.consumer, "assignment", None)  # aiokafka's; not part of the protocol
        if now - self.idle_since >= _IDLE_REPORT and callable(assignment) and not assignment():
            _log.warning(
                "idembarrier: consumer of group %r has had no partition assigned for %.0f s "
                "(a rebalance in progress, or more consumers than partitions)",
                self.group,
                now - self.idle_since,
            )
            self.idle_since = now

    async def _commit(self, positions: dict[P, int], committed: dict[P, int], *, quietly: bool = False) -> None:
        """Commit in one request the partitions whose position moved past ``committed``, and note them there.

        Every message below those positions has its database commit done. A failed commit is a retry (or,
        ``quietly``, while another failure propagates, only logged), with ``positions`` put back where the
        commit had left them: those messages are fetched again, as duplicates, and committed then.
        """
        moved = {partition: offset for partition, offset in positions.items() if offset > committed[partition]}
        if not moved:
            return
        try:
            await self.consumer.commit(moved)
        except Exception as exc:  # a rebalance, the broker away: the messages are applied, their redelivery duplicates
            positions.update((partition, committed[partition]) for partition in moved)
            if quietly:
                _log.info("idembarrier: committing offsets %s failed (%r); they come again as duplicates", moved, exc)
                return
            if _closed(exc):
                raise
            raise _Retry(exc, "committing the offsets") from exc
        committed.update(moved)

    def _seek_back(self, batches: Mapping[P, Sequence[M]], positions: Mapping[P, int]) -> None:
        for partition, messages in batches.items():
            if messages and positions[partition] <= messages[-1].offset:
                try:
                    self.consumer.seek(partition, positions[partition])
                except Exception as exc:  # revoked meanwhile: its next owner starts at the committed offset
                    _log.info("idembarrier: not seeking %s back (%r): no longer assigned", partition, exc)

    async def _apply(self, message: M) -> int:
        """Consume one message; return 1 if its handler's writes committed, 0 for a duplicate or a dead letter."""
        match await self.gate.process(KafkaDelivery(message)):
            case Applied():
                return 1
            case Duplicate() | DeadLettered():
                return 0
            case Retry(cause=cause, what=what):
                raise _Retry(cause, what)

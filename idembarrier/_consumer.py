"""The consumer barrier: each message's effect once, whatever the broker redelivers.

`consume` runs one message's handler in a unit of work keyed by its id. `run_consumer` is the loop around
it, with this retry contract: whatever goes wrong (the handler, the database, the broker, a cancellation,
a stop), before the loop goes on or returns, every partition of the fetched batch is sought back to its
first message not yet applied and committed, so a retry of the loop, a restart or a rebalance loses
nothing, and what was applied is a duplicate when it comes again.

What fails is told apart by type:
    transient   `StorageError` that a retry can outlive (a lost connection, an aborted transaction, a
                busy server: by SQLSTATE class), `KeyInProgressError`, any error of the consumer's own
                client: retried with backoff and jitter, without limit unless ``max_retries`` says so.
    poison      the handler (or its writes) raising, ``max_attempts`` times for one message id, counted
                in the ``<records>_failures`` table (a restart does not reset it); a message whose
                headers cannot be read (`MalformedMessageError`); an id reused for another value
                (`FingerprintMismatchError`). Sent to the dead letter at once, with no retry for the last
                two: the message's record becomes FAILED with a `DeadLetter` description, the
                ``dead_letter`` destination runs in the same transaction, and the offset moves past it.
    fatal       `SchemaError`, `ConfigurationError`, a `StorageError` no retry fixes (an undefined table, a
                permission): they propagate (after the seek).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import anyio

from ._backoff import Backoff
from ._errors import transient
from ._exceptions import (
    ConfigurationError,
    FingerprintMismatchError,
    IdembarrierError,
    InvalidKeyError,
    KeyInProgressError,
    ResponseExpiredError,
    SchemaError,
    StorageError,
)
from ._keys import MAX_KEY_LENGTH, validate_key
from ._metrics import Outcome
from ._outbox import CONTRACT_HEADER, CONTRACT_VERSION, MESSAGE_ID_HEADER
from ._record import Status

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier
    from ._codec import JSON
    from ._uow import UnitOfWork

__all__ = [
    "Consumed",
    "ConsumerMessage",
    "DeadLetter",
    "DeadLetterTopic",
    "MalformedMessageError",
    "MissingMessageId",
    "MissingMessageIdError",
    "OffsetConsumer",
    "consume",
    "run_consumer",
]

R = TypeVar("R")
M = TypeVar("M", bound="ConsumerMessage")
P = TypeVar("P")
M_co = TypeVar("M_co", bound="ConsumerMessage", covariant=True)
M_contra = TypeVar("M_contra", bound="ConsumerMessage", contravariant=True)

_log = logging.getLogger("idembarrier.consumer")

READABLE_CONTRACTS = frozenset({1, CONTRACT_VERSION})
"""The header contract versions a consumer reads; 1 is the version without a contract header."""
_MAX_ERROR = 2000
"""The longest error text kept in a failure count or a dead letter."""
_IDLE_REPORT = 10.0
"""Seconds without an assigned partition after which the loop says so in the log."""


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


class MissingMessageId(StrEnum):
    """What `consume` does with a message that lacks the ``idempotency-message-id`` header."""

    REJECT = "reject"
    """Raise `MissingMessageIdError`; the handler does not run (`run_consumer`: the message goes to its dead letter)."""
    DERIVE = "derive"
    """Key it by ``<topic>:<partition>:<offset>`` with a warning: a redelivery is caught, a re-publish is not."""


class MalformedMessageError(IdembarrierError):
    """Raised when a consumed message's idempotency headers cannot be read; the handler does not run.

    The id header is not UTF-8, not a usable key (empty, over 255 characters, control characters), or the
    contract header names a version this consumer does not read. `run_consumer` sends such a message to
    its dead letter at once: it would fail the same way on every redelivery.
    """

    def __init__(self, topic: str, partition: int, offset: int, reason: str) -> None:
        super().__init__(f"message {topic}:{partition}:{offset} cannot be consumed: {reason}")
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.reason = reason


class MissingMessageIdError(MalformedMessageError):
    """Raised when a consumed message has no ``idempotency-message-id`` header and the policy rejects it."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        super().__init__(topic, partition, offset, f"it has no {MESSAGE_ID_HEADER!r} header")


@dataclass(frozen=True, slots=True)
class Consumed(Generic[R]):
    """What `consume` did with a message."""

    message_id: str
    """The key the consumer's barrier used."""
    duplicate: bool
    """Whether the message was seen before: the handler did not run, ``response`` is the recorded one."""
    response: R | None
    """The handler's response (recorded, for a duplicate); ``None`` for a dead-lettered message."""
    dead_lettered: bool = False
    """Whether the message was seen before and given up on (`run_consumer` sent it to its dead letter)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why `run_consumer` gave up on a message: the FAILED record's response, and what a destination gets."""

    key: str
    """The key of the message's FAILED record: its id, or ``<topic>:<partition>:<offset>`` when unusable."""
    reason: str
    """``handler`` (it failed ``attempts`` times), ``malformed`` or ``fingerprint_mismatch``."""
    error: str
    """The last exception, as ``repr``, cut to 2,000 characters."""
    attempts: int
    """How many times the handler failed; 0 when it never ran."""
    topic: str
    partition: int
    offset: int

    def as_json(self) -> dict[str, JSON]:
        """The fields as a JSON object."""
        return dict(asdict(self))


class DeadLetterDestination(Protocol[M_contra]):
    """Where `run_consumer` sends a poison message, in the transaction that records it FAILED.

    Called as ``destination(uow, message, letter)``: write to a table through ``uow.session``, publish to a
    topic with ``uow.publish`` (the outbox relays it), or both. Raising makes the dead-lettering transient:
    it is retried with the loop's backoff.
    """

    async def __call__(self, uow: UnitOfWork[JSON], message: M_contra, letter: DeadLetter, /) -> None: ...


class DeadLetterTopic:
    """A dead-letter destination that publishes the message, through the outbox, to ``topic``.

    The copy keeps the message's key, value and own headers, and adds ``idempotency-dead-letter`` (the
    `DeadLetter` as JSON) and ``idempotency-original-message-id``; it gets an id of its own.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic

    async def __call__(self, uow: UnitOfWork[JSON], message: ConsumerMessage, letter: DeadLetter, /) -> None:
        """Publish the copy; see the class."""
        ours = {CONTRACT_HEADER, MESSAGE_ID_HEADER, "idempotency-key", "idempotency-scope"}
        headers = {name: value for name, value in message.headers if name not in ours and isinstance(value, bytes)}
        headers["idempotency-dead-letter"] = json.dumps(letter.as_json()).encode()
        headers["idempotency-original-message-id"] = letter.key.encode()
        uow.publish(self.topic, message.value or b"", key=message.key, headers=headers)


def message_key(message: ConsumerMessage, policy: MissingMessageId) -> str:
    """The key a message is consumed under: its id header, read by the contract it declares.

    Raises:
        MissingMessageIdError: No id header, and ``policy`` is REJECT.
        MalformedMessageError: The headers cannot be read (see the exception).
    """
    headers: dict[str, object] = {}
    for name, value in message.headers:
        headers.setdefault(name, value)  # the first of a repeated header counts
    contract = headers.get(CONTRACT_HEADER)
    where = (message.topic, message.partition, message.offset)
    if contract is not None:
        version = contract.decode("ascii", "replace") if isinstance(contract, bytes) else None
        if version is None or not version.isdecimal() or int(version) not in READABLE_CONTRACTS:
            known = ", ".join(map(str, sorted(READABLE_CONTRACTS)))
            raise MalformedMessageError(*where, f"header contract {version!r} is not one this version reads ({known})")
    if MESSAGE_ID_HEADER not in headers:
        if MissingMessageId(policy) is MissingMessageId.REJECT:
            raise MissingMessageIdError(*where)
        warnings.warn(
            f"message {position_key(message)} has no {MESSAGE_ID_HEADER!r} header: "
            "deduplicating it by its offset, which misses duplicates the producer created",
            stacklevel=3,
        )
        return position_key(message)
    mid = headers[MESSAGE_ID_HEADER]
    if not isinstance(mid, bytes):
        raise MalformedMessageError(*where, f"its {MESSAGE_ID_HEADER!r} header has no value")
    try:
        return validate_key(mid.decode("utf-8"), what="message id")
    except UnicodeDecodeError as exc:
        raise MalformedMessageError(*where, f"its {MESSAGE_ID_HEADER!r} header is not UTF-8") from exc
    except InvalidKeyError as exc:
        raise MalformedMessageError(*where, exc.reason) from exc


def position_key(message: ConsumerMessage) -> str:
    """``<topic>:<partition>:<offset>``, hashed when a long topic name would make it too long for a key."""
    key = f"{message.topic}:{message.partition}:{message.offset}"
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return "pos-" + hashlib.sha256(key.encode()).hexdigest()


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
    return await _consume_as(message_key(message, on_missing_id), barrier, message, handler, group=group)


async def _consume_as(
    key: str, barrier: Barrier[R], message: M, handler: Callable[[AsyncSession, M], Awaitable[R]], *, group: str
) -> Consumed[R]:
    """`consume` under a key already read from the message."""
    async with barrier.unit_of_work(key, scope=f"consumer:{group}", fingerprint=message.value) as uow:
        if not uow.replayed:
            uow.complete(await handler(uow.session, message))
    if uow.record is not None and uow.record.status is Status.FAILED:
        return Consumed(message_id=key, duplicate=True, response=None, dead_lettered=True)
    return Consumed(message_id=key, duplicate=uow.replayed, response=uow.response)


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
    """Consume until ``stop`` is set: each message through `consume`, then its offset committed.

    The offset is committed after the database commit, one message at a time: a crash in between means a
    redelivery, which `consume` recognises as a duplicate. Failures are handled as the module says:
    transient ones retried, poison messages dead-lettered, and before any retry or return every partition
    of the batch is sought back to its first message not yet applied and committed. When ``stop`` is set
    the loop finishes the message in flight, commits its offset, seeks back the rest and returns.

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


_FATAL = (SchemaError, ConfigurationError)


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
        from ._barrier import Barrier

        self.consumer, self.barrier, self.handler = consumer, barrier, handler
        self.group, self.scope, self.stop = group, f"consumer:{group}", stop
        self.on_missing_id = on_missing_id
        self.timeout_ms, self.max_records = int(poll_timeout * 1000), max_records
        self.max_attempts, self.destination, self.max_retries = max_attempts, dead_letter, max_retries
        self.backoff = backoff
        self.retries = 0
        self.idle_since: float | None = None
        self.failed: set[str] = set()  # ids whose handler failed in this run: their count is cleared on success
        options = barrier.options
        # Dead letters are recorded as JSON whatever the consumer's codec: a `DeadLetter` is JSON.
        self.letters: Barrier[JSON] = Barrier(
            barrier.sessionmaker,
            table=options.table,
            schema=options.schema,
            retention=options.retention,
            retention_by_scope=options.retention_by_scope,
            check_schema=False,
        )

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def run(self) -> int:
        applied = 0
        while not self.stopped():
            batches = await self._fetch()
            # Per partition, the first message of the batch not yet applied and committed.
            positions = {partition: messages[0].offset for partition, messages in batches.items() if messages}
            try:
                for partition, messages in batches.items():
                    for message in messages:
                        if self.stopped():
                            return applied
                        applied += await self._apply(message)
                        await self._commit(partition, message.offset + 1)
                        positions[partition] = message.offset + 1
            except _Retry as retry:
                await self._wait_after(retry)
                continue
            finally:
                self._seek_back(batches, positions)
            self.retries = 0
            self.backoff.reset()
        return applied

    async def _fetch(self) -> Mapping[P, Sequence[M]]:
        """One fetch, given up (nothing fetched) as soon as ``stop`` is set; a client error is retried."""
        while True:
            fetched: Mapping[P, Sequence[M]] = {}
            failed: Exception | None = None
            async with anyio.create_task_group() as tg:
                if self.stop is not None:
                    tg.start_soon(_cancel_on, self.stop, tg.cancel_scope)
                try:  # caught here, inside: the task group would wrap it in an exception group
                    fetched = await self.consumer.getmany(timeout_ms=self.timeout_ms, max_records=self.max_records)
                except Exception as exc:
                    failed = exc
                tg.cancel_scope.cancel()
            if failed is not None:
                await self._wait_after(_Retry(failed, "fetching from the broker"))
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

    async def _commit(self, partition: P, offset: int) -> None:
        try:
            await self.consumer.commit({partition: offset})
        except Exception as exc:  # a rebalance, the broker away: the message is applied, its redelivery a duplicate
            raise _Retry(exc, "committing the offset") from exc

    def _seek_back(self, batches: Mapping[P, Sequence[M]], positions: Mapping[P, int]) -> None:
        for partition, messages in batches.items():
            if messages and positions[partition] <= messages[-1].offset:
                try:
                    self.consumer.seek(partition, positions[partition])
                except Exception as exc:  # revoked meanwhile: its next owner starts at the committed offset
                    _log.info("idembarrier: not seeking %s back (%r): no longer assigned", partition, exc)

    async def _wait_after(self, retry: _Retry) -> None:
        """Back off after a retryable failure, or re-raise its cause past ``max_retries``."""
        self.retries += 1
        if self.max_retries is not None and self.retries > self.max_retries:
            raise retry.cause
        delay = self.backoff.next()
        _log.warning("idembarrier: %s failed (%r); retrying in %.2fs", retry.what, retry.cause, delay)
        with anyio.move_on_after(delay):
            if self.stop is not None:
                await self.stop.wait()
            else:
                await anyio.sleep_forever()

    async def _apply(self, message: M) -> int:
        """Consume one message; return 1 if its handler's writes committed, 0 for a duplicate or a dead letter."""
        try:
            key = message_key(message, self.on_missing_id)
        except MalformedMessageError as exc:
            await self._dead_letter(message, position_key(message), exc, "malformed", 0)
            return 0
        try:
            done = await _consume_as(key, self.barrier, message, partial(self._handle, key), group=self.group)
        except KeyInProgressError as exc:
            raise _Retry(exc, f"consuming {key}") from exc
        except StorageError as exc:
            if not transient(exc):
                raise
            raise _Retry(exc, f"consuming {key}") from exc
        except FingerprintMismatchError as exc:
            await self._dead_letter(message, position_key(message), exc, "fingerprint_mismatch", 0)
            return 0
        except ResponseExpiredError:
            return 0  # consumed long ago: only its compact record remains
        except _FATAL:
            raise
        except Exception as exc:  # the handler's own, or its writes'
            if self.max_attempts is None:
                raise
            attempts = await self._count_failure(key, exc)
            if attempts < self.max_attempts:
                raise _Retry(exc, f"the handler of {key} (failure {attempts} of {self.max_attempts})") from exc
            await self._dead_letter(message, key, exc, "handler", attempts)
            return 0
        return int(not done.duplicate)

    async def _handle(self, key: str, session: AsyncSession, message: M) -> R:
        response = await self.handler(session, message)
        if key in self.failed:  # it failed before in this run: its count goes with its success
            self.failed.discard(key)
            await self._forget(session, key)
        return response

    async def _forget(self, session: AsyncSession, key: str) -> None:
        """In ``session``'s transaction: drop the failure count of ``key`` (it succeeded, or is dead-lettered)."""
        storage = await self.barrier.runtime.storage_on(await session.connection(), check=False)
        await storage.forget_failure(self.scope, key)

    async def _count_failure(self, key: str, exc: BaseException) -> int:
        """Count a handler failure of ``key`` in a transaction of its own; return the count so far."""
        error = repr(exc)[:_MAX_ERROR]
        self.failed.add(key)
        runtime = self.barrier.runtime
        try:
            async with runtime.transaction("counting a handler failure", wait=runtime.options.wait_timeout) as storage:
                attempts = await storage.count_failure(self.scope, key, error)
        except StorageError as err:
            raise _Retry(err, f"counting a failure of {key}") from err
        return attempts

    async def _dead_letter(self, message: M, key: str, exc: BaseException, reason: str, attempts: int) -> None:
        """Record ``key`` FAILED with its `DeadLetter`, call the destination, all in one transaction."""
        letter = DeadLetter(
            key=key,
            reason=reason,
            error=repr(exc)[:_MAX_ERROR],
            attempts=attempts,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
        )
        try:
            async with self.letters.unit_of_work(key, scope=self.scope, fingerprint=message.value) as uow:
                if uow.replayed:
                    return  # dead-lettered already, by a run that died before committing the offset
                if self.destination is not None:
                    await self.destination(uow, message, letter)
                await self._forget(uow.session, key)
                uow.fail(letter.as_json())
        except _FATAL:
            raise
        except Exception as err:
            raise _Retry(err, f"dead-lettering {key}") from err
        self.failed.discard(key)
        self.barrier.runtime.count(Outcome.DEAD_LETTERED, self.scope)
        _log.error("idembarrier: gave up on message %s (%s, %r); its record is FAILED", key, reason, exc)


async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()

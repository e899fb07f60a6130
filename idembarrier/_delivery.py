"""The consumer barrier, whatever the broker: one delivered message's effect once, then its acknowledgement.

`ConsumerBarrier.process` runs a handler in a unit of work keyed by the delivery's ``idempotency-message-id``
header and answers what the caller does with the delivery:

    `Applied`, `Duplicate`, `DeadLettered`   acknowledge it (commit its offset, ack, XACK): the database has
                                             committed what it means, so a redelivery is a duplicate here.
    `Retry`                                  leave it unacknowledged (or nack it) and back off: a transient
                                             failure, or a handler failure under ``max_attempts``.

and lets fatal errors propagate (`SchemaError`, `ConfigurationError`, a `StorageError` no retry fixes; the
handler's own exception when ``max_attempts`` is ``None``), the delivery unacknowledged. Each broker's adapter
(`idembarrier.kafka`, `idembarrier.rabbitmq`, `idembarrier.nats`, `idembarrier.redis`, ...) is a loop around it
that fetches, processes, and acknowledges only after the database commit.

What fails is told apart by type:
    transient   `StorageError` that a retry can outlive (a lost connection, an aborted transaction, a busy
                server: by SQLSTATE class), `KeyInProgressError`: `Retry`.
    poison      the handler (or its writes) raising, ``max_attempts`` times for one message id, counted in the
                ``<records>_failures`` table (a restart does not reset it); a delivery whose headers cannot be
                read (`MalformedMessageError`); an id reused for another value (`FingerprintMismatchError`).
                Dead-lettered at once for the last two: the message's record becomes FAILED with a `DeadLetter`
                description, the ``dead_letter`` destination runs in the same transaction: `DeadLettered`.
    fatal       propagates.
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
from ._outbox import CONTRACT_HEADER, CONTRACT_VERSION, KEY_HEADER, MESSAGE_ID_HEADER, SCOPE_HEADER
from ._record import Status
from ._tracecontext import continued

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier
    from ._codec import JSON
    from ._uow import UnitOfWork

__all__ = [
    "Applied",
    "Consumed",
    "ConsumerBarrier",
    "Copyable",
    "DeadLetter",
    "DeadLetterDestination",
    "DeadLetterTopic",
    "DeadLettered",
    "Delivery",
    "Duplicate",
    "MalformedMessageError",
    "MissingMessageId",
    "MissingMessageIdError",
    "Processed",
    "Retry",
    "consume_once",
    "message_key",
    "position_key",
]

R = TypeVar("R")
D = TypeVar("D", bound="Delivery")
D_contra = TypeVar("D_contra", contravariant=True)

_log = logging.getLogger("idembarrier.consumer")

READABLE_CONTRACTS = frozenset({1, CONTRACT_VERSION})
"""The header contract versions a consumer reads; 1 is the version without a contract header."""
MAX_ERROR = 2000
"""The longest error text kept in a failure count or a dead letter."""
_FATAL = (SchemaError, ConfigurationError)


class Delivery(Protocol):
    """One delivered message, whatever the broker: what the consumer barrier reads of it."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]:
        """Its headers in order; of a repeated name, the first counts."""
        ...

    @property
    def value(self) -> bytes | None:
        """Its payload: the barrier's fingerprint, so an id reused for another payload is caught."""
        ...

    @property
    def key(self) -> bytes | None:
        """Its partition or routing key, where the broker has one."""
        ...

    @property
    def source(self) -> str:
        """The topic, queue, stream or subject it came from."""
        ...

    @property
    def position(self) -> str:
        """Where in ``source``, as the broker names it: ``partition:offset``, a stream entry id, a sequence."""
        ...


class MissingMessageId(StrEnum):
    """What the consumer barrier does with a message that lacks the ``idempotency-message-id`` header."""

    REJECT = "reject"
    """Raise `MissingMessageIdError`; the handler does not run (a consumer loop dead-letters the message)."""
    DERIVE = "derive"
    """Key it by ``<source>:<position>`` with a warning: a redelivery is caught, a re-publish is not."""


class MalformedMessageError(IdembarrierError):
    """Raised when a delivered message's idempotency headers cannot be read; the handler does not run.

    The id header is not UTF-8, not a usable key (empty, over 255 characters, control characters), or the
    contract header names a version this consumer does not read. A consumer loop sends such a message to its
    dead letter at once: it would fail the same way on every redelivery.
    """

    def __init__(self, source: str, position: str, reason: str) -> None:
        super().__init__(f"message {source}:{position} cannot be consumed: {reason}")
        self.source = source
        self.position = position
        self.reason = reason


class MissingMessageIdError(MalformedMessageError):
    """Raised when a delivered message has no ``idempotency-message-id`` header and the policy rejects it."""

    def __init__(self, source: str, position: str) -> None:
        super().__init__(source, position, f"it has no {MESSAGE_ID_HEADER!r} header")


@dataclass(frozen=True, slots=True)
class Consumed(Generic[R]):
    """What consuming one message did."""

    message_id: str
    """The key the consumer's barrier used."""
    duplicate: bool
    """Whether the message was seen before: the handler did not run, ``response`` is the recorded one."""
    response: R | None
    """The handler's response (recorded, for a duplicate); ``None`` for a dead-lettered message."""
    dead_lettered: bool = False
    """Whether the message was seen before and given up on (a consumer loop sent it to its dead letter)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why a consumer gave up on a message: the FAILED record's response, and what a destination gets."""

    key: str
    """The key of the message's FAILED record: its id, or ``<source>:<position>`` when unusable."""
    reason: str
    """``handler`` (it failed ``attempts`` times), ``malformed`` or ``fingerprint_mismatch``."""
    error: str
    """The last exception, as ``repr``, cut to 2,000 characters."""
    attempts: int
    """How many times the handler failed; 0 when it never ran."""
    topic: str
    """Where the message came from: the topic, queue, stream or subject (`Delivery.source`)."""
    partition: int | None
    """Its Kafka partition; ``None`` on other brokers."""
    offset: int | None
    """Its Kafka offset; ``None`` on other brokers."""
    position: str = ""
    """Where it was in ``topic``, as the broker names it (`Delivery.position`)."""

    def as_json(self) -> dict[str, JSON]:
        """The fields as a JSON object."""
        return dict(asdict(self))


class DeadLetterDestination(Protocol[D_contra]):
    """Where a consumer sends a poison message, in the transaction that records it FAILED.

    Called as ``destination(uow, message, letter)``: write to a table through ``uow.session``, publish with
    ``uow.publish`` (the outbox relays it), or both. Raising makes the dead-lettering transient: it is
    retried with the loop's backoff.
    """

    async def __call__(self, uow: UnitOfWork[JSON], message: D_contra, letter: DeadLetter, /) -> None: ...


class Copyable(Protocol):
    """What `DeadLetterTopic` copies of a message: its headers, value and key (a `Delivery` or a Kafka record)."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def key(self) -> bytes | None: ...


class DeadLetterTopic:
    """A dead-letter destination that publishes the message, through the outbox, to ``topic``.

    The copy keeps the message's key, value and own headers, and adds ``idempotency-dead-letter`` (the
    `DeadLetter` as JSON) and ``idempotency-original-message-id``; it gets an id of its own. ``topic`` is
    whatever the relay's publisher publishes to: a Kafka topic, a routing key, a subject, a stream.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic

    async def __call__(self, uow: UnitOfWork[JSON], message: Copyable, letter: DeadLetter, /) -> None:
        """Publish the copy; see the class."""
        ours = {CONTRACT_HEADER, MESSAGE_ID_HEADER, KEY_HEADER, SCOPE_HEADER}
        headers = {name: value for name, value in message.headers if name not in ours and isinstance(value, bytes)}
        headers["idempotency-dead-letter"] = json.dumps(letter.as_json()).encode()
        headers["idempotency-original-message-id"] = letter.key.encode()
        uow.publish(self.topic, message.value or b"", key=message.key, headers=headers)


def message_key(delivery: Delivery, policy: MissingMessageId) -> str:
    """The key a delivery is consumed under: its id header, read by the contract it declares.

    Raises:
        MissingMessageIdError: No id header, and ``policy`` is REJECT.
        MalformedMessageError: The headers cannot be read (see the exception).
    """
    headers: dict[str, object] = {}
    for name, value in delivery.headers:
        headers.setdefault(name, value)  # the first of a repeated header counts
    contract = headers.get(CONTRACT_HEADER)
    where = (delivery.source, delivery.position)
    if contract is not None:
        version = contract.decode("ascii", "replace") if isinstance(contract, bytes) else None
        if version is None or not version.isdecimal() or int(version) not in READABLE_CONTRACTS:
            known = ", ".join(map(str, sorted(READABLE_CONTRACTS)))
            raise MalformedMessageError(*where, f"header contract {version!r} is not one this version reads ({known})")
    if MESSAGE_ID_HEADER not in headers:
        if MissingMessageId(policy) is MissingMessageId.REJECT:
            raise MissingMessageIdError(*where)
        warnings.warn(
            f"message {position_key(delivery)} has no {MESSAGE_ID_HEADER!r} header: "
            "deduplicating it by its position, which misses duplicates the producer created",
            stacklevel=3,
        )
        return position_key(delivery)
    mid = headers[MESSAGE_ID_HEADER]
    if not isinstance(mid, bytes):
        raise MalformedMessageError(*where, f"its {MESSAGE_ID_HEADER!r} header has no value")
    try:
        return validate_key(mid.decode("utf-8"), what="message id")
    except UnicodeDecodeError as exc:
        raise MalformedMessageError(*where, f"its {MESSAGE_ID_HEADER!r} header is not UTF-8") from exc
    except InvalidKeyError as exc:
        raise MalformedMessageError(*where, exc.reason) from exc


def position_key(delivery: Delivery) -> str:
    """``<source>:<position>``, hashed when a long source name would make it too long for a key."""
    key = f"{delivery.source}:{delivery.position}"
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return "pos-" + hashlib.sha256(key.encode()).hexdigest()


async def consume_once(
    key: str,
    barrier: Barrier[R],
    delivery: D,
    handler: Callable[[AsyncSession, D], Awaitable[R]],
    *,
    group: str,
) -> Consumed[R]:
    """Run ``handler(session, delivery)`` in a unit of work keyed ``key`` under ``consumer:<group>``.

    The trace the message carries (``traceparent``, where OpenTelemetry is in use) is current meanwhile, so
    the unit of work's span continues the producer's trace.
    """
    with continued(delivery.headers):
        async with barrier.unit_of_work(key, scope=f"consumer:{group}", fingerprint=delivery.value) as uow:
            if not uow.replayed:
                uow.complete(await handler(uow.session, delivery))
    if uow.record is not None and uow.record.status is Status.FAILED:
        return Consumed(message_id=key, duplicate=True, response=None, dead_lettered=True)
    return Consumed(message_id=key, duplicate=uow.replayed, response=uow.response)


# -- what process() answers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Applied(Generic[R]):
    """The handler ran and its writes committed with the record: acknowledge the delivery."""

    message_id: str
    response: R


@dataclass(frozen=True, slots=True)
class Duplicate(Generic[R]):
    """The message was consumed before; the handler did not run: acknowledge the delivery."""

    message_id: str
    response: R | None
    """The recorded response; ``None`` when only a compact record remains or it was dead-lettered."""


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """The message is poison: its record is FAILED with ``letter``, the destination ran: acknowledge it."""

    letter: DeadLetter


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure, or a handler failure under ``max_attempts``: do not acknowledge; back off, go on."""

    cause: BaseException
    what: str
    """What failed, for the log: ``consuming <id>``, ``the handler of <id> (failure 2 of 5)``..."""


Processed = Applied[R] | Duplicate[R] | DeadLettered | Retry
"""What `ConsumerBarrier.process` answers for one delivery."""


class ConsumerBarrier(Generic[D, R]):
    """One consumer group's barrier: each delivery's handler once per message id, and what to do with it.

    Args:
        barrier: The consumer's barrier (its records table holds the group's records).
        handler: Called as ``handler(session, delivery)`` once per message id, in the unit of work.
        group: The consumer group: the barrier's scope is ``consumer:<group>``.
        on_missing_id: The policy for a delivery without the id header (REJECT: its dead letter).
        max_attempts: Handler failures of one message id after which it is dead-lettered; ``None``: never,
            the handler's exception propagates.
        dead_letter: Also called for each poison message, in the transaction that records it FAILED.
    """

    def __init__(
        self,
        barrier: Barrier[R],
        handler: Callable[[AsyncSession, D], Awaitable[R]],
        *,
        group: str,
        on_missing_id: MissingMessageId = MissingMessageId.REJECT,
        max_attempts: int | None = 5,
        dead_letter: DeadLetterDestination[D] | None = None,
    ) -> None:
        from ._barrier import Barrier

        if max_attempts is not None and max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be at least 1 or None, not {max_attempts!r}")
        self.barrier, self.handler, self.group, self.scope = barrier, handler, group, f"consumer:{group}"
        self.on_missing_id, self.max_attempts, self.destination = on_missing_id, max_attempts, dead_letter
        self._failed: set[str] = set()  # ids whose handler failed in this process: their count goes on success
        options = barrier.options
        # Dead letters are recorded as JSON whatever the consumer's codec: a `DeadLetter` is JSON.
        self._letters: Barrier[JSON] = Barrier(
            barrier.sessionmaker,
            table=options.table,
            schema=options.schema,
            retention=options.retention,
            retention_by_scope=options.retention_by_scope,
            check_schema=False,
        )

    async def process(self, delivery: D) -> Processed[R]:
        """Consume ``delivery`` once; answer what to do with it (see the module).

        Raises:
            SchemaError, ConfigurationError: The barrier cannot run here; a retry does not help.
            StorageError: One that no retry fixes (an undefined table, a permission).
            Exception: The handler's own, when ``max_attempts`` is ``None``.
        """
        try:
            key = message_key(delivery, self.on_missing_id)
        except MalformedMessageError as exc:
            return await self._dead_letter(delivery, position_key(delivery), exc, "malformed", 0)
        try:
            done = await consume_once(key, self.barrier, delivery, partial(self._handle, key), group=self.group)
        except KeyInProgressError as exc:
            return Retry(exc, f"consuming {key}")
        except StorageError as exc:
            if not transient(exc):
                raise
            return Retry(exc, f"consuming {key}")
        except FingerprintMismatchError as exc:
            return await self._dead_letter(delivery, position_key(delivery), exc, "fingerprint_mismatch", 0)
        except ResponseExpiredError:
            return Duplicate(key, None)  # consumed long ago: only its compact record remains
        except _FATAL:
            raise
        except Exception as exc:  # the handler's own, or its writes'
            if self.max_attempts is None:
                raise
            attempts = await self._count_failure(key, exc)
            if isinstance(attempts, Retry):
                return attempts
            if attempts < self.max_attempts:
                return Retry(exc, f"the handler of {key} (failure {attempts} of {self.max_attempts})")
            return await self._dead_letter(delivery, key, exc, "handler", attempts)
        if done.duplicate:
            return Duplicate(key, done.response)
        return Applied(key, done.response)  # type: ignore[arg-type]  # the handler's response: an R

    async def _handle(self, key: str, session: AsyncSession, delivery: D) -> R:
        response = await self.handler(session, delivery)
        if key in self._failed:  # it failed before in this process: its count goes with its success
            self._failed.discard(key)
            await self._forget(session, key)
        return response

    async def _forget(self, session: AsyncSession, key: str) -> None:
        """In ``session``'s transaction: drop the failure count of ``key`` (it succeeded, or is dead-lettered)."""
        storage = await self.barrier.runtime.storage_on(await session.connection(), check=False)
        await storage.forget_failure(self.scope, key)

    async def _count_failure(self, key: str, exc: BaseException) -> int | Retry:
        """Count a handler failure of ``key`` in a transaction of its own; return the count so far."""
        error = repr(exc)[:MAX_ERROR]
        self._failed.add(key)
        runtime = self.barrier.runtime
        try:
            async with runtime.transaction("counting a handler failure", wait=runtime.options.wait_timeout) as storage:
                return await storage.count_failure(self.scope, key, error)
        except StorageError as err:
            return Retry(err, f"counting a failure of {key}")

    async def _dead_letter(
        self, delivery: D, key: str, exc: BaseException, reason: str, attempts: int
    ) -> DeadLettered | Retry:
        """Record ``key`` FAILED with its `DeadLetter`, call the destination, all in one transaction."""
        partition, offset = _kafka_position(delivery)
        letter = DeadLetter(
            key=key,
            reason=reason,
            error=repr(exc)[:MAX_ERROR],
            attempts=attempts,
            topic=delivery.source,
            partition=partition,
            offset=offset,
            position=delivery.position,
        )
        try:
            with continued(delivery.headers):
                async with self._letters.unit_of_work(key, scope=self.scope, fingerprint=delivery.value) as uow:
                    if uow.replayed:
                        return DeadLettered(letter)  # dead-lettered already, by a run that died before its ack
                    if self.destination is not None:
                        await self.destination(uow, delivery, letter)
                    await self._forget(uow.session, key)
                    uow.fail(letter.as_json())
        except _FATAL:
            raise
        except Exception as err:
            return Retry(err, f"dead-lettering {key}")
        self._failed.discard(key)
        self.barrier.runtime.count(Outcome.DEAD_LETTERED, self.scope)
        _log.error("idembarrier: gave up on message %s (%s, %r); its record is FAILED", key, reason, exc)
        return DeadLettered(letter)


def _kafka_position(delivery: Delivery) -> tuple[int | None, int | None]:
    """The Kafka partition and offset of ``delivery``, where it has them (an aiokafka record does)."""
    partition, offset = getattr(delivery, "partition", None), getattr(delivery, "offset", None)
    if isinstance(partition, int) and isinstance(offset, int):
        return partition, offset
    return None, None

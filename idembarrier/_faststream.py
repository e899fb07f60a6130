"""The consumer barrier as a FastStream middleware, and the relay's publisher over a FastStream broker."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from faststream import BaseMiddleware
from faststream.exceptions import NackMessage
from faststream.message import StreamMessage

from ._backoff import Backoff
from ._delivery import Applied, ConsumerBarrier, DeadLettered, Duplicate, MissingMessageId, Retry
from ._exceptions import ConfigurationError
from ._relay import MessageRefusedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from faststream._internal.context.repository import ContextRepo
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier
    from ._delivery import DeadLetterDestination
    from ._outbox import Message

__all__ = ["SESSION", "BarrierMiddleware", "FastStreamDelivery", "FastStreamPublisher"]

R = TypeVar("R")

SESSION = "idembarrier_session"
"""The FastStream context key of the unit of work's session: ``session: AsyncSession = Context(SESSION)``."""

_log = logging.getLogger("idembarrier.consumer")


@dataclass(frozen=True, slots=True)
class FastStreamDelivery:
    """A FastStream ``StreamMessage`` as a `idembarrier.messaging.Delivery`.

    Its source is the raw message's topic, routing key, subject or stream, where the broker's message has
    one; its position the Kafka ``partition:offset``, else FastStream's message id.
    """

    message: StreamMessage[Any]

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]:
        """FastStream's headers, their values as bytes (text as UTF-8)."""
        return [(str(name), _bytes(value)) for name, value in self.message.headers.items()]

    @property
    def value(self) -> bytes | None:
        """The message's raw body."""
        body = self.message.body
        return body if isinstance(body, bytes) else None

    @property
    def key(self) -> bytes | None:
        """The Kafka key, where the raw message has one."""
        key = getattr(self.message.raw_message, "key", None)
        return key if isinstance(key, bytes) else None

    @property
    def source(self) -> str:
        """Where the message came from, as the broker's raw message says."""
        raw = self.message.raw_message
        for name in ("topic", "routing_key", "subject", "channel", "stream"):
            if isinstance(where := getattr(raw, name, None), str) and where:
                return where
        return "faststream"

    @property
    def position(self) -> str:
        """``partition:offset`` on Kafka, else FastStream's message id."""
        raw = self.message.raw_message
        partition, offset = getattr(raw, "partition", None), getattr(raw, "offset", None)
        if isinstance(partition, int) and isinstance(offset, int):
            return f"{partition}:{offset}"
        return str(self.message.message_id)


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class BarrierMiddleware(Generic[R]):
    """Puts the consumer barrier in front of every subscriber of a FastStream broker (or of one subscriber).

    ``RabbitBroker(..., middlewares=[BarrierMiddleware(barrier, group="billing")])``: each message runs its
    subscriber in a unit of work keyed by its ``idempotency-message-id`` header, under ``consumer:<group>``.
    The subscriber's writes go through the unit of work's session, which it takes from FastStream's context
    as ``session: AsyncSession = Context(SESSION)``; what it returns is recorded (encoded by the barrier's
    codec) and returned again for a duplicate, whose subscriber does not run.

    What FastStream then does with the message: a message applied, a duplicate and a dead-lettered poison
    message return normally (FastStream acknowledges them after the database commit); a transient failure,
    a handler failure under ``max_attempts`` and a fatal error (the barrier cannot run: no schema, a
    permission) raise FastStream's ``NackMessage`` after a backoff with jitter, so the broker redelivers.
    Use FastStream's default ack policy (acknowledge after the subscriber); ``ACK_FIRST`` would acknowledge
    before the database commit and lose what fails.
    """

    def __init__(
        self,
        barrier: Barrier[R],
        *,
        group: str,
        on_missing_id: MissingMessageId = MissingMessageId.REJECT,
        max_attempts: int | None = 5,
        dead_letter: DeadLetterDestination[FastStreamDelivery] | None = None,
        backoff: tuple[float, float] = (0.1, 30.0),
    ) -> None:
        if not 0 < backoff[0] <= backoff[1]:
            raise ConfigurationError("backoff must be (first, longest) with 0 < first <= longest")
        self.barrier, self.group = barrier, group
        self.on_missing_id, self.max_attempts, self.dead_letter = on_missing_id, max_attempts, dead_letter
        self.backoff = Backoff(*backoff)
        self._gate: ConsumerBarrier[FastStreamDelivery, Any] | None = None

    def __call__(self, msg: Any, /, *, context: ContextRepo) -> BaseMiddleware:
        """The middleware of one message (FastStream's middleware factory protocol)."""
        return _Scope(msg, context=context, owner=self)

    async def consume(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any, context: ContextRepo) -> Any:
        """Run ``call_next`` through the barrier; see the class."""
        if self._gate is None:
            self._gate = ConsumerBarrier(
                self.barrier,
                _continue,
                group=self.group,
                on_missing_id=self.on_missing_id,
                max_attempts=self.max_attempts,
                dead_letter=self.dead_letter,
            )
        token = _NEXT.set((call_next, context))  # this message's continuation; the barrier is shared
        try:
            processed = await self._gate.process(FastStreamDelivery(msg))
        except Exception as exc:  # fatal: the message comes back; the barrier must be fixed first
            _log.error("idembarrier: consuming a message failed for good (%r); nacking it", exc)
            await anyio.sleep(self.backoff.next())
            raise NackMessage() from exc
        finally:
            _NEXT.reset(token)
        match processed:
            case Applied(response=response) | Duplicate(response=response):
                self.backoff.reset()
                return response
            case DeadLettered():
                self.backoff.reset()
                return None
            case Retry(cause=cause, what=what):
                delay = self.backoff.next()
                _log.warning("idembarrier: %s failed (%r); nacking it after %.2fs", what, cause, delay)
                await anyio.sleep(delay)
                raise NackMessage() from cause


_NEXT: ContextVar[tuple[Callable[[Any], Awaitable[Any]], ContextRepo]] = ContextVar("idembarrier_faststream_next")
"""The subscriber call of the message being consumed in this task, and FastStream's context."""


async def _continue(session: AsyncSession, delivery: FastStreamDelivery) -> Any:
    """The barrier's handler: the rest of FastStream's call chain, with ``session`` in its context."""
    call_next, context = _NEXT.get()
    with context.scope(SESSION, session):
        return await call_next(delivery.message)


class _Scope(BaseMiddleware):
    """FastStream's per-message middleware: its ``consume_scope`` runs the owner's barrier."""

    def __init__(self, msg: Any, /, *, context: ContextRepo, owner: BarrierMiddleware[Any]) -> None:
        super().__init__(msg, context=context)
        self.owner = owner

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        return await self.owner.consume(call_next, msg, self.context)


class FastStreamPublisher:
    """`idembarrier.messaging.Publisher` over a connected FastStream broker: ``broker.publish`` per message.

    The message's topic is the publish destination (a Kafka topic, a RabbitMQ queue or routing key, a
    subject, a stream); its headers are sent as text (the contract's are ASCII; a header that is not UTF-8
    is refused for good with `MessageRefusedError`), and ``key`` goes as the Kafka key where the broker takes
    one. Each publish is awaited in order.
    """

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` in order; see `idembarrier.messaging.Publisher.publish`."""
        for m in messages:
            try:
                headers = {name: value.decode() for name, value in m.headers}
            except UnicodeDecodeError as exc:
                raise MessageRefusedError(m, "a header is not UTF-8 text, which FastStream headers must be") from exc
            extra: dict[str, Any] = {"key": m.key} if _takes_keys(self.broker) and m.key is not None else {}
            await self.broker.publish(m.value, m.topic, headers=headers, **extra)


def _takes_keys(broker: Any) -> bool:
    """Whether ``broker`` is a Kafka broker of FastStream's (its publish takes a key)."""
    return type(broker).__module__.startswith(("faststream.kafka", "faststream.confluent"))

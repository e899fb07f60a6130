"""The RabbitMQ adapter: the relay's publisher over aio-pika, the `Delivery`, and the consumer loop.

See `idembarrier.rabbitmq` for what is refused, what is transient, and how a delivery is settled.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Generic, TypeVar

import aio_pika
import aiormq
import anyio
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel

from ._backoff import Backoff, Retries, cancel_on
from ._delivery import (
    Applied,
    ConsumerBarrier,
    DeadLetterDestination,
    DeadLettered,
    MissingMessageId,
    Retry,
)
from ._exceptions import ConfigurationError
from ._outbox import MESSAGE_KEY_HEADER
from ._relay import MessageRefusedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    Received = MemoryObjectReceiveStream[AbstractIncomingMessage]
    from pamqp.common import FieldValue
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier
    from ._outbox import Message

__all__ = ["MESSAGE_KEY_HEADER", "AioPikaDelivery", "AioPikaPublisher", "run_rabbitmq_consumer"]

R = TypeVar("R")

_log = logging.getLogger("idembarrier.rabbitmq")


_WATCH = 1.0
"""Seconds between checks, while no message comes, that a channel that does not reopen is still open."""
_MAX_FIELD_NAME = 128
"""The longest header name AMQP 0-9-1 allows, in bytes (a field table's names)."""
_CAUSED_BY_THE_MESSAGE = (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ConnectionFrameError)
"""What the broker closes a channel or connection with because of one message (too large, headers too large)."""


class AioPikaPublisher:
    """`Publisher` over an aio-pika channel in confirm mode; the caller opens and closes it.

    Each message goes to ``exchange`` (default: the default exchange, where the routing key names a queue)
    with the message's topic as the routing key, its value as the body, the header contract and its own
    headers as AMQP headers (byte arrays), its key in `MESSAGE_KEY_HEADER`, its id as the ``message_id``
    property, and persistent delivery mode. A batch is pipelined: every message is written (in order: the
    channel writes each message's frames under a first-come lock) before the confirms are awaited
    together. See the module for what is refused and what is transient.

    Args:
        channel: A channel opened with ``publisher_confirms=True`` (aio-pika's default), preferably of a
            robust connection.
        exchange: The exchange's name; it must exist (declare it beforehand).
        timeout: The longest wait, in seconds, for a confirm (a broker under a memory alarm blocks
            publishers) and for a robust channel to reopen; then the batch fails, transiently.

    Raises:
        ConfigurationError: The channel does not confirm publishes.
    """

    def __init__(self, channel: AbstractChannel, *, exchange: str = "", timeout: float = 30.0) -> None:
        if not channel.publisher_confirms:
            raise ConfigurationError("AioPikaPublisher needs a channel opened with publisher_confirms=True")
        self.channel = channel
        self.exchange = exchange
        self.timeout = timeout
        self._one_at_a_time = False  # after a 406 or 501: find the message that caused it

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` and wait for every confirm; see `Publisher.publish`."""
        await self._reopened()
        exchange = await self._exchange()
        if self._one_at_a_time:
            for m in messages:
                outcome = await _outcome(self._send(exchange, m))
                self._check(m, outcome, alone=True)
            self._one_at_a_time = False
            return
        # Created in order, the tasks reach the channel's lock in order before they first wait.
        sends = [asyncio.ensure_future(self._send(exchange, m)) for m in messages]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        for m, outcome in zip(messages, outcomes, strict=True):
            self._check(m, outcome, alone=False)

    async def _reopened(self) -> None:
        """Wait, up to ``timeout``, for a robust channel the broker closed (after a refusal) to reopen.

        The relay publishes the rest of a batch right after a refusal, in the same transaction: were that
        publish to fail on the closed channel, the refusal would be rolled back with it, and never counted.
        """
        channel = self.channel
        if not channel.is_closed or not isinstance(channel, AbstractRobustChannel):
            return  # a plain channel stays closed: every publish fails (transient) until the caller reopens it
        with anyio.fail_after(self.timeout):
            while channel.is_closed:
                await channel.ready()
                await anyio.sleep(0.02)  # ready() can answer before the channel has noticed its close

    async def _exchange(self) -> AbstractExchange:
        if not self.exchange:
            return self.channel.default_exchange
        return await self.channel.get_exchange(self.exchange, ensure=False)

    async def _send(self, exchange: AbstractExchange, m: Message) -> object:
        return await exchange.publish(_amqp_message(m), routing_key=m.topic, mandatory=True, timeout=self.timeout)

    def _check(self, m: Message, outcome: object, *, alone: bool) -> None:
        """Raise what the outcome of publishing ``m`` means for the relay; return if it was confirmed."""
        if isinstance(outcome, aiormq.abc.DeliveredMessage):  # a Basic.Return: no queue for the routing key
            raise MessageRefusedError(m, _returned(outcome))
        if isinstance(outcome, aiormq.exceptions.PublishError):  # the same, on a channel with on_return_raises
            raise MessageRefusedError(m, repr(outcome)) from outcome
        if isinstance(outcome, MessageRefusedError):
            raise outcome
        if isinstance(outcome, _CAUSED_BY_THE_MESSAGE):
            if alone:
                raise MessageRefusedError(m, repr(outcome)) from outcome
            self._one_at_a_time = True  # which message of the batch caused it: sent alone next time
            raise outcome
        if isinstance(outcome, BaseException):
            raise outcome  # transient, a basic.nack (DeliveryError) included


async def _outcome(send: Awaitable[object]) -> object:
    """What ``send`` returned or raised (as `asyncio.gather` with ``return_exceptions`` gives it)."""
    try:
        return await send
    except Exception as exc:
        return exc


def _returned(returned: aiormq.abc.DeliveredMessage) -> str:
    frame = returned.delivery
    code, text = getattr(frame, "reply_code", None), getattr(frame, "reply_text", "")
    return f"returned by the broker: {code} {text} (routing key {returned.routing_key!r})"


def _amqp_message(m: Message) -> aio_pika.Message:
    """``m`` as an AMQP message; `MessageRefusedError` if a header name is too long for AMQP."""
    headers: dict[str, FieldValue] = {}
    for name, value in m.headers:
        if len(name.encode()) > _MAX_FIELD_NAME:  # pamqp would cut it short, with only a log line
            raise MessageRefusedError(m, f"header name {name[:40]!r}... is over AMQP's {_MAX_FIELD_NAME} bytes")
        headers.setdefault(name, bytearray(value))  # a byte array ('x'): bytes as they are, unlike a long string
    if m.key is not None:
        headers.setdefault(MESSAGE_KEY_HEADER, bytearray(m.key))
    return aio_pika.Message(
        m.value, headers=headers, message_id=m.message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )


class AioPikaDelivery:
    """A `Delivery` over an aio-pika incoming message, as `run_rabbitmq_consumer` hands it to the handler.

    Headers whose value is a byte array or a string (a string is read as its UTF-8 bytes) are the
    delivery's headers; other AMQP values (numbers, tables) are left out, so an id header of another type
    counts as missing. The key is `MESSAGE_KEY_HEADER`. The position is where RabbitMQ places the message:
    its offset in a stream queue (``offset:<n>``), else its ``message_id`` property (``message-id:<id>``,
    which a redelivery keeps), else the delivery (``delivery:<consumer tag>:<delivery tag>``).
    """

    def __init__(self, message: AbstractIncomingMessage, queue: str) -> None:
        self.message = message
        """The aio-pika message: its body, properties, routing key, ``redelivered`` flag..."""
        self.queue = queue
        read: list[tuple[str, bytes]] = []
        for name, value in (message.headers or {}).items():
            if isinstance(value, bytes | bytearray):
                read.append((name, bytes(value)))
            elif isinstance(value, str):
                read.append((name, value.encode()))
        self._headers = tuple(read)

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]:
        """The headers with a byte-array or string value."""
        return self._headers

    @property
    def value(self) -> bytes | None:
        """The body."""
        return self.message.body

    @property
    def key(self) -> bytes | None:
        """The `MESSAGE_KEY_HEADER`, if the message has one."""
        return next((value for name, value in self._headers if name == MESSAGE_KEY_HEADER), None)

    @property
    def source(self) -> str:
        """The queue it was consumed from."""
        return self.queue

    @property
    def position(self) -> str:
        """``offset:<n>`` in a stream queue, else ``message-id:<id>``, else ``delivery:<consumer>:<tag>``."""
        offset = (self.message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int) and not isinstance(offset, bool):
            return f"offset:{offset}"
        if self.message.message_id:
            return f"message-id:{self.message.message_id}"
        return f"delivery:{self.message.consumer_tag}:{self.message.delivery_tag}"


async def run_rabbitmq_consumer(
    queue: AbstractQueue,
    barrier: Barrier[R],
    handler: Callable[[AsyncSession, AioPikaDelivery], Awaitable[R]],
    *,
    group: str,
    stop: anyio.Event | None = None,
    prefetch: int = 10,
    on_missing_id: MissingMessageId = MissingMessageId.REJECT,
    max_attempts: int | None = 5,
    dead_letter: DeadLetterDestination[AioPikaDelivery] | None = None,
    max_retries: int | None = None,
    backoff: tuple[float, float] = (0.1, 30.0),
) -> int:
    """Consume ``queue`` until ``stop`` is set: each message through the consumer barrier, then acked.

    Messages are processed one at a time, ``prefetch`` of them delivered ahead (the channel's QoS). Each
    is settled only after the database commit: acked when its handler's writes committed or it was seen
    before, so a crash in between means a redelivery, which is a duplicate here. A transient failure (the
    database away) or a handler failure under ``max_attempts`` keeps the message while the loop backs off
    (with jitter), then nacks it with requeue: it comes back, to this consumer or another. A poison
    message (``max_attempts`` handler failures, counted in the database across restarts and consumers;
    unreadable headers; an id reused for another body) is recorded FAILED, given to ``dead_letter`` in
    the same transaction, and rejected without requeue: RabbitMQ routes it to the queue's dead-letter
    exchange when the queue has one (``x-dead-letter-exchange``), and drops it otherwise.

    When ``stop`` is set the loop finishes the message in flight, acks it, cancels its consumer, nacks
    back (requeued) the prefetched messages it did not start, and returns. A fatal error (`SchemaError`,
    `ConfigurationError`, a `StorageError` no retry fixes, the handler's exception when ``max_attempts``
    is ``None``, the last transient one past ``max_retries``) or a cancellation propagates after the same
    cancel, its message nacked back unacknowledged: it comes back, and a restart applies every message
    exactly once. The caller opens the queue's channel (of a robust connection) and closes it.

    Args:
        queue: The queue, declared on a channel of the caller's.
        barrier: The consumer's barrier.
        handler: Called as ``handler(session, delivery)`` once per message id, in the unit of work.
        group: The consumer group: the barrier's scope is ``consumer:<group>``. Consumers of one queue
            share a group.
        stop: Set it to shut down gracefully; without it, cancel the task.
        prefetch: Messages RabbitMQ delivers ahead of the one in flight (``basic.qos``).
        on_missing_id: The policy for a message without the id header (REJECT: its dead letter; DERIVE:
            keyed by `AioPikaDelivery.position`).
        max_attempts: Handler failures of one message id after which it is dead-lettered; ``None``:
            never, the handler's exception propagates.
        dead_letter: Also called for each poison message, in the transaction that records it FAILED
            (e.g. ``DeadLetterTopic("orders.dead")`` publishes a copy through the outbox).
        max_retries: Consecutive transient failures after which the last one propagates; ``None``:
            retry without limit.
        backoff: First and longest wait, in seconds, between retries.

    Returns:
        How many messages the handler applied.
    """
    if prefetch < 1:
        raise ConfigurationError(f"prefetch must be at least 1, not {prefetch!r}")
    consumer = ConsumerBarrier(
        barrier, handler, group=group, on_missing_id=on_missing_id, max_attempts=max_attempts, dead_letter=dead_letter
    )
    loop = _Loop(queue, consumer, stop, max_retries, Backoff(*backoff))
    await queue.channel.set_qos(prefetch_count=prefetch)
    send, receive = anyio.create_memory_object_stream[AbstractIncomingMessage](math.inf)

    async def delivered(message: AbstractIncomingMessage) -> None:
        try:
            send.send_nowait(message)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):  # arrived while the loop was leaving
            await message.nack(requeue=True)

    tag = await queue.consume(delivered, no_ack=False)
    try:
        return await loop.run(receive)
    finally:
        with anyio.CancelScope(shield=True):
            await _give_back(queue, tag, loop.holding, send, receive)


async def _give_back(
    queue: AbstractQueue,
    tag: str,
    holding: AbstractIncomingMessage | None,
    send: MemoryObjectSendStream[AbstractIncomingMessage],
    receive: Received,
) -> None:
    """Cancel the consumer, then requeue the message it holds unsettled and those it did not start.

    Cancelled first, so that RabbitMQ does not deliver them straight back to this consumer.
    """
    try:
        await queue.cancel(tag)
    except Exception as exc:  # the channel is gone: RabbitMQ requeues its unacked messages itself
        _log.info("idembarrier: cancelling consumer %s failed (%r)", tag, exc)
    send.close()
    if holding is not None:
        await _nack(holding)
    with receive:
        while True:
            try:
                message = receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return
            await _nack(message)


async def _nack(message: AbstractIncomingMessage) -> None:
    """Give ``message`` back with requeue; if the channel is gone, RabbitMQ has requeued it already."""
    try:
        await message.nack(requeue=True)
    except Exception as exc:
        _log.info("idembarrier: nacking message %s failed (%r); its channel requeues it", message.message_id, exc)


class _Loop(Generic[R]):
    """The state of one `run_rabbitmq_consumer`: its retries and backoff."""

    def __init__(
        self,
        queue: AbstractQueue,
        consumer: ConsumerBarrier[AioPikaDelivery, R],
        stop: anyio.Event | None,
        max_retries: int | None,
        backoff: Backoff,
    ) -> None:
        self.queue, self.consumer, self.stop = queue, consumer, stop
        self.retries = Retries(backoff, max_retries, stop, _log)
        self.holding: AbstractIncomingMessage | None = None
        """The message being processed or retried, not settled: on the way out, it is given back."""

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def run(self, receive: Received) -> int:
        applied = 0
        while not self.stopped():
            message = await self._next(receive)
            if message is None:
                break
            self.holding = message  # fatal, cancelled or stopped while held: given back, unacked
            outcome = await self.consumer.process(AioPikaDelivery(message, self.queue.name))
            if isinstance(outcome, Retry):
                await self._retry(message, outcome)
                continue
            self.retries.reset()
            await self._settle(message, rejected=isinstance(outcome, DeadLettered))
            self.holding = None
            applied += isinstance(outcome, Applied)
        return applied

    async def _next(self, receive: Received) -> AbstractIncomingMessage | None:
        """The next delivered message, or ``None`` once ``stop`` is set.

        Raises:
            aiormq.exceptions.ChannelInvalidStateError: The channel closed and is not robust: no message
                will come.
        """
        message: AbstractIncomingMessage | None = None
        async with anyio.create_task_group() as tg:
            if self.stop is not None:
                tg.start_soon(cancel_on, self.stop, tg.cancel_scope)
            while message is None:
                with anyio.move_on_after(_WATCH):
                    message = await receive.receive()  # a memory stream: cancelled, it keeps the message
                channel = self.queue.channel
                if message is None and channel.is_closed and not isinstance(channel, AbstractRobustChannel):
                    raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            tg.cancel_scope.cancel()
        return message

    async def _settle(self, message: AbstractIncomingMessage, *, rejected: bool) -> None:
        """Ack ``message`` (or reject it to the dead-letter exchange); its outcome is committed already."""
        try:
            if rejected:
                await message.reject(requeue=False)
            else:
                await message.ack()
        except Exception as exc:  # the channel closed: RabbitMQ redelivers it, and it is a duplicate then
            _log.warning("idembarrier: settling message %s failed (%r); its redelivery is a duplicate", message, exc)

    async def _retry(self, message: AbstractIncomingMessage, retry: Retry) -> None:
        """Back off holding ``message``, then give it back; past ``max_retries`` raise the cause."""
        await self.retries.after(retry.cause, retry.what)
        if not self.stopped():  # stopped, it is given back after the consumer is cancelled
            await _nack(message)
            self.holding = None

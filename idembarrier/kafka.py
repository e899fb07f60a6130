"""Across boundaries: relay the outbox to Kafka, and run a barrier at every consumer.

The id travels: a unit of work publishes (`UnitOfWork.publish`) → the message waits in the outbox, committed
with the record → `OutboxRelay` publishes it with the ``idempotency-message-id`` header → `consume` runs the
consumer's writes in a unit of work keyed by that id, under the scope ``consumer:<group>``. Whatever is
delivered twice (a relay that re-publishes after a crash, a redelivery after a consumer crash) has one
effect.

Needs the ``kafka`` extra (aiokafka) only for `AIOKafkaPublisher`; the rest works with any client.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import anyio
from sqlalchemy import func, select, update

from ._exceptions import ConfigurationError, IdembarrierError
from ._outbox import (
    KEY_HEADER,
    MESSAGE_ID_HEADER,
    SCOPE_HEADER,
    Message,
    decode_headers,
    message_id,
    outbox_for,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from aiokafka import AIOKafkaProducer
    from sqlalchemy import Select, Table
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier

__all__ = [
    "KEY_HEADER",
    "MESSAGE_ID_HEADER",
    "SCOPE_HEADER",
    "AIOKafkaPublisher",
    "Consumed",
    "ConsumerMessage",
    "Message",
    "MissingMessageId",
    "MissingMessageIdError",
    "OutboxRelay",
    "Publisher",
    "consume",
    "message_id",
]

R = TypeVar("R")
M = TypeVar("M", bound="ConsumerMessage")

_log = logging.getLogger(__name__)


# -- relay ------------------------------------------------------------------------------------------------


class Publisher(Protocol):
    """Publishes the relay's messages to a broker."""

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` in order, headers and key included; return once the broker acknowledged all.

        Raise if any was not acknowledged: the relay then marks none of the batch sent, and re-publishes it.
        """
        ...


class AIOKafkaPublisher:
    """`Publisher` over a started ``aiokafka.AIOKafkaProducer``; the caller starts and stops it.

    Messages are sent one after another and awaited together: aiokafka keeps one batch in flight per
    partition, so messages with the same key (same partition) arrive in the relay's order.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def publish(self, messages: Sequence[Message]) -> None:
        """Send ``messages`` and wait for every acknowledgement; see `Publisher.publish`."""
        pending = [await self.producer.send(m.topic, m.value, key=m.key, headers=list(m.headers)) for m in messages]
        for acknowledged in pending:
            await acknowledged


class OutboxRelay:
    """Moves committed messages from the outbox to a `Publisher`, then marks them sent.

    Each batch is one transaction: claim up to ``batch_size`` pending rows in insertion order, publish them,
    mark them sent, commit. A relay that dies between publishing and committing leaves the rows pending, and
    the next relay publishes them again (with the same message id: consumers deduplicate). On PostgreSQL
    several relays run side by side: rows are claimed ``FOR UPDATE SKIP LOCKED``, and a relay claims a
    (topic, key) only while no other relay holds it, so each key's messages are published in order. On
    SQLite the write lock serializes relays.

    Wakes by polling, with a backoff between ``poll_interval`` and ``max_poll_interval`` while the outbox
    is empty or the publisher fails. (PostgreSQL LISTEN/NOTIFY wake-ups are not implemented yet.)

    Args:
        barrier: The barrier whose records table's outbox is relayed.
        publisher: Where messages go.
        batch_size: Most rows per transaction.
        poll_interval: First wait, in seconds, after an empty or failed batch.
        max_poll_interval: Longest wait between polls.
    """

    def __init__(
        self,
        barrier: Barrier[R],
        publisher: Publisher,
        *,
        batch_size: int = 100,
        poll_interval: float = 0.05,
        max_poll_interval: float = 2.0,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size!r}")
        if not 0 < poll_interval <= max_poll_interval:
            raise ConfigurationError("poll intervals must satisfy 0 < poll_interval <= max_poll_interval")
        self._barrier = barrier
        self._publisher = publisher
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._max_poll_interval = max_poll_interval
        self._outbox = outbox_for(barrier._table)

    async def relay_once(self) -> int:
        """Publish one batch and mark it sent, in one transaction; return how many messages it held."""
        barrier = self._barrier
        async with barrier.sessionmaker() as session:
            conn = await session.connection()
            storage = await barrier._storage_on(conn)
            await storage.begin(barrier.options.wait_timeout)
            claim = _claim(conn.dialect.name, self._outbox, self._batch_size)
            rows = (await conn.execute(claim)).all()
            if not rows:
                return 0
            messages = [
                Message(
                    id=row.id,
                    message_id=row.message_id,
                    topic=row.topic,
                    key=row.key,
                    value=row.value,
                    headers=decode_headers(row.headers),
                )
                for row in rows
            ]
            await self._publisher.publish(messages)
            outbox = self._outbox
            ids = [m.id for m in messages]
            await conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(sent_at=func.now()))
            await session.commit()
        return len(messages)

    async def run(self, *, stop: anyio.Event | None = None) -> None:
        """Relay until ``stop`` is set (or the task is cancelled), backing off while idle or failing.

        A failed batch is logged and retried after the backoff; it stays pending meanwhile.
        """
        delay = self._poll_interval
        while stop is None or not stop.is_set():
            try:
                sent = await self.relay_once()
            except Exception:
                _log.exception("idembarrier: relaying the outbox failed; retrying in %.2fs", delay)
                sent = 0
            if sent:
                delay = self._poll_interval
                continue
            with anyio.move_on_after(delay):
                if stop is not None:
                    await stop.wait()
                else:
                    await anyio.sleep(delay)
            delay = min(delay * 2, self._max_poll_interval)


def _claim(dialect: str, outbox: Table, limit: int) -> Select[tuple[object, ...]]:
    """The statement that claims the next pending rows, oldest first."""
    c = outbox.c
    query = (
        select(c.id, c.message_id, c.topic, c.key, c.value, c.headers)
        .where(c.sent_at.is_(None))
        .order_by(c.id)
        .limit(limit)
    )
    if dialect != "postgresql":
        return query  # SQLite: the transaction holds the database's write lock; no other relay runs now
    # SKIP LOCKED: a relay never waits for, nor re-claims, a row another relay holds; a row that relay then
    # marks sent is re-checked after its commit and dropped. The transaction-scoped advisory lock on
    # (topic, key) keeps the other relays off that key's later rows until this one commits: order per key.
    partition = func.hashtextextended(c.topic + ":" + func.coalesce(func.encode(c.key, "hex"), ""), 0)
    return query.where(func.pg_try_advisory_xact_lock(partition)).with_for_update(skip_locked=True)


# -- consumer barrier -------------------------------------------------------------------------------------


class ConsumerMessage(Protocol):
    """What `consume` reads from a consumed message (an aiokafka ``ConsumerRecord`` has all of it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class MissingMessageId(StrEnum):
    """What `consume` does with a message that lacks the ``idempotency-message-id`` header."""

    REJECT = "reject"
    """Raise `MissingMessageIdError`; the handler does not run."""
    DERIVE = "derive"
    """Key it by ``<topic>:<partition>:<offset>`` with a warning: a redelivery is caught, a re-publish is not."""


class MissingMessageIdError(IdembarrierError):
    """Raised when a consumed message has no ``idempotency-message-id`` header and the policy rejects it."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        super().__init__(f"message {topic}:{partition}:{offset} has no {MESSAGE_ID_HEADER!r} header")
        self.topic = topic
        self.partition = partition
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Consumed(Generic[R]):
    """What `consume` did with a message."""

    message_id: str
    """The key the consumer's barrier used."""
    duplicate: bool
    """Whether the message was seen before: the handler did not run, ``response`` is the recorded one."""
    response: R


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
        FingerprintMismatchError: Another message with the same id but another value was consumed.
    """
    key = _message_key(message, on_missing_id)
    async with barrier.unit_of_work(key, scope=f"consumer:{group}", fingerprint=message.value) as uow:
        if not uow.replayed:
            uow.complete(await handler(uow.session, message))
    return Consumed(message_id=key, duplicate=uow.replayed, response=uow.response)


def _message_key(message: ConsumerMessage, policy: MissingMessageId) -> str:
    for name, value in message.headers:
        if name == MESSAGE_ID_HEADER:
            return value.decode()
    if MissingMessageId(policy) is MissingMessageId.REJECT:
        raise MissingMessageIdError(message.topic, message.partition, message.offset)
    warnings.warn(
        f"message {message.topic}:{message.partition}:{message.offset} has no {MESSAGE_ID_HEADER!r} header: "
        "deduplicating it by its offset, which misses duplicates the producer created",
        stacklevel=2,
    )
    return f"{message.topic}:{message.partition}:{message.offset}"

"""Across boundaries: relay the outbox to Kafka, and run a barrier at every consumer.

The id travels: a unit of work publishes (`UnitOfWork.publish`) → the message waits in the outbox, committed
with the record → `OutboxRelay` publishes it with the headers of the contract (``idempotency-contract: 2``,
``idempotency-message-id``) → `consume` runs the consumer's writes in a unit of work keyed by that id, under
the scope ``consumer:<group>``. Whatever is delivered twice (a relay that re-publishes after a crash, a
redelivery after a consumer crash) has one effect; a key that executes again publishes new ids.

Needs the ``kafka`` extra (aiokafka) only for `AIOKafkaPublisher`; the rest works with any client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._consumer import ConsumerMessage, KafkaDelivery, OffsetConsumer, consume, run_consumer
from ._delivery import (
    Consumed,
    DeadLetter,
    DeadLetterDestination,
    DeadLetterTopic,
    MalformedMessageError,
    MissingMessageId,
    MissingMessageIdError,
)
from ._outbox import CONTRACT_HEADER, CONTRACT_VERSION, KEY_HEADER, MESSAGE_ID_HEADER, SCOPE_HEADER, Message, message_id
from ._relay import MessageRefusedError, OutboxRelay, Parked, Publisher

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aiokafka import AIOKafkaProducer

__all__ = [
    "CONTRACT_HEADER",
    "CONTRACT_VERSION",
    "KEY_HEADER",
    "MESSAGE_ID_HEADER",
    "SCOPE_HEADER",
    "AIOKafkaPublisher",
    "Consumed",
    "ConsumerMessage",
    "DeadLetter",
    "DeadLetterDestination",
    "DeadLetterTopic",
    "KafkaDelivery",
    "MalformedMessageError",
    "Message",
    "MessageRefusedError",
    "MissingMessageId",
    "MissingMessageIdError",
    "OffsetConsumer",
    "OutboxRelay",
    "Parked",
    "Publisher",
    "consume",
    "message_id",
    "run_consumer",
]


class AIOKafkaPublisher:
    """`Publisher` over a started ``aiokafka.AIOKafkaProducer``; the caller starts and stops it.

    Messages are sent one after another and awaited together: aiokafka keeps one batch in flight per
    partition, so messages with the same key (same partition) arrive in the relay's order. A message the
    producer or the broker refuses for good (too large, an invalid topic) raises `MessageRefusedError`;
    every other error is transient.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def publish(self, messages: Sequence[Message]) -> None:
        """Send ``messages`` and wait for every acknowledgement; see `Publisher.publish`."""
        from aiokafka.errors import InvalidTopicError, MessageSizeTooLargeError, RecordTooLargeError

        refusals = (InvalidTopicError, MessageSizeTooLargeError, RecordTooLargeError)
        pending = []
        for m in messages:
            try:
                pending.append((m, await self.producer.send(m.topic, m.value, key=m.key, headers=list(m.headers))))
            except refusals as exc:
                await self._acknowledged(pending)
                raise MessageRefusedError(m, repr(exc)) from exc
        await self._acknowledged(pending, refusals)

    @staticmethod
    async def _acknowledged(pending: list[tuple[Message, object]], refusals: tuple[type[Exception], ...] = ()) -> None:
        for m, acknowledged in pending:
            try:
                await acknowledged  # type: ignore[misc]  # aiokafka's send() returns an asyncio future
            except refusals as exc:
                raise MessageRefusedError(m, repr(exc)) from exc

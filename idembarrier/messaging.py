"""Across any broker: the outbox's relay, the header contract, and the consumer barrier every adapter runs on.

The id travels: a unit of work publishes (`UnitOfWork.publish`) → the message waits in the outbox, committed
with the record → `OutboxRelay` hands it to a `Publisher` with the headers of the contract
(``idempotency-contract: 2``, ``idempotency-message-id``, ``idempotency-key``, ``idempotency-scope``, and the
W3C ``traceparent``/``tracestate`` where OpenTelemetry is in use) → a consumer loop runs each `Delivery`
through `ConsumerBarrier.process`, keyed by that id under the scope ``consumer:<group>``, and acknowledges it
only after the database commit. Whatever is delivered twice has one effect.

The adapters are `idembarrier.kafka` (aiokafka), `idembarrier.confluent` (confluent-kafka),
`idembarrier.rabbitmq` (aio-pika), `idembarrier.nats` (JetStream), `idembarrier.redis` (Redis Streams) and
`idembarrier.faststream`, each in the extra of its name; this module needs none of them. Write a loop of your
own for another broker on `ConsumerBarrier`: acknowledge on `Applied`, `Duplicate` and `DeadLettered`, back off
and let the delivery come again on `Retry`, and let anything it raises propagate unacknowledged.
"""

from __future__ import annotations

from ._delivery import (
    Applied,
    Consumed,
    ConsumerBarrier,
    Copyable,
    DeadLetter,
    DeadLetterDestination,
    DeadLettered,
    DeadLetterTopic,
    Delivery,
    Duplicate,
    MalformedMessageError,
    MissingMessageId,
    MissingMessageIdError,
    Processed,
    Retry,
)
from ._outbox import CONTRACT_HEADER, CONTRACT_VERSION, KEY_HEADER, MESSAGE_ID_HEADER, SCOPE_HEADER, Message, message_id
from ._relay import MessageRefusedError, OutboxRelay, Parked, Publisher
from ._tracecontext import TRACE_HEADERS

__all__ = [
    "CONTRACT_HEADER",
    "CONTRACT_VERSION",
    "KEY_HEADER",
    "MESSAGE_ID_HEADER",
    "SCOPE_HEADER",
    "TRACE_HEADERS",
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
    "Message",
    "MessageRefusedError",
    "MissingMessageId",
    "MissingMessageIdError",
    "OutboxRelay",
    "Parked",
    "Processed",
    "Publisher",
    "Retry",
    "message_id",
]

"""NATS JetStream: relay the outbox to a stream, and run the consumer barrier on a durable pull consumer.

The id travels twice here. `JetStreamPublisher` publishes each outbox message with the header contract and
``Nats-Msg-Id`` set to its idempotency message id, so JetStream itself drops a re-publish (a relay that died
after publishing, before marking the row sent) that comes within the stream's ``duplicate_window`` (two
minutes by default): the PubAck says ``duplicate`` and the stream holds the message once. Beyond the window,
or for a redelivery to the consumer (a consumer that died after its database commit, before its ack), the
consumer barrier catches it: `run_jetstream_consumer` runs each message through
`idembarrier.messaging.ConsumerBarrier` and acks it only after the database commit.

JetStream has no partition key: the subject routes. The outbox message's key, where it has one, travels in
the ``message-key`` header (`MESSAGE_KEY_HEADER`, as on RabbitMQ), and `JetStreamDelivery.key` reads it back.

JetStream's ``max_deliver`` and the barrier's ``max_attempts`` both bound a poison message; JetStream counts
every delivery (a crash's redelivery, a transient failure's nak too), the barrier only the handler's
failures. When JetStream's count runs out first, it stops delivering the message without any dead letter, so
`run_jetstream_consumer` refuses a consumer whose ``max_deliver`` is below ``max_attempts``: leave it
unlimited (``-1``, the default) and let the barrier dead-letter.

Needs the ``nats`` extra (nats-py).
"""

from __future__ import annotations

from ._delivery import DeadLetter, DeadLetterTopic, MissingMessageId
from ._nats import MESSAGE_KEY_HEADER, JetStreamDelivery, JetStreamPublisher, run_jetstream_consumer

__all__ = [
    "MESSAGE_KEY_HEADER",
    "DeadLetter",
    "DeadLetterTopic",
    "JetStreamDelivery",
    "JetStreamPublisher",
    "MissingMessageId",
    "run_jetstream_consumer",
]

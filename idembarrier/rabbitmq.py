"""RabbitMQ through aio-pika: relay the outbox to an exchange, and run the consumer barrier at every queue.

The id travels: a unit of work publishes (``uow.publish(topic, value, key=...)``) → the message waits in the
outbox → `OutboxRelay` with an `AioPikaPublisher` publishes it to one exchange, the **topic as the routing
key**, with the header contract as AMQP headers (byte arrays), the message id as the ``message_id`` property,
persistent, mandatory, and waits for the publisher confirm → `run_rabbitmq_consumer` runs the handler in a
unit of work keyed by the id header, under the scope ``consumer:<group>``, and acks only after the database
commit. Whatever RabbitMQ delivers twice (a relay that re-publishes after a crash, a redelivery after a
consumer died before its ack) has one effect.

RabbitMQ itself deduplicates nothing: a publisher confirm says the broker took the message, not that it
took it once, and a redelivery after a lost ack is a second delivery. The barrier is the only deduplication.

How a publish fails:
    refused     returned as unroutable (``mandatory``: no queue is bound for the routing key), headers
                that cannot be encoded (a name over 255 bytes), and, when the message is sent alone, a
                channel closed with 406 PRECONDITION_FAILED (over the broker's ``max_message_size``) or a
                connection closed with 501 FRAME_ERROR (headers over the frame size): `MessageRefusedError`,
                counted by the relay, which parks the message after its ``max_attempts``.
    transient   everything else: the broker away, a closed channel, and a ``basic.nack``, which RabbitMQ sends
                only for a full queue with ``overflow: reject-publish`` or an internal error of a queue (never
                for the message itself): the relay retries the batch after a backoff. A 406 or 501 in a
                pipelined batch is transient too, and the publisher sends the next batch one message at a
                time, so that the message that causes it is found and refused.

Needs the ``rabbitmq`` extra (aio-pika). Use a robust connection (``aio_pika.connect_robust``): its channels
reopen after the broker closes them, which the publisher's refusals rely on.
"""

from __future__ import annotations

from ._delivery import DeadLetter, DeadLetterTopic, MissingMessageId
from ._rabbitmq import MESSAGE_KEY_HEADER, AioPikaDelivery, AioPikaPublisher, run_rabbitmq_consumer

__all__ = [
    "MESSAGE_KEY_HEADER",
    "AioPikaDelivery",
    "AioPikaPublisher",
    "DeadLetter",
    "DeadLetterTopic",
    "MissingMessageId",
    "run_rabbitmq_consumer",
]

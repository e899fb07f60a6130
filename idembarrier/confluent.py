"""confluent-kafka at both ends: the relay's publisher, and the consumer barrier over its asyncio consumer.

Needs the ``confluent`` extra (``confluent-kafka`` 2.13+). The contract is Kafka's, as in `idembarrier.kafka`:
the relay publishes each outbox message with the header contract, and `run_confluent_consumer` runs each
record through the consumer barrier, committing offsets only after the database commits they cover.

- `ConfluentPublisher` wraps a ``confluent_kafka.Producer``, not the asyncio ``AIOProducer``: the latter
  batches without headers (``produce(headers=...)`` raises ``NotImplementedError`` in 2.16), and the message
  id travels in a header. Delivery reports are awaited through ``flush`` in a worker thread.
- `run_confluent_consumer` drives a ``confluent_kafka.aio.AIOConsumer`` (subscribed, ``enable.auto.commit``
  false) through `idembarrier.kafka.run_consumer`'s loop, so the retry contract is the same: every
  partition of a failed batch is sought back to its first message not yet applied and committed.

A fetch is not cancelled halfway: the consumer's ``consume`` runs in a thread, which would go on reading
records nobody applies and move the consumer's position past them. So a stop or a cancellation waits for
the fetch in flight, at most ``poll_timeout``.
"""

from __future__ import annotations

from ._confluent import ConfluentConsumer, ConfluentPublisher, ConfluentRecord, run_confluent_consumer
from ._delivery import DeadLetter, DeadLetterTopic, MissingMessageId

__all__ = [
    "ConfluentConsumer",
    "ConfluentPublisher",
    "ConfluentRecord",
    "DeadLetter",
    "DeadLetterTopic",
    "MissingMessageId",
    "run_confluent_consumer",
]

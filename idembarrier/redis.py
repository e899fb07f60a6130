"""Across Redis Streams: relay the outbox with XADD, and run a consumer group behind the barrier.

Needs the ``redis`` extra (redis-py's ``redis.asyncio``); importing this module does not import redis.

An entry as `RedisStreamPublisher` writes it to the stream named by the message's topic (field names and
values are binary-safe byte strings):

    ``value``                the message's value (present even when empty)
    ``key``                  the message's key, present only when it has one
    ``header:<name>``        one field per header, the header's value as it is (``header:idempotency-message-id``)

Redis Streams have no deduplication of their own: XADD appends whatever it is given, so an entry the relay
publishes again after a crash (published, not yet marked sent) is in the stream twice, under two entry ids.
The consumer barrier catches the copy: its ``idempotency-message-id`` is the same.

`run_redis_consumer` reads a consumer group (created with ``MKSTREAM`` from the stream's first entry if
missing). XREADGROUP puts each entry it hands out in the group's pending entries list (PEL) under this
consumer's name, and the entry leaves it only with XACK, sent after the database commit. A consumer that
dies in between leaves its entries pending: restarted under the same name it reads them again at once
(XREADGROUP from id ``0``), and any other consumer of the group claims them with XAUTOCLAIM once they have
been idle ``claim_idle`` seconds. Either way the barrier answers the redelivery as a duplicate: acknowledged,
not re-run.

Trimming loses entries: ``MAXLEN`` (the publisher's ``maxlen``, or an XTRIM) deletes the oldest entries
whether or not every group has consumed them. Keep ``maxlen`` well above the longest backlog a group can
have; a trimmed entry still pending is acknowledged and logged as lost.
"""

from __future__ import annotations

from ._delivery import DeadLetter, DeadLetterTopic, MissingMessageId
from ._redis import (
    HEADER_PREFIX,
    KEY_FIELD,
    PROTO_MAX_BULK_LEN,
    VALUE_FIELD,
    RedisStreamPublisher,
    StreamEntry,
    entry_fields,
    run_redis_consumer,
)

__all__ = [
    "HEADER_PREFIX",
    "KEY_FIELD",
    "PROTO_MAX_BULK_LEN",
    "VALUE_FIELD",
    "DeadLetter",
    "DeadLetterTopic",
    "MissingMessageId",
    "RedisStreamPublisher",
    "StreamEntry",
    "entry_fields",
    "run_redis_consumer",
]

"""The transactional outbox: messages a unit of work publishes, written in its transaction.

A message exists if and only if the unit of work that published it committed. Each carries a deterministic
message id and the headers of the header contract, so a consumer can deduplicate whatever the relay or the
broker redelivers.

Header contract, version 2 (names are lowercase ASCII, values UTF-8):
    idempotency-contract: ``2``, the version of this contract.
    idempotency-message-id: `message_id` of (scope, key, execution, position); the consumer's idempotency key.
    idempotency-key / idempotency-scope: the record whose unit of work published the message.

Version 1 (messages written before revision 0005, still in an outbox or a topic) has no contract header and
an id of (scope, key, position) alone; consumers read both versions alike: the id header is the key.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from ._exceptions import UnitOfWorkError
from ._schema import outbox_name
from ._tracecontext import current_headers

if TYPE_CHECKING:
    import uuid
    from collections.abc import Mapping, Sequence

    from ._storage import TableName

__all__ = [
    "CONTRACT_HEADER",
    "CONTRACT_VERSION",
    "KEY_HEADER",
    "MESSAGE_ID_HEADER",
    "SCOPE_HEADER",
    "Message",
    "Parked",
    "contract_headers",
    "decode_headers",
    "encode_headers",
    "message_id",
    "notify_channel",
]

CONTRACT_HEADER = "idempotency-contract"
"""The header naming the version of the header contract a message follows; absent in version 1."""
CONTRACT_VERSION = 2
"""The version of the header contract messages are published with."""
MESSAGE_ID_HEADER = "idempotency-message-id"
"""The header carrying a message's deterministic id."""
KEY_HEADER = "idempotency-key"
"""The header carrying the idempotency key of the unit of work that published the message."""
SCOPE_HEADER = "idempotency-scope"
"""The header carrying the scope of the unit of work that published the message."""
MESSAGE_KEY_HEADER = "message-key"
"""The header carrying a message's key on brokers whose messages have none of their own (RabbitMQ, NATS
JetStream): one name, so a consumer reads a key alike from either broker."""
_RESERVED = frozenset({CONTRACT_HEADER, MESSAGE_ID_HEADER, KEY_HEADER, SCOPE_HEADER})


def message_id(scope: str, key: str, position: int, *, execution: uuid.UUID) -> str:
    """The id of the ``position``-th message (from 0) published by one execution of (scope, key).

    ``msg-`` + the first 128 bits of SHA-256 over the scope, the key, the execution and the position,
    separated by unit separators. The execution is the claim token of the record (the lease's token for
    leased work): a key that runs again (a late request under ``ExpiredReplay.ALLOW``, a key new again after
    retention, a reclaimed lease) publishes new ids, which consumers apply. The id is computed once, at
    `UnitOfWork.publish`, and stored with the message, so every re-publish and redelivery carries it.
    """
    text = f"{scope}\x1f{key}\x1f{execution.hex}\x1f{position}"
    return "msg-" + hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the outbox holds it and a relay publishes it."""

    id: int
    """The outbox row's id: publication order."""
    message_id: str
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Parked:
    """A message the relay gave up on after ``max_attempts`` refusals; its key's later messages wait."""

    message_id: str
    topic: str
    key: bytes | None
    attempts: int
    last_error: str | None
    parked_at: datetime


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    """The JSON text the outbox stores for ``headers``: ``[[name, base64 value], ...]``."""
    return json.dumps([[name, base64.b64encode(value).decode("ascii")] for name, value in headers])


def decode_headers(text: str) -> tuple[tuple[str, bytes], ...]:
    """The headers `encode_headers` stored as ``text``."""
    return tuple((str(name), base64.b64decode(value)) for name, value in json.loads(text))


def contract_headers(
    scope: str, key: str, position: int, execution: uuid.UUID, headers: Mapping[str, bytes] | None
) -> tuple[str, list[tuple[str, bytes]]]:
    """The message id, and the message's headers: ours first, the current trace's (``traceparent``, where
    OpenTelemetry is in use and the caller sets none), then the caller's."""
    extra = dict(headers or {})
    if reserved := sorted(_RESERVED & extra.keys()):
        raise UnitOfWorkError(f"headers {reserved} are set by idembarrier; leave them out")
    for name, value in extra.items():
        if not isinstance(value, bytes):
            raise UnitOfWorkError(f"header {name!r} must be bytes, not {type(value).__name__}")
    mid = message_id(scope, key, position, execution=execution)
    ours = [
        (CONTRACT_HEADER, str(CONTRACT_VERSION).encode()),
        (MESSAGE_ID_HEADER, mid.encode()),
        (KEY_HEADER, key.encode()),
        (SCOPE_HEADER, scope.encode()),
    ]
    carried = [(name, value) for name, value in current_headers().items() if name not in extra]  # the trace
    return mid, ours + carried + list(extra.items())


def notify_channel(table: TableName) -> str:
    """The PostgreSQL channel a commit that wrote to the outbox of ``table`` notifies: the outbox's name."""
    outbox = outbox_name(table.name)
    return f"{table.schema}.{outbox}" if table.schema else outbox

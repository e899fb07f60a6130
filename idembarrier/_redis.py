"""Redis Streams: the publisher, the stream entry as a `Delivery`, and the consumer group loop (`idembarrier.redis`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

from ._backoff import Backoff, Retries, cancel_on
from ._delivery import Applied, ConsumerBarrier, MissingMessageId, Retry
from ._exceptions import ConfigurationError
from ._relay import MessageRefusedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from redis.asyncio import Redis
    from redis.typing import KeyT, StreamIdT
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier
    from ._delivery import DeadLetterDestination, Processed
    from ._outbox import Message

__all__ = [
    "HEADER_PREFIX",
    "KEY_FIELD",
    "PROTO_MAX_BULK_LEN",
    "VALUE_FIELD",
    "RedisStreamPublisher",
    "StreamEntry",
    "entry_fields",
    "run_redis_consumer",
]

VALUE_FIELD = b"value"
"""The entry field holding the message's value."""
KEY_FIELD = b"key"
"""The entry field holding the message's key; absent when the message has none."""
HEADER_PREFIX = b"header:"
"""The prefix of the entry fields holding the headers: ``header:<name>``, one field per header."""
PROTO_MAX_BULK_LEN = 512 * 1024 * 1024
"""Redis's default ``proto-max-bulk-len``: the longest string one command argument may be."""

R = TypeVar("R")

_log = logging.getLogger("idembarrier.redis")

# Redis error replies start with an error code, the first word, in capitals (RESP's "simple errors");
# redis-py raises the ones it has no class for as ResponseError, with the reply as its message. These are
# the codes read here.
_WRONGTYPE = "WRONGTYPE"  # the key holds another type than a stream
_BUSYGROUP = "BUSYGROUP"  # XGROUP CREATE: the group exists
_NOGROUP = "NOGROUP"  # the stream or its group is gone (deleted meanwhile)


def _error_code(exc: BaseException) -> str | None:
    """The error code of a Redis error reply (``WRONGTYPE``, ``NOGROUP``...), or None for another failure."""
    from redis.exceptions import ResponseError

    if not isinstance(exc, ResponseError) or not exc.args or not isinstance(exc.args[0], str):
        return None
    return exc.args[0].split(" ", 1)[0]


def entry_fields(message: Message) -> dict[bytes, bytes]:
    """The fields of the stream entry `RedisStreamPublisher` writes for ``message`` (see the module)."""
    fields = {VALUE_FIELD: message.value}
    if message.key is not None:
        fields[KEY_FIELD] = message.key
    for name, value in message.headers:
        fields.setdefault(HEADER_PREFIX + name.encode(), value)  # the first of a repeated header counts
    return fields


class RedisStreamPublisher:
    """`Publisher` over a ``redis.asyncio.Redis`` client: each message XADDed to the stream named by its topic.

    A batch goes in one pipeline (one round trip, not a transaction): the entries are appended in the
    relay's order, each with an id of Redis's making (``*``). Redis Streams do not deduplicate: a batch
    published again after a relay crash or a lost reply is in the stream twice, which the consumer barrier
    catches by the message id.

    Refused for good (`MessageRefusedError`): a message whose stream's key holds another type (WRONGTYPE),
    and, before anything is sent, a message with a value, key or header longer than ``max_field_bytes``
    (the server would drop the connection). Everything else (connection errors, timeouts, OOM, a read-only
    replica) is transient. The pipeline goes on past a failed XADD: the messages it appended after one are
    remembered, and taken as acknowledged when the relay hands them over again, on its next call.

    Args:
        redis: The client; the caller creates and closes it. Its ``decode_responses`` does not matter here.
        maxlen: Trim each stream to about this many entries (``MAXLEN ~``) as it grows; ``None``: never.
            Trimming deletes entries whether or not they were consumed (see the module).
        max_field_bytes: The server's ``proto-max-bulk-len`` (512 MiB unless configured otherwise).
    """

    def __init__(self, redis: Redis, *, maxlen: int | None = None, max_field_bytes: int = PROTO_MAX_BULK_LEN) -> None:
        if maxlen is not None and maxlen < 1:
            raise ConfigurationError(f"maxlen must be at least 1 or None, not {maxlen!r}")
        if max_field_bytes < 1:
            raise ConfigurationError(f"max_field_bytes must be at least 1, not {max_field_bytes!r}")
        self.redis = redis
        self.maxlen = maxlen
        self.max_field_bytes = max_field_bytes
        self._appended: set[tuple[int, str]] = set()  # appended past a failed one: acknowledged on the next call

    async def publish(self, messages: Sequence[Message]) -> None:
        """XADD ``messages`` in one pipeline and wait for every reply; see `Publisher.publish`."""
        appended, self._appended = self._appended, set()
        sendable = [m for m in messages if (m.id, m.message_id) not in appended]  # in the stream already
        refused = None
        for at, message in enumerate(sendable):
            if (reason := self._too_long(message)) is not None:
                sendable, refused = sendable[:at], MessageRefusedError(message, reason)
                break
        if sendable:
            async with self.redis.pipeline(transaction=False) as pipe:
                for message in sendable:
                    # redis-py types the fields dict[str | bytes, ...]: a dict[bytes, bytes] is one (invariance)
                    pipe.xadd(message.topic, entry_fields(message), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                replies = await pipe.execute(raise_on_error=False)
            for at, (message, reply) in enumerate(zip(sendable, replies, strict=True)):
                if not isinstance(reply, Exception):
                    continue
                # The pipeline went on past the failure: what it appended after it is not published again.
                later = zip(sendable[at + 1 :], replies[at + 1 :], strict=True)
                self._appended = {(m.id, m.message_id) for m, r in later if not isinstance(r, Exception)}
                if _error_code(reply) == _WRONGTYPE:
                    raise MessageRefusedError(message, f"the key {message.topic!r} is not a stream: {reply}") from reply
                raise reply
        if refused is not None:
            raise refused

    def _too_long(self, message: Message) -> str | None:
        """Why the server would refuse ``message``'s entry for its size, if it would."""
        parts = [("value", message.value), ("key", message.key or b"")]
        parts += [(f"header {name!r}", value) for name, value in message.headers]
        for what, data in parts:
            if len(data) > self.max_field_bytes:
                return f"its {what} is {len(data)} bytes, over the server's {self.max_field_bytes} (proto-max-bulk-len)"
        return None


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """A Redis stream entry as a `Delivery`: ``source`` is the stream, ``position`` the entry id.

    ``value``, ``key`` and ``headers`` are read from the fields `RedisStreamPublisher` writes (see the
    module); an entry of another producer without a ``value`` field has ``value`` ``None``, and its other
    fields are in ``fields``. redis-py hands the fields over as a mapping: of a repeated field, the last
    counts.
    """

    source: str
    """The stream."""
    position: str
    """The entry id, ``<milliseconds>-<sequence>``."""
    fields: Mapping[bytes, bytes]
    """All the entry's fields, as XREADGROUP returned them."""
    value: bytes | None
    """The ``value`` field, if any."""
    key: bytes | None
    """The ``key`` field, if any."""
    headers: tuple[tuple[str, bytes], ...]
    """The ``header:<name>`` fields, in the entry's order, the names decoded (undecodable bytes escaped)."""

    @classmethod
    def of(cls, stream: str, entry_id: str, fields: Mapping[bytes, bytes]) -> StreamEntry:
        """The entry ``entry_id`` of ``stream`` with ``fields``."""
        prefix = len(HEADER_PREFIX)
        headers = tuple(
            (name[prefix:].decode("utf-8", "backslashreplace"), value)
            for name, value in fields.items()
            if name.startswith(HEADER_PREFIX)
        )
        return cls(stream, entry_id, fields, fields.get(VALUE_FIELD), fields.get(KEY_FIELD), headers)


async def run_redis_consumer(
    redis: Redis,
    stream: str,
    barrier: Barrier[R],
    handler: Callable[[AsyncSession, StreamEntry], Awaitable[R]],
    *,
    group: str,
    consumer_name: str,
    stop: anyio.Event | None = None,
    count: int = 100,
    block: float = 1.0,
    claim_idle: float = 30.0,
    on_missing_id: MissingMessageId = MissingMessageId.REJECT,
    max_attempts: int | None = 5,
    dead_letter: DeadLetterDestination[StreamEntry] | None = None,
    max_retries: int | None = None,
    backoff: tuple[float, float] = (0.1, 30.0),
) -> int:
    """Consume ``stream`` as ``consumer_name`` of ``group`` until ``stop`` is set: each entry processed, then XACKed.

    The group is created (``XGROUP CREATE <stream> <group> 0 MKSTREAM``: from the stream's first entry) if
    it does not exist; create it yourself with another id to start elsewhere. Then, in turn: this consumer's
    own pending entries (XREADGROUP from id ``0``: a restart under the same name resumes them), the entries
    of any consumer idle ``claim_idle`` seconds or more (XAUTOCLAIM, a scan every ``claim_idle / 2``
    seconds: a dead consumer's), and new entries (XREADGROUP ``>``, waiting up to ``block`` seconds). Each
    entry goes through `ConsumerBarrier.process` and is acknowledged with XACK once that answers `Applied`,
    `Duplicate` or `DeadLettered`: after the database commit, so a crash in between leaves it pending, and
    its redelivery is a duplicate.

    On `Retry` (a transient database failure, a handler failure under ``max_attempts``) the entry stays
    pending: the loop backs off with jitter and reads its own pending entries again from the first, so the
    stream's order holds. A Redis error (connection lost, timeout, an XACK that failed) is retried the same
    way; a deleted stream or group (NOGROUP) is created again. Fatal errors (`SchemaError`,
    `ConfigurationError`, a `StorageError` no retry fixes, the handler's exception when ``max_attempts`` is
    ``None``, the last transient error past ``max_retries``, a cancellation) propagate, the entry pending:
    calling `run_redis_consumer` again applies every entry exactly once. When ``stop`` is set the loop
    finishes the entry in flight, acknowledges it and returns; entries read but not processed stay pending
    under ``consumer_name``.

    Args:
        redis: A ``redis.asyncio.Redis`` client with ``decode_responses=False`` (values are bytes); its
            ``socket_timeout``, if any, must be longer than ``block``. The caller creates and closes it.
        stream: The stream's key (the topic the relay publishes to).
        barrier: The consumer's barrier.
        handler: Called as ``handler(session, entry)`` once per message id, in the unit of work.
        group: The consumer group, in Redis and in the barrier: its scope is ``consumer:<group>``.
        consumer_name: This consumer's name in the group, unique among the running consumers. A stable
            name (per host or pod) resumes its own pending entries when restarted; a fresh one leaves them
            to be claimed. Redis keeps every name ever used (XINFO CONSUMERS); delete the idle ones that
            have no pending entries with XGROUP DELCONSUMER.
        stop: Set it to shut down gracefully; without it, cancel the task.
        count: Most entries per read or claim.
        block: Longest wait, in seconds, for new entries in one read.
        claim_idle: Seconds an entry stays pending, undelivered again, before another consumer claims it.
            Longer than the slowest handler (or a consumer's backoff), else a live consumer's entry is
            claimed too and the barrier makes one of the two wait.
        on_missing_id: The policy for an entry without the id header (REJECT: its dead letter).
        max_attempts: Handler failures of one message id after which it goes to its dead letter;
            ``None``: never, the handler's exception propagates.
        dead_letter: Also called for each poison entry, in the transaction that records it FAILED
            (``DeadLetterTopic("<stream>-dead")`` publishes a copy through the outbox).
        max_retries: Consecutive transient failures after which the last one propagates; ``None``: retry
            forever.
        backoff: The first and the longest delay, in seconds, between retries (with jitter).

    Returns:
        How many entries the handler applied (duplicates and dead letters not counted).
    """
    if redis.connection_pool.connection_kwargs.get("decode_responses"):
        raise ConfigurationError("run_redis_consumer needs a client with decode_responses=False: values are bytes")
    if not consumer_name:
        raise ConfigurationError("consumer_name must not be empty")
    if count < 1:
        raise ConfigurationError(f"count must be at least 1, not {count!r}")
    if block <= 0 or claim_idle <= 0:
        raise ConfigurationError("block and claim_idle must be positive numbers of seconds")
    if not 0 < backoff[0] <= backoff[1]:
        raise ConfigurationError("backoff must be (first, longest) with 0 < first <= longest")
    core: ConsumerBarrier[StreamEntry, R] = ConsumerBarrier(
        barrier, handler, group=group, on_missing_id=on_missing_id, max_attempts=max_attempts, dead_letter=dead_letter
    )
    loop = _Loop(
        redis,
        stream,
        core,
        group=group,
        consumer_name=consumer_name,
        stop=stop,
        count=count,
        block=block,
        claim_idle=claim_idle,
        max_retries=max_retries,
        backoff=Backoff(*backoff),
    )
    return await loop.run()


class _Again(Exception):
    """A retryable failure: back off, then read this consumer's pending entries again from the first."""

    def __init__(self, cause: BaseException, what: str) -> None:
        super().__init__(what)
        self.cause = cause
        self.what = what


class _Loop(Generic[R]):
    """The state of one `run_redis_consumer` call."""

    def __init__(
        self,
        redis: Redis,
        stream: str,
        core: ConsumerBarrier[StreamEntry, R],
        *,
        group: str,
        consumer_name: str,
        stop: anyio.Event | None,
        count: int,
        block: float,
        claim_idle: float,
        max_retries: int | None,
        backoff: Backoff,
    ) -> None:
        self.redis, self.stream, self.core = redis, stream, core
        self.group, self.consumer_name, self.stop = group, consumer_name, stop
        self.count, self.block_ms = count, max(1, round(block * 1000))  # BLOCK 0 would wait forever
        self.claim_idle_ms, self.claim_every = round(claim_idle * 1000), claim_idle / 2
        self.retries = Retries(backoff, max_retries, stop, _log)
        self.group_ready = False
        self.own = True  # read this consumer's own pending entries (from id 0) before anything new
        self.claim_cursor = "0-0"
        self.next_claim = 0.0
        self.applied = 0  # entries whose handler's writes committed (acknowledged or not yet)

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def run(self) -> int:
        self.next_claim = anyio.current_time()
        while not self.stopped():
            try:
                if not self.group_ready:
                    await self._create_group()
                for entry in await self._next_entries():
                    if self.stopped():
                        return self.applied  # the rest stays pending under our name
                    await self._consume(entry)
            except _Again as again:
                self.own = True  # what failed is pending under our name: read it again, in order
                await self.retries.after(again.cause, again.what)
            else:
                self.retries.reset()
        return self.applied

    async def _next_entries(self) -> list[StreamEntry]:
        """Our own pending entries while there are any, then idle ones to claim when a scan is due, then new ones."""
        if self.own:
            if entries := await self._read("0"):
                return entries
            self.own = False
        if anyio.current_time() >= self.next_claim:
            claimed = await self._claim()
            if claimed or self.claim_cursor != "0-0":
                return claimed
            # An empty scan that went through the whole PEL: read new entries now, even if (claim_idle
            # shorter than a scan) the next scan is due already, else the scans would starve the reads.
        return await self._read(">")

    async def _consume(self, entry: StreamEntry) -> None:
        """Process ``entry`` and XACK it, counting it in ``applied`` if its handler's writes committed."""
        if not entry.fields:  # XREADGROUP hands out a pending entry deleted from the stream with no fields
            await self._ack(entry)
            _log.error(
                "idembarrier: entry %s of %r was trimmed from the stream while pending; acknowledged it, "
                "it is lost unless it was applied before",
                entry.position,
                self.stream,
            )
            return
        outcome: Processed[R] = await self.core.process(entry)
        if isinstance(outcome, Retry):
            raise _Again(outcome.cause, outcome.what)
        self.applied += isinstance(outcome, Applied)
        await self._ack(entry)  # only now: the database has committed what the outcome means

    async def _create_group(self) -> None:
        from redis.exceptions import RedisError

        try:
            # Atomic on the server: of consumers creating the group at once, one succeeds, the others get
            # BUSYGROUP and read the same group.
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except (RedisError, OSError) as exc:
            if _error_code(exc) != _BUSYGROUP:
                raise self._failure(exc, f"creating the group {self.group!r}") from exc
        self.group_ready = True

    async def _read(self, last_id: str) -> list[StreamEntry]:
        """XREADGROUP from ``last_id``: ``0`` reads our pending entries at once, ``>`` waits for new ones."""
        from redis.exceptions import RedisError

        streams: dict[KeyT, StreamIdT] = {self.stream: last_id}
        reply: object = None
        if last_id == "0":
            try:
                reply = await self.redis.xreadgroup(self.group, self.consumer_name, streams, count=self.count)
            except (RedisError, OSError) as exc:
                raise self._failure(exc, "reading our pending entries") from exc
            return self._entries(reply)
        failed: Exception | None = None
        async with anyio.create_task_group() as tg:
            if self.stop is not None:
                tg.start_soon(cancel_on, self.stop, tg.cancel_scope)  # the wait ends at once on stop
            try:  # caught here, inside: the task group would wrap it in an exception group
                reply = await self.redis.xreadgroup(
                    self.group, self.consumer_name, streams, count=self.count, block=self.block_ms
                )
            except (RedisError, OSError) as exc:
                failed = exc
            tg.cancel_scope.cancel()
        if failed is not None:
            raise self._failure(failed, "reading new entries") from failed
        # Entries a cancelled read was handed are pending under our name: a restart or a claim reads them.
        return self._entries(reply)

    async def _claim(self) -> list[StreamEntry]:
        """One XAUTOCLAIM step of the scan for entries idle ``claim_idle`` or more; they become ours."""
        from redis.exceptions import RedisError

        try:
            reply = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer_name, self.claim_idle_ms, self.claim_cursor, count=self.count
            )
        except (RedisError, OSError) as exc:
            raise self._failure(exc, "claiming idle entries") from exc
        cursor, claimed = _text(reply[0]), reply[1]
        for deleted in reply[2] if len(reply) > 2 else ():  # Redis 7: pending entries no longer in the stream
            _log.error(
                "idembarrier: entry %s of %r was trimmed from the stream while pending (XAUTOCLAIM dropped it); "
                "it is lost unless it was applied before",
                _text(deleted),
                self.stream,
            )
        self.claim_cursor = cursor
        if cursor == "0-0":  # the scan went through the whole PEL: the next one is due later
            self.next_claim = anyio.current_time() + self.claim_every
        entries = [StreamEntry.of(self.stream, _text(i), f) for i, f in claimed if i is not None and f is not None]
        if entries:
            _log.info(
                "idembarrier: claimed %d idle entries of %r for %s", len(entries), self.stream, self.consumer_name
            )
        return entries

    async def _ack(self, entry: StreamEntry) -> None:
        from redis.exceptions import RedisError

        try:
            await self.redis.xack(self.stream, self.group, entry.position)
        except (RedisError, OSError) as exc:  # applied all the same: its redelivery is a duplicate
            raise self._failure(exc, f"acknowledging entry {entry.position}") from exc

    def _failure(self, exc: BaseException, what: str) -> Exception:
        """What a Redis error means here: fatal for a key of another type, else retried (a lost group re-created)."""
        code = _error_code(exc)
        if code == _WRONGTYPE:
            return ConfigurationError(f"the key {self.stream!r} holds another type than a stream: {exc}")
        if code == _NOGROUP:  # the stream was deleted, and its groups with it
            self.group_ready = False
        return _Again(exc, what)

    def _entries(self, reply: object) -> list[StreamEntry]:
        """The entries of an XREADGROUP reply, in whichever shape redis-py gives it (RESP2 or RESP3, legacy or not)."""
        if not reply:
            return []
        groups = list(reply.values()) if isinstance(reply, dict) else [pair[1] for pair in reply]  # type: ignore[attr-defined]  # a list of [stream, entries]
        entries: list[StreamEntry] = []
        for group in groups:
            if group and isinstance(group[0], list):  # RESP3's legacy shape wraps the entries once more
                group = group[0]
            entries += [StreamEntry.of(self.stream, _text(i), f or {}) for i, f in group if i is not None]
        return entries


def _text(entry_id: object) -> str:
    """An entry id (or cursor) as text: redis-py hands them over as bytes."""
    return entry_id.decode("ascii") if isinstance(entry_id, bytes) else str(entry_id)

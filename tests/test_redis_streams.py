"""Redis Streams: the relay's XADD publisher and the consumer group behind the barrier, on the real server."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import anyio
import pytest

import idembarrier
from idembarrier.messaging import (
    CONTRACT_HEADER,
    MESSAGE_ID_HEADER,
    DeadLetter,
    DeadLetterTopic,
    Message,
    MessageRefusedError,
    MissingMessageId,
    OutboxRelay,
)
from idembarrier.redis import RedisStreamPublisher, StreamEntry, entry_fields, run_redis_consumer
from tests._postgres_server import free_port
from tests.helpers import Boom, require
from tests.models import Payment
from tests.redis_worker import REDIS_URL, record_payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncSession

    from tests.conftest import Database


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    """A client of the local Redis (bytes in, bytes out); the test fails under CI, or skips, if it does not answer."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
        available = True
    except (RedisError, OSError):
        available = False
    try:
        require(available, "Redis does not answer on 127.0.0.1:6379")
        yield client
    finally:
        await client.aclose()


class Streams:
    """Stream names no other test uses, deleted (with their groups) when the test ends."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def new(self, what: str = "orders") -> str:
        self.names.append(f"idembarrier-test-{what}-{uuid.uuid4().hex[:12]}")
        return self.names[-1]


@pytest.fixture
async def streams(redis: Redis) -> AsyncIterator[Streams]:
    made = Streams()
    try:
        yield made
    finally:
        if made.names:
            await redis.delete(*made.names)


def message(topic: str, value: bytes, n: int = 1, *, key: bytes | None = b"k", **headers: bytes) -> Message:
    return Message(n, f"msg-{n}", topic, key, value, ((MESSAGE_ID_HEADER, f"msg-{n}".encode()), *headers.items()))


async def entries(redis: Redis, stream: str) -> list[StreamEntry]:
    """Every entry of ``stream``, read with XRANGE."""
    found = []
    for entry_id, fields in await redis.xrange(stream) or []:
        assert isinstance(entry_id, bytes)
        found.append(StreamEntry.of(stream, entry_id.decode(), cast("dict[bytes, bytes]", fields)))
    return found


async def pending(redis: Redis, stream: str, group: str) -> int:
    summary = await redis.xpending(stream, group)
    return int(summary["pending"])


async def consume_until(
    redis: Redis,
    stream: str,
    barrier: idembarrier.Barrier,
    done: Callable[[], bool],
    *,
    group: str,
    handler: Callable[[AsyncSession, StreamEntry], Awaitable[idembarrier.JSON]] = record_payment,
    consumer_name: str = "c1",
    **options: Any,
) -> int:
    """Run the consumer until ``done()`` holds after a handler or a counted outcome; return what it applied.

    The loop finishes the entry in flight (its commit, its XACK) before it returns.
    """
    stop = anyio.Event()
    scope = f"consumer:{group}"

    def check(outcome: idembarrier.Outcome, of: str) -> None:
        if of == scope and done():
            stop.set()

    async def handle(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        response = await handler(session, entry)
        if done():
            stop.set()
        return response

    barrier.observe(check)
    options.setdefault("backoff", (0.01, 0.05))
    with anyio.fail_after(30):
        return await run_redis_consumer(
            redis, stream, barrier, handle, group=group, consumer_name=consumer_name, stop=stop, **options
        )


# -- the publisher -----------------------------------------------------------------------------------------


async def test_an_entry_holds_the_value_the_key_and_one_field_per_header(redis: Redis, streams: Streams) -> None:
    """XADDed fields: ``value``, ``key`` when there is one, ``header:<name>`` each; bytes kept as they are."""
    stream = streams.new()
    binary = bytes(range(256))
    await RedisStreamPublisher(redis).publish(
        [message(stream, binary, 1, key=b"\xff\x00", trace=b"\x00\xfe"), message(stream, b"", 2, key=None)]
    )
    first, second = await entries(redis, stream)
    assert first.fields == {
        b"value": binary,
        b"key": b"\xff\x00",
        b"header:idempotency-message-id": b"msg-1",
        b"header:trace": b"\x00\xfe",
    }
    assert (first.value, first.key, first.headers) == (
        binary,
        b"\xff\x00",
        ((MESSAGE_ID_HEADER, b"msg-1"), ("trace", b"\x00\xfe")),
    )
    assert (second.value, second.key, second.source) == (b"", None, stream)
    assert first.position < second.position  # the relay's order


def test_a_repeated_header_keeps_its_first_value() -> None:
    """Headers are fields, and a field appears once: of a repeated header name the first value counts."""
    repeated = Message(1, "m", "s", None, b"v", (("h", b"first"), ("h", b"second")))
    assert entry_fields(repeated)[b"header:h"] == b"first"


async def test_maxlen_trims_each_stream_approximately(redis: Redis, streams: Streams) -> None:
    """With ``maxlen`` the stream is trimmed as it grows (``MAXLEN ~``: whole nodes, so a little over)."""
    stream = streams.new()
    publisher = RedisStreamPublisher(redis, maxlen=10)
    for n in range(0, 500, 50):
        await publisher.publish([message(stream, b"v", i) for i in range(n, n + 50)])
    assert 10 <= await redis.xlen(stream) < 500


async def test_a_key_of_another_type_is_refused_for_good(redis: Redis, streams: Streams) -> None:
    """WRONGTYPE is `MessageRefusedError` naming the message; the ones before it were appended."""
    stream, taken = streams.new(), streams.new("taken")
    await redis.set(taken, b"not a stream")
    batch = [message(stream, b"a", 1), message(taken, b"b", 2), message(stream, b"c", 3)]
    with pytest.raises(MessageRefusedError, match="is not a stream") as caught:
        await RedisStreamPublisher(redis).publish(batch)
    assert caught.value.message == batch[1]
    assert [e.value for e in await entries(redis, stream)][:1] == [b"a"]


async def test_a_refused_message_is_parked_by_the_relay_and_other_streams_flow(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """Through the relay: the refusal is counted and parks the message; the batch's other stream is published."""
    stream, taken = streams.new(), streams.new("taken")
    await redis.set(taken, b"not a stream")
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        uow.publish(taken, b"refused", key=b"k")
        uow.publish(stream, b"flows", key=b"j")
        uow.complete(None)
    relay = OutboxRelay(barrier, RedisStreamPublisher(redis), max_attempts=1)
    assert await relay.relay_once() == 1
    assert [p.topic for p in await relay.parked()] == [taken]
    assert [e.value for e in await entries(redis, stream)] == [b"flows"]


async def test_a_field_over_the_bulk_limit_is_refused_before_anything_is_sent(redis: Redis, streams: Streams) -> None:
    """A value (or key, or header) longer than ``max_field_bytes`` is refused; the messages before it go."""
    stream = streams.new()
    batch = [message(stream, b"small", 1), message(stream, b"x" * 11, 2), message(stream, b"after", 3)]
    with pytest.raises(MessageRefusedError, match="11 bytes") as caught:
        await RedisStreamPublisher(redis, max_field_bytes=10).publish(batch)
    assert caught.value.message == batch[1]
    assert [e.value for e in await entries(redis, stream)] == [b"small"]
    with pytest.raises(MessageRefusedError, match="header 'big'"):
        await RedisStreamPublisher(redis, max_field_bytes=10).publish([message(stream, b"v", 4, big=b"y" * 11)])


async def test_an_xadd_failing_otherwise_is_raised_and_what_followed_it_is_not_appended_again(
    redis: Redis, streams: Streams
) -> None:
    """Another error reply (a stream past its last possible id) is raised as it is, for the relay to retry; the
    entries the pipeline appended after it are taken as published when the batch comes again."""
    from redis.exceptions import ResponseError

    full, stream = streams.new("full"), streams.new()
    await redis.xadd(full, {b"value": b"last"}, id="18446744073709551615-18446744073709551615")
    publisher = RedisStreamPublisher(redis)
    batch = [message(full, b"a", 1), message(stream, b"b", 2)]
    with pytest.raises(ResponseError):
        await publisher.publish(batch)
    assert [e.value for e in await entries(redis, stream)] == [b"b"]
    await redis.delete(full)  # the stream can take entries again
    await publisher.publish(batch)
    assert [e.value for e in await entries(redis, stream)] == [b"b"]  # not appended twice
    assert [e.value for e in await entries(redis, full)] == [b"a"]


async def test_an_unreachable_server_is_a_transient_failure() -> None:
    """A connection refused is raised as it is (the relay retries the batch), not as a refusal."""
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = Redis(port=free_port(), socket_connect_timeout=1)
    try:
        with pytest.raises(RedisConnectionError):
            await RedisStreamPublisher(client).publish([message("s", b"v")])
    finally:
        await client.aclose()


@pytest.mark.parametrize("options", [{"maxlen": 0}, {"max_field_bytes": 0}], ids=["maxlen", "max_field_bytes"])
def test_the_publisher_refuses_unusable_options(options: dict[str, int]) -> None:
    """A ``maxlen`` or a field limit below 1 is a `ConfigurationError`."""
    from redis.asyncio import Redis

    with pytest.raises(idembarrier.ConfigurationError):
        RedisStreamPublisher(Redis(), **options)


# -- end to end --------------------------------------------------------------------------------------------


async def test_a_publish_from_a_unit_of_work_reaches_the_consumer_once(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """UoW.publish → OutboxRelay → XADD → the group: one effect, XACKed, the producer's ids in the headers."""
    stream, group = streams.new(), f"billing-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        mid = uow.publish(stream, b"o-1", key=b"account-1")
        uow.complete(None)
    assert await OutboxRelay(barrier, RedisStreamPublisher(redis)).relay_once() == 1
    seen: list[StreamEntry] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        seen.append(entry)
        return await record_payment(session, entry)

    applied = await consume_until(redis, stream, barrier, lambda: bool(seen), group=group, handler=handler)
    assert applied == 1
    assert await pg_db.payments("o-1") == 1
    assert await pending(redis, stream, group) == 0
    (entry,) = seen
    assert (entry.source, entry.key, dict(entry.headers)[MESSAGE_ID_HEADER]) == (stream, b"account-1", mid.encode())
    assert (f"consumer:{group}", mid, "COMPLETED") in await pg_db.records()


async def test_a_relay_that_dies_before_marking_sent_publishes_twice_and_one_is_applied(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """The relay crashes after XADD, before its commit: the next relay appends the entry again; one effect."""
    stream, group = streams.new(), f"billing-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    publisher = RedisStreamPublisher(redis)
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        uow.publish(stream, b"o-1", key=b"k")
        uow.complete(None)

    class DiesBeforeMarking:
        async def publish(self, messages: Sequence[Message]) -> None:
            await publisher.publish(messages)
            raise ConnectionResetError("relay died")

    with pytest.raises(ConnectionResetError):
        await OutboxRelay(barrier, DiesBeforeMarking()).relay_once()
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    assert len(await entries(redis, stream)) == 2  # Redis Streams do not deduplicate
    replays: list[idembarrier.Outcome] = []
    barrier.observe(lambda outcome, scope: replays.append(outcome) if outcome is idembarrier.Outcome.REPLAYED else None)
    applied = await consume_until(redis, stream, barrier, lambda: bool(replays), group=group)
    assert applied == 1
    assert await pg_db.payments("o-1") == 1
    assert await pending(redis, stream, group) == 0


async def test_a_rolled_back_unit_of_work_publishes_nothing(pg_db: Database, redis: Redis, streams: Streams) -> None:
    """A unit of work that raises after publishing leaves no outbox row: the relay appends nothing."""
    stream = streams.new()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with pytest.raises(Boom):
        async with barrier.unit_of_work("o-1", scope="orders") as uow:
            uow.publish(stream, b"o-1")
            raise Boom
    assert await OutboxRelay(barrier, RedisStreamPublisher(redis)).relay_once() == 0
    assert await redis.exists(stream) == 0


def spawn(*args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tests.redis_worker", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy())


async def read_line(process: subprocess.Popen[bytes], prefix: str) -> str:
    """The first line of the process's output that starts with ``prefix`` (read in a worker thread)."""
    assert process.stdout is not None
    stdout = process.stdout

    def scan() -> str:
        for raw in stdout:
            if (line := raw.decode().strip()).startswith(prefix):
                return line
        raise AssertionError(f"the worker exited ({process.wait()}) without printing {prefix!r}")

    with anyio.fail_after(60):
        return await anyio.to_thread.run_sync(scan, abandon_on_cancel=True)


@pytest.mark.parametrize("redelivered_to", ["another consumer", "the same consumer restarted"])
async def test_a_consumer_killed_between_its_commit_and_its_xack_has_one_effect(
    pg_db: Database, redis: Redis, streams: Streams, redelivered_to: str
) -> None:
    """SIGKILL at the XACK (the commit done): the entry stays pending; XAUTOCLAIM or the own PEL replays it."""
    stream, group = streams.new(), f"billing-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        uow.publish(stream, b"o-1")
        uow.complete(None)
    assert await OutboxRelay(barrier, RedisStreamPublisher(redis)).relay_once() == 1
    worker = spawn("stalls-before-ack", pg_db.url, stream, group, "doomed", "30")
    try:
        line = await read_line(worker, "committed")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        worker.kill()
        worker.wait()
        assert worker.stdout is not None
        worker.stdout.close()
    (entry,) = await entries(redis, stream)
    assert line == f"committed {entry.position}"
    assert await pg_db.payments("o-1") == 1  # committed, not acknowledged
    assert await pending(redis, stream, group) == 1
    name = "doomed" if redelivered_to == "the same consumer restarted" else "rescuer"
    replays: list[idembarrier.Outcome] = []
    barrier.observe(lambda outcome, scope: replays.append(outcome) if outcome is idembarrier.Outcome.REPLAYED else None)
    ran: list[bytes | None] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        ran.append(entry.value)
        return await record_payment(session, entry)

    applied = await consume_until(
        redis, stream, barrier, lambda: bool(replays), group=group, handler=handler, consumer_name=name, claim_idle=0.1
    )
    assert (applied, ran) == (0, [])  # replayed, not re-run
    assert await pg_db.payments("o-1") == 1
    assert await pending(redis, stream, group) == 0


# -- the consumer loop ---------------------------------------------------------------------------------------


async def xadd(redis: Redis, stream: str, fields: dict[bytes, bytes]) -> str:
    entry_id = await redis.xadd(stream, fields)  # type: ignore[arg-type]  # bytes fields; redis-py's dict is invariant
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


CONTRACT_FIELD = f"header:{CONTRACT_HEADER}".encode()


def event(value: bytes, mid: bytes) -> dict[bytes, bytes]:
    return {b"value": value, b"header:" + MESSAGE_ID_HEADER.encode(): mid}


class AckFails:
    """Makes the client's XACK fail ``times`` times (a connection lost after the database commit)."""

    def __init__(self, redis: Redis, times: int) -> None:
        self.redis, self.times, self.failed = redis, times, 0
        self.xack = redis.xack

    def __enter__(self) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError

        async def failing(*args: Any) -> int:
            if self.failed < self.times:
                self.failed += 1
                raise RedisConnectionError("connection lost before XACK")
            return await self.xack(*args)

        self.redis.xack = failing  # type: ignore[method-assign,assignment]

    def __exit__(self, *exc_info: object) -> None:
        self.redis.xack = self.xack  # type: ignore[method-assign]


async def test_a_failed_xack_is_retried_and_the_entry_replayed(pg_db: Database, redis: Redis, streams: Streams) -> None:
    """An XACK that fails after the commit leaves the entry pending; it is read again from the PEL: a duplicate."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await xadd(redis, stream, event(b"o-1", b"m-1"))
    replays: list[idembarrier.Outcome] = []
    barrier.observe(lambda outcome, scope: replays.append(outcome) if outcome is idembarrier.Outcome.REPLAYED else None)
    with AckFails(redis, 1):
        assert await consume_until(redis, stream, barrier, lambda: bool(replays), group=group) == 1
    assert await pg_db.payments("o-1") == 1
    assert await pending(redis, stream, group) == 0


async def test_a_restart_after_a_propagated_failure_replays_and_does_not_rerun(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """Past ``max_retries`` the XACK's error propagates, the entry pending; the same name restarted replays it."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await xadd(redis, stream, event(b"o-1", b"m-1"))
    with AckFails(redis, 1), anyio.fail_after(10), pytest.raises(RedisConnectionError):
        await run_redis_consumer(redis, stream, barrier, record_payment, group=group, consumer_name="c1", max_retries=0)
    assert await pending(redis, stream, group) == 1
    ran: list[bytes | None] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        ran.append(entry.value)
        return await record_payment(session, entry)

    replays: list[idembarrier.Outcome] = []
    barrier.observe(lambda outcome, scope: replays.append(outcome) if outcome is idembarrier.Outcome.REPLAYED else None)
    assert await consume_until(redis, stream, barrier, lambda: bool(replays), group=group, handler=handler) == 0
    assert ran == []
    assert await pg_db.payments("o-1") == 1
    assert await pending(redis, stream, group) == 0


async def test_a_poison_entry_reaches_the_dead_letter_stream_after_max_attempts(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """The handler failing on one entry ``max_attempts`` times: FAILED, copied to the dead-letter stream, XACKed."""
    stream, dead, group = streams.new(), streams.new("dead"), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    poison = await xadd(redis, stream, event(b"poison", b"m-poison"))
    await xadd(redis, stream, event(b"o-2", b"m-2"))
    tries: list[bytes | None] = []

    async def fragile(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        tries.append(entry.value)
        if entry.value == b"poison":
            raise RuntimeError("boom")
        return await record_payment(session, entry)

    applied = await consume_until(
        redis,
        stream,
        barrier,
        lambda: b"o-2" in tries,
        group=group,
        handler=fragile,
        max_attempts=3,
        dead_letter=DeadLetterTopic(dead),
    )
    assert applied == 1
    assert tries == [b"poison", b"poison", b"poison", b"o-2"]  # retried in place: the stream's order holds
    assert await pending(redis, stream, group) == 0
    record = await barrier.inspect("m-poison", scope=f"consumer:{group}")
    assert record is not None
    assert record.status is idembarrier.Status.FAILED
    assert await OutboxRelay(barrier, RedisStreamPublisher(redis)).relay_once() == 1
    (copy,) = await entries(redis, dead)
    headers = dict(copy.headers)
    assert copy.value == b"poison"
    assert headers["idempotency-original-message-id"] == b"m-poison"
    letter = DeadLetter(**json.loads(headers["idempotency-dead-letter"]))
    assert (letter.topic, letter.position, letter.reason, letter.attempts) == (stream, poison, "handler", 3)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"value": b"v"}, "has no 'idempotency-message-id' header"),
        ({b"value": b"v", b"header:idempotency-message-id": b"\xff\xfe"}, "not UTF-8"),
        ({b"value": b"v", b"header:idempotency-message-id": b""}, "message id"),
        (
            {b"value": b"v", b"header:idempotency-message-id": b"m", f"header:{CONTRACT_HEADER}".encode(): b"9"},
            "contract",
        ),
    ],
    ids=["no-id-header", "id-not-utf8", "empty-id", "unknown-contract"],
)
async def test_an_entry_whose_headers_cannot_be_read_is_dead_lettered_under_its_position(
    pg_db: Database, redis: Redis, streams: Streams, fields: dict[bytes, bytes], reason: str
) -> None:
    """Malformed headers: FAILED under ``<stream>:<entry id>``, XACKed at once, the next entry applied."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    bad = await xadd(redis, stream, fields)
    await xadd(redis, stream, event(b"o-2", b"m-2"))
    seen: list[bytes | None] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        seen.append(entry.value)
        return await record_payment(session, entry)

    assert await consume_until(redis, stream, barrier, lambda: bool(seen), group=group, handler=handler) == 1
    assert seen == [b"o-2"]
    record = await barrier.inspect(f"{stream}:{bad}", scope=f"consumer:{group}")
    assert record is not None
    assert record.status is idembarrier.Status.FAILED
    assert isinstance(record.response, bytes)
    assert reason in json.loads(record.response)["error"]
    assert await pending(redis, stream, group) == 0


async def test_an_entry_without_an_id_can_be_keyed_by_its_entry_id(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """DERIVE keys an entry without the id header by ``<stream>:<entry id>``, with a warning, and applies it."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    entry_id = await xadd(redis, stream, {b"value": b"o-1"})
    with pytest.warns(UserWarning, match="by its position"):
        applied = await consume_until(
            redis, stream, barrier, lambda: True, group=group, on_missing_id=MissingMessageId.DERIVE
        )
    assert applied == 1
    assert await pg_db.records(f"{stream}:{entry_id}") == [(f"consumer:{group}", f"{stream}:{entry_id}", "COMPLETED")]


async def test_an_entry_without_a_value_field_is_handed_over_with_value_none(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """Another producer's entry (no ``value`` field) reaches the handler with ``value`` None and all its fields."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await xadd(redis, stream, {b"data": b"{}", b"header:idempotency-message-id": b"m-1"})
    seen: list[StreamEntry] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        seen.append(entry)
        session.add(Payment(key=entry.fields[b"data"].decode(), amount=1))
        return None

    assert await consume_until(redis, stream, barrier, lambda: bool(seen), group=group, handler=handler) == 1
    assert (seen[0].value, seen[0].key) == (None, None)
    assert await pg_db.payments("{}") == 1


async def test_a_trimmed_pending_entry_is_acknowledged_and_reported_lost(
    pg_db: Database, redis: Redis, streams: Streams, caplog: pytest.LogCaptureFixture
) -> None:
    """A pending entry trimmed from the stream comes back with no fields: acknowledged, logged as lost."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    lost = await xadd(redis, stream, event(b"o-1", b"m-1"))
    await xadd(redis, stream, event(b"o-2", b"m-2"))
    await redis.xreadgroup(group, "c1", {stream: ">"}, count=1)  # c1 takes the first, then dies
    await redis.xtrim(stream, maxlen=1, approximate=False)
    with caplog.at_level(logging.ERROR, logger="idembarrier.redis"):
        assert await consume_until(redis, stream, barrier, lambda: True, group=group) == 1
    assert f"entry {lost} of {stream!r} was trimmed" in caplog.text
    assert await pending(redis, stream, group) == 0
    assert await pg_db.payments() == 1


async def test_stop_ends_a_blocked_read_at_once(pg_db: Database, redis: Redis, streams: Streams) -> None:
    """``stop`` set while XREADGROUP waits (block=30 s) returns at once; the client still works."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    from redis.asyncio import Redis

    stop, name = anyio.Event(), f"idembarrier-test-{uuid.uuid4().hex[:8]}"
    client = Redis.from_url(REDIS_URL, client_name=name)

    async def blocked() -> bool:
        return any(c["name"] == name and c["cmd"] == "xreadgroup" for c in await redis.client_list())

    try:
        with anyio.fail_after(10):  # far under block=30: the read did not run out
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    partial(
                        run_redis_consumer,
                        client,
                        stream,
                        barrier,
                        record_payment,
                        group=group,
                        consumer_name="c1",
                        stop=stop,
                        block=30,
                    )
                )
                while not await blocked():  # noqa: ASYNC110  # the server's state: no event of ours reports it
                    await anyio.sleep(0.01)
                stop.set()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_deleted_stream_and_group_are_created_again(pg_db: Database, redis: Redis, streams: Streams) -> None:
    """The stream deleted under a running consumer (NOGROUP): the group is created again and entries flow."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await xadd(redis, stream, event(b"o-1", b"m-1"))
    seen: list[bytes | None] = []
    deleted = anyio.Event()

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        seen.append(entry.value)
        if entry.value == b"o-1":
            await redis.delete(stream)  # gone with its group
            deleted.set()
        return await record_payment(session, entry)

    async def add_later() -> None:
        await deleted.wait()
        await xadd(redis, stream, event(b"o-2", b"m-2"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(add_later)
        done = lambda: b"o-2" in seen  # noqa: E731
        assert await consume_until(redis, stream, barrier, done, group=group, handler=handler, block=0.05) == 2
    assert seen == [b"o-1", b"o-2"]


async def test_stop_set_between_the_entries_of_one_read_leaves_the_rest_pending(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """``stop`` set while the first entry of a read is handled: that entry is acknowledged, the others stay
    pending under the consumer's name, and its restart applies them."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    for n in range(3):
        await xadd(redis, stream, event(f"o-{n}".encode(), f"m-{n}".encode()))
    seen: list[bytes | None] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        seen.append(entry.value)
        return await record_payment(session, entry)

    assert await consume_until(redis, stream, barrier, lambda: bool(seen), group=group, handler=handler) == 1
    assert seen == [b"o-0"]
    assert await redis.xpending(stream, group) == {
        "pending": 2,
        "min": (await entries(redis, stream))[1].position.encode(),
        "max": (await entries(redis, stream))[2].position.encode(),
        "consumers": [{"name": b"c1", "pending": 2}],
    }
    assert await consume_until(redis, stream, barrier, lambda: len(seen) == 3, group=group, handler=handler) == 2
    assert seen == [b"o-0", b"o-1", b"o-2"]
    assert await pending(redis, stream, group) == 0


async def test_a_group_destroyed_while_an_entry_is_retried_is_created_again(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """The group destroyed (XGROUP DESTROY) while a failed entry waits for its retry: re-reading the pending
    entries answers NOGROUP, the group is created again from the stream's start, and the entry is applied once."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await xadd(redis, stream, event(b"o-1", b"m-1"))
    tries: list[bytes | None] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        tries.append(entry.value)
        if len(tries) == 1:
            assert await redis.xgroup_destroy(stream, group) == 1
            raise RuntimeError("fails once")
        return await record_payment(session, entry)

    assert await consume_until(redis, stream, barrier, lambda: len(tries) == 2, group=group, handler=handler) == 1
    assert tries == [b"o-1", b"o-1"]
    assert await pg_db.payments("o-1") == 1
    assert await pending(redis, stream, group) == 0


async def test_a_claim_idle_shorter_than_a_scan_still_reads_new_entries(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """A claim scan due again before the last one ended (``claim_idle`` 1 µs) does not starve the reads: an
    empty scan is followed by a read of new entries."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await xadd(redis, stream, event(b"o-1", b"m-1"))
    assert await consume_until(redis, stream, barrier, lambda: True, group=group, claim_idle=1e-6) == 1
    assert await pg_db.payments("o-1") == 1


async def test_a_group_destroyed_before_a_claim_scan_is_created_again_and_replays(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """The group destroyed while an entry is handled: its XACK finds nothing, the claim scan due next answers
    NOGROUP, the group is created again from the start, and the entry read again is a duplicate."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await xadd(redis, stream, event(b"o-1", b"m-1"))
    replays: list[idembarrier.Outcome] = []
    barrier.observe(lambda outcome, scope: replays.append(outcome) if outcome is idembarrier.Outcome.REPLAYED else None)
    ran: list[bytes | None] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        ran.append(entry.value)
        assert await redis.xgroup_destroy(stream, group) == 1
        return await record_payment(session, entry)

    # claim_idle 1 µs: a claim scan is due after every entry, before any new read
    applied = await consume_until(
        redis, stream, barrier, lambda: bool(replays), group=group, handler=handler, claim_idle=1e-6
    )
    assert (applied, ran) == (1, [b"o-1"])
    assert await pg_db.payments("o-1") == 1
    assert await pending(redis, stream, group) == 0


async def test_a_claim_scan_goes_on_past_count_until_every_idle_entry_is_claimed(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """More idle entries than ``count``: XAUTOCLAIM's cursor is followed, step after step, and all are applied."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    for n in range(3):
        await xadd(redis, stream, event(f"o-{n}".encode(), f"m-{n}".encode()))
    await redis.xreadgroup(group, "dead", {stream: ">"}, count=3)  # "dead" takes all three, then dies
    seen: list[bytes | None] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        seen.append(entry.value)
        return await record_payment(session, entry)

    applied = await consume_until(
        redis,
        stream,
        barrier,
        lambda: len(seen) == 3,
        group=group,
        handler=handler,
        consumer_name="rescuer",
        count=1,
        claim_idle=1e-6,
    )
    assert (applied, seen) == (3, [b"o-0", b"o-1", b"o-2"])
    assert await pending(redis, stream, group) == 0


async def test_a_trimmed_entry_of_a_dead_consumer_is_reported_lost_by_the_claim(
    pg_db: Database, redis: Redis, streams: Streams, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry pending under a dead consumer and trimmed from the stream: XAUTOCLAIM drops it from the
    pending list (Redis 7) and the claimant logs it as lost; the entry still in the stream is applied."""
    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    lost = await xadd(redis, stream, event(b"o-1", b"m-1"))
    await xadd(redis, stream, event(b"o-2", b"m-2"))
    await redis.xreadgroup(group, "dead", {stream: ">"}, count=2)  # "dead" takes both, then dies
    await redis.xtrim(stream, maxlen=1, approximate=False)
    seen: list[bytes | None] = []

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        seen.append(entry.value)
        return await record_payment(session, entry)

    with caplog.at_level(logging.ERROR, logger="idembarrier.redis"):
        applied = await consume_until(
            redis,
            stream,
            barrier,
            lambda: bool(seen),
            group=group,
            handler=handler,
            consumer_name="rescuer",
            claim_idle=1e-6,
        )
    assert (applied, seen) == (1, [b"o-2"])
    assert f"entry {lost} of {stream!r} was trimmed from the stream while pending (XAUTOCLAIM" in caplog.text
    assert await pending(redis, stream, group) == 0


async def test_a_resp3_client_consumes_the_same(pg_db: Database, redis: Redis, streams: Streams) -> None:
    """A client speaking RESP3 (``protocol=3``, whose replies nest the entries once more) reads the same entries."""
    from redis.asyncio import Redis

    stream, group = streams.new(), f"g-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await xadd(redis, stream, event(b"o-1", b"m-1"))
    client = Redis.from_url(REDIS_URL, protocol=3)
    try:
        assert await consume_until(client, stream, barrier, lambda: True, group=group) == 1
    finally:
        await client.aclose()
    assert await pg_db.payments("o-1") == 1
    assert await pending(redis, stream, group) == 0


async def test_a_key_of_another_type_is_fatal_for_the_consumer(pg_db: Database, redis: Redis, streams: Streams) -> None:
    """The stream's key holding a string is a `ConfigurationError` at once, no retry."""
    stream = streams.new()
    await redis.set(stream, b"not a stream")
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with anyio.fail_after(10), pytest.raises(idembarrier.ConfigurationError, match="another type"):
        await run_redis_consumer(redis, stream, barrier, record_payment, group="g", consumer_name="c1")


@pytest.mark.parametrize(
    "options",
    [
        {"count": 0},
        {"block": 0},
        {"claim_idle": 0},
        {"backoff": (0.0, 1.0)},
        {"max_attempts": 0},
        {"consumer_name": ""},
    ],
    ids=["count", "block", "claim_idle", "backoff", "max_attempts", "consumer_name"],
)
async def test_run_redis_consumer_refuses_unusable_options(sqlite_db: Database, options: dict[str, Any]) -> None:
    """Options that cannot work are a `ConfigurationError` before anything is read."""
    from redis.asyncio import Redis

    barrier = idembarrier.Barrier(sqlite_db.sessionmaker)
    options = {"consumer_name": "c1", **options}
    with pytest.raises(idembarrier.ConfigurationError):
        await run_redis_consumer(Redis(port=free_port()), "s", barrier, record_payment, group="g", **options)


async def test_a_client_that_decodes_responses_is_refused(sqlite_db: Database) -> None:
    """Values are bytes: a client with ``decode_responses=True`` is a `ConfigurationError`."""
    from redis.asyncio import Redis

    barrier = idembarrier.Barrier(sqlite_db.sessionmaker)
    with pytest.raises(idembarrier.ConfigurationError, match="decode_responses"):
        await run_redis_consumer(
            Redis(decode_responses=True), "s", barrier, record_payment, group="g", consumer_name="c"
        )


def test_importing_idembarrier_redis_does_not_import_redis() -> None:
    """``import idembarrier.redis`` leaves redis-py unimported until a publisher or consumer runs."""
    code = "import sys, idembarrier.redis; assert 'redis' not in sys.modules, 'redis imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

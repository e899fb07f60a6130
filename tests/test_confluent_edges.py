"""confluent-kafka's edges on the real Kafka-protocol broker (Tansu): options refused, broker and client errors
on both ends, records with broken headers, the retry's seek back. Each message's effect once, or none."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from confluent_kafka import KafkaError, KafkaException

import idembarrier
from idembarrier.confluent import ConfluentConsumer, ConfluentPublisher, ConfluentRecord, run_confluent_consumer
from idembarrier.kafka import MESSAGE_ID_HEADER, Message, MessageRefusedError, MissingMessageId
from tests._postgres_server import free_port
from tests.confluent_worker import consumer_config
from tests.helpers import Boom
from tests.test_confluent import broker, consumer_client, effects, names, producer, run_until
from tests.test_kafka import record_payment
from tests.test_nats_failures import LogEvent, watch

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from tests.conftest import Database

__all__ = ["broker", "consumer_client"]  # fixtures, shared with test_confluent


def message(topic: str, value: bytes) -> Message:
    """An outbox message for ``topic`` with an id of its own."""
    mid = f"m-{uuid.uuid4().hex[:12]}"
    return Message(1, mid, topic, b"k", value, ((MESSAGE_ID_HEADER, mid.encode()),))


async def records(consumer: ConfluentConsumer, topic: str, n: int) -> list[bytes | None]:
    """The values of the first ``n`` records of ``topic`` (subscribing ``consumer`` to it)."""
    await consumer.consumer.subscribe([topic])
    seen: list[bytes | None] = []
    with anyio.fail_after(30):
        while len(seen) < n:
            for batch in (await consumer.getmany(timeout_ms=200, max_records=10)).values():
                seen.extend(record.value for record in batch)
    return seen


# -- the consumer loop ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"poll_timeout": 0}, "poll_timeout"),
        ({"poll_timeout": -1.0}, "poll_timeout"),
        ({"max_records": 0}, "max_records"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"backoff": (0.0, 1.0)}, "backoff"),
        ({"backoff": (2.0, 1.0)}, "backoff"),
    ],
)
async def test_unusable_options_are_refused_before_a_fetch(
    pg_db: Database, consumer_client: Any, options: dict[str, Any], named: str
) -> None:
    """A poll_timeout that is not positive (librdkafka blocks for ever on a negative one, in a thread the loop
    cannot cancel, and spins on zero), max_records or max_attempts under 1, a bad backoff: ConfigurationError."""
    with anyio.fail_after(10), pytest.raises(idembarrier.ConfigurationError, match=named):
        await run_confluent_consumer(consumer_client, idembarrier.Barrier(pg_db.sessionmaker), record_payment,
                                     group="g", **options)  # fmt: skip


async def test_a_consumer_error_event_past_max_retries_propagates(pg_db: Database, broker: str) -> None:
    """A subscription to a topic that does not exist (auto-creation off) yields librdkafka's error event: the
    fetch raises it as KafkaException which, with max_retries=0, propagates at its first occurrence."""
    from confluent_kafka.aio import AIOConsumer

    topic, group = names()
    client = AIOConsumer({**consumer_config(broker, group), "allow.auto.create.topics": False})
    await client.subscribe([topic])
    retried = LogEvent("fetching from the broker failed")
    try:
        with watch(retried, "idembarrier.consumer"), anyio.fail_after(30), pytest.raises(KafkaException) as raised:
            await run_confluent_consumer(client, idembarrier.Barrier(pg_db.sessionmaker), record_payment,
                                         group=group, poll_timeout=0.2, max_retries=0)  # fmt: skip
    finally:
        await client.close()
    assert raised.value.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    assert retried.count == 0  # max_retries=0: the first failure propagates


async def test_a_consumer_error_event_is_retried_until_the_topic_exists(pg_db: Database, broker: str) -> None:
    """The same error event with retries unlimited: logged and backed off, and once the topic exists (and the
    client's metadata has caught up) its message is applied."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.aio import AIOConsumer
    from confluent_kafka.cimpl import NewTopic

    topic, group = names()
    client = AIOConsumer(
        {**consumer_config(broker, group), "allow.auto.create.topics": False, "topic.metadata.refresh.interval.ms": 200}
    )
    await client.subscribe([topic])
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    stop = anyio.Event()

    async def stops(session: AsyncSession, record: ConfluentRecord) -> idembarrier.JSON:
        stop.set()
        return await record_payment(session, record)

    async def create_topic_once_retried() -> None:
        await retried.seen.wait()
        admin = AdminClient({"bootstrap.servers": broker})
        await anyio.to_thread.run_sync(admin.create_topics([NewTopic(topic, 1, 1)])[topic].result, 10)
        publisher = producer(broker)
        publisher.produce(topic, b"o-1", b"k", headers=[(MESSAGE_ID_HEADER, b"m-1")])
        assert await anyio.to_thread.run_sync(publisher.flush, 10) == 0

    retried = LogEvent("fetching from the broker failed")
    try:
        with watch(retried, "idembarrier.consumer"), anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(create_topic_once_retried)
                applied = await run_confluent_consumer(
                    client, barrier, stops, group=group, stop=stop, poll_timeout=0.2, backoff=(0.05, 0.2)
                )
    finally:
        await client.close()
    assert retried.count >= 1
    assert applied == 1
    assert await effects(pg_db) == {"o-1": 1}


async def test_partition_end_events_are_not_errors(broker: str) -> None:
    """With enable.partition.eof, librdkafka reports each partition's end as an event: skipped, not raised."""
    from confluent_kafka.aio import AIOConsumer

    topic, group = names()
    client = producer(broker)
    for value in (b"a", b"b"):
        client.produce(topic, value, b"k")
    assert client.flush(10) == 0
    consumer = AIOConsumer({**consumer_config(broker, group), "enable.partition.eof": True})
    try:
        assert await records(ConfluentConsumer(consumer), topic, 2) == [b"a", b"b"]
        with anyio.fail_after(10):  # past the end: only the end-of-partition event comes, and it is skipped
            assert await ConfluentConsumer(consumer).getmany(timeout_ms=500, max_records=10) == {}
    finally:
        await consumer.close()


@pytest.mark.parametrize("policy", [MissingMessageId.REJECT, MissingMessageId.DERIVE])
async def test_records_with_broken_id_headers_are_dead_lettered_unrun(
    pg_db: Database, broker: str, policy: MissingMessageId
) -> None:
    """An id header with no value (Kafka's null) or one that is not UTF-8 is malformed, whatever the missing-id
    policy (DERIVE is for producers that send no id, not broken ones): FAILED, the handler unrun; the next
    record is applied."""
    topic, group = names()
    client = producer(broker)
    client.produce(topic, b"null-id", b"k", headers=[(MESSAGE_ID_HEADER, None)])
    client.produce(topic, b"binary-id", b"k", headers=[(MESSAGE_ID_HEADER, b"\xff\xfe")])
    client.produce(topic, b"good", b"k", headers=[(MESSAGE_ID_HEADER, b"m-good")])
    assert client.flush(10) == 0
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    assert await run_until(pg_db, broker, topic, group, barrier, 1, on_missing_id=policy) == 1
    assert await effects(pg_db) == {"good": 1}
    recorded = await pg_db.records()
    failed = [key for scope, key, status in recorded if status == "FAILED"]
    partition = failed[0].split(":")[-2]  # the broker's choice for key b"k"
    assert sorted(failed) == [f"{topic}:{partition}:0", f"{topic}:{partition}:1"]
    assert (f"consumer:{group}", "m-good", "COMPLETED") in recorded
    assert len(recorded) == 3


async def test_a_handler_failure_seeks_back_to_the_failed_record_only(pg_db: Database, broker: str) -> None:
    """The second of three records fails once (a Retry): the first's offset is committed, the partition sought
    back to the second, and the next fetch reads from there: the first is not re-run, each applied once."""
    topic, group = names()
    client = producer(broker)
    for i in range(3):
        client.produce(topic, f"o-{i}".encode(), b"k", headers=[(MESSAGE_ID_HEADER, f"m-{i}".encode())])
    assert client.flush(10) == 0
    calls: list[bytes | None] = []

    async def fails_once(session: AsyncSession, record: ConfluentRecord) -> idembarrier.JSON:
        calls.append(record.value)
        if record.value == b"o-1" and calls.count(b"o-1") == 1:
            raise Boom
        return await record_payment(session, record)

    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    assert await run_until(pg_db, broker, topic, group, barrier, 3, handler=fails_once) == 3
    assert calls == [b"o-0", b"o-1", b"o-1", b"o-2"]
    assert await effects(pg_db) == {"o-0": 1, "o-1": 1, "o-2": 1}


async def test_a_consumer_closed_under_the_loop_ends_it(pg_db: Database, broker: str) -> None:
    """The AIOConsumer closed by a handler: its writes commit, and every later call raises RuntimeError
    ("Consumer closed"), which no retry changes, so the loop ends with it (as ClosedResourceError) instead of
    retrying for ever."""
    from confluent_kafka.aio import AIOConsumer

    topic, group = names()
    client = producer(broker)
    client.produce(topic, b"o-1", b"k", headers=[(MESSAGE_ID_HEADER, b"m-1")])
    assert client.flush(10) == 0
    consumer = AIOConsumer(consumer_config(broker, group))
    await consumer.subscribe([topic])

    async def closes_its_consumer(session: AsyncSession, record: ConfluentRecord) -> idembarrier.JSON:
        await consumer.close()
        return await record_payment(session, record)

    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with anyio.fail_after(12), pytest.raises(anyio.ClosedResourceError) as closed:
        await run_confluent_consumer(consumer, barrier, closes_its_consumer, group=group, poll_timeout=0.2,
                                     backoff=(0.01, 0.05))  # fmt: skip
    assert isinstance(closed.value.__cause__, RuntimeError)
    assert await effects(pg_db) == {"o-1": 1}


# -- the publisher ---------------------------------------------------------------------------------------


async def test_a_full_local_queue_delivers_what_it_holds_and_is_transient(broker: str, consumer_client: Any) -> None:
    """A producer queue of one message: the second message's BufferError propagates (transient) once the first
    is delivered; published again, the second goes too."""
    topic, _ = names()
    publisher = ConfluentPublisher(producer(broker, **{"queue.buffering.max.messages": 1}))
    first, second = message(topic, b"first"), message(topic, b"second")
    with pytest.raises(BufferError):
        await publisher.publish([first, second])
    await publisher.publish([second])
    assert await records(ConfluentConsumer(consumer_client), topic, 2) == [b"first", b"second"]


async def test_a_broker_that_does_not_answer_is_transient() -> None:
    """Nothing listening: a flush that outlasts ``timeout`` is a TimeoutError, and a message librdkafka gave up
    on (message.timeout.ms) a KafkaException; neither is a refusal, so the relay retries them."""
    nowhere = f"127.0.0.1:{free_port()}"
    topic, _ = names()
    with pytest.raises(TimeoutError, match="did not deliver"):
        await ConfluentPublisher(producer(nowhere), timeout=0.5).publish([message(topic, b"x")])
    gives_up = ConfluentPublisher(producer(nowhere, **{"message.timeout.ms": 300}), timeout=10)
    with pytest.raises(KafkaException) as raised:
        await gives_up.publish([message(topic, b"x")])
    assert raised.value.args[0].code() == KafkaError._MSG_TIMED_OUT


async def test_a_topic_the_broker_refuses_is_refused_for_good(broker: str) -> None:
    """An invalid topic name: the broker's TOPIC_EXCEPTION report is a MessageRefusedError for that message, after
    the one before it was delivered."""
    topic, _ = names()
    good, bad = message(topic, b"fine"), message("not a topic!", b"x")
    with pytest.raises(MessageRefusedError) as refused:
        await ConfluentPublisher(producer(broker)).publish([good, bad])
    assert refused.value.message is bad

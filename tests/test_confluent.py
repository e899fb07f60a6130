"""confluent-kafka at both ends, through the real Kafka-protocol broker (Tansu) and PostgreSQL: each message once."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from sqlalchemy import func, select, text

import idembarrier
from idembarrier import Status
from idembarrier.confluent import ConfluentConsumer, ConfluentPublisher, ConfluentRecord, run_confluent_consumer
from idembarrier.kafka import MESSAGE_ID_HEADER, DeadLetterTopic, Message, MessageRefusedError, OutboxRelay
from tests.confluent_worker import consumer_config
from tests.models import Payment
from tests.test_chaos import Crew, kill_either, kill_while, publish_events
from tests.test_kafka import broker, record_payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    import confluent_kafka
    from sqlalchemy.ext.asyncio import AsyncSession

    from tests.conftest import Database

__all__ = ["broker"]  # a fixture, shared with test_kafka


def names() -> tuple[str, str]:
    return f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"


def producer(broker: str, **config: object) -> confluent_kafka.Producer:
    import confluent_kafka

    return confluent_kafka.Producer({"bootstrap.servers": broker, "enable.idempotence": False, **config})


async def effects(db: Database) -> dict[str, int]:
    query = select(Payment.key, func.count()).group_by(Payment.key)
    async with db.engine.connect() as conn:
        return {str(key): int(n) for key, n in (await conn.execute(query)).all()}


async def publish(barrier: idembarrier.Barrier, topic: str, keys: Sequence[str], *, fail: bool = False) -> list[str]:
    """One unit of work per key, each publishing the key as the event; return the message ids."""
    ids = []
    for key in keys:
        async with barrier.unit_of_work(key, scope="orders") as uow:
            ids.append(uow.publish(topic, key.encode(), key=b"account"))
            uow.complete(None)
    return ids


async def run_until(
    db: Database, broker: str, topic: str, group: str, barrier: idembarrier.Barrier, expected: int, **options: Any
) -> int:
    """Run the consumer loop until ``expected`` distinct events have effects; return what it applied."""
    from confluent_kafka.aio import AIOConsumer

    client = AIOConsumer(consumer_config(broker, group))
    await client.subscribe([topic])
    stop = anyio.Event()

    async def until_seen() -> None:
        # Another task's progress, which no event of ours reports: polled, not used to order tasks.
        while len(await effects(db)) < expected:  # noqa: ASYNC110
            await anyio.sleep(0.1)
        stop.set()

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(until_seen)
                applied = await run_confluent_consumer(
                    client,
                    barrier,
                    options.pop("handler", record_payment),
                    group=group,
                    stop=stop,
                    poll_timeout=0.2,
                    backoff=(0.01, 0.05),
                    **options,
                )
    finally:
        await client.close()
    return applied


def spawn(role: str, *args: str) -> subprocess.Popen[bytes]:
    """A worker process of ``tests.confluent_worker``, its output piped."""
    command = [sys.executable, "-m", "tests.confluent_worker", role, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy())


def test_importing_the_adapter_does_not_import_confluent_kafka() -> None:
    """`idembarrier.confluent` imports confluent-kafka only when it is used."""
    code = "import sys, idembarrier.confluent; assert 'confluent_kafka' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_a_published_message_and_its_duplicate_have_one_effect(pg_db: Database, broker: str) -> None:
    """UoW.publish → relay → confluent producer → broker → consumer: applied once; a re-sent copy is replayed."""
    topic, group = names()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    [mid] = await publish(barrier, topic, ["o-1"])
    client = producer(broker)
    assert await OutboxRelay(barrier, ConfluentPublisher(client)).relay_once() == 1
    client.produce(topic, b"o-1", b"account", headers=[(MESSAGE_ID_HEADER, mid.encode())])  # a duplicate
    client.produce(topic, b"last", b"account", headers=[(MESSAGE_ID_HEADER, b"m-last")])
    assert client.flush(10) == 0
    assert await run_until(pg_db, broker, topic, group, barrier, 2) == 2
    assert await effects(pg_db) == {"o-1": 1, "last": 1}


async def test_a_rolled_back_unit_of_work_publishes_nothing(pg_db: Database, broker: str) -> None:
    """The message exists only if the unit of work commits: nothing reaches the broker."""
    topic, _ = names()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with pytest.raises(RuntimeError, match="declined"):
        async with barrier.unit_of_work("o-1", scope="orders") as uow:
            uow.publish(topic, b"o-1")
            raise RuntimeError("declined")
    assert await OutboxRelay(barrier, ConfluentPublisher(producer(broker))).relay_once() == 0


class DiesBeforeMarking(ConfluentPublisher):
    """Publishes, then fails as a relay killed before it marks the batch sent."""

    async def publish(self, messages: Sequence[Message]) -> None:
        await super().publish(messages)
        raise ConnectionResetError("the relay died before marking")


async def test_a_relay_that_dies_after_publishing_gives_one_effect(pg_db: Database, broker: str) -> None:
    """The batch is published twice (the next relay re-publishes it): the consumer applies it once."""
    topic, group = names()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish(barrier, topic, ["o-1", "o-2"])
    client = producer(broker)
    with pytest.raises(ConnectionResetError):
        await OutboxRelay(barrier, DiesBeforeMarking(client)).relay_once()
    assert await OutboxRelay(barrier, ConfluentPublisher(client)).relay_once() == 2
    applied = await run_until(pg_db, broker, topic, group, barrier, 2)
    assert applied == 2
    assert await effects(pg_db) == {"o-1": 1, "o-2": 1}


async def test_a_consumer_killed_after_its_commit_before_its_offsets_gives_one_effect(
    pg_db: Database, broker: str
) -> None:
    """SIGKILL between the database commit and the offset commit: the redelivery is replayed, not re-run."""
    topic, group = names()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish(barrier, topic, ["o-1", "o-2", "o-3"])
    assert await OutboxRelay(barrier, ConfluentPublisher(producer(broker))).relay_once() == 3
    stalled = spawn("stall", pg_db.url, broker, topic, group)
    try:
        assert stalled.stdout is not None
        with anyio.fail_after(60):
            lines: list[bytes] = []
            while (line := await anyio.to_thread.run_sync(stalled.stdout.readline)) != b"committing\n":
                assert line, f"the worker ended before committing: {lines}"
                lines.append(line)
        assert await effects(pg_db) == {"o-1": 1, "o-2": 1, "o-3": 1}  # applied, offsets not committed
    finally:
        stalled.kill()
        stalled.wait()
        if stalled.stdout is not None:
            stalled.stdout.close()
    replayed = await run_until(pg_db, broker, topic, group, barrier, 3, handler=record_payment)
    assert replayed == 0  # all three came again and were duplicates
    assert await effects(pg_db) == {"o-1": 1, "o-2": 1, "o-3": 1}


async def test_a_poison_message_reaches_the_dead_letter_topic(pg_db: Database, broker: str) -> None:
    """The handler failing ``max_attempts`` times: the record FAILED, a copy published to the DLQ, the rest applied."""
    topic, group = names()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    ids = await publish(barrier, topic, ["poison", "o-2"])
    client = producer(broker)
    assert await OutboxRelay(barrier, ConfluentPublisher(client)).relay_once() == 2

    async def fragile(session: AsyncSession, message: ConfluentRecord) -> idembarrier.JSON:
        if message.value == b"poison":
            raise RuntimeError("boom")
        return await record_payment(session, message)

    dlq = DeadLetterTopic(f"{topic}-dlq")
    await run_until(pg_db, broker, topic, group, barrier, 1, handler=fragile, max_attempts=2, dead_letter=dlq)
    record = await barrier.inspect(ids[0], scope=f"consumer:{group}")
    assert record is not None
    assert record.status is Status.FAILED
    async with pg_db.engine.connect() as conn:
        topics = (await conn.execute(text("SELECT topic FROM idempotency_keys_outbox WHERE sent_at IS NULL"))).all()
    assert [row[0] for row in topics] == [f"{topic}-dlq"]
    assert await OutboxRelay(barrier, ConfluentPublisher(client)).relay_once() == 1
    assert await effects(pg_db) == {"o-2": 1}


async def test_a_message_too_large_for_the_producer_is_refused_for_good(pg_db: Database, broker: str) -> None:
    """librdkafka refusing a message's size raises `MessageRefusedError` after the ones before it were delivered."""
    topic, _ = names()
    publisher = ConfluentPublisher(producer(broker, **{"message.max.bytes": 2000}))
    small = Message(1, "m-1", topic, b"k", b"small", ())
    large = Message(2, "m-2", topic, b"k", b"x" * 5000, ())
    with pytest.raises(MessageRefusedError) as refused:
        await publisher.publish([small, large])
    assert refused.value.message is large


@pytest.fixture
async def consumer_client(broker: str) -> AsyncIterator[Any]:
    from confluent_kafka.aio import AIOConsumer

    client = AIOConsumer(consumer_config(broker, f"g-{uuid.uuid4().hex[:8]}"))
    yield client
    await client.close()


async def test_seeks_take_effect_at_the_next_fetch(consumer_client: Any, broker: str) -> None:
    """The loop's seek-back is kept and applied before the next fetch: the records come again from there."""
    topic, _ = names()
    client = producer(broker)
    for i in range(3):
        client.produce(topic, f"v{i}".encode(), b"k")
    assert client.flush(10) == 0
    await consumer_client.subscribe([topic])
    consumer = ConfluentConsumer(consumer_client)
    seen: list[ConfluentRecord] = []
    with anyio.fail_after(30):
        while len(seen) < 3:
            for records in (await consumer.getmany(timeout_ms=200, max_records=10)).values():
                seen.extend(records)
    consumer.seek((topic, seen[0].partition), 1)
    again: list[ConfluentRecord] = []
    with anyio.fail_after(30):
        while not again:
            for records in (await consumer.getmany(timeout_ms=200, max_records=10)).values():
                again.extend(records)
    assert [r.value for r in again] == [b"v1", b"v2"]


EVENTS = 500
PARTITIONS = 4
CHAOS_SECONDS = 15.0


@pytest.mark.timeout(240)
async def test_killed_relays_and_consumers_apply_every_event_exactly_once(pg_db: Database, broker: str) -> None:
    """500 events, 2 relays and 2 consumers (confluent-kafka) SIGKILLed at random: each event has one effect."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    topic, group = names()
    admin = AdminClient({"bootstrap.servers": broker})  # kept: its futures fail once it is collected
    await anyio.to_thread.run_sync(admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result, 10)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    args = [pg_db.url, broker, topic, group]
    relays = Crew("relay", args, 2, module="tests.confluent_worker")
    consumers = Crew("consumer", args, 2, module="tests.confluent_worker")
    try:
        produce = partial(publish_events, barrier, topic, EVENTS, every=50, pause=0.5)
        await kill_while(produce, kill_either(rng, relays, consumers), rng, CHAOS_SECONDS, gap=(0.5, 1.5))
        with anyio.fail_after(150):
            # Other processes' progress, which no event of ours reports: polled, not used to order tasks.
            while len(seen := await effects(pg_db)) < EVENTS:  # noqa: ASYNC110
                await anyio.sleep(0.5)
    finally:
        relays.stop()
        consumers.stop()
    report = f"seed {seed}: {EVENTS} events, {relays.kills} relay kills, {consumers.kills} consumer kills"
    print(report)
    assert seen == {f"event-{i}": 1 for i in range(EVENTS)}, report

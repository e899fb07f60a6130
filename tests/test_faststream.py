"""The barrier as a FastStream middleware, through real brokers (RabbitMQ here, the Kafka-protocol Tansu too)."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from faststream import Context
from sqlalchemy import func, select, text

import idembarrier
from idembarrier import Status
from idembarrier.faststream import (
    SESSION,
    BarrierMiddleware,
    DeadLetterTopic,
    FastStreamDelivery,
    FastStreamPublisher,
)
from idembarrier.kafka import MESSAGE_ID_HEADER, OutboxRelay
from tests.helpers import require
from tests.models import Payment
from tests.rabbitmq_worker import RABBITMQ_URL
from tests.test_chaos import Crew, kill_either, kill_while, publish_events
from tests.test_kafka import broker
from tests.test_rabbitmq import Broker, Worker, connection, pending, wait_for_effects

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from aio_pika.abc import AbstractRobustConnection
    from sqlalchemy.ext.asyncio import AsyncSession

    from tests.conftest import Database

__all__ = ["broker", "connection"]  # fixtures, shared with test_kafka and test_rabbitmq

RABBITMQ = RABBITMQ_URL
SESSION_OF_THE_UNIT_OF_WORK = Context(SESSION)
"""The subscribers' session parameter: the unit of work's, from FastStream's context."""


async def effects(db: Database) -> dict[str, int]:
    query = select(Payment.key, func.count()).group_by(Payment.key)
    async with db.engine.connect() as conn:
        return {str(key): int(n) for key, n in (await conn.execute(query)).all()}


async def rabbitmq_answers() -> bool:
    try:
        with anyio.fail_after(3):
            await (await anyio.connect_tcp("127.0.0.1", 5672)).aclose()
    except (OSError, TimeoutError):
        return False
    return True


@pytest.fixture
async def rabbit() -> None:
    require(await rabbitmq_answers(), "RabbitMQ does not answer on 127.0.0.1:5672")


async def status(barrier: idembarrier.Barrier, key: str, group: str) -> Status | None:
    record = await barrier.inspect(key, scope=f"consumer:{group}")
    return None if record is None else record.status


class Seen:
    """What the subscriber ran for, and an event per count reached."""

    def __init__(self) -> None:
        self.runs: list[bytes] = []
        self.changed = anyio.Event()

    def add(self, value: bytes) -> None:
        self.runs.append(value)
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, predicate: Any) -> None:
        with anyio.fail_after(30):
            while not predicate():
                await self.changed.wait()


async def test_a_relayed_message_and_its_duplicate_run_the_subscriber_once(pg_db: Database, rabbit: None) -> None:
    """UoW.publish → relay → FastStream → RabbitMQ → subscriber behind the barrier: one run, one effect."""
    from faststream.rabbit import RabbitBroker

    queue, group = f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    rabbit_broker = RabbitBroker(RABBITMQ, middlewares=[BarrierMiddleware(barrier, group=group)], logger=None)
    seen = Seen()

    @rabbit_broker.subscriber(queue)
    async def bill(body: bytes, session: AsyncSession = SESSION_OF_THE_UNIT_OF_WORK) -> dict[str, str]:
        session.add(Payment(key=body.decode(), amount=1))
        seen.add(body)
        return {"billed": body.decode()}

    async with rabbit_broker:
        await rabbit_broker.start()
        async with barrier.unit_of_work("o-1", scope="orders") as uow:
            mid = uow.publish(queue, b"o-1")
            uow.complete(None)
        assert await OutboxRelay(barrier, FastStreamPublisher(rabbit_broker)).relay_once() == 1
        await rabbit_broker.publish(b"o-1", queue, headers={MESSAGE_ID_HEADER: mid})  # the same message again
        await rabbit_broker.publish(b"last", queue, headers={MESSAGE_ID_HEADER: "m-last"})
        await seen.until(lambda: b"last" in seen.runs)
    assert seen.runs == [b"o-1", b"last"]
    assert await effects(pg_db) == {"o-1": 1, "last": 1}
    record = await barrier.inspect(mid, scope=f"consumer:{group}")
    assert record is not None
    assert record.status is Status.COMPLETED


async def test_a_failing_subscriber_is_redelivered_then_dead_lettered(pg_db: Database, rabbit: None) -> None:
    """Each failure nacks the message (RabbitMQ redelivers it); at ``max_attempts`` it goes to its dead letter."""
    from faststream.rabbit import RabbitBroker

    queue, group = f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    middleware = BarrierMiddleware(
        barrier, group=group, max_attempts=3, dead_letter=DeadLetterTopic(f"{queue}-dlq"), backoff=(0.01, 0.02)
    )
    rabbit_broker = RabbitBroker(RABBITMQ, middlewares=[middleware], logger=None)
    seen = Seen()

    @rabbit_broker.subscriber(queue)
    async def bill(body: bytes, session: AsyncSession = SESSION_OF_THE_UNIT_OF_WORK) -> None:
        seen.add(body)
        if body == b"poison":
            raise RuntimeError("boom")
        session.add(Payment(key=body.decode(), amount=1))

    async with rabbit_broker:
        await rabbit_broker.start()
        await rabbit_broker.publish(b"poison", queue, headers={MESSAGE_ID_HEADER: "m-poison"})
        await rabbit_broker.publish(b"no id", queue)  # malformed: dead-lettered without running
        await rabbit_broker.publish(b"o-2", queue, headers={MESSAGE_ID_HEADER: "m-2"})
        await seen.until(lambda: seen.runs.count(b"poison") == 3 and b"o-2" in seen.runs)
        with anyio.fail_after(30):
            # The dead-lettering commits after the third run, in the broker's task: polled, not ordered.
            while await status(barrier, "m-poison", group) is not Status.FAILED:  # noqa: ASYNC110
                await anyio.sleep(0.05)
    assert b"no id" not in seen.runs
    assert await effects(pg_db) == {"o-2": 1}
    async with pg_db.engine.connect() as conn:
        topics = (await conn.exec_driver_sql("SELECT topic FROM idempotency_keys_outbox")).all()
    assert sorted(row[0] for row in topics) == [f"{queue}-dlq", f"{queue}-dlq"]  # the poison and the malformed one


async def test_the_middleware_guards_a_kafka_subscriber_too(pg_db: Database, broker: str) -> None:
    """The same middleware in front of FastStream's Kafka broker: a duplicate is replayed, not re-run."""
    from faststream.kafka import KafkaBroker

    topic, group = f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    kafka = KafkaBroker(broker, middlewares=[BarrierMiddleware(barrier, group=group)], logger=None)
    seen = Seen()

    @kafka.subscriber(topic, group_id=group, auto_offset_reset="earliest", session_timeout_ms=6000)
    async def bill(body: bytes, session: AsyncSession = SESSION_OF_THE_UNIT_OF_WORK) -> None:
        session.add(Payment(key=body.decode(), amount=1))
        seen.add(body)

    async with kafka:
        await kafka.start()
        async with barrier.unit_of_work("o-1", scope="orders") as uow:
            uow.publish(topic, b"o-1", key=b"account")
            uow.complete(None)
        publisher = FastStreamPublisher(kafka)
        assert await OutboxRelay(barrier, publisher).relay_once() == 1
        async with pg_db.engine.begin() as conn:  # make the relay publish it again, as one that died before marking
            await conn.exec_driver_sql("UPDATE idempotency_keys_outbox SET sent_at = NULL")
        assert await OutboxRelay(barrier, publisher).relay_once() == 1
        await kafka.publish(b"last", topic, headers={MESSAGE_ID_HEADER: "m-last"}, key=b"account")
        await seen.until(lambda: b"last" in seen.runs)
    assert seen.runs == [b"o-1", b"last"]
    assert await effects(pg_db) == {"o-1": 1, "last": 1}


# -- the options and the delivery ------------------------------------------------------------------------


async def test_a_backoff_that_is_not_first_then_longest_is_refused(pg_db: Database) -> None:
    """A backoff whose first wait is not positive, or exceeds the longest, is a `ConfigurationError` at once."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    for backoff in ((0.0, 1.0), (2.0, 1.0)):
        with pytest.raises(idembarrier.ConfigurationError, match="backoff"):
            BarrierMiddleware(barrier, group="billing", backoff=backoff)


def test_a_raw_message_that_names_no_source_is_from_faststream() -> None:
    """A raw message without topic, routing key, subject, channel or stream: source ``faststream``, position
    FastStream's message id, no key; a body that is not bytes has no value; headers are bytes."""
    from faststream.message import StreamMessage

    delivery = FastStreamDelivery(StreamMessage(object(), {"parsed": 1}, headers={"n": 7}, message_id="m-1"))
    assert (delivery.source, delivery.position, delivery.key, delivery.value) == ("faststream", "m-1", None, None)
    assert list(delivery.headers) == [("n", b"7")]


# -- the real broker: what a publish and a crash give ----------------------------------------------------


@pytest.fixture
async def queues(connection: AbstractRobustConnection) -> AsyncIterator[Broker]:
    """Queues with names no other test uses (`tests.test_rabbitmq.Broker`), deleted when the test ends."""
    opened = Broker(await connection.channel())
    try:
        yield opened
    finally:
        await opened.delete()


async def consume_until(db: Database, queue: str, last: bytes, *, effects_then: int, **options: Any) -> list[bytes]:
    """Run a FastStream subscriber of ``queue`` behind the middleware (group ``billing``) until it has run for
    ``last`` and ``effects_then`` events have their effect; return the bodies it ran for, in order."""
    from faststream.rabbit import RabbitBroker, RabbitQueue

    barrier = idembarrier.Barrier(db.sessionmaker, check_schema=options.pop("check_schema", True))
    middleware = BarrierMiddleware(barrier, group="billing", backoff=(0.01, 0.05), **options)
    rabbit_broker = RabbitBroker(RABBITMQ, middlewares=[middleware], logger=None)
    seen = Seen()

    @rabbit_broker.subscriber(RabbitQueue(queue, durable=True, declare=False))
    async def bill(body: bytes, session: AsyncSession = SESSION_OF_THE_UNIT_OF_WORK) -> None:
        session.add(Payment(key=body.decode(), amount=1))
        seen.add(body)

    async with rabbit_broker:
        await rabbit_broker.start()
        await seen.until(lambda: last in seen.runs)
        await wait_for_effects(db, effects_then)  # committed (then acked) before the broker closes
    return seen.runs


class FastStreamWorker(Worker):
    """A `tests.faststream_worker` process; its stdout lines tell where it is."""

    def __init__(self, role: str, db: Database, queue: str, group: str = "billing") -> None:
        command = [sys.executable, "-m", "tests.faststream_worker", role, db.url, queue, group]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy()
        )


async def publish_orders(barrier: idembarrier.Barrier, topic: str, *values: str) -> list[str]:
    """One unit of work per value, each publishing it to ``topic``; return the message ids."""
    ids = []
    for value in values:
        async with barrier.unit_of_work(f"order-{value}", scope="orders") as uow:
            ids.append(uow.publish(topic, value.encode()))
            uow.complete(None)
    return ids


async def test_a_rolled_back_unit_of_work_publishes_nothing(pg_db: Database, queues: Broker) -> None:
    """A unit of work whose body raises leaves no outbox row: the FastStream relay has nothing, the queue none."""
    from faststream.rabbit import RabbitBroker

    queue = await queues.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with pytest.raises(RuntimeError, match="declined"):
        async with barrier.unit_of_work("order-1", scope="orders") as uow:
            uow.publish(queue.name, b"o-1")
            raise RuntimeError("declined")
    async with RabbitBroker(RABBITMQ, logger=None) as rabbit_broker:
        assert await OutboxRelay(barrier, FastStreamPublisher(rabbit_broker)).relay_once() == 0
    assert await queues.ready(queue) == 0


async def test_a_header_that_is_not_text_is_refused_and_parked(pg_db: Database, queues: Broker) -> None:
    """FastStream's headers are text: a header that is not UTF-8 is refused, parked, and nothing is sent."""
    from faststream.rabbit import RabbitBroker

    queue = await queues.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("order-1", scope="orders") as uow:
        uow.publish(queue.name, b"o-1", headers={"tenant": b"\xff"})
        uow.complete(None)
    async with RabbitBroker(RABBITMQ, logger=None) as rabbit_broker:
        relay = OutboxRelay(barrier, FastStreamPublisher(rabbit_broker), max_attempts=1)
        assert await relay.relay_once() == 0
        (parked,) = await relay.parked()
    assert parked.last_error is not None
    assert "not UTF-8" in parked.last_error
    assert await queues.ready(queue) == 0


async def test_a_fatal_error_nacks_the_message_and_its_redelivery_is_applied_once_fixed(
    pg_db: Database, queues: Broker
) -> None:
    """No records table (42P01): the middleware logs the error and nacks; RabbitMQ redelivers the message, and
    once the table is back the redelivery runs the subscriber once."""
    queue = await queues.queue()
    async with pg_db.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE idempotency_keys RENAME TO idempotency_keys_away"))
    nacked = anyio.Event()

    class Nacked(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.ERROR and "failed for good" in record.msg:
                nacked.set()

    async def restore_the_table() -> None:
        await nacked.wait()
        async with pg_db.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE idempotency_keys_away RENAME TO idempotency_keys"))

    handler = Nacked()
    logging.getLogger("idembarrier.consumer").addHandler(handler)
    try:
        await queues.publish(queue, b"o-1", headers={MESSAGE_ID_HEADER: "m-1"})
        async with anyio.create_task_group() as tg:
            tg.start_soon(restore_the_table)
            runs = await consume_until(pg_db, queue.name, b"o-1", effects_then=1, check_schema=False)
    finally:
        logging.getLogger("idembarrier.consumer").removeHandler(handler)
    assert nacked.is_set()
    assert runs == [b"o-1"]
    assert await effects(pg_db) == {"o-1": 1}
    assert await queues.ready(queue) == 0


async def test_a_relay_killed_after_publishing_before_marking_gives_one_effect(pg_db: Database, queues: Broker) -> None:
    """SIGKILL a FastStream relay process between the broker's confirm and its commit: the next relay
    re-publishes, the subscriber runs once and the copy is replayed."""
    queue = await queues.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_orders(barrier, queue.name, "o-1")
    dying = FastStreamWorker("relay-dies-published", pg_db, queue.name)
    try:
        await dying.said("published")
    finally:
        dying.kill()
    assert await queues.ready(queue) == 1
    relay = FastStreamWorker("relay", pg_db, queue.name)
    try:
        await publish_orders(barrier, queue.name, "last")
        assert await consume_until(pg_db, queue.name, b"last", effects_then=2) == [b"o-1", b"last"]
        with anyio.fail_after(30):
            # The relay marks "last" sent after its confirm, which the consumer may beat: polled, not ordered.
            while await pending(pg_db):  # noqa: ASYNC110
                await anyio.sleep(0.1)
    finally:
        relay.kill()
    assert await effects(pg_db) == {"o-1": 1, "last": 1}
    assert await queues.ready(queue) == 0


async def test_a_consumer_killed_after_its_commit_before_its_ack_gives_one_effect(
    pg_db: Database, queues: Broker
) -> None:
    """SIGKILL a FastStream app after its database commit, before the ack: RabbitMQ redelivers the message to
    the restarted subscriber, which replays it (the subscriber does not run again)."""
    queue = await queues.queue()
    await queues.publish(queue, b"o-1", headers={MESSAGE_ID_HEADER: "m-o-1"})
    dying = FastStreamWorker("consumer-dies-committed", pg_db, queue.name)
    try:
        await dying.said("committed")
    finally:
        dying.kill()
    assert await effects(pg_db) == {"o-1": 1}
    with anyio.fail_after(10):
        # Unacked, o-1 goes back to the queue once the broker sees the connection gone: polled, not ordered.
        while await queues.ready(queue) != 1:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    await queues.publish(queue, b"last", headers={MESSAGE_ID_HEADER: "m-last"})
    assert await consume_until(pg_db, queue.name, b"last", effects_then=2) == [b"last"]
    assert await effects(pg_db) == {"o-1": 1, "last": 1}
    assert await queues.ready(queue) == 0


CHAOS_EVENTS = 600
CHAOS_SECONDS = 25.0


@pytest.mark.timeout(240)
async def test_chaos_killed_relays_and_consumers_apply_every_event_exactly_once(
    pg_db: Database, queues: Broker
) -> None:
    """600 events; two FastStream relays and two FastStream apps on one queue SIGKILLed at random: each event
    has one effect."""
    queue = await queues.queue()
    seed = int(os.environ.get("IDEMBARRIER_CHAOS_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    args = [pg_db.url, queue.name, "billing"]
    relays = Crew("relay", args, 2, module="tests.faststream_worker")
    consumers = Crew("consumer", args, 2, module="tests.faststream_worker")
    started = time.monotonic()
    try:
        produce = partial(publish_events, barrier, queue.name, CHAOS_EVENTS, every=40, pause=0.5, keyed=False)
        await kill_while(produce, kill_either(rng, relays, consumers), rng, CHAOS_SECONDS)
        seen = await wait_for_effects(pg_db, CHAOS_EVENTS)
    finally:
        relays.stop()
        consumers.stop()
    duplicated = sorted(event for event, n in seen.items() if n > 1)
    report = (
        f"seed {seed}: {CHAOS_EVENTS} events, {relays.kills} relay kills, {consumers.kills} consumer kills, "
        f"{time.monotonic() - started:.1f} s; applied once {sum(n == 1 for n in seen.values())}, "
        f"lost {CHAOS_EVENTS - len(seen)}, duplicated {len(duplicated)}"
    )
    print(report)
    assert seen == {f"event-{i}": 1 for i in range(CHAOS_EVENTS)}, report

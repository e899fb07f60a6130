"""The barrier as a FastStream middleware, through real brokers (RabbitMQ here, the Kafka-protocol Tansu too)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from faststream import Context
from sqlalchemy import func, select

import idembarrier
from idembarrier import Status
from idembarrier.faststream import SESSION, BarrierMiddleware, DeadLetterTopic, FastStreamPublisher
from idembarrier.kafka import MESSAGE_ID_HEADER, OutboxRelay
from tests.helpers import require
from tests.models import Payment
from tests.test_kafka import broker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from tests.conftest import Database

__all__ = ["broker"]  # a fixture, shared with test_kafka

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
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

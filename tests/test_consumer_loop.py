"""The consumer loop's retry contract and poison policy, through Tansu and a fault proxy in front of PostgreSQL."""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import idembarrier
from idembarrier import Outcome, Status
from idembarrier.kafka import (
    CONTRACT_HEADER,
    MESSAGE_ID_HEADER,
    AIOKafkaPublisher,
    DeadLetterTopic,
    OutboxRelay,
    run_consumer,
)
from tests.faultproxy import CommitCut, FaultProxy
from tests.models import Payment
from tests.test_kafka import broker, make_consumer, publisher, record_payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession

    from idembarrier.kafka import ConsumerMessage
    from tests.conftest import Database

__all__ = ["broker", "publisher"]  # fixtures, shared with test_kafka

FAST = (0.01, 0.05)
"""A backoff for tests: retries come quickly."""


def names() -> tuple[str, str]:
    return f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"


async def send(publisher: AIOKafkaPublisher, topic: str, values: list[bytes]) -> None:
    """Produce one message per value, each with its own id, in order, on one partition."""
    for value in values:
        headers = [(CONTRACT_HEADER, b"2"), (MESSAGE_ID_HEADER, b"id-" + value)]
        await publisher.producer.send_and_wait(topic, value, key=b"k", headers=headers)


async def applied(db: Database) -> dict[str, int]:
    """Payments per key: one entry per applied event, its value the number of effects."""
    query = select(Payment.key, func.count()).group_by(Payment.key)
    async with db.engine.connect() as conn:
        return {str(key): int(n) for key, n in (await conn.execute(query)).all()}


@asynccontextmanager
async def started(broker: str, topic: str, group: str) -> AsyncIterator[Any]:
    """A started consumer of ``topic`` in ``group`` (see `make_consumer`), stopped at the end."""
    consumer = make_consumer(broker, topic, group)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def supervise(run: Callable[[], Awaitable[int]], stop: anyio.Event) -> list[BaseException]:
    """Call ``run`` again after every exception, as a supervisor would, until ``stop``; return the exceptions."""
    raised: list[BaseException] = []
    while not stop.is_set():
        try:
            await run()
        except Exception as exc:
            raised.append(exc)
    return raised


@pytest.mark.parametrize("max_retries", [0, None], ids=["supervisor-retries", "loop-retries"])
async def test_a_cut_commit_mid_batch_loses_no_event(
    pg_db: Database, proxy: FaultProxy, broker: str, publisher: AIOKafkaPublisher, max_retries: int | None
) -> None:
    """A COMMIT cut at the 5th of 21 events: whoever retries, every event is applied exactly once."""
    topic, group = names()
    values = [f"e-{i}".encode() for i in range(21)]
    await send(publisher, topic, values)
    engine = create_async_engine(proxy.url(pg_db.url), pool_size=2, max_overflow=0)
    barrier = idembarrier.Barrier(async_sessionmaker(engine))
    stop = anyio.Event()

    async def handler(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        if message.value == b"e-4" and not proxy.commit_cut.is_set():
            proxy.cut_at_commit(CommitCut.BEFORE_REPLY)  # it commits; the consumer never hears so
        if message.value == values[-1]:
            stop.set()
        return await record_payment(session, message)

    try:
        async with started(broker, topic, group) as consumer:
            with anyio.fail_after(60):
                raised = await supervise(
                    lambda: run_consumer(
                        consumer, barrier, handler, group=group, stop=stop, max_retries=max_retries, backoff=FAST
                    ),
                    stop,
                )
    finally:
        await engine.dispose()
    assert proxy.commit_cut.is_set()
    assert [type(exc).__name__ for exc in raised] == (["ConnectionLostError"] if max_retries == 0 else [])
    assert await applied(pg_db) == {value.decode(): 1 for value in values}


async def test_a_poison_message_goes_to_its_dead_letter_and_the_partition_flows(
    pg_db: Database, broker: str, publisher: AIOKafkaPublisher
) -> None:
    """A handler failing 3 times on one message: FAILED with its reason, copied to the DLQ, counted; the rest flows."""
    topic, group = names()
    await send(publisher, topic, [b"ok-1", b"poison", b"ok-2"])
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    stop, calls = anyio.Event(), []

    async def fragile(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        calls.append(message.value)
        if message.value == b"poison":
            raise ValueError("cannot parse the order")
        if message.value == b"ok-2":
            stop.set()
        return await record_payment(session, message)

    async with started(broker, topic, group) as consumer:
        with anyio.fail_after(30):
            await run_consumer(
                consumer,
                barrier,
                fragile,
                group=group,
                stop=stop,
                max_attempts=3,
                dead_letter=DeadLetterTopic(f"{topic}-dlq"),
                backoff=FAST,
            )
    assert calls.count(b"poison") == 3
    assert await applied(pg_db) == {"ok-1": 1, "ok-2": 1}
    record = await barrier.inspect("id-poison", scope=f"consumer:{group}")
    assert record is not None
    assert record.status is Status.FAILED
    letter: Any = idembarrier.JSONCodec().decode(record.response or b"")
    assert (letter["reason"], letter["attempts"]) == ("handler", 3)
    assert "cannot parse the order" in letter["error"]
    assert (await barrier.stats()).outcomes[Outcome.DEAD_LETTERED] == 1
    dlq = await OutboxRelay(barrier, publisher).counts()
    assert dlq == (1, 0)  # the dead letter's copy waits in the outbox for the relay


async def test_the_failure_count_survives_restarts(pg_db: Database, broker: str, publisher: AIOKafkaPublisher) -> None:
    """Each run that dies on the poison message adds one to its count in the database; the third dead-letters it."""
    topic, group = names()
    await send(publisher, topic, [b"poison", b"ok-1"])
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    stop = anyio.Event()

    async def fragile(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        if message.value == b"poison":
            raise ValueError("poison")
        stop.set()
        return await record_payment(session, message)

    async with started(broker, topic, group) as consumer:
        with anyio.fail_after(30):
            raised = await supervise(
                lambda: run_consumer(
                    consumer, barrier, fragile, group=group, stop=stop, max_attempts=3, max_retries=0, backoff=FAST
                ),
                stop,
            )
    assert [str(exc) for exc in raised] == ["poison", "poison"]  # each restart starts a new loop
    assert await applied(pg_db) == {"ok-1": 1}
    record = await barrier.inspect("id-poison", scope=f"consumer:{group}")
    assert record is not None
    assert record.status is Status.FAILED
    async with pg_db.engine.connect() as conn:
        left = (await conn.exec_driver_sql("SELECT count(*) FROM idempotency_keys_failures")).scalar_one()
    assert left == 0  # the FAILED record carries the count now


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], "has no 'idempotency-message-id' header"),
        ([(MESSAGE_ID_HEADER, b"\xff\xfe")], "not UTF-8"),
        ([(MESSAGE_ID_HEADER, b"")], "empty"),
        ([(MESSAGE_ID_HEADER, b"x" * 300)], "characters"),
        ([(CONTRACT_HEADER, b"9"), (MESSAGE_ID_HEADER, b"m-1")], "header contract '9'"),
    ],
    ids=["no-id", "not-utf8", "empty-id", "long-id", "unknown-contract"],
)
async def test_a_malformed_message_is_dead_lettered_at_once(
    pg_db: Database, broker: str, publisher: AIOKafkaPublisher, headers: list[tuple[str, bytes]], reason: str
) -> None:
    """A message whose headers cannot be read never reaches the handler, is FAILED under its position, and is passed."""
    topic, group = names()
    await publisher.producer.send_and_wait(topic, b"bad", key=b"k", headers=headers)
    await send(publisher, topic, [b"ok-1"])
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    stop = anyio.Event()

    async def handler(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        assert message.value == b"ok-1"
        stop.set()
        return await record_payment(session, message)

    async with started(broker, topic, group) as consumer:
        with anyio.fail_after(30):
            await run_consumer(consumer, barrier, handler, group=group, stop=stop, backoff=FAST)
    assert await applied(pg_db) == {"ok-1": 1}
    record = await barrier.inspect(f"{topic}:0:0", scope=f"consumer:{group}")
    assert record is not None
    assert record.status is Status.FAILED
    letter: Any = idembarrier.JSONCodec().decode(record.response or b"")
    assert letter["reason"] == "malformed"
    assert reason in letter["error"]


async def test_an_empty_and_a_large_value_are_consumed(
    pg_db: Database, broker: str, publisher: AIOKafkaPublisher
) -> None:
    """An empty value and a 900 kB one are ordinary messages: each applied once."""
    topic, group = names()
    await publisher.producer.send_and_wait(topic, b"", key=b"k", headers=[(MESSAGE_ID_HEADER, b"m-empty")])
    await publisher.producer.send_and_wait(topic, b"x" * 900_000, key=b"k", headers=[(MESSAGE_ID_HEADER, b"m-big")])
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    stop, sizes = anyio.Event(), []

    async def handler(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        sizes.append(len(message.value or b""))
        if len(sizes) == 2:
            stop.set()
        session.add(Payment(key=str(len(message.value or b"")), amount=1))
        return None

    async with started(broker, topic, group) as consumer:
        with anyio.fail_after(30):
            assert await run_consumer(consumer, barrier, handler, group=group, stop=stop, backoff=FAST) == 2
    assert sizes == [0, 900_000]

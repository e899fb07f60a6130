"""RabbitMQ through aio-pika: the relay's publisher, the consumer loop, crashes and chaos, on the real broker."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
import anyio
import pytest
from sqlalchemy import func, select, text

import idembarrier
from idembarrier.messaging import CONTRACT_HEADER, KEY_HEADER, MESSAGE_ID_HEADER, SCOPE_HEADER, OutboxRelay
from idembarrier.rabbitmq import (
    MESSAGE_KEY_HEADER,
    AioPikaDelivery,
    AioPikaPublisher,
    DeadLetterTopic,
    MissingMessageId,
    run_rabbitmq_consumer,
)
from tests.helpers import require
from tests.models import Payment
from tests.rabbitmq_worker import RABBITMQ_URL, record_payment
from tests.test_chaos import Crew, kill_either, kill_while, publish_events

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
    from sqlalchemy.ext.asyncio import AsyncSession

    from idembarrier.messaging import Message
    from tests.conftest import Database

pytestmark = pytest.mark.timeout(120)


# -- the broker ------------------------------------------------------------------------------------------


@pytest.fixture
async def connection() -> AsyncIterator[AbstractRobustConnection]:
    """A robust connection to the machine's RabbitMQ; the test fails under CI (skips elsewhere) without one."""
    try:
        with anyio.fail_after(10):
            opened = await aio_pika.connect_robust(RABBITMQ_URL, reconnect_interval=0.2)
    except (OSError, TimeoutError, aiormq.exceptions.AMQPError):
        require(False, f"RabbitMQ is not reachable at {RABBITMQ_URL}")
        raise
    try:
        yield opened
    finally:
        await opened.close()


class Broker:
    """Queues and exchanges with names no other test uses, deleted when the test ends."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.queues: list[AbstractQueue] = []
        self.exchanges: list[str] = []

    async def queue(self, **arguments: Any) -> AbstractQueue:
        queue = await self.channel.declare_queue(
            f"idembarrier-{uuid.uuid4().hex[:12]}", durable=True, arguments=arguments
        )
        self.queues.append(queue)
        return queue

    async def exchange(self, kind: aio_pika.ExchangeType = aio_pika.ExchangeType.DIRECT) -> str:
        exchange = await self.channel.declare_exchange(f"idembarrier-{uuid.uuid4().hex[:12]}", kind)
        self.exchanges.append(exchange.name)
        return exchange.name

    async def ready(self, queue: AbstractQueue) -> int:
        """How many messages ``queue`` holds ready, now (a nack's requeue reaches the queue asynchronously:
        a message given back is waited for with `drain`)."""
        underlay = await self.channel.get_underlay_channel()  # aio-pika's robust channel caches declarations
        count = (await underlay.queue_declare(queue.name, passive=True)).message_count
        assert count is not None
        return count

    async def drain(self, queue: AbstractQueue, count: int) -> list[AbstractIncomingMessage]:
        """The next ``count`` messages of ``queue``, acked, waiting at most 20 s for them."""
        got: list[AbstractIncomingMessage] = []
        with anyio.fail_after(20):
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    got.append(message)
                    if len(got) == count:
                        break
        return got

    async def publish(self, queue: AbstractQueue, body: bytes, **properties: Any) -> None:
        """Publish ``body`` to ``queue`` as another producer would, with ``properties``."""
        await self.channel.default_exchange.publish(aio_pika.Message(body, **properties), routing_key=queue.name)

    async def delete(self) -> None:
        with anyio.CancelScope(shield=True):
            channel = self.channel
            if channel.is_closed:
                await channel.reopen()
            for queue in self.queues:
                await channel.queue_delete(queue.name)
            for name in self.exchanges:
                await channel.exchange_delete(name)


@pytest.fixture
async def broker(connection: AbstractRobustConnection) -> AsyncIterator[Broker]:
    opened = Broker(await connection.channel())
    try:
        yield opened
    finally:
        await opened.delete()


@pytest.fixture
async def publisher(connection: AbstractRobustConnection) -> AioPikaPublisher:
    return AioPikaPublisher(await connection.channel())


async def publish_orders(barrier: idembarrier.Barrier, topic: str, *values: str) -> list[str]:
    """One unit of work per value, each publishing it to ``topic``; return the message ids."""
    ids = []
    for value in values:
        async with barrier.unit_of_work(f"order-{value}", scope="orders") as uow:
            ids.append(uow.publish(topic, value.encode(), key=b"account-1"))
            uow.complete(None)
    return ids


async def consume_until(
    queue: AbstractQueue,
    barrier: idembarrier.Barrier,
    last: bytes,
    handler: Callable[[AsyncSession, AioPikaDelivery], Awaitable[idembarrier.JSON]] = record_payment,
    **options: Any,
) -> int:
    """Run the consumer loop until the handler has applied the message whose body is ``last``; return how many
    it applied. One consumer on a queue gets its messages in order, so everything before ``last`` is settled."""
    stop = anyio.Event()

    async def until_last(session: AsyncSession, delivery: AioPikaDelivery) -> idembarrier.JSON:
        response = await handler(session, delivery)
        if delivery.value == last:
            stop.set()  # the loop finishes this message, acks it and returns
        return response

    with anyio.fail_after(30):
        return await run_rabbitmq_consumer(queue, barrier, until_last, group="billing", stop=stop, **options)


async def effects(db: Database) -> dict[str, int]:
    """The payments written, counted by event."""
    query = select(Payment.key, func.count()).group_by(Payment.key)
    async with db.engine.connect() as conn:
        return {str(key): int(n) for key, n in (await conn.execute(query)).all()}


# -- the publisher ---------------------------------------------------------------------------------------


async def test_a_relayed_message_carries_the_contract_as_amqp_headers_and_properties(
    pg_db: Database, broker: Broker, publisher: AioPikaPublisher
) -> None:
    """Routing key = topic; headers are byte arrays; message_id = the idempotency id; persistent; key in a header."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("order-1", scope="orders") as uow:
        mid = uow.publish(queue.name, b"o-1", key=b"account-7", headers={"tenant": b"\x00\xff"})
        uow.complete(None)
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    (message,) = await broker.drain(queue, 1)
    assert (message.body, message.message_id, message.routing_key) == (b"o-1", mid, queue.name)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers == {
        CONTRACT_HEADER: bytearray(b"2"),
        MESSAGE_ID_HEADER: bytearray(mid.encode()),
        KEY_HEADER: bytearray(b"order-1"),
        SCOPE_HEADER: bytearray(b"orders"),
        "tenant": bytearray(b"\x00\xff"),
        MESSAGE_KEY_HEADER: bytearray(b"account-7"),
    }
    delivery = AioPikaDelivery(message, queue.name)
    assert (delivery.key, delivery.source, delivery.position) == (b"account-7", queue.name, f"message-id:{mid}")


async def test_a_batch_is_pipelined_in_order_through_a_named_exchange(
    pg_db: Database, broker: Broker, connection: AbstractRobustConnection
) -> None:
    """300 messages in one batch reach the queue bound to the exchange in the outbox's order."""
    exchange, queue = await broker.exchange(), await broker.queue()
    await queue.bind(exchange, routing_key="orders")
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("bulk", scope="orders") as uow:
        ids = [uow.publish("orders", f"o-{i}".encode()) for i in range(300)]
        uow.complete(None)
    publisher = AioPikaPublisher(await connection.channel(), exchange=exchange)
    assert await OutboxRelay(barrier, publisher, batch_size=300).relay_once() == 300
    assert [m.message_id for m in await broker.drain(queue, 300)] == ids


async def test_a_channel_without_confirms_is_refused(connection: AbstractRobustConnection) -> None:
    """Without publisher confirms nothing says the broker took a message: `ConfigurationError` at once."""
    with pytest.raises(idembarrier.ConfigurationError, match="publisher_confirms"):
        AioPikaPublisher(await connection.channel(publisher_confirms=False))


async def test_an_unroutable_message_is_refused_and_parked_while_others_flow(
    pg_db: Database, broker: Broker, publisher: AioPikaPublisher
) -> None:
    """Mandatory: a routing key no queue is bound to comes back (312 NO_ROUTE): refused, parked; the rest goes."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_orders(barrier, f"nowhere-{uuid.uuid4().hex}", "lost")
    await publish_orders(barrier, queue.name, "o-1")
    relay = OutboxRelay(barrier, publisher, max_attempts=1)
    assert await relay.relay_once() == 1
    (parked,) = await relay.parked()
    assert parked.attempts == 1
    assert parked.last_error is not None
    assert "312 NO_ROUTE" in parked.last_error
    assert [m.body for m in await broker.drain(queue, 1)] == [b"o-1"]


async def test_a_nack_is_transient(pg_db: Database, broker: Broker, publisher: AioPikaPublisher) -> None:
    """A full queue that rejects publishes nacks: the batch is retried later, no refusal is counted."""
    queue = await broker.queue(**{"x-max-length": 1, "x-overflow": "reject-publish"})
    await broker.publish(queue, b"filler")
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_orders(barrier, queue.name, "o-1")
    relay = OutboxRelay(barrier, publisher, max_attempts=1)
    with pytest.raises(aiormq.exceptions.DeliveryError):
        await relay.relay_once()
    assert await relay.parked() == []
    assert [m.body for m in await broker.drain(queue, 1)] == [b"filler"]  # the queue drains
    assert await relay.relay_once() == 1
    assert [m.body for m in await broker.drain(queue, 1)] == [b"o-1"]


async def test_headers_too_large_for_a_frame_are_found_and_refused(
    pg_db: Database, broker: Broker, publisher: AioPikaPublisher, connection: AbstractRobustConnection
) -> None:
    """Headers over the frame size close the connection (501): transient in a batch; sent alone, refused."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("big", scope="orders") as uow:
        uow.publish(queue.name, b"big", key=b"big", headers={"blob": bytes(200_000)})
        uow.complete(None)
    await publish_orders(barrier, queue.name, "o-1")
    relay = OutboxRelay(barrier, publisher, max_attempts=1)
    with pytest.raises(aiormq.exceptions.ConnectionFrameError):
        await relay.relay_once()
    with anyio.fail_after(20):
        await connection.ready()  # the robust connection reconnects
    assert await relay.relay_once() == 1  # one at a time: the big one refused (parked), o-1 published
    (parked,) = await relay.parked()
    assert parked.last_error is not None
    assert "FRAME_ERROR" in parked.last_error
    assert [m.body for m in await broker.drain(queue, 1)] == [b"o-1"]


async def test_a_header_name_amqp_cannot_encode_is_refused(
    pg_db: Database, broker: Broker, publisher: AioPikaPublisher
) -> None:
    """A header name over AMQP's 128 bytes (which pamqp would silently cut short) is refused, nothing sent."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("long", scope="orders") as uow:
        uow.publish(queue.name, b"long", headers={"h" * 129: b"v"})
        uow.complete(None)
    relay = OutboxRelay(barrier, publisher, max_attempts=1)
    assert await relay.relay_once() == 0
    (parked,) = await relay.parked()
    assert parked.last_error is not None
    assert "over AMQP's 128 bytes" in parked.last_error
    assert await broker.ready(queue) == 0


# -- end to end ------------------------------------------------------------------------------------------


async def test_a_publish_from_a_unit_of_work_reaches_the_consumer_once(
    pg_db: Database, broker: Broker, publisher: AioPikaPublisher
) -> None:
    """UoW.publish → relay (dies before marking, publishes again) → queue → consumer: one effect, one replay."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_orders(barrier, queue.name, "o-1")

    class DiesBeforeMarking:
        """The relay fails after the broker confirmed, before its transaction marked the row sent."""

        async def publish(self, messages: Sequence[Message]) -> None:
            await publisher.publish(messages)
            raise ConnectionResetError("relay died")

    with pytest.raises(ConnectionResetError):
        await OutboxRelay(barrier, DiesBeforeMarking()).relay_once()
    assert await OutboxRelay(barrier, publisher).relay_once() == 1  # the queue holds o-1 twice
    await publish_orders(barrier, queue.name, "last")
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    assert await consume_until(queue, barrier, b"last") == 2  # o-1 once, its copy a duplicate, then last
    assert await effects(pg_db) == {"o-1": 1, "last": 1}
    assert await broker.ready(queue) == 0


async def test_a_rolled_back_unit_of_work_publishes_nothing(
    pg_db: Database, broker: Broker, publisher: AioPikaPublisher
) -> None:
    """A unit of work whose body raises leaves no outbox row: the relay has nothing, the queue stays empty."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with pytest.raises(RuntimeError, match="declined"):
        async with barrier.unit_of_work("order-1", scope="orders") as uow:
            uow.publish(queue.name, b"o-1")
            raise RuntimeError("declined")
    assert await OutboxRelay(barrier, publisher).relay_once() == 0
    assert await broker.ready(queue) == 0


async def test_a_ten_megabyte_value_is_relayed_and_consumed_once(
    pg_db: Database, broker: Broker, publisher: AioPikaPublisher
) -> None:
    """10 MB is under RabbitMQ's max_message_size (16 MiB on 4.x, 128 MiB on 3.x): published, applied once;
    the fingerprint is a hash of it, not a copy."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    big = b"x" * 10_000_000
    async with barrier.unit_of_work("big", scope="orders") as uow:
        uow.publish(queue.name, big)
        uow.complete(None)
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    assert await OutboxRelay(barrier, publisher).relay_once() == 0
    await publish_orders(barrier, queue.name, "last")
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    sizes: list[int] = []

    async def measured(session: AsyncSession, delivery: AioPikaDelivery) -> idembarrier.JSON:
        sizes.append(len(delivery.value or b""))
        session.add(Payment(key="big" if delivery.value == big else "last", amount=1))
        return None

    assert await consume_until(queue, barrier, b"last", measured) == 2
    assert sizes == [10_000_000, 4]
    assert await effects(pg_db) == {"big": 1, "last": 1}


# -- the consumer loop -----------------------------------------------------------------------------------


async def test_a_poison_message_reaches_the_dead_letters_after_max_attempts(
    pg_db: Database, broker: Broker, publisher: AioPikaPublisher
) -> None:
    """Three handler failures (nacked, requeued, redelivered), then FAILED, copied through the outbox, and
    rejected to the queue's dead-letter exchange; the next message is applied."""
    dead_exchange, dead, copies = (
        await broker.exchange(aio_pika.ExchangeType.FANOUT),
        await broker.queue(),
        await broker.queue(),
    )
    await dead.bind(dead_exchange)
    queue = await broker.queue(**{"x-dead-letter-exchange": dead_exchange})
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    (poison_id,) = await publish_orders(barrier, queue.name, "poison")
    await publish_orders(barrier, queue.name, "last")
    assert await OutboxRelay(barrier, publisher).relay_once() == 2
    tries: list[bytes | None] = []

    async def fragile(session: AsyncSession, delivery: AioPikaDelivery) -> idembarrier.JSON:
        tries.append(delivery.value)
        if delivery.value == b"poison":
            raise RuntimeError("boom")
        return await record_payment(session, delivery)

    applied = await consume_until(
        queue,
        barrier,
        b"last",
        fragile,
        prefetch=1,  # a requeued message goes back to the head of the queue, before what is prefetched
        max_attempts=3,
        backoff=(0.01, 0.02),
        dead_letter=DeadLetterTopic(copies.name),
    )
    assert applied == 1
    assert tries == [b"poison"] * 3 + [b"last"]
    (rejected,) = await broker.drain(dead, 1)
    assert rejected.message_id == poison_id
    assert rejected.headers["x-death"][0]["reason"] == "rejected"  # type: ignore[index,call-overload]
    async with pg_db.engine.connect() as conn:
        status, response = (
            await conn.execute(
                text("SELECT status, response FROM idempotency_keys WHERE scope = 'consumer:billing' AND key = :k"),
                {"k": poison_id},
            )
        ).one()
    assert status == "FAILED"
    letter = response if isinstance(response, dict) else json.loads(response)
    assert (letter["reason"], letter["attempts"], letter["topic"]) == ("handler", 3, queue.name)
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    (copy,) = await broker.drain(copies, 1)
    assert copy.body == b"poison"
    assert copy.headers["idempotency-original-message-id"] == bytearray(poison_id.encode())
    assert await effects(pg_db) == {"last": 1}


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        pytest.param({}, "no 'idempotency-message-id' header", id="missing"),
        pytest.param({MESSAGE_ID_HEADER: 42}, "no 'idempotency-message-id' header", id="an-integer-id"),
        pytest.param({MESSAGE_ID_HEADER: bytearray(b"\xff\xfe")}, "not UTF-8", id="not-utf8"),
        pytest.param({MESSAGE_ID_HEADER: bytearray(b"")}, "", id="empty"),
        pytest.param({MESSAGE_ID_HEADER: bytearray(b"m-1"), CONTRACT_HEADER: "9"}, "contract", id="contract-9"),
    ],
)
async def test_a_message_with_unreadable_headers_is_dead_lettered_without_running_the_handler(
    pg_db: Database, broker: Broker, headers: dict[str, Any], why: str
) -> None:
    """A message another producer sent without a usable id is poison at once: FAILED as malformed, rejected."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await broker.publish(queue, b"bad", headers=headers, message_id="amqp-1")
    await broker.publish(queue, b"last", headers={MESSAGE_ID_HEADER: bytearray(b"m-last")})
    assert await consume_until(queue, barrier, b"last") == 1
    assert await effects(pg_db) == {"last": 1}
    async with pg_db.engine.connect() as conn:
        key, status, response = (
            await conn.execute(
                text("SELECT key, status, response FROM idempotency_keys WHERE status = 'FAILED'"),
            )
        ).one()
    letter = response if isinstance(response, dict) else json.loads(response)
    assert (key, status, letter["reason"]) == (f"{queue.name}:message-id:amqp-1", "FAILED", "malformed")
    assert why in letter["error"]
    assert await broker.ready(queue) == 0


async def test_string_headers_of_another_producer_are_read_as_their_bytes(pg_db: Database, broker: Broker) -> None:
    """An id sent as an AMQP long string (what most clients send for a string) keys the message like a byte array."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    for body in (b"o-1", b"o-1", b"last"):
        await broker.publish(queue, body, headers={MESSAGE_ID_HEADER: f"m-{body.decode()}", CONTRACT_HEADER: "2"})
    assert await consume_until(queue, barrier, b"last") == 2
    assert await effects(pg_db) == {"o-1": 1, "last": 1}


async def test_derive_keys_a_message_without_the_id_header_by_its_amqp_message_id(
    pg_db: Database, broker: Broker
) -> None:
    """DERIVE: keyed by ``<queue>:message-id:<message_id>``, with a warning: its redelivery is a duplicate."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    for body in (b"o-1", b"o-1", b"last"):
        await broker.publish(queue, body, message_id=f"amqp-{body.decode()}")
    with pytest.warns(UserWarning, match="by its position"):
        assert await consume_until(queue, barrier, b"last", on_missing_id=MissingMessageId.DERIVE) == 2
    assert await effects(pg_db) == {"o-1": 1, "last": 1}
    assert (await pg_db.records(f"{queue.name}:message-id:amqp-o-1"))[0][2] == "COMPLETED"


async def test_a_stop_finishes_the_message_in_flight_and_gives_back_the_prefetched(
    pg_db: Database, broker: Broker
) -> None:
    """Stop set inside the handler: that message is committed and acked; the four prefetched are requeued."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    for i in range(5):
        await broker.publish(queue, f"o-{i}".encode(), headers={MESSAGE_ID_HEADER: bytearray(f"m-{i}".encode())})
    stop, inside, release = anyio.Event(), anyio.Event(), anyio.Event()

    async def slow(session: AsyncSession, delivery: AioPikaDelivery) -> idembarrier.JSON:
        inside.set()
        await release.wait()
        return await record_payment(session, delivery)

    applied = 0

    async def run() -> None:
        nonlocal applied
        applied = await run_rabbitmq_consumer(queue, barrier, slow, group="billing", stop=stop, prefetch=5)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await inside.wait()
            stop.set()
            release.set()
    assert applied == 1
    assert await effects(pg_db) == {"o-0": 1}
    assert [m.body for m in await broker.drain(queue, 4)] == [f"o-{i}".encode() for i in range(1, 5)]  # back


async def test_a_fatal_error_propagates_and_the_message_comes_back(pg_db: Database, broker: Broker) -> None:
    """With max_attempts None the handler's error propagates; the message is not acked: it is ready again."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await broker.publish(queue, b"o-1", headers={MESSAGE_ID_HEADER: bytearray(b"m-1")})

    async def broken(session: AsyncSession, delivery: AioPikaDelivery) -> idembarrier.JSON:
        raise RuntimeError("boom")

    with anyio.fail_after(30), pytest.raises(RuntimeError, match="boom"):
        await run_rabbitmq_consumer(queue, barrier, broken, group="billing", max_attempts=None)
    (back,) = await broker.drain(queue, 1)  # given back, it is delivered again
    assert back.redelivered
    assert await pg_db.records() == []


async def test_a_missing_records_table_is_fatal_and_the_message_comes_back(pg_db: Database, broker: Broker) -> None:
    """An undefined table (42P01) is a `StorageError` no retry fixes: it propagates at once, the message back."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker, check_schema=False)
    await broker.publish(queue, b"o-1", headers={MESSAGE_ID_HEADER: bytearray(b"m-1")})
    async with pg_db.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE idempotency_keys RENAME TO idempotency_keys_away"))
    with anyio.fail_after(30), pytest.raises(idembarrier.StorageError, match="42P01"):
        await run_rabbitmq_consumer(queue, barrier, record_payment, group="billing", max_retries=2)
    (back,) = await broker.drain(queue, 1)  # given back, it is delivered again
    assert back.redelivered


def test_importing_idembarrier_does_not_import_aio_pika() -> None:
    """`import idembarrier` leaves aio-pika unimported; `idembarrier.rabbitmq` is for the extra's users."""
    code = "import sys, idembarrier, idembarrier.messaging; assert 'aio_pika' not in sys.modules, 'aio_pika imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- processes killed ------------------------------------------------------------------------------------


class Worker:
    """A `tests.rabbitmq_worker` process; its stdout lines tell where it is."""

    def __init__(self, role: str, db: Database, queue: str, group: str = "billing") -> None:
        command = [sys.executable, "-m", "tests.rabbitmq_worker", role, db.url, queue, group]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy()
        )

    async def said(self, line: str) -> None:
        """Wait until the worker prints ``line`` (it prints nothing else before)."""
        assert self.process.stdout is not None
        stdout = self.process.stdout
        with anyio.fail_after(30):
            while True:
                got = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
                if not got:
                    raise AssertionError(f"the worker exited ({self.process.poll()}) before saying {line!r}")
                if got.decode().strip() == line:
                    return

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


async def wait_for_effects(db: Database, count: int) -> dict[str, int]:
    """The effects, once ``count`` events have some. Other processes' progress, which no event of ours
    reports: polled."""
    with anyio.fail_after(60):
        while len(seen := await effects(db)) < count:  # noqa: ASYNC110
            await anyio.sleep(0.2)
    return seen


async def test_a_relay_killed_after_publishing_before_marking_gives_one_effect(pg_db: Database, broker: Broker) -> None:
    """SIGKILL a relay process between the broker's confirm and its commit: the next relay re-publishes, the
    consumer applies the event once."""
    queue = await broker.queue()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_orders(barrier, queue.name, "o-1")
    dying = Worker("relay-dies-published", pg_db, queue.name)
    try:
        await dying.said("published")
    finally:
        dying.kill()
    assert await broker.ready(queue) == 1
    relay = Worker("relay", pg_db, queue.name)
    try:
        await publish_orders(barrier, queue.name, "last")
        assert await consume_until(queue, barrier, b"last") == 2
        with anyio.fail_after(30):
            # The relay marks "last" sent after its confirm, which the consumer may beat: polled, not ordered.
            while await pending(pg_db):  # noqa: ASYNC110
                await anyio.sleep(0.1)
    finally:
        relay.kill()
    assert await effects(pg_db) == {"o-1": 1, "last": 1}


async def pending(db: Database) -> int:
    """The outbox's messages not marked sent."""
    async with db.engine.connect() as conn:
        count: int = (
            await conn.execute(text("SELECT count(*) FROM idempotency_keys_outbox WHERE sent_at IS NULL"))
        ).scalar_one()
    return count


async def test_a_consumer_killed_after_its_commit_before_its_ack_gives_one_effect(
    pg_db: Database, broker: Broker
) -> None:
    """SIGKILL a consumer process after its database commit, before the ack: RabbitMQ redelivers the message
    to the restarted consumer, which replays it (the handler does not run again)."""
    queue = await broker.queue()
    for body in (b"o-1", b"last"):
        await broker.publish(queue, body, headers={MESSAGE_ID_HEADER: bytearray(b"m-" + body)})
    dying = Worker("consumer-dies-committed", pg_db, queue.name)
    try:
        await dying.said("committed")
    finally:
        dying.kill()
    assert await effects(pg_db) == {"o-1": 1}
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    ran: list[bytes | None] = []

    async def watched(session: AsyncSession, delivery: AioPikaDelivery) -> idembarrier.JSON:
        ran.append(delivery.value)
        return await record_payment(session, delivery)

    assert await consume_until(queue, barrier, b"last", watched) == 1
    assert ran == [b"last"]  # o-1 was redelivered and replayed: its handler did not run
    assert await effects(pg_db) == {"o-1": 1, "last": 1}
    assert await broker.ready(queue) == 0


CHAOS_EVENTS = 600
CHAOS_SECONDS = 25.0


async def test_chaos_killed_relays_and_consumers_apply_every_event_exactly_once(
    pg_db: Database, broker: Broker
) -> None:
    """600 events; two relays and two consumers on one queue SIGKILLed at random: each event has one effect."""
    queue = await broker.queue()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    args = [pg_db.url, queue.name, "billing"]
    relays = Crew("relay", args, 2, module="tests.rabbitmq_worker")
    consumers = Crew("consumer", args, 2, module="tests.rabbitmq_worker")
    try:
        produce = partial(publish_events, barrier, queue.name, CHAOS_EVENTS, every=40, pause=0.5)
        await kill_while(produce, kill_either(rng, relays, consumers), rng, CHAOS_SECONDS)
        seen = await wait_for_effects(pg_db, CHAOS_EVENTS)
    finally:
        relays.stop()
        consumers.stop()
    duplicated = sorted(event for event, n in seen.items() if n > 1)
    lost = CHAOS_EVENTS - len(seen)
    report = (
        f"seed {seed}: {CHAOS_EVENTS} events, {relays.kills} relay kills, {consumers.kills} consumer kills; "
        f"applied once {sum(n == 1 for n in seen.values())}, lost {lost}, duplicated {len(duplicated)}"
    )
    print(report)
    assert seen == {f"event-{i}": 1 for i in range(CHAOS_EVENTS)}, report

"""The consumers of ``benchmarks/brokers.py``, one class per broker, each run in its own worker process.

Every variant's ``stream`` calls ``counted()`` once per message settled: acknowledged after the database
commit (an offset committed, an ``ack`` confirmed, an ``XACK``). The barrier variants are counted through a
thin proxy over the client the adapter's loop drives, so both variants count the same event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import Integer, MetaData, String, Uuid
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import idembarrier
from idembarrier._outbox import MESSAGE_ID_HEADER

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from benchmarks import _blocks


class Base(DeclarativeBase):
    metadata = MetaData()


class Payment(Base):
    """The row every consumer writes per message, tagged with the variant so the check can count them apart."""

    __tablename__ = "peers_broker_payments"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    variant: Mapped[str] = mapped_column(String(32), index=True)
    amount: Mapped[int] = mapped_column(Integer)


class Consumer:
    """What every consumer variant shares: the database, the row, the counts."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name, self.config = name, config
        self.broker, _, self.kind = name.partition("_")
        self.executed = 0
        self.engine: AsyncEngine = create_async_engine(config["url"], pool_size=2, max_overflow=0)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.barrier: idembarrier.Barrier[idembarrier.JSON] = idembarrier.Barrier(self.sessionmaker)
        self.group = ""

    async def setup(self) -> None:
        return None

    async def open(self, conc: int) -> None:
        self.group = f"{self.name}-{uuid.uuid4().hex[:10]}"

    async def close(self) -> None:
        return None

    def counts(self) -> dict[str, int]:
        return {"executed": self.executed}

    async def stream(self, stop: asyncio.Event, counted: Callable[[], None]) -> None:
        raise NotImplementedError

    def payment(self) -> Payment:
        return Payment(id=uuid.uuid4(), variant=self.name, amount=1)

    async def write_bare(self) -> None:
        """The bare loop's work for one message: a session, the row, COMMIT."""
        async with self.sessionmaker() as session:
            session.add(self.payment())
            await session.commit()
        self.executed += 1

    async def handler(self, session: AsyncSession, message: object) -> idembarrier.JSON:
        """The barrier's handler: the same row, in the unit of work's session."""
        session.add(self.payment())
        self.executed += 1
        return None

    @contextlib.asynccontextmanager
    async def stopping(self, stop: asyncio.Event) -> Any:
        """An anyio.Event set when ``stop`` is (the adapters' loops take anyio's)."""
        done = anyio.Event()

        async def bridge() -> None:
            await stop.wait()
            done.set()

        task = asyncio.create_task(bridge())
        try:
            yield done
        finally:
            task.cancel()


class Counting:
    """An aiokafka consumer whose committed offsets are counted: one per message settled, however batched."""

    def __init__(self, consumer: Any, counted: Callable[[], None]) -> None:
        self.consumer, self.counted = consumer, counted
        self.position: dict[Any, int] = {}

    async def getmany(self, *, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        for tp, messages in batches.items():
            if messages:
                self.position.setdefault(tp, messages[0].offset)
        return batches

    async def commit(self, offsets: dict[Any, int]) -> None:
        await self.consumer.commit(offsets)
        for tp, offset in offsets.items():
            for _ in range(offset - self.position.get(tp, offset)):
                self.counted()
            self.position[tp] = offset

    def seek(self, partition: Any, offset: int) -> None:
        self.consumer.seek(partition, offset)


class Kafka(Consumer):
    """aiokafka on Tansu: ``kafka_bare``, ``kafka_ib`` and ``kafka_ib_dup``."""

    consumer: Any = None

    async def setup(self) -> None:
        if self.kind == "ib_dup":  # record every message once, under the group its blocks replay
            self.recorded = f"{self.name}-recorded"
            await self.open(1)
            stop, total = asyncio.Event(), self.config["messages"]
            seen = 0

            def counted() -> None:
                nonlocal seen
                seen += 1
                if seen >= total:
                    stop.set()

            try:
                await self.stream(stop, counted, group=self.recorded)
            finally:
                await self.close()

    async def open(self, conc: int) -> None:
        from aiokafka import AIOKafkaConsumer

        await super().open(conc)
        self.consumer = AIOKafkaConsumer(
            self.config["topic"],
            bootstrap_servers=self.config["bootstrap"],
            group_id=self.group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        )
        await self.consumer.start()

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    async def stream(  # setup passes the recording group
        self, stop: asyncio.Event, counted: Callable[[], None], group: str | None = None
    ) -> None:
        consumer = Counting(self.consumer, counted)
        if self.kind == "bare":
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=100)
                for tp, messages in batches.items():
                    for message in messages:
                        await self.write_bare()
                        await consumer.commit({tp: message.offset + 1})  # only after the database commit
            return
        from idembarrier.kafka import run_consumer

        if self.kind == "ib_dup" and group is None:
            group = self.recorded
        async with self.stopping(stop) as done:
            await run_consumer(consumer, self.barrier, self.handler, group=group or self.group, stop=done)

    def counts(self) -> dict[str, int]:
        return {"executed": self.executed, "recorded": self.config["messages"] if self.kind == "ib_dup" else 0}


class CountingConfluent:
    """An ``AIOConsumer`` whose committed offsets are counted, as `Counting` does for aiokafka."""

    def __init__(self, consumer: Any, counted: Callable[[], None]) -> None:
        self.consumer, self.counted = consumer, counted
        self.position: dict[tuple[str, int], int] = {}

    async def consume(self, *args: Any, **kwargs: Any) -> Any:
        messages = await self.consumer.consume(*args, **kwargs)
        for m in messages:
            if m.error() is None:
                self.position.setdefault((m.topic(), m.partition()), m.offset())
        return messages

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        done = await self.consumer.commit(*args, **kwargs)
        for tp in kwargs["offsets"]:
            key = (tp.topic, tp.partition)
            for _ in range(tp.offset - self.position.get(key, tp.offset)):
                self.counted()
            self.position[key] = tp.offset
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self.consumer, name)


class Confluent(Consumer):
    """confluent-kafka's ``AIOConsumer`` on the same Tansu topic: ``confluent_bare`` and ``confluent_ib``."""

    consumer: Any = None

    async def open(self, conc: int) -> None:
        from confluent_kafka.aio import AIOConsumer

        await super().open(conc)
        self.consumer = AIOConsumer(
            {
                "bootstrap.servers": self.config["bootstrap"],
                "group.id": self.group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
            }
        )
        await self.consumer.subscribe([self.config["topic"]])

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.close()
            self.consumer = None

    async def stream(self, stop: asyncio.Event, counted: Callable[[], None]) -> None:
        from confluent_kafka import TopicPartition

        consumer: Any = CountingConfluent(self.consumer, counted)
        if self.kind == "bare":
            while not stop.is_set():
                for message in await consumer.consume(num_messages=100, timeout=0.2):
                    if message.error() is not None:
                        continue
                    await self.write_bare()
                    next_offset = [TopicPartition(message.topic(), message.partition(), message.offset() + 1)]
                    await consumer.commit(offsets=next_offset, asynchronous=False)  # after the database commit
            return
        from idembarrier.confluent import run_confluent_consumer

        async with self.stopping(stop) as done:
            await run_confluent_consumer(consumer, self.barrier, self.handler, group=self.group, stop=done)


class CountedMessage:
    """An aio-pika incoming message whose ``ack`` is counted (the class has slots: a proxy, not a patch)."""

    def __init__(self, message: Any, counted: Callable[[], None]) -> None:
        self._message, self._counted = message, counted

    async def ack(self, multiple: bool = False) -> None:
        await self._message.ack(multiple=multiple)
        self._counted()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)


class CountingQueue:
    """An aio-pika queue handing the consumer's callback `CountedMessage`."""

    def __init__(self, queue: Any, counted: Callable[[], None]) -> None:
        self._queue, self._counted = queue, counted

    async def consume(self, callback: Callable[[Any], Any], **kwargs: Any) -> Any:
        async def wrapped(message: Any) -> Any:
            return await callback(CountedMessage(message, self._counted))

        return await self._queue.consume(wrapped, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


class RabbitMQ(Consumer):
    """aio-pika: ``rabbitmq_bare`` and ``rabbitmq_ib``, each block on a fresh queue holding every message."""

    connection: Any = None
    queue: Any = None

    async def open(self, conc: int) -> None:
        import aio_pika

        await super().open(conc)
        self.connection = await aio_pika.connect_robust(self.config["rabbitmq_url"])
        loading = await self.connection.channel(publisher_confirms=False)
        await loading.declare_queue(self.group, durable=True)
        for i in range(self.config["messages"]):  # the values and ids brokers.messages() gives the others
            message_id = f"{self.config['run_id']}-{i}"
            message = aio_pika.Message(
                json.dumps({"n": i}).encode(),
                headers={MESSAGE_ID_HEADER: bytearray(message_id.encode())},
                message_id=message_id,
            )
            await loading.default_exchange.publish(message, routing_key=self.group)
        await loading.close()
        channel = await self.connection.channel()
        self.queue = await channel.declare_queue(self.group, durable=True)

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.queue.delete(if_unused=False, if_empty=False)
            await self.connection.close()
            self.connection = None

    async def stream(self, stop: asyncio.Event, counted: Callable[[], None]) -> None:
        if self.kind == "bare":
            await self.queue.channel.set_qos(prefetch_count=10)  # the barrier loop's default
            inbox: asyncio.Queue[Any] = asyncio.Queue()
            tag = await self.queue.consume(inbox.put, no_ack=False)
            try:
                while not stop.is_set():
                    try:
                        message = await asyncio.wait_for(inbox.get(), 0.2)
                    except TimeoutError:
                        continue
                    await self.write_bare()
                    await message.ack()  # after the database commit
                    counted()
            finally:
                await self.queue.cancel(tag)
            return
        from idembarrier.rabbitmq import run_rabbitmq_consumer

        async with self.stopping(stop) as done:
            queue: Any = CountingQueue(self.queue, counted)
            await run_rabbitmq_consumer(queue, self.barrier, self.handler, group=self.group, stop=done)


class CountingSubscription:
    """A JetStream pull subscription whose fetched messages count their ``ack_sync``."""

    def __init__(self, sub: Any, counted: Callable[[], None]) -> None:
        self._sub, self._counted = sub, counted

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        messages = await self._sub.fetch(*args, **kwargs)
        for msg in messages:
            ack_sync = msg.ack_sync

            async def counted_ack(*a: Any, _ack: Any = ack_sync, **k: Any) -> Any:
                done = await _ack(*a, **k)
                self._counted()
                return done

            msg.ack_sync = counted_ack
        return messages

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sub, name)


class Nats(Consumer):
    """nats-py's JetStream: ``nats_bare`` and ``nats_ib``, a fresh durable pull consumer per block."""

    client: Any = None
    sub: Any = None

    async def open(self, conc: int) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await super().open(conc)
        self.client = await nats.connect(self.config["nats_url"])
        js = self.client.jetstream()
        config = ConsumerConfig(
            durable_name=self.group, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30
        )
        await js.add_consumer(self.config["nats_stream"], config)
        self.sub = await js.pull_subscribe_bind(self.group, self.config["nats_stream"])

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.jetstream().delete_consumer(self.config["nats_stream"], self.group)
            await self.client.close()
            self.client = None

    async def stream(self, stop: asyncio.Event, counted: Callable[[], None]) -> None:
        sub: Any = CountingSubscription(self.sub, counted)
        if self.kind == "bare":
            while not stop.is_set():
                try:
                    batch = await sub.fetch(10, timeout=0.2)  # the barrier loop's default batch
                except TimeoutError:
                    continue
                for msg in batch:
                    await self.write_bare()
                    await msg.ack_sync(timeout=5.0)  # after the database commit, confirmed as the loop does
            return
        from idembarrier.nats import run_jetstream_consumer

        async with self.stopping(stop) as done:
            await run_jetstream_consumer(sub, self.barrier, self.handler, group=self.group, stop=done, poll_timeout=0.2)


class CountingRedis:
    """A ``redis.asyncio.Redis`` whose XACKs are counted, one per entry acknowledged."""

    def __init__(self, redis: Any, counted: Callable[[], None]) -> None:
        self._redis, self._counted = redis, counted

    async def xack(self, *args: Any) -> Any:
        acked = await self._redis.xack(*args)
        for _ in range(int(acked)):
            self._counted()
        return acked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


class Redis(Consumer):
    """redis-py on a stream: ``redis_bare`` and ``redis_ib``, a fresh consumer group per block."""

    redis: Any = None

    async def open(self, conc: int) -> None:
        import redis.asyncio as aioredis

        await super().open(conc)
        self.redis = aioredis.from_url(self.config["redis_url"], decode_responses=False)
        await self.redis.xgroup_create(self.config["redis_stream"], self.group, id="0")

    async def close(self) -> None:
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.xgroup_destroy(self.config["redis_stream"], self.group)
            await self.redis.aclose()
            self.redis = None

    async def stream(self, stop: asyncio.Event, counted: Callable[[], None]) -> None:
        redis: Any = CountingRedis(self.redis, counted)
        stream = self.config["redis_stream"]
        if self.kind == "bare":
            while not stop.is_set():
                read = await redis.xreadgroup(self.group, "c1", {stream: ">"}, count=100, block=200)
                for _, entries in read or []:
                    for entry_id, _fields in entries:
                        await self.write_bare()
                        await redis.xack(stream, self.group, entry_id)  # after the database commit
            return
        from idembarrier.redis import run_redis_consumer

        async with self.stopping(stop) as done:
            await run_redis_consumer(
                redis, stream, self.barrier, self.handler, group=self.group, consumer_name="c1", stop=done, block=0.2
            )


def make(name: str, config: dict[str, Any]) -> _blocks.Stream:
    kinds: dict[str, type[Consumer]] = {
        "kafka": Kafka, "confluent": Confluent, "rabbitmq": RabbitMQ, "nats": Nats, "redis": Redis
    }  # fmt: skip
    return kinds[name.partition("_")[0]](name, config)

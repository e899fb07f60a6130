"""The relay's poison policy through Tansu, and a LISTEN that comes back after its backend is terminated."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import anyio
import pytest

import idembarrier
from idembarrier.kafka import AIOKafkaPublisher, OutboxRelay
from tests.test_kafka import broker
from tests.test_outbox import Collecting

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from idembarrier.kafka import Message
    from tests.conftest import Database

__all__ = ["broker"]  # a fixture, shared with test_kafka


@pytest.fixture
async def small_publisher(broker: str) -> AsyncIterator[AIOKafkaPublisher]:
    """A producer that refuses any request over 2 kB: a 4 kB message is poison to it, for good."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False, max_request_size=2048)
    await producer.start()
    try:
        yield AIOKafkaPublisher(producer)
    finally:
        await producer.stop()


async def publish(barrier: idembarrier.Barrier, key: str, *messages: tuple[str, bytes, bytes]) -> list[str]:
    """One unit of work that publishes ``messages`` as (topic, partition key, value); return their ids."""
    async with barrier.unit_of_work(key, scope="orders") as uow:
        ids = [uow.publish(topic, value, key=pkey) for topic, pkey, value in messages]
        uow.complete(None)
    return ids


async def test_a_refused_message_parks_and_holds_only_its_own_key(
    pg_db: Database, small_publisher: AIOKafkaPublisher
) -> None:
    """A 4 kB message the producer refuses: parked after 2 refusals, its key's next message waits, another key flows."""
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    (big,) = await publish(barrier, "o-1", (topic, b"A", b"x" * 4096))
    (a2,) = await publish(barrier, "o-2", (topic, b"A", b"a-2"))
    (b1,) = await publish(barrier, "o-3", (topic, b"B", b"b-1"))
    relay = OutboxRelay(barrier, small_publisher, max_attempts=2)
    assert await relay.relay_once() == 1  # b-1; the big one refused once, a-2 held behind it
    assert await relay.counts() == (2, 0)
    assert await relay.relay_once() == 0  # refused again: parked
    assert await relay.relay_once() == 0  # nothing to claim: a-2 waits behind the parked message
    assert await relay.counts() == (2, 1)
    stats = await barrier.stats()
    assert (stats.outbox_pending, stats.outbox_parked) == (2, 1)
    (parked,) = await relay.parked()
    assert (parked.message_id, parked.key, parked.attempts) == (big, b"A", 2)
    assert "MessageSizeTooLarge" in (parked.last_error or "")
    assert await relay.release(big)  # its refusals count from 0 again
    assert await relay.counts() == (2, 0)
    assert await relay.relay_once() == 0  # its first refusal after the release
    assert not await relay.drop(a2)  # only a parked message can be dropped
    assert await relay.relay_once() == 0  # second refusal: parked again
    assert await relay.drop(big)
    assert await relay.relay_once() == 1  # a-2, at last
    assert await relay.counts() == (0, 0)
    assert b1 not in {m.message_id for m in await relay.parked()}


async def test_a_transient_publisher_failure_counts_nothing(db: Database) -> None:
    """A broker that is down (any other error) leaves the batch pending with no refusal counted."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    await publish(barrier, "o-1", ("orders", b"A", b"v"))

    class Down:
        async def publish(self, messages: Sequence[Message]) -> None:
            raise ConnectionRefusedError("broker down")

    relay = OutboxRelay(barrier, Down(), max_attempts=1)
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            await relay.relay_once()
    assert await relay.counts() == (1, 0)
    assert await relay.parked() == []


class Signalling(Collecting):
    """A publisher that sets ``arrived`` once it was given a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = anyio.Event()

    async def publish(self, messages: Sequence[Message]) -> None:
        await super().publish(messages)
        self.arrived.set()


async def until_relayed(
    relay: OutboxRelay, barrier: idembarrier.Barrier, publisher: Collecting, *, linger: float = 0.0
) -> None:
    """Run ``relay`` while one message is published, until the relay (polling) has published it, then ``linger`` s."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(lambda task_status: relay.run(stop=stop, task_status=task_status))
            await publish(barrier, "o-1", ("orders", b"A", b"v"))
            while not publisher.messages:  # noqa: ASYNC110 - the relay's polls, which no event reports
                await anyio.sleep(0.01)
        await anyio.sleep(linger)
        stop.set()


async def listeners(db: Database) -> list[int]:
    """The backends LISTENing on the outbox's channel."""
    sql = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
    async with db.engine.connect() as conn:
        return [int(pid) for pid in (await conn.exec_driver_sql(sql)).scalars()]


async def test_the_relay_listens_again_after_its_backend_is_terminated(pg_db: Database) -> None:
    """After pg_terminate_backend on its LISTEN connection the relay reconnects and is woken by NOTIFY at once."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    publisher = Signalling()
    # Polls are 20-30 s apart: only a notification can deliver within the second the test allows.
    relay = OutboxRelay(barrier, publisher, poll_interval=30, max_poll_interval=30)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: relay.run(stop=stop, task_status=task_status))
        (first,) = await listeners(pg_db)
        async with pg_db.engine.connect() as conn:
            await conn.exec_driver_sql(f"SELECT pg_terminate_backend({first})")
        with anyio.fail_after(10):
            # The server's state, which no event of ours reports: polled, not used to order tasks.
            while not (again := await listeners(pg_db)) or again == [first]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        with anyio.fail_after(1):
            await publish(barrier, "o-1", ("orders", b"A", b"v"))
            await publisher.arrived.wait()
        stop.set()
    assert len(publisher.messages) == 1


async def woken_through(
    barrier: idembarrier.Barrier, listen_url: str, listening: Callable[[], Awaitable[object]] | None = None
) -> Signalling:
    """Run a relay listening at ``listen_url`` whose polls are 30 s apart, publish one message, and return once
    it was delivered, which only a notification can do within the second allowed (``listening``: checked once
    the relay has started)."""
    publisher = Signalling()
    relay = OutboxRelay(barrier, publisher, poll_interval=30, max_poll_interval=30, listen_url=listen_url)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: relay.run(stop=stop, task_status=task_status))
        if listening is not None:
            await listening()
        with anyio.fail_after(1):
            await publish(barrier, "o-1", ("orders", b"A", b"v"))
            await publisher.arrived.wait()
        stop.set()
    return publisher


async def test_a_listen_url_wakes_the_relay(pg_db: Database) -> None:
    """With ``listen_url`` the relay listens on a connection of its own and is woken by NOTIFY at once."""

    async def one_listener() -> None:
        assert len(await listeners(pg_db)) == 1

    await woken_through(idembarrier.Barrier(pg_db.sessionmaker), pg_db.url, one_listener)


async def test_a_listen_that_hears_nothing_is_reported_once_and_the_relay_polls(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """LISTEN accepted where the barrier's NOTIFY never arrives (as behind a pooler): one warning, then polling."""
    from tests.conftest import ADMIN_URL

    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    elsewhere = ADMIN_URL.render_as_string(hide_password=False)  # another database: its channel never fires
    publisher = Collecting()
    relay = OutboxRelay(barrier, publisher, poll_interval=0.01, max_poll_interval=0.05, listen_url=elsewhere)
    with caplog.at_level("WARNING", logger="idembarrier.relay"):
        await until_relayed(relay, barrier, publisher)
    warnings = [r.getMessage() for r in caplog.records if "receives no notifications" in r.getMessage()]
    assert len(warnings) == 1
    assert "listen_url" in warnings[0]


@pytest.mark.parametrize("url", ["postgresql+psycopg://db/x", "sqlite+aiosqlite:///x.db", "not a url"])
async def test_a_listen_url_that_cannot_listen_is_refused(sqlite_db: Database, url: str) -> None:
    """``listen_url`` must be a postgresql+asyncpg URL: anything else is a `ConfigurationError` at once."""
    with pytest.raises(idembarrier.ConfigurationError, match="listen_url"):
        OutboxRelay(idembarrier.Barrier(sqlite_db.sessionmaker), Collecting(), listen_url=url)


async def test_a_listen_url_that_refuses_is_reported_once_while_the_relay_polls(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A direct connection that is refused: one warning for the outage, the relay polls and relays meanwhile."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the socket is closed
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    publisher = Collecting()
    refused = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test"
    relay = OutboxRelay(barrier, publisher, poll_interval=0.01, max_poll_interval=0.05, listen_url=refused)
    with caplog.at_level("WARNING", logger="idembarrier.relay"):
        await until_relayed(relay, barrier, publisher, linger=0.3)  # more reconnections: none may log again
    failures = [r for r in caplog.records if "listening on" in r.getMessage() and "failed" in r.getMessage()]
    assert len(failures) == 1


async def test_a_relay_whose_commit_is_lost_publishes_again_with_the_same_id(pg_db: Database) -> None:
    """A batch whose COMMIT never reaches the server raises ConnectionLostError; the next batch re-publishes it."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from tests.faultproxy import CommitCut, FaultProxy

    (mid,) = await publish(idembarrier.Barrier(pg_db.sessionmaker), "o-1", ("orders", b"A", b"v"))
    async with FaultProxy.for_url(pg_db.url) as proxy:
        engine = create_async_engine(proxy.url(pg_db.url), pool_size=1, max_overflow=0)
        try:
            barrier = idembarrier.Barrier(async_sessionmaker(engine))
            publisher = Collecting()
            relay = OutboxRelay(barrier, publisher)
            proxy.cut_at_commit(CommitCut.DROP)
            with pytest.raises(idembarrier.ConnectionLostError):
                await relay.relay_once()
            assert await relay.relay_once() == 1  # the dead connection was discarded; a fresh one serves
            proxy.refuse()
            await engine.dispose()  # no pooled connection left: the next batch must connect
            with pytest.raises(idembarrier.StorageError):
                await relay.relay_once()
        finally:
            await engine.dispose()
    assert [m.message_id for m in publisher.messages] == [mid, mid]

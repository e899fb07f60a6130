"""NATS JetStream: the outbox relayed with ``Nats-Msg-Id``, the barrier on a durable pull consumer, all real.

Every test makes its own streams and consumers (uuid names) on the server at 127.0.0.1:4222 and deletes them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.client import JetStreamContext
from sqlalchemy import func, select

import idembarrier
from idembarrier.messaging import (
    CONTRACT_HEADER,
    MESSAGE_ID_HEADER,
    ConsumerBarrier,
    DeadLetterTopic,
    Duplicate,
    MessageRefusedError,
    OutboxRelay,
)
from idembarrier.nats import MESSAGE_KEY_HEADER, JetStreamDelivery, JetStreamPublisher, run_jetstream_consumer
from tests.helpers import Boom, require
from tests.models import Payment
from tests.nats_worker import record_payment
from tests.test_chaos import Crew, kill_either, kill_while

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from nats.aio.client import Client
    from sqlalchemy.ext.asyncio import AsyncSession

    from idembarrier.messaging import Message
    from tests.conftest import Database

    Handler = Callable[[AsyncSession, JetStreamDelivery], Awaitable[Any]]

NATS_URL = os.environ.get("IDEMBARRIER_TEST_NATS_URL", "nats://127.0.0.1:4222")


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    """A connection to the JetStream server; the test fails under CI (skips elsewhere) without one."""
    connected: Client | None = None
    try:
        connected = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
        await connected.jetstream().account_info()
    except Exception as exc:
        if connected is not None:
            await connected.close()
        require(False, f"NATS with JetStream at {NATS_URL} does not answer: {exc!r}")
    assert connected is not None
    try:
        yield connected
    finally:
        await connected.close()


@dataclass
class Stream:
    """A stream of the test's own, on subjects ``<name>.>``."""

    js: JetStreamContext
    name: str

    @property
    def subject(self) -> str:
        return f"{self.name}.orders"

    async def consumer(self, *, ack_wait: float = 30.0, max_deliver: int = -1) -> str:
        """A new durable pull consumer with explicit acks; return its name."""
        durable = f"billing{uuid.uuid4().hex[:8]}"
        config = ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=max_deliver
        )
        await self.js.add_consumer(self.name, config)
        return durable

    async def messages(self) -> int:
        return (await self.js.stream_info(self.name)).state.messages


async def make_stream(js: JetStreamContext, **config: Any) -> Stream:
    name = f"t{uuid.uuid4().hex[:12]}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], **config))
    return Stream(js, name)


@pytest.fixture
async def stream(client: Client) -> AsyncIterator[Stream]:
    """A stream for the test (default settings: a two-minute duplicate window), deleted afterwards."""
    made = await make_stream(client.jetstream())
    try:
        yield made
    finally:
        await made.js.delete_stream(made.name)


async def consume_all(
    stream: Stream,
    durable: str,
    barrier: idembarrier.Barrier[Any],
    handler: Handler = record_payment,
    *,
    expect: int,
    **options: Any,
) -> int:
    """Run the loop until the consumer has acked ``expect`` messages and holds none; return how many applied."""
    stop = anyio.Event()

    async def until_all_acked() -> None:
        # The broker's progress, which no event of ours reports: polled, to stop the loop, not to order it.
        while True:
            info = await stream.js.consumer_info(stream.name, durable)
            if info.ack_floor.stream_seq >= expect and info.num_ack_pending == 0 and info.num_pending == 0:
                stop.set()
                return
            await anyio.sleep(0.05)

    options.setdefault("backoff", (0.01, 0.1))
    applied = 0
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(until_all_acked)
            applied = await run_jetstream_consumer(
                (stream.js, stream.name, durable),
                barrier,
                handler,
                group=durable,
                stop=stop,
                poll_timeout=0.2,
                **options,
            )
    return applied


async def effects(db: Database) -> dict[str, int]:
    """The consumer's payment rows, counted per event."""
    query = select(Payment.key, func.count()).group_by(Payment.key)
    async with db.engine.connect() as conn:
        return {str(key): int(n) for key, n in (await conn.execute(query)).all()}


async def publish_order(barrier: idembarrier.Barrier[Any], subject: str, order: str, **options: Any) -> str:
    """A unit of work that publishes ``order`` to ``subject``; return the message id."""
    async with barrier.unit_of_work(order, scope="orders") as uow:
        mid = uow.publish(subject, order.encode(), **options)
        uow.complete(None)
    return mid


def outbox_message(
    subject: str, value: bytes, *, headers: Sequence[tuple[str, bytes]] = (), key: bytes | None = None
) -> Message:
    from idembarrier.messaging import Message

    mid = f"msg-{uuid.uuid4().hex}"
    return Message(1, mid, subject, key, value, ((MESSAGE_ID_HEADER, mid.encode()), *headers))


def test_importing_idembarrier_does_not_import_nats() -> None:
    """`import idembarrier` (and `idembarrier.messaging`) leave nats-py unimported: it is the ``nats`` extra."""
    code = "import sys, idembarrier, idembarrier.messaging; assert 'nats' not in sys.modules, 'nats imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- publish → relay → stream → consumer ----------------------------------------------------------------


async def test_a_unit_of_works_message_reaches_the_consumer_once(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """UoW.publish → OutboxRelay with JetStreamPublisher → the stream → run_jetstream_consumer: one effect."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    mid = await publish_order(barrier, stream.subject, "o-1", key=b"account-7", headers={"x-tenant": b"acme"})
    assert await OutboxRelay(barrier, JetStreamPublisher(client)).relay_once() == 1
    seen: list[JetStreamDelivery] = []

    async def handler(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        seen.append(delivery)
        return await record_payment(session, delivery)

    durable = await stream.consumer()
    assert await consume_all(stream, durable, barrier, handler, expect=1) == 1
    assert await effects(pg_db) == {"o-1": 1}
    [delivery] = seen
    headers = dict(delivery.headers)
    assert headers[MESSAGE_ID_HEADER] == mid.encode()
    assert headers["Nats-Msg-Id"] == mid.encode()
    assert headers["x-tenant"] == b"acme"
    assert headers[MESSAGE_KEY_HEADER] == b"account-7"
    assert (delivery.key, delivery.subject, delivery.source, delivery.position) == (
        b"account-7",
        stream.subject,
        stream.name,
        "1",
    )
    assert ("consumer:" + durable, mid, "COMPLETED") in await pg_db.records()


async def test_a_rolled_back_unit_of_work_publishes_nothing(pg_db: Database, client: Client, stream: Stream) -> None:
    """A unit of work whose body raises leaves nothing in the outbox, so nothing reaches the stream."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with pytest.raises(Boom):
        async with barrier.unit_of_work("o-1", scope="orders") as uow:
            uow.publish(stream.subject, b"o-1")
            raise Boom
    assert await OutboxRelay(barrier, JetStreamPublisher(client)).relay_once() == 0
    assert await stream.messages() == 0


class DiesBeforeMarking:
    """A relay's publisher that crashes once the stream acknowledged, before the relay marked the rows sent."""

    def __init__(self, publisher: JetStreamPublisher) -> None:
        self.publisher = publisher

    async def publish(self, messages: Sequence[Message]) -> None:
        await self.publisher.publish(messages)
        raise ConnectionResetError("relay died")


async def test_a_re_publish_within_the_duplicate_window_is_dropped_by_jetstream(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """The relay dies after publishing; its re-publish has the same Nats-Msg-Id: a duplicate PubAck, one message."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    mid = await publish_order(barrier, stream.subject, "o-1")
    publisher = JetStreamPublisher(client)
    with pytest.raises(ConnectionResetError):
        await OutboxRelay(barrier, DiesBeforeMarking(publisher)).relay_once()
    assert await OutboxRelay(barrier, publisher).relay_once() == 1  # pending still: published again
    assert await stream.messages() == 1
    again = await stream.js.publish(stream.subject, b"o-1", headers={"Nats-Msg-Id": mid})
    assert (again.duplicate, again.seq) == (True, 1)  # what the relay's second PubAck said
    durable = await stream.consumer()
    assert await consume_all(stream, durable, barrier, expect=1) == 1
    assert await effects(pg_db) == {"o-1": 1}


async def test_a_re_publish_beyond_the_duplicate_window_is_caught_by_the_barrier(
    pg_db: Database, client: Client
) -> None:
    """Past the stream's duplicate window the re-publish is stored again; the consumer barrier applies it once."""
    stream = await make_stream(client.jetstream(), duplicate_window=0.2)
    try:
        barrier = idembarrier.Barrier(pg_db.sessionmaker)
        await publish_order(barrier, stream.subject, "o-1")
        publisher = JetStreamPublisher(client)
        with pytest.raises(ConnectionResetError):
            await OutboxRelay(barrier, DiesBeforeMarking(publisher)).relay_once()
        await anyio.sleep(0.5)  # the relay comes back after the 0.2 s window: time itself is the condition
        assert await OutboxRelay(barrier, publisher).relay_once() == 1
        assert await stream.messages() == 2
        durable = await stream.consumer()
        assert await consume_all(stream, durable, barrier, expect=2) == 1
        assert await effects(pg_db) == {"o-1": 1}
    finally:
        await stream.js.delete_stream(stream.name)


# -- the consumer dies, restarts, stops ------------------------------------------------------------------


async def test_a_consumer_killed_after_its_commit_before_its_ack_has_one_effect_and_a_replay(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """SIGKILLed from the after-commit hook (the ack unsent): the redelivery after a restart is replayed, not re-run."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_order(barrier, stream.subject, "o-1")
    assert await OutboxRelay(barrier, JetStreamPublisher(client)).relay_once() == 1
    durable = await stream.consumer(ack_wait=1.0)
    command = [sys.executable, "-m", "tests.nats_worker", "die-after-commit", pg_db.url, NATS_URL, stream.name, durable]
    worker = await anyio.run_process(command, check=False)
    assert worker.returncode == -signal.SIGKILL
    assert b"committed" in worker.stdout
    assert await effects(pg_db) == {"o-1": 1}
    assert (await stream.js.consumer_info(stream.name, durable)).num_ack_pending == 1  # never acked

    sub = await stream.js.pull_subscribe_bind(durable, stream.name)
    try:
        with anyio.fail_after(10):
            [msg] = await sub.fetch(1, timeout=5)  # redelivered once ack_wait (1 s) has passed
        delivery = JetStreamDelivery(msg)
        ran: list[str] = []

        async def counted(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
            ran.append(delivery.position)
            return await record_payment(session, delivery)

        answer = await ConsumerBarrier(barrier, counted, group=durable).process(delivery)
        await msg.ack_sync()
    finally:
        await sub.unsubscribe()
    assert delivery.num_delivered == 2
    assert answer == Duplicate(answer.message_id, {"applied": "o-1", "sequence": 1})  # type: ignore[union-attr]
    assert ran == []
    assert await effects(pg_db) == {"o-1": 1}


async def test_a_stop_acks_the_message_in_flight_and_hands_the_batch_back(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """Stopped during the first of three fetched messages: it is acked, the other two naked, taken at once after."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    for i in range(3):
        await publish_order(barrier, stream.subject, f"o-{i}")
    assert await OutboxRelay(barrier, JetStreamPublisher(client)).relay_once() == 3
    durable = await stream.consumer(ack_wait=60.0)  # a message left unacked would stall the second run
    stop = anyio.Event()

    async def stops(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        stop.set()
        return await record_payment(session, delivery)

    with anyio.fail_after(10):
        first = await run_jetstream_consumer(
            (stream.js, stream.name, durable), barrier, stops, group=durable, stop=stop
        )
    assert first == 1
    assert await consume_all(stream, durable, barrier, expect=3) == 2  # within fail_after(30) << ack_wait
    assert await effects(pg_db) == {"o-0": 1, "o-1": 1, "o-2": 1}


async def test_a_failing_handler_is_naked_and_applied_on_its_redelivery(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """A handler failure under max_attempts is a Retry: the message is naked, comes back, and is applied once."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_order(barrier, stream.subject, "o-1")
    assert await OutboxRelay(barrier, JetStreamPublisher(client)).relay_once() == 1
    deliveries: list[int] = []

    async def flaky(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        deliveries.append(delivery.num_delivered)
        if delivery.num_delivered == 1:
            raise Boom
        return await record_payment(session, delivery)

    durable = await stream.consumer()
    assert await consume_all(stream, durable, barrier, flaky, expect=1) == 1
    assert deliveries == [1, 2]
    assert await effects(pg_db) == {"o-1": 1}


async def test_a_fatal_error_propagates_with_the_message_unacked(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """With max_attempts=None the handler's exception propagates; the message stays unacked and comes back."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_order(barrier, stream.subject, "o-1")
    assert await OutboxRelay(barrier, JetStreamPublisher(client)).relay_once() == 1
    durable = await stream.consumer(ack_wait=1.0)

    async def broken(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        raise Boom

    with anyio.fail_after(10), pytest.raises(Boom):
        await run_jetstream_consumer(
            (stream.js, stream.name, durable), barrier, broken, group=durable, max_attempts=None
        )
    assert (await stream.js.consumer_info(stream.name, durable)).num_ack_pending == 1
    assert await consume_all(stream, durable, barrier, expect=1) == 1  # redelivered after ack_wait
    assert await effects(pg_db) == {"o-1": 1}


async def test_a_handler_longer_than_ack_wait_is_kept_in_progress(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """A 2.5 s handler on a 1 s ack_wait: in-progress acks keep a second consumer from getting the message."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await publish_order(barrier, stream.subject, "o-1")
    assert await OutboxRelay(barrier, JetStreamPublisher(client)).relay_once() == 1
    durable = await stream.consumer(ack_wait=1.0)
    calls: list[str] = []
    started = anyio.Event()

    async def slow(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        calls.append("slow")
        started.set()
        await anyio.sleep(2.5)  # a long handler, which is what is tested: not an ordering
        return await record_payment(session, delivery)

    async def other(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        calls.append("other")
        return await record_payment(session, delivery)

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial_consume, stream, durable, barrier, slow)
        await started.wait()
        tg.start_soon(partial_consume, stream, durable, barrier, other)
    assert calls == ["slow"]
    info = await stream.js.consumer_info(stream.name, durable)
    assert (info.delivered.consumer_seq, info.num_ack_pending) == (1, 0)  # delivered once: never redelivered
    assert await effects(pg_db) == {"o-1": 1}


async def partial_consume(stream: Stream, durable: str, barrier: idembarrier.Barrier[Any], handler: Handler) -> None:
    await consume_all(stream, durable, barrier, handler, expect=1)


# -- poison messages and bad inputs ----------------------------------------------------------------------


async def test_a_poison_message_reaches_the_dead_letter_stream_after_max_attempts(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """Three handler failures: the record is FAILED and a copy, relayed through the outbox, lands in the DLQ."""
    letters = await make_stream(client.jetstream())
    try:
        barrier = idembarrier.Barrier(pg_db.sessionmaker)
        mid = await publish_order(barrier, stream.subject, "o-1")
        relay = OutboxRelay(barrier, JetStreamPublisher(client))
        assert await relay.relay_once() == 1
        durable = await stream.consumer()  # max_deliver unlimited: the barrier's count decides
        attempts: list[int] = []

        async def poison(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
            attempts.append(delivery.num_delivered)
            raise Boom

        dead = DeadLetterTopic(f"{letters.name}.dead")
        assert await consume_all(stream, durable, barrier, poison, expect=1, max_attempts=3, dead_letter=dead) == 0
        assert attempts == [1, 2, 3]
        assert ("consumer:" + durable, mid, "FAILED") in await pg_db.records()
        assert await relay.relay_once() == 1  # the dead letter's copy
        info = await letters.js.stream_info(letters.name)
        assert info.state.messages == 1
        copy = await letters.js.get_msg(letters.name, 1)
        assert copy.data == b"o-1"
        assert copy.headers is not None
        assert copy.headers["idempotency-original-message-id"] == mid
        assert '"reason": "handler"' in copy.headers["idempotency-dead-letter"]
        assert await effects(pg_db) == {}
    finally:
        await letters.js.delete_stream(letters.name)


@pytest.mark.parametrize(("max_deliver", "max_attempts"), [(2, 3), (1, 5)])
async def test_a_consumer_whose_max_deliver_runs_out_first_is_refused(
    pg_db: Database, stream: Stream, max_deliver: int, max_attempts: int
) -> None:
    """JetStream's max_deliver below max_attempts would drop a poison message undead-lettered: refused at start."""
    durable = await stream.consumer(max_deliver=max_deliver)
    with pytest.raises(idembarrier.ConfigurationError, match="max_deliver"):
        await run_jetstream_consumer(
            (stream.js, stream.name, durable),
            idembarrier.Barrier(pg_db.sessionmaker),
            record_payment,
            group=durable,
            max_attempts=max_attempts,
        )


async def test_a_consumer_that_does_not_exist_or_acks_all_is_refused(pg_db: Database, stream: Stream) -> None:
    """A missing durable and AckPolicy.ALL are configuration errors naming the fix, not retried forever."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with pytest.raises(idembarrier.ConfigurationError, match="does not exist"):
        await run_jetstream_consumer((stream.js, stream.name, "nobody"), barrier, record_payment, group="g")
    await stream.js.add_consumer(stream.name, ConsumerConfig(durable_name="all", ack_policy=AckPolicy.ALL))
    with pytest.raises(idembarrier.ConfigurationError, match="EXPLICIT"):
        await run_jetstream_consumer((stream.js, stream.name, "all"), barrier, record_payment, group="g")


async def test_messages_without_or_with_unreadable_ids_are_dead_lettered_unrun(pg_db: Database, stream: Stream) -> None:
    """No id header, an unknown contract, an empty id, an over-long id: each FAILED as malformed, the handler unrun."""
    bad: list[dict[str, str] | None] = [
        None,
        {CONTRACT_HEADER: "99", MESSAGE_ID_HEADER: "msg-1"},
        {MESSAGE_ID_HEADER: ""},
        {MESSAGE_ID_HEADER: "m" * 300},
    ]
    for headers in bad:
        await stream.js.publish(stream.subject, b"o-1", headers=headers)
    ran: list[str] = []

    async def handler(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        ran.append(delivery.position)
        return None

    durable = await stream.consumer()
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    assert await consume_all(stream, durable, barrier, handler, expect=len(bad)) == 0
    assert ran == []
    records = await pg_db.records()
    assert records == [("consumer:" + durable, f"{stream.name}:{n}", "FAILED") for n in range(1, len(bad) + 1)]


async def test_refusals_for_good_are_message_refused_errors(pg_db: Database, client: Client) -> None:
    """No stream, over max_payload (headers counted), over the stream's max_msg_size, an unsendable header."""
    stream = await make_stream(client.jetstream(), max_msg_size=1000)
    publisher = JetStreamPublisher(client)
    try:
        cases = {
            "no stream listens": outbox_message(f"nowhere{uuid.uuid4().hex}", b"x"),
            "max_payload": outbox_message(stream.subject, b"x" * (client.max_payload - 50)),
            "message size exceeds": outbox_message(stream.subject, b"x" * 2000),
            "not UTF-8": outbox_message(stream.subject, b"x", headers=[("x-bin", b"\xff\xfe")]),
            "trimmed or split": outbox_message(stream.subject, b"x", headers=[("x-line", b"a\r\nb")]),
            "not a NATS header token": outbox_message(stream.subject, b"x", headers=[("x bad", b"v")]),
        }
        for reason, message in cases.items():
            with pytest.raises(MessageRefusedError, match=reason) as refused:
                await publisher.publish([outbox_message(stream.subject, b"fine"), message])
            assert refused.value.message is message
        assert await stream.messages() == len(cases)  # each batch's first message went through
    finally:
        await stream.js.delete_stream(stream.name)


async def test_a_value_over_max_payload_is_parked_while_other_keys_flow(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """Through the relay: the too-large message is refused and parked; a message of another key is published."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        big = uow.publish(stream.subject, b"x" * client.max_payload, key=b"a")
        uow.publish(stream.subject, b"small", key=b"b")
        uow.complete(None)
    relay = OutboxRelay(barrier, JetStreamPublisher(client), max_attempts=1)
    assert await relay.relay_once() == 1
    assert [p.message_id for p in await relay.parked()] == [big]
    assert await stream.messages() == 1


# -- chaos -----------------------------------------------------------------------------------------------

EVENTS = 500
CHAOS_SECONDS = 20.0


@pytest.mark.timeout(240)
async def test_chaos_killed_relays_and_consumers_apply_each_event_once(pg_db: Database, client: Client) -> None:
    """500 events, two relays and two consumers on one durable SIGKILLed at random: each event has one effect."""
    # A 1 s duplicate window: a relay's re-publish after its replacement starts is often past it, so both layers work.
    stream = await make_stream(client.jetstream(), duplicate_window=1.0)
    durable = await stream.consumer(ack_wait=2.0)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    args = [pg_db.url, NATS_URL, stream.name, durable]
    relays = Crew("relay", args, 2, module="tests.nats_worker")
    consumers = Crew("consumer", args, 2, module="tests.nats_worker")
    try:

        async def produce() -> None:
            for i in range(EVENTS):
                await publish_order(barrier, stream.subject, f"event-{i}", key=f"account-{i % 16}".encode())
                if i % 25 == 0:
                    await anyio.sleep(0.5)  # spread the events over the chaos

        await kill_while(produce, kill_either(rng, relays, consumers), rng, CHAOS_SECONDS, gap=(0.5, 1.5))
        settled = False
        with anyio.move_on_after(120):
            # Other processes' progress, which no event of ours reports: polled, not used to order tasks.
            while True:
                info = await stream.js.consumer_info(stream.name, durable)
                pending = await OutboxRelay(barrier, JetStreamPublisher(client)).counts()
                if pending == (0, 0) and info.num_pending == 0 and info.num_ack_pending == 0:
                    settled = True
                    break
                await anyio.sleep(0.5)
        seen = await effects(pg_db)
        stored = await stream.messages()
    finally:
        relays.stop()
        consumers.stop()
        await stream.js.delete_stream(stream.name)
    report = (
        f"seed {seed}: {EVENTS} events, {relays.kills} relay kills, {consumers.kills} consumer kills, "
        f"{stored} messages in the stream ({stored - EVENTS} re-publishes past JetStream's window), "
        f"{sum(seen.values())} effects over {len(seen)} events"
    )
    print(report)
    assert settled, f"not settled in 120 s: outbox (pending, parked) {pending}, {info}; {report}"
    assert seen == {f"event-{i}": 1 for i in range(EVENTS)}, report

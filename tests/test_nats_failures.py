"""JetStream failing under the consumer loop and the publisher, on the real server: nothing lost, nothing doubled.

Each failure is real: the loop's client closed under it, its consumer deleted while a handler runs, its
connection cut by a byte-forwarding proxy while it fetches, a JetStream domain nobody serves, a full stream.
The tests line up with the loop through its log records (`LogEvent`) and the server's state, not sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import anyio
import nats
import pytest
from nats.errors import ConnectionClosedError
from nats.js.api import DiscardPolicy
from nats.js.errors import ServiceUnavailableError

import idembarrier
from idembarrier.messaging import MessageRefusedError, OutboxRelay
from idembarrier.nats import JetStreamDelivery, JetStreamPublisher, run_jetstream_consumer
from tests.helpers import Boom
from tests.nats_worker import record_payment
from tests.test_nats import (
    NATS_URL,
    Stream,
    client,
    consume_all,
    effects,
    make_stream,
    outbox_message,
    publish_order,
    stream,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from nats.aio.client import Client
    from sqlalchemy.ext.asyncio import AsyncSession

    from tests.conftest import Database

__all__ = ["client", "stream"]  # fixtures, shared with test_nats

NATS_PORT = int(NATS_URL.rsplit(":", 1)[1])


class LogEvent(logging.Handler):
    """Counts the records of a logger whose message contains ``text``; ``seen`` is set at the first."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = anyio.Event()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.count += 1
            self.seen.set()


@contextlib.contextmanager
def watch(text: str | LogEvent, logger: str = "idembarrier.nats") -> Iterator[LogEvent]:
    """A `LogEvent` (or one for ``text``) on ``logger``, its level lowered to INFO meanwhile, for the block."""
    log = logging.getLogger(logger)
    handler, level = text if isinstance(text, LogEvent) else LogEvent(text), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


async def own_client(url: str = NATS_URL, **options: Any) -> Client:
    """A connection of the loop's own, which a test may close under it (no reconnects unless asked)."""
    options.setdefault("allow_reconnect", False)
    return await nats.connect(url, connect_timeout=2, **options)


async def relayed(barrier: idembarrier.Barrier[Any], client: Client, stream: Stream, *orders: str) -> None:
    """Publish ``orders`` through units of work and the relay: one stream message each."""
    for order in orders:
        await publish_order(barrier, stream.subject, order)
    assert await OutboxRelay(barrier, JetStreamPublisher(client)).relay_once() == len(orders)


# -- acks that fail after the commit ---------------------------------------------------------------------


async def test_an_ack_that_fails_after_the_commit_leaves_the_message_to_be_replayed(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """The consumer deleted under a running handler: its writes commit, the ack fails (no responder), the loop
    counts the message applied; the consumer made again delivers it again, and that delivery is a replay."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await relayed(barrier, client, stream, "o-1")
    durable = await stream.consumer()
    config = (await stream.js.consumer_info(stream.name, durable)).config
    ran: list[str] = []

    async def deletes_its_consumer(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        ran.append(delivery.position)
        await stream.js.delete_consumer(stream.name, durable)
        return await record_payment(session, delivery)

    stop = anyio.Event()

    async def stop_once(event: anyio.Event) -> None:
        await event.wait()
        stop.set()

    with watch("acking") as ack_failed, anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_once, ack_failed.seen)
            applied = await run_jetstream_consumer(
                (stream.js, stream.name, durable), barrier, deletes_its_consumer, group=durable, stop=stop,
                poll_timeout=0.2, backoff=(0.01, 0.1),
            )  # fmt: skip
    assert applied == 1  # its writes committed, though the ack did not go
    assert await effects(pg_db) == {"o-1": 1}

    await stream.js.add_consumer(stream.name, config)  # from the stream's start: o-1 is delivered again
    assert await consume_all(stream, durable, barrier, record_payment, expect=1) == 0
    assert ran == ["1"]
    assert await effects(pg_db) == {"o-1": 1}


async def test_a_client_closed_under_a_handler_ends_the_loop_and_its_message_is_replayed(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """The loop's client closed while a handler runs: the in-progress signal fails (logged) without stopping the
    handler, its writes commit, and the ack's ConnectionClosedError ends the loop (nats-py never reopens a closed
    client) instead of a retry forever; after ack_wait the message comes back and is replayed."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await relayed(barrier, client, stream, "o-1")
    durable = await stream.consumer(ack_wait=1.0)  # an in-progress signal every third of a second
    own = await own_client()
    ran: list[int] = []

    async def closes_the_client(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        ran.append(delivery.num_delivered)
        await own.close()
        await no_progress.seen.wait()  # the keep-alive tried, and failed, while this handler still runs
        return await record_payment(session, delivery)

    no_progress, retried = LogEvent("in progress"), LogEvent("retrying")
    with watch(no_progress), watch(retried), anyio.fail_after(15), pytest.raises(ConnectionClosedError):
        await run_jetstream_consumer(
            (own.jetstream(), stream.name, durable), barrier, closes_the_client, group=durable,
            poll_timeout=0.2, backoff=(0.01, 0.1),
        )  # fmt: skip
    assert retried.count == 0  # the ack's ConnectionClosedError propagated at once
    assert await effects(pg_db) == {"o-1": 1}
    assert (await stream.js.consumer_info(stream.name, durable)).num_ack_pending == 1  # never acked

    assert await consume_all(stream, durable, barrier, record_payment, expect=1) == 0  # the redelivery: a replay
    assert ran == [1]
    assert await effects(pg_db) == {"o-1": 1}


# -- naks that fail -------------------------------------------------------------------------------------


async def test_a_nak_that_fails_leaves_the_message_to_come_back_after_ack_wait(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """A handler failure (a Retry) on a closed client: the nak fails (logged), the loop ends with
    ConnectionClosedError, and the message, never acked, comes back after ack_wait and is applied once."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await relayed(barrier, client, stream, "o-1")
    durable = await stream.consumer(ack_wait=1.0)
    own = await own_client()
    attempts: list[int] = []

    async def fails_first(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        attempts.append(delivery.num_delivered)
        if delivery.num_delivered == 1:
            await own.close()
            raise Boom
        return await record_payment(session, delivery)

    with watch("could not nak") as nak_failed, anyio.fail_after(15), pytest.raises(ConnectionClosedError):
        await run_jetstream_consumer(
            (own.jetstream(), stream.name, durable), barrier, fails_first, group=durable,
            poll_timeout=0.2, backoff=(0.01, 0.1),
        )  # fmt: skip
    assert nak_failed.count == 1
    assert await effects(pg_db) == {}

    assert await consume_all(stream, durable, barrier, fails_first, expect=1) == 1
    assert attempts == [1, 2]
    assert await effects(pg_db) == {"o-1": 1}


async def test_a_handlers_exception_propagates_unchanged_when_the_client_is_gone(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """max_attempts=None, the client closed by the failing handler: the handler's own exception propagates (not
    the unsubscribe's ConnectionClosedError), the batch's other naks fail (logged), and all three messages
    come back after ack_wait, each applied once."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await relayed(barrier, client, stream, "o-1", "o-2", "o-3")
    durable = await stream.consumer(ack_wait=1.0)
    own = await own_client()

    async def closes_and_fails(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        await own.close()
        raise Boom

    with watch("could not nak") as nak_failed, anyio.fail_after(15), pytest.raises(Boom):
        await run_jetstream_consumer(
            (own.jetstream(), stream.name, durable), barrier, closes_and_fails, group=durable, batch=3,
            max_attempts=None, poll_timeout=1.0,
        )  # fmt: skip
    assert nak_failed.count == 2  # the two fetched with it; the failing one stays unacked
    assert await consume_all(stream, durable, barrier, record_payment, expect=3) == 3
    assert await effects(pg_db) == {"o-1": 1, "o-2": 1, "o-3": 1}


async def test_a_handler_failure_past_max_retries_propagates_and_hands_the_batch_back(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """max_retries=0: the first handler failure (a Retry) propagates its cause; the failing message is naked
    and the rest of the batch handed back, so both come again at once and are applied once each."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await relayed(barrier, client, stream, "o-1", "o-2")
    durable = await stream.consumer(ack_wait=60.0)  # a message left unacked would stall the second run

    async def fails(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
        raise Boom

    with anyio.fail_after(15), pytest.raises(Boom):
        await run_jetstream_consumer(
            (stream.js, stream.name, durable), barrier, fails, group=durable, batch=2, max_retries=0,
            backoff=(0.01, 0.05),
        )  # fmt: skip
    assert await consume_all(stream, durable, barrier, record_payment, expect=2) == 2  # within 15 s << ack_wait
    assert await effects(pg_db) == {"o-1": 1, "o-2": 1}


# -- fetches and settings that fail ---------------------------------------------------------------------


class Forwarder:
    """A plain TCP forwarder to the NATS server: `cut` resets its connections and refuses new ones, `mend`
    listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def mend(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        ends = {writer.transport, up_writer.transport}
        self._transports |= ends

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except ConnectionError:
            pass
        finally:
            for transport in ends:
                transport.abort()
            self._transports -= ends


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    proxy = Forwarder(("127.0.0.1", NATS_PORT))
    await proxy.mend()
    try:
        yield proxy
    finally:
        proxy.cut()


async def test_a_fetch_failing_while_the_client_reconnects_is_retried_and_the_loop_goes_on(
    pg_db: Database, client: Client, stream: Stream, forwarder: Forwarder
) -> None:
    """The connection cut under an idle loop whose client buffers nothing while reconnecting: each fetch raises
    OutboundBufferLimitError, retried with backoff (logged); once the server is reachable again the loop
    takes the next message and applies it."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    durable = await stream.consumer()
    own = await own_client(
        forwarder.url, allow_reconnect=True, reconnect_time_wait=0.05, max_reconnect_attempts=-1, pending_size=0
    )
    try:
        stop = anyio.Event()

        async def stops_at_the_first(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
            stop.set()
            return await record_payment(session, delivery)

        async def outage() -> None:
            # The loop's pull request waiting at the server, which no event of ours reports: polled.
            while (await stream.js.consumer_info(stream.name, durable)).num_waiting == 0:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            forwarder.cut()
            await fetch_failed.seen.wait()
            await forwarder.mend()
            await relayed(barrier, client, stream, "o-1")

        with watch("fetching from JetStream failed") as fetch_failed, anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(outage)
                applied = await run_jetstream_consumer(
                    (own.jetstream(), stream.name, durable), barrier, stops_at_the_first, group=durable, stop=stop,
                    poll_timeout=0.2, backoff=(0.01, 0.1),
                )  # fmt: skip
        assert fetch_failed.count >= 1
        assert applied == 1
        assert await effects(pg_db) == {"o-1": 1}
    finally:
        await own.close()


async def test_settings_that_cannot_be_read_are_retried_and_past_max_retries_propagate(
    pg_db: Database, client: Client, stream: Stream
) -> None:
    """A JetStream domain nobody serves answers 503 (as a cluster without a leader does): the settings read is
    retried with backoff (logged), and past max_retries its error propagates."""
    durable = await stream.consumer()
    nowhere = client.jetstream(domain="nowhere")
    retried = LogEvent("reading the consumer's settings failed")
    with watch(retried), anyio.fail_after(10), pytest.raises(ServiceUnavailableError):
        await run_jetstream_consumer(
            (nowhere, stream.name, durable), idembarrier.Barrier(pg_db.sessionmaker), record_payment,
            group=durable, max_retries=2, backoff=(0.01, 0.05),
        )  # fmt: skip
    assert retried.count == 2


async def test_a_client_closed_before_the_loop_starts_is_refused_at_once(pg_db: Database, stream: Stream) -> None:
    """A subscription whose client is already closed: reading the consumer's settings raises
    ConnectionClosedError, which propagates instead of being retried."""
    durable = await stream.consumer()
    own = await own_client()
    sub = await own.jetstream().pull_subscribe_bind(durable, stream.name)
    await own.close()
    retried = LogEvent("retrying")
    with watch(retried), anyio.fail_after(10), pytest.raises(ConnectionClosedError):
        await run_jetstream_consumer(sub, idembarrier.Barrier(pg_db.sessionmaker), record_payment, group=durable)
    assert retried.count == 0


# -- the publisher ---------------------------------------------------------------------------------------


async def test_a_full_stream_is_transient_and_a_bad_subject_is_refused(pg_db: Database, client: Client) -> None:
    """A stream at max_msgs with discard=new answers 503: re-raised as transient (the relay keeps the row), and
    published once there is room; a subject that is not one is refused for good."""
    stream = await make_stream(client.jetstream(), max_msgs=1, discard=DiscardPolicy.NEW)
    publisher = JetStreamPublisher(client)
    try:
        await publisher.publish([outbox_message(stream.subject, b"first")])
        second = outbox_message(stream.subject, b"second")
        with pytest.raises(ServiceUnavailableError):
            await publisher.publish([second])
        await stream.js.purge_stream(stream.name)
        await publisher.publish([second])
        assert await stream.messages() == 1
        bad = outbox_message("not a subject", b"x")
        with pytest.raises(MessageRefusedError) as refused:
            await publisher.publish([bad])
        assert refused.value.message is bad
    finally:
        await stream.js.delete_stream(stream.name)

"""The trace across the boundary: a message carries the W3C trace context of the unit of work that published it,
and the consumer's unit of work continues that trace (through the outbox, the relay and the real Kafka broker)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import TYPE_CHECKING

import anyio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import idembarrier
from idembarrier._outbox import decode_headers
from idembarrier.kafka import AIOKafkaPublisher, ConsumerMessage, OutboxRelay, run_consumer
from idembarrier.messaging import TRACE_HEADERS, Applied, ConsumerBarrier, Duplicate
from idembarrier.otel import instrument
from tests.test_kafka import broker, make_consumer, publisher, record_payment

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from tests.conftest import Database

__all__ = ["broker", "publisher"]  # fixtures, shared with test_kafka


def spans_of(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


async def outbox_headers(db: Database) -> list[tuple[tuple[str, bytes], ...]]:
    async with db.engine.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT headers FROM idempotency_keys_outbox ORDER BY id")).all()
    return [decode_headers(row[0]) for row in rows]


async def test_the_consumer_continues_the_trace_of_the_request_that_published(
    pg_db: Database, broker: str, publisher: AIOKafkaPublisher
) -> None:
    """The consumer's unit of work span has the producer's trace id and the request's span as its parent."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    topic, group = f"orders-{uuid.uuid4().hex[:8]}", f"billing-{uuid.uuid4().hex[:8]}"
    producer = idembarrier.Barrier(pg_db.sessionmaker)
    consumer_barrier = idembarrier.Barrier(pg_db.sessionmaker)
    instrument(consumer_barrier, tracer=tracer)
    with tracer.start_as_current_span("POST /orders") as request:
        async with producer.unit_of_work("o-1", scope="orders") as uow:
            uow.publish(topic, b"o-1", key=b"k")
            uow.complete(None)
    [headers] = await outbox_headers(pg_db)
    assert [name for name, _ in headers if name in TRACE_HEADERS] == ["traceparent"]
    assert await OutboxRelay(producer, publisher).relay_once() == 1

    stop = anyio.Event()

    async def handler(session: AsyncSession, message: ConsumerMessage) -> idembarrier.JSON:
        stop.set()
        return await record_payment(session, message)

    consumer = make_consumer(broker, topic, group)
    await consumer.start()
    try:
        with anyio.fail_after(30):
            assert (
                await run_consumer(consumer, consumer_barrier, handler, group=group, stop=stop, poll_timeout=0.2) == 1
            )
    finally:
        await consumer.stop()
    provider.shutdown()
    [consumed] = spans_of(exporter, "idembarrier.unit_of_work")
    assert consumed.context is not None
    assert consumed.context.trace_id == request.get_span_context().trace_id
    assert consumed.parent is not None
    assert consumed.parent.span_id == request.get_span_context().span_id
    assert await pg_db.payments() == 1


class Delivered:
    """A delivery for the core alone: its headers, value and where it came from."""

    def __init__(self, headers: list[tuple[str, bytes]], value: bytes = b"v") -> None:
        self.headers, self.value, self.key, self.source, self.position = headers, value, None, "orders", "7"


async def test_without_a_current_span_no_trace_header_is_written_and_a_bad_one_is_ignored(db: Database) -> None:
    """No span, no ``traceparent``; a consumer meeting an unreadable one starts a new trace and applies it."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        uow.publish("orders", b"o-1")
        uow.complete(None)
    [headers] = await outbox_headers(db)
    assert not [name for name, _ in headers if name in TRACE_HEADERS]

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(barrier, tracer=provider.get_tracer("test"))
    gate: ConsumerBarrier[Delivered, idembarrier.JSON] = ConsumerBarrier(barrier, record_payment, group="g")  # type: ignore[arg-type]
    bad = [("idempotency-message-id", b"m-1"), ("traceparent", b"\xff not a trace")]
    first = await gate.process(Delivered(bad))
    again = await gate.process(Delivered(bad))
    provider.shutdown()
    assert isinstance(first, Applied)
    assert isinstance(again, Duplicate)
    assert all(span.parent is None for span in spans_of(exporter, "idembarrier.unit_of_work"))
    assert await db.payments() == 1


def test_publishing_without_opentelemetry_imports_nothing_of_it() -> None:
    """An application that never imports OpenTelemetry gets no trace headers and no OpenTelemetry import."""
    code = (
        "import sys, idembarrier._outbox as o\n"
        "assert o.current_headers() == {}\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

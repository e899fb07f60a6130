"""OpenTelemetry spans and histograms: one span per call, its claim's wait and its length, never the key."""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from idembarrier import Barrier, FingerprintMismatchError, downstream_key, key_hash
from idembarrier.asgi import HTTPResponseCodec, IdempotencyMiddleware
from idembarrier.otel import instrument
from tests.helpers import Boom, new_key, pay
from tests.test_asgi_units import Exchange, public
from tests.test_concurrency import Waiters, Winner
from tests.test_operations import left_behind

if TYPE_CHECKING:
    from collections.abc import Iterator

    from idembarrier.asgi._types import Receive, Scope, Send
    from tests.conftest import Database

SCOPE = "payments"  # pay()'s


class Telemetry:
    """An SDK tracer and meter provider with in-memory exporters, and barriers instrumented with them."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])

    def barrier(self, db: Database) -> Barrier:
        barrier = Barrier(db.sessionmaker)
        instrument(barrier, meter=self.meters.get_meter("test"), tracer=self.tracers.get_tracer("test"))
        return barrier

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def histogram(self, name: str) -> dict[frozenset[tuple[str, str]], HistogramDataPoint]:
        """The histogram's points, by attributes (as sorted pairs)."""
        data = self.reader.get_metrics_data()
        points: dict[frozenset[tuple[str, str]], HistogramDataPoint] = {}
        for resource in data.resource_metrics if data is not None else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        assert metric.unit == "s"
                        for point in metric.data.data_points:
                            assert isinstance(point, HistogramDataPoint)
                            points[frozenset((k, str(v)) for k, v in (point.attributes or {}).items())] = point
        return points


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    telemetry.tracers.shutdown()
    telemetry.meters.shutdown()


def at(outcome: str, scope: str = SCOPE, work: str = "unit_of_work") -> frozenset[tuple[str, str]]:
    return frozenset({("work", work), ("outcome", outcome), ("scope", scope)})


def attrs(span: ReadableSpan) -> dict[str, object]:
    """The span's attributes (an empty dict for none)."""
    return dict(span.attributes or {})


def events(span: ReadableSpan) -> dict[str, int]:
    """The span's events: their timestamps, by name."""
    return {event.name: event.timestamp or 0 for event in span.events}


def contents(span: ReadableSpan) -> str:
    """Everything a span carries, as text."""
    parts = [span.name, repr(dict(span.attributes or {})), repr(span.status.description)]
    parts += [f"{event.name} {dict(event.attributes or {})!r}" for event in span.events]
    return "\n".join(parts)


async def test_a_first_execution_is_one_span_with_its_claim_and_body(db: Database, telemetry: Telemetry) -> None:
    """A first call ends one span: its scope, outcome, attempt and key hash; claimed, then its body ended."""
    key = new_key()
    await pay(telemetry.barrier(db), key)
    (span,) = telemetry.finished()
    assert span.name == "idembarrier.unit_of_work"
    attributes = dict(span.attributes or {})
    waited = attributes.pop("idempotency.waited")
    assert attributes == {
        "idempotency.scope": SCOPE,
        "idempotency.outcome": "executed",
        "idempotency.attempt": 1,
        "idempotency.key_hash": key_hash(SCOPE, key),
        "idempotency.status": "COMPLETED",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.start_time is not None
    assert span.end_time is not None
    when = events(span)
    assert list(when) == ["claimed", "body_ended"]
    assert span.start_time <= when["claimed"] <= when["body_ended"] <= span.end_time
    assert isinstance(waited, float)
    assert (when["claimed"] - span.start_time) / 1e9 == pytest.approx(waited, abs=1e-6)
    assert key not in contents(span)


async def test_the_histograms_record_each_call_by_outcome_and_scope(db: Database, telemetry: Telemetry) -> None:
    """A first call and two replays add one and two points to the claim-wait and duration histograms."""
    barrier, key = telemetry.barrier(db), new_key()
    begun = time.perf_counter()
    for _ in range(3):
        await pay(barrier, key)
    elapsed = time.perf_counter() - begun
    waits, durations = telemetry.histogram("idempotency.claim.wait"), telemetry.histogram("idempotency.duration")
    assert set(waits) == set(durations) == {at("executed"), at("replayed")}
    assert [waits[at("executed")].count, waits[at("replayed")].count] == [1, 2]
    assert [durations[at("executed")].count, durations[at("replayed")].count] == [1, 2]
    for outcome in ("executed", "replayed"):
        assert 0 < waits[at(outcome)].sum <= durations[at(outcome)].sum
    assert durations[at("executed")].sum + durations[at("replayed")].sum <= elapsed
    spans = telemetry.finished()
    assert [attrs(span)["idempotency.outcome"] for span in spans] == [
        "executed",
        "replayed",
        "replayed",
    ]
    assert all(attrs(span)["idempotency.status"] == "COMPLETED" for span in spans)


async def test_a_concurrent_duplicate_waited_for_the_holder(db: Database, telemetry: Telemetry) -> None:
    """A duplicate that waits on the holder's claim replays: its claim answered only after the holder's body ended."""
    barrier, key = telemetry.barrier(db), new_key()
    winner = Winner(barrier, key)
    async with Waiters(db) as waiters, anyio.create_task_group() as tg:
        await tg.start(winner.run)
        tg.start_soon(partial(pay, barrier, key, scope=SCOPE))
        await waiters.until(1)
        winner.release.set()
    first, duplicate = sorted(telemetry.finished(), key=lambda span: span.start_time or 0)
    assert attrs(first)["idempotency.outcome"] == "executed"
    assert attrs(duplicate)["idempotency.outcome"] == "replayed"
    assert attrs(duplicate)["idempotency.key_hash"] == attrs(first)["idempotency.key_hash"]
    assert duplicate.start_time is not None
    held_until = events(first)["body_ended"]
    assert duplicate.start_time < held_until <= events(duplicate)["claimed"]
    waited = attrs(duplicate)["idempotency.waited"]
    assert isinstance(waited, float)
    assert waited >= (held_until - duplicate.start_time) / 1e9 - 1e-6
    waits = telemetry.histogram("idempotency.claim.wait")
    assert waits[at("replayed", SCOPE)].count == 1
    assert waits[at("replayed", SCOPE)].max == pytest.approx(waited)


async def test_a_failing_body_ends_its_span_in_error(db: Database, telemetry: Telemetry) -> None:
    """The body's exception sets the span's status to ERROR with the exception's type, never its text."""
    barrier, key = telemetry.barrier(db), new_key()
    with pytest.raises(Boom):
        async with barrier.unit_of_work(key, scope=SCOPE) as uow:
            uow.complete(None)
            raise Boom(f"declined for {key}")
    (span,) = telemetry.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "tests.helpers.Boom"
    assert attrs(span)["idempotency.outcome"] == "executed"
    assert "idempotency.status" not in attrs(span)
    (*_, failure) = span.events
    assert failure.name == "exception"
    assert dict(failure.attributes or {}) == {"exception.type": "tests.helpers.Boom"}
    assert key not in contents(span)
    assert telemetry.histogram("idempotency.duration")[at("executed")].count == 1


async def test_a_mismatch_ends_its_span_in_error_at_the_claim(db: Database, telemetry: Telemetry) -> None:
    """A key reused for another request: its span has the mismatch outcome, an ERROR status, no body."""
    barrier, key = telemetry.barrier(db), new_key()
    await pay(barrier, key, fingerprint=1)
    with pytest.raises(FingerprintMismatchError):
        await pay(barrier, key, fingerprint=2)
    _, span = telemetry.finished()
    assert attrs(span)["idempotency.outcome"] == "fingerprint_mismatch"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "idembarrier.FingerprintMismatchError"
    assert [event.name for event in span.events] == ["claimed", "exception"]
    assert key not in contents(span)
    assert telemetry.histogram("idempotency.claim.wait")[at("fingerprint_mismatch")].count == 1


async def test_a_lease_is_one_span_its_finish_included(db: Database, telemetry: Telemetry) -> None:
    """A lease and its fenced finish make one lease span, whose body ends at finish(); no unit-of-work span."""
    barrier, key = telemetry.barrier(db), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease, lease.finish() as uow:
        uow.complete({"ok": True})
    (span,) = telemetry.finished()
    assert span.name == "idembarrier.lease"
    assert attrs(span)["idempotency.status"] == "COMPLETED"
    assert attrs(span)["idempotency.outcome"] == "executed"
    assert "idempotency.reclaimed" not in attrs(span)
    assert list(events(span)) == ["claimed", "body_ended"]
    assert set(telemetry.histogram("idempotency.duration")) == {at("executed", work="lease")}


async def test_a_reclaimed_lease_tells_its_attempt(db: Database, telemetry: Telemetry) -> None:
    """A lease taken over from a dead holder has attempt 2 and is marked reclaimed; a release records no status."""
    barrier, key = telemetry.barrier(db), new_key()
    await left_behind(db, SCOPE, key, "IN_PROGRESS")
    async with barrier.leased(key, scope=SCOPE) as lease:
        await lease.release()
    (span,) = telemetry.finished()
    attributes = dict(span.attributes or {})
    assert (attributes["idempotency.attempt"], attributes["idempotency.reclaimed"]) == (2, True)
    assert "idempotency.status" not in attributes


async def test_a_leased_replay_tells_the_replayed_status(sqlite_db: Database, telemetry: Telemetry) -> None:
    """A lease that finds the key finished replays it: outcome replayed, the recorded status, no body."""
    barrier, key = telemetry.barrier(sqlite_db), new_key()
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        uow.fail({"declined": True})
    async with barrier.leased(key, scope=SCOPE) as lease:
        assert lease.replayed
    _, span = telemetry.finished()
    attributes = dict(span.attributes or {})
    assert (attributes["idempotency.outcome"], attributes["idempotency.status"]) == ("replayed", "FAILED")
    assert list(events(span)) == ["claimed"]


async def test_spans_are_children_of_the_span_current_where_the_call_ends(
    sqlite_db: Database, telemetry: Telemetry
) -> None:
    """A call made inside the application's span is recorded as that span's child."""
    barrier = telemetry.barrier(sqlite_db)
    with telemetry.tracers.get_tracer("app").start_as_current_span("request") as request:
        await pay(barrier, new_key())
    ours, theirs = telemetry.finished()
    assert theirs.name == "request"
    assert ours.parent is not None
    assert ours.parent.span_id == request.get_span_context().span_id


async def test_requests_through_the_middleware_are_one_span_each(db: Database, telemetry: Telemetry) -> None:
    """The ASGI middleware's start, commit and rollback make one span per guarded request, as a block does."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    instrument(barrier, meter=telemetry.meters.get_meter("test"), tracer=telemetry.tracers.get_tracer("test"))
    middleware = IdempotencyMiddleware(app, barrier, scope_of=public)
    for _ in range(2):
        exchange = Exchange()
        await exchange.through(middleware)
        assert exchange.status == 201
    first, replay = telemetry.finished()
    assert [attrs(first)["idempotency.outcome"], attrs(replay)["idempotency.outcome"]] == ["executed", "replayed"]
    assert attrs(first)["idempotency.key_hash"] == key_hash("public", "k-1")
    assert attrs(first)["idempotency.status"] == attrs(replay)["idempotency.status"] == "COMPLETED"
    assert list(events(first)) == ["claimed", "body_ended"]


async def test_a_failing_watcher_does_not_fail_the_call(
    sqlite_db: Database, telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """A watcher's exception is logged; the committed call returns its response."""
    barrier = telemetry.barrier(sqlite_db)

    def broken(_: object) -> None:
        raise RuntimeError("the exporter is down")

    barrier.runtime.watch(broken)
    response = await pay(barrier, new_key(), amount=7)
    assert isinstance(response, dict)
    assert response["amount"] == 7
    assert "a watcher failed on a unit_of_work" in caplog.text


def test_the_key_hash_is_sha256_of_scope_and_key_cut_to_16_hex() -> None:
    """key_hash is the first 16 hex digits of SHA-256 over scope, 0x1F and key; downstream_key starts the same."""
    assert key_hash("payments", "order-1") == "59d2a8a8ef040746"
    assert downstream_key("payments", "order-1").removeprefix("idb-").startswith(key_hash("payments", "order-1"))
    assert key_hash("payments", "order-1") != key_hash("payment", "sorder-1")

"""OpenTelemetry metrics: counters as calls end, gauges from the last reading of the table."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, NumberDataPoint
from sqlalchemy import text

from idembarrier import (
    Barrier,
    ConfigurationError,
    ExpiredReplay,
    FingerprintMismatchError,
    IdembarrierError,
    KeyInProgressError,
    OnConflict,
    Outcome,
    ResponseExpiredError,
    otel,
)
from idembarrier.otel import Instrumentation, instrument
from tests.helpers import new_key
from tests.test_operations import SCOPE, left_behind, run
from tests.test_retention import expired, pay

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import Database

Points = dict[frozenset[tuple[str, str]], float]


class Metrics:
    """An SDK meter provider with an in-memory reader, and the instrumented barrier under test."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def instrument(self, db: Database, **options: Any) -> tuple[Barrier, Instrumentation]:
        barrier = Barrier(db.sessionmaker, **options)
        return barrier, instrument(barrier, meter=self.provider.get_meter("test"))

    def read(self) -> dict[str, tuple[str, Points]]:
        """Collect now: each counter's and gauge's unit and its points, by attributes (as sorted pairs)."""
        data = self.reader.get_metrics_data()
        found: dict[str, tuple[str, Points]] = {}
        for resource in data.resource_metrics if data is not None else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if isinstance(metric.data, Histogram):
                        continue  # the histograms are tests/test_traces.py's
                    points: Points = {}
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        attributes = frozenset((k, str(v)) for k, v in (point.attributes or {}).items())
                        points[attributes] = point.value
                    found[metric.name] = (metric.unit or "", points)
        return found

    def points(self, name: str) -> Points:
        return self.read().get(name, ("", {}))[1]


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    metrics = Metrics()
    yield metrics
    metrics.provider.shutdown()


def at(**attributes: str) -> frozenset[tuple[str, str]]:
    return frozenset(attributes.items())


async def test_counters_count_each_outcome_with_its_scope(db: Database, metrics: Metrics) -> None:
    """A first call, a replay, a conflict, a mismatch and a stale reclaim each add one to their counter."""
    barrier, _ = metrics.instrument(db)
    key = new_key()
    await run(barrier, key, fingerprint=1)
    await run(barrier, key, fingerprint=1)
    with pytest.raises(FingerprintMismatchError):
        await run(barrier, key, fingerprint=2)
    stale = new_key()
    await left_behind(db, SCOPE, stale, "IN_PROGRESS")
    async with barrier.leased(stale, scope=SCOPE) as lease:
        with pytest.raises(KeyInProgressError):
            async with barrier.leased(stale, scope=SCOPE, on_conflict=OnConflict.FAIL):
                pass
        await lease.release()
    read = metrics.read()
    assert read["idempotency.requests"] == (
        "{request}",
        {
            at(outcome="executed", scope=SCOPE): 2,
            at(outcome="replayed", scope=SCOPE): 1,
            at(outcome="fingerprint_mismatch", scope=SCOPE): 1,
            at(outcome="in_progress", scope=SCOPE): 1,
        },
    )
    assert read["idempotency.stale.reclaim.count"] == ("{reclaim}", {at(scope=SCOPE): 1})


async def test_a_finished_lease_counts_once(db: Database, metrics: Metrics) -> None:
    """A lease and the fenced unit of work that finishes it are one call: one ``executed``."""
    barrier, _ = metrics.instrument(db)
    async with barrier.leased(new_key(), scope=SCOPE) as lease, lease.finish() as uow:
        uow.complete(None)
    assert metrics.points("idempotency.requests") == {at(outcome="executed", scope=SCOPE): 1}
    assert barrier.runtime.outcomes == {Outcome.EXECUTED: 1}


@pytest.mark.parametrize("policy", [ExpiredReplay.REJECT, ExpiredReplay.ALERT])
async def test_late_replays_are_counted_under_either_policy(
    sqlite_db: Database, metrics: Metrics, policy: ExpiredReplay
) -> None:
    """A request that finds only a compact record adds one to the late-replay counter, rejected or run."""
    barrier, _ = metrics.instrument(sqlite_db, on_expired_replay=policy)
    key = await expired(sqlite_db, barrier)
    if policy is ExpiredReplay.REJECT:
        with pytest.raises(ResponseExpiredError):
            await pay(barrier, key)
    else:
        assert await pay(barrier, key)
    read = metrics.read()
    assert read["idempotency.late.replay.count"] == ("{request}", {at(scope="late"): 1})
    executed = 2 if policy is ExpiredReplay.ALERT else 1  # the first payment, and the late one if it ran
    assert read["idempotency.requests"][1] == {at(outcome="executed", scope="late"): executed}


async def test_hit_rate_is_replays_over_executions_and_replays(sqlite_db: Database, metrics: Metrics) -> None:
    """The hit rate reports nothing before a call, then replays over executions plus replays."""
    barrier, _ = metrics.instrument(sqlite_db)
    assert metrics.points("idempotency.hit.rate") == {}
    key = new_key()
    for _ in range(4):
        await run(barrier, key)
    unit, points = metrics.read()["idempotency.hit.rate"]
    assert (unit, points) == ("1", {at(): 0.75})


async def test_distribution_gauges_report_the_last_refresh(db: Database, metrics: Metrics) -> None:
    """The status and oldest-age gauges report the last refresh, every status included, until the next."""
    barrier, instrumentation = metrics.instrument(db)
    assert metrics.points("idempotency.status.distribution") == {}
    await run(barrier, new_key())
    async with barrier.leased(new_key(), scope=SCOPE) as lease:
        assert (await instrumentation.refresh()) is instrumentation.reading
        await lease.release()
    read = metrics.read()
    assert read["idempotency.status.distribution"] == (
        "{record}",
        {at(status="IN_PROGRESS"): 1, at(status="COMPLETED"): 1, at(status="FAILED"): 0, at(status="UNKNOWN"): 0},
    )
    unit, ages = read["idempotency.in_progress.oldest.age"]
    assert unit == "s"
    assert ages[at()] >= 0
    assert metrics.points("idempotency.status.distribution")[at(status="IN_PROGRESS")] == 1  # stale until refresh
    await instrumentation.refresh()
    assert metrics.points("idempotency.status.distribution")[at(status="IN_PROGRESS")] == 0
    assert metrics.points("idempotency.in_progress.oldest.age") == {at(): 0}


async def test_running_refreshes_in_the_background_and_survives_failures(
    db: Database, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """running() reads on entry, rereads every interval, and logs a failed read while its gauges go silent."""
    barrier, instrumentation = metrics.instrument(db)
    with anyio.fail_after(10):
        async with instrumentation.running(every=0.01):
            assert instrumentation.reading is not None
            assert instrumentation.reading.statuses == {}
            await run(barrier, new_key())
            # The loop offers no event to wait on; polling its reading is what an exporter sees.
            while not (instrumentation.reading and instrumentation.reading.statuses):  # noqa: ASYNC110
                await anyio.sleep(0.01)
            async with db.engine.begin() as conn:
                await conn.execute(text("DROP TABLE idempotency_keys"))
            while instrumentation.reading is not None:  # noqa: ASYNC110 - as above
                await anyio.sleep(0.01)
            assert metrics.points("idempotency.status.distribution") == {}
    assert "refreshing the table's metrics failed" in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "idembarrier.otel")


async def test_a_failed_refresh_raises_and_drops_the_reading(sqlite_db: Database, metrics: Metrics) -> None:
    """refresh() raises the barrier's error and forgets the previous reading."""
    _, instrumentation = metrics.instrument(sqlite_db)
    await instrumentation.refresh()
    async with sqlite_db.engine.begin() as conn:
        await conn.execute(text("DROP TABLE idempotency_keys"))
    with pytest.raises(IdembarrierError):
        await instrumentation.refresh()
    assert instrumentation.reading is None


async def test_running_refuses_a_useless_interval(sqlite_db: Database, metrics: Metrics) -> None:
    """An interval below or at zero raises ConfigurationError."""
    _, instrumentation = metrics.instrument(sqlite_db)
    with pytest.raises(ConfigurationError, match="every"):
        async with instrumentation.running(every=0):
            pass


async def test_instrument_defaults_to_the_global_meter(sqlite_db: Database) -> None:
    """Without a meter, instrument() uses the global provider, which records nothing until an SDK is set."""
    barrier = Barrier(sqlite_db.sessionmaker)
    instrumentation = instrument(barrier)
    await run(barrier, new_key())
    assert instrumentation.barrier is barrier


def test_importing_idembarrier_does_not_import_opentelemetry() -> None:
    """`import idembarrier` leaves OpenTelemetry unimported; only `idembarrier.otel` imports it."""
    code = (
        "import sys, idembarrier; print(any(m.split('.')[0] == 'opentelemetry' for m in sys.modules)); "
        "import idembarrier.otel; print('opentelemetry' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_otel_all_is_pinned() -> None:
    """`idembarrier.otel.__all__` holds exactly `Instrumentation` and `instrument`."""
    assert otel.__all__ == ["Instrumentation", "instrument"]

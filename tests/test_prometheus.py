"""The guide's Prometheus recipe: idembarrier's instruments, read through OpenTelemetry's Prometheus exporter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from idembarrier import Barrier
from idembarrier.otel import instrument
from tests.helpers import new_key, pay

if TYPE_CHECKING:
    from tests.conftest import Database


async def test_the_exporter_serves_the_counters_and_histograms_by_their_prometheus_names(
    sqlite_db: Database,
) -> None:
    """A scrape shows the requests counter and both histograms in seconds, with their labels."""
    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        barrier = Barrier(sqlite_db.sessionmaker)
        instrument(barrier, meter=provider.get_meter("idembarrier"))
        key = new_key()
        await pay(barrier, key)
        await pay(barrier, key)
        scrape = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()
    samples = [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        if sample.name.startswith("idempotency_")
    ]

    def value(name: str, **labels: str) -> float:
        (found,) = [v for n, sample_labels, v in samples if n == name and labels.items() <= sample_labels.items()]
        return found

    assert value("idempotency_requests_total", outcome="executed", scope="payments") == 1
    assert value("idempotency_requests_total", outcome="replayed", scope="payments") == 1
    for histogram in ("idempotency_claim_wait_seconds", "idempotency_duration_seconds"):
        for outcome in ("executed", "replayed"):
            labels = {"outcome": outcome, "scope": "payments", "work": "unit_of_work"}
            assert value(f"{histogram}_count", **labels) == 1
            assert value(f"{histogram}_bucket", le="+Inf", **labels) == 1
            assert 0 < value(f"{histogram}_sum", **labels) < 60
    assert key not in scrape

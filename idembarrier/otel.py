"""OpenTelemetry metrics and traces for a `Barrier`; ``idembarrier[otel]`` (the ``opentelemetry-api`` package).

`instrument` registers a barrier's outcomes with an OpenTelemetry meter and its calls with a tracer. Only
this module imports OpenTelemetry; ``import idembarrier`` does not. Without an SDK configured, the API's
meter and tracer record nothing.

Instruments (the names follow the article's ``idempotency.*`` metrics):

- ``idempotency.requests``: Counter, unit ``{request}``; attributes ``outcome`` (``executed``,
  ``replayed``, ``in_progress``, ``fingerprint_mismatch``, ``unresolved``) and ``scope``.
- ``idempotency.stale.reclaim.count``: Counter, unit ``{reclaim}``; attribute ``scope``.
- ``idempotency.late.replay.count``: Counter, unit ``{request}``; attribute ``scope``.
- ``idempotency.hit.rate``: ObservableGauge, unit ``1``; no attributes.
- ``idempotency.status.distribution``: ObservableGauge, unit ``{record}``; attribute ``status``
  (``IN_PROGRESS``, ``COMPLETED``, ``FAILED``, ``UNKNOWN``), each reported, 0 included.
- ``idempotency.in_progress.oldest.age``: ObservableGauge, unit ``s``; no attributes.
- ``idempotency.claim.wait``: Histogram, unit ``s``; attributes ``work``, ``outcome``, ``scope``.
- ``idempotency.duration``: Histogram, unit ``s``; attributes ``work``, ``outcome``, ``scope``.

- ``idempotency.requests`` counts each call to `Barrier.unit_of_work` or `Barrier.leased` once, by how it
  ended at its claim (`Outcome`). The hit rate of any window or scope is one division:
  ``replayed / (executed + replayed)``.
- ``idempotency.stale.reclaim.count`` counts stale leases taken over; such a call is also counted under
  ``idempotency.requests`` with its own outcome.
- ``idempotency.late.replay.count`` counts requests that found only a compact record (their response past
  retention) under the ``reject`` policy (refused; counted here only) and the ``alert`` policy (run again;
  also counted under ``idempotency.requests`` as ``executed``). ``allow`` runs them again uncounted.
- ``idempotency.hit.rate`` is that division over this process's calls since `instrument` (no value until
  a call executed or replayed).
- ``idempotency.status.distribution`` and ``idempotency.in_progress.oldest.age`` describe the whole table
  (every process). The age is measured on the database clock and is 0 when no record is IN_PROGRESS.

- ``idempotency.claim.wait`` is each call's wait for its claim's answer: from the call's beginning until it
  held the key, found the record to replay, or was refused; a concurrent holder's time included.
- ``idempotency.duration`` is each call's whole length, to its commit or rollback (a lease: to its block's
  end). ``work`` is ``unit_of_work`` or ``lease``; ``outcome`` is the call's `Outcome`, or ``error`` when
  the database failed the claim.

Each call is one span, ``idembarrier.unit_of_work`` or ``idembarrier.lease`` (kind INTERNAL), a child of the
span current where the call ends (the request's, say). It is recorded when the call ends, with the times it
began and ended, so spans the body opens are its siblings, not its children. Its attributes:
``idempotency.scope``, ``idempotency.outcome``, ``idempotency.attempt``, ``idempotency.key_hash`` (see
`idembarrier.key_hash`: never the key), ``idempotency.waited`` and, when the call ended cleanly,
``idempotency.status``; a lease that took a stale lease over has ``idempotency.reclaimed``. Its events:
``claimed`` when the claim answered and ``body_ended`` when the body ended (the commit or rollback began; a
lease's ``finish()``). A call that ended with an exception has status ERROR, described by the exception's
type, and an ``exception`` event with ``exception.type`` only: exception messages name the key.

The table gauges are read with one query (`Barrier.stats`). OpenTelemetry calls observable callbacks
synchronously, from the exporter's thread, where no query can be awaited; so the callbacks report the last
reading kept in memory, and `Instrumentation.refresh` or `Instrumentation.running` renews it. They are
therefore as stale as the refresh interval, and report nothing before the first reading or after a
failed one.

Keep the ``scope`` attribute's cardinality bounded: scopes should name operations or consumer groups, not
users.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Generic

import anyio
from opentelemetry import metrics, trace
from typing_extensions import TypeVar

from . import __version__
from ._codec import JSON
from ._exceptions import ConfigurationError
from ._metrics import Outcome
from ._record import Status

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from ._barrier import Barrier
    from ._metrics import Stats
    from ._observe import Observation

__all__ = ["Instrumentation", "instrument"]

logger = logging.getLogger(__name__)

R = TypeVar("R", default=JSON)

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""The histograms' bucket boundaries, in seconds: a millisecond claim to a lease's minute."""


class Instrumentation(Generic[R]):
    """The instruments of one barrier, and the last reading of its table; made by `instrument`.

    Attributes:
        barrier: The barrier observed.
    """

    def __init__(self, barrier: Barrier[R], meter: metrics.Meter, tracer: trace.Tracer) -> None:
        self.barrier = barrier
        self._tracer = tracer
        self._reading: Stats | None = None
        self._outcomes: Counter[Outcome] = Counter()
        self._requests = meter.create_counter(
            "idempotency.requests",
            unit="{request}",
            description="Calls to the barrier, by how they ended at their claim.",
        )
        self._reclaims = meter.create_counter(
            "idempotency.stale.reclaim.count",
            unit="{reclaim}",
            description="Stale leases taken over from a holder that stopped renewing them.",
        )
        self._late_replays = meter.create_counter(
            "idempotency.late.replay.count",
            unit="{request}",
            description="Requests whose key's response was past retention (only its compact record was left).",
        )
        meter.create_observable_gauge(
            "idempotency.hit.rate",
            callbacks=[self._observe_hit_rate],
            unit="1",
            description="Replayed calls over calls that executed or replayed, in this process.",
        )
        meter.create_observable_gauge(
            "idempotency.status.distribution",
            callbacks=[self._observe_statuses],
            unit="{record}",
            description="Records per status in the table, as of the last refresh.",
        )
        meter.create_observable_gauge(
            "idempotency.in_progress.oldest.age",
            callbacks=[self._observe_oldest],
            unit="s",
            description="Age of the oldest IN_PROGRESS record (0 if none), as of the last refresh.",
        )
        meter.create_observable_gauge(
            "idempotency.outbox.messages",
            callbacks=[self._observe_outbox],
            unit="{message}",
            description="Outbox messages not yet sent, by state (pending, parked), as of the last refresh.",
        )
        self._claim_wait = meter.create_histogram(
            "idempotency.claim.wait",
            unit="s",
            description="Time from a call's beginning to its claim's answer, a concurrent holder's time included.",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self._duration = meter.create_histogram(
            "idempotency.duration",
            unit="s",
            description="Time from a call's beginning to its commit or rollback (a lease: to its block's end).",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        barrier.observe(self._record)
        barrier.runtime.watch(self._watch)

    @property
    def reading(self) -> Stats | None:
        """The last reading of the table, which the gauges report; ``None`` before the first one."""
        return self._reading

    async def refresh(self) -> Stats:
        """Read the table now (one query) and keep the reading for the gauges.

        Raises:
            StorageError: The query failed; the previous reading is dropped, so the gauges go silent
                rather than report numbers that are no longer being renewed.
        """
        try:
            self._reading = await self.barrier.stats()
        except BaseException:
            self._reading = None
            raise
        return self._reading

    @asynccontextmanager
    async def running(self, *, every: float = 15.0) -> AsyncIterator[Instrumentation[R]]:
        """Refresh on entry, then every ``every`` seconds in the background until the block exits.

        The first refresh raises (a wrong database shows at start-up). Later failures are logged on the
        ``idembarrier.otel`` logger and retried at the next interval, the gauges silent meanwhile.
        """
        if every <= 0:
            raise ConfigurationError(f"every must be positive, not {every}")
        await self.refresh()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refresh_every, every)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _refresh_every(self, every: float) -> None:
        while True:
            await anyio.sleep(every)
            try:
                await self.refresh()
            except Exception:
                logger.warning("idembarrier: refreshing the table's metrics failed", exc_info=True)

    def _record(self, outcome: Outcome, scope: str) -> None:
        """Add one counted outcome to its counter (the barrier's observer)."""
        if outcome is Outcome.STALE_RECLAIM:
            self._reclaims.add(1, {"scope": scope})
            return
        if outcome is Outcome.LATE_REPLAY:
            self._late_replays.add(1, {"scope": scope})
            return
        self._outcomes[outcome] += 1
        self._requests.add(1, {"outcome": outcome.value, "scope": scope})

    def _watch(self, observation: Observation) -> None:
        """Record one call's histograms and its span (the runtime's watcher)."""
        outcome = "error" if observation.outcome is None else observation.outcome.value
        attributes = {"work": observation.work.value, "outcome": outcome, "scope": observation.scope}
        self._claim_wait.record(observation.waited, attributes)
        self._duration.record(observation.duration, attributes)
        began = int(observation.began_at * 1e9)
        span = self._tracer.start_span(
            f"idembarrier.{observation.work.value}",
            kind=trace.SpanKind.INTERNAL,
            start_time=began,
            attributes={
                "idempotency.scope": observation.scope,
                "idempotency.outcome": outcome,
                "idempotency.attempt": observation.attempt,
                "idempotency.key_hash": observation.key_hash,
                "idempotency.waited": observation.waited,
            },
        )
        if not span.is_recording():
            return
        if observation.status is not None:
            span.set_attribute("idempotency.status", observation.status.value)
        if observation.reclaimed:
            span.set_attribute("idempotency.reclaimed", True)
        span.add_event("claimed", timestamp=began + int(observation.waited * 1e9))
        if observation.body_ended is not None:
            span.add_event("body_ended", timestamp=began + int(observation.body_ended * 1e9))
        ended = began + int(observation.duration * 1e9)
        if observation.error is not None:
            span.add_event("exception", {"exception.type": observation.error}, timestamp=ended)
            span.set_status(trace.Status(trace.StatusCode.ERROR, observation.error))
        span.end(end_time=ended)

    def _observe_hit_rate(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        hits, runs = self._outcomes[Outcome.REPLAYED], self._outcomes[Outcome.EXECUTED]
        return [metrics.Observation(hits / (hits + runs))] if hits + runs else []

    def _observe_statuses(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        if (reading := self._reading) is None:
            return []
        # Every status is reported, 0 included, so a status that empties out drops to 0 on dashboards.
        return [metrics.Observation(reading.statuses.get(status, 0), {"status": status.value}) for status in Status]

    def _observe_outbox(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        if (reading := self._reading) is None:
            return []
        waiting = reading.outbox_pending - reading.outbox_parked
        return [
            metrics.Observation(waiting, {"state": "pending"}),
            metrics.Observation(reading.outbox_parked, {"state": "parked"}),
        ]

    def _observe_oldest(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        if (reading := self._reading) is None:
            return []
        age = reading.oldest_in_progress
        return [metrics.Observation(age.total_seconds() if age is not None else 0.0)]


def instrument(
    barrier: Barrier[R], *, meter: metrics.Meter | None = None, tracer: trace.Tracer | None = None
) -> Instrumentation[R]:
    """Report ``barrier``'s outcomes, calls and table to OpenTelemetry.

    Counters are updated as calls are decided; histograms and spans as calls end. The table gauges report
    the last reading: keep it fresh with ``async with instrumentation.running(every=15.0):`` around the
    application, or ``await instrumentation.refresh()`` on a schedule of your own.

    Args:
        barrier: The barrier to observe; its outcomes are counted from now on.
        meter: Where the instruments are created; by default the global meter provider's ``idembarrier``
            meter.
        tracer: Where the spans are started; by default the global tracer provider's ``idembarrier`` tracer.

    Returns:
        The instruments and the table's last reading.
    """
    if meter is None:
        meter = metrics.get_meter("idembarrier", __version__)
    if tracer is None:
        tracer = trace.get_tracer("idembarrier", __version__)
    return Instrumentation(barrier, meter, tracer)

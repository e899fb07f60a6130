"""The phantom-write lab: the article's four failure modes, each run against naive designs and the barrier.

Every scenario writes for real to the given database (its own tables; the records table only through the
barrier), in one process: concurrency is a task group, a crash is an exception raised between two commits (or
inside a unit of work), and a late replay comes after a fake clock moved past a TTL cache's window. Each
design's business writes are then counted per key: a *duplicate* is a write beyond the first, a *lost* write
one that never happened although its request was acknowledged or refused for good.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
from sqlalchemy import Integer, MetaData, String, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .._barrier import Barrier
from .._migrate import upgrade
from ._engine import create_engine

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["DesignResult", "LabReport", "ScenarioResult", "format_report", "run_lab"]

TTL = timedelta(hours=24)
LAG = timedelta(hours=26)


class _Base(DeclarativeBase):
    metadata = MetaData()


class LabWrite(_Base):
    """A business write made by one of the lab's designs: one row per write that actually happened."""

    __tablename__ = "idembarrier_lab_writes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run: Mapped[str] = mapped_column(String(32), index=True)
    design: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    step: Mapped[str] = mapped_column(String(32))


class LabClaim(_Base):
    """A naive design's idempotency key. No unique constraint: the naive designs rely on their check."""

    __tablename__ = "idembarrier_lab_claims"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run: Mapped[str] = mapped_column(String(32), index=True)
    design: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))


class _SimulatedCrashError(Exception):
    """Raised where the lab's process dies: between two commits, or in the middle of a unit of work."""


@dataclass(frozen=True)
class DesignResult:
    """The business writes of one design in one scenario."""

    design: str
    barrier: bool
    expected: int
    written: int
    duplicates: int
    lost: int

    @property
    def phantom_writes(self) -> int:
        """Duplicate plus lost writes."""
        return self.duplicates + self.lost


@dataclass(frozen=True)
class ScenarioResult:
    """One failure mode, and what each design made of it."""

    name: str
    title: str
    designs: tuple[DesignResult, ...]
    unit: str = "payment rows"
    """What the counts count."""
    expected_is: str = ""
    """Why the expected count is what it is."""
    produced_by: str = ""
    """How the failure is produced (all of them in this one process: nothing is really killed or raced)."""


@dataclass
class LabReport:
    """The lab's four scenarios on one database."""

    database: str
    scenarios: list[ScenarioResult] = field(default_factory=list)
    real: bool = False
    """Whether crashes and races were real processes (``--real``), not simulated in one."""
    broker: str | None = None
    """With ``real``, the Kafka-protocol broker the layer mismatch went through (else an in-process one)."""

    @property
    def ok(self) -> bool:
        """Whether the barrier made no duplicate and lost no write in any scenario."""
        return all(d.phantom_writes == 0 for s in self.scenarios for d in s.designs if d.barrier)

    def to_json(self) -> dict[str, object]:
        """The report as JSON-ready data."""
        return {
            "database": self.database,
            "real": self.real,
            "broker": self.broker,
            "ok": self.ok,
            "scenarios": [
                {
                    "name": s.name,
                    "title": s.title,
                    "unit": s.unit,
                    "expected_is": s.expected_is,
                    "produced_by": s.produced_by,
                    "designs": [{**vars(d), "phantom_writes": d.phantom_writes} for d in s.designs],
                }
                for s in self.scenarios
            ],
        }


class _Lab:
    """One lab run: its engine, barrier, run id and the helpers its designs share."""

    def __init__(self, engine: AsyncEngine, *, keys: int, concurrency: int, run: str | None = None) -> None:
        self.engine = engine
        self.barrier: Barrier = Barrier(async_sessionmaker(engine, expire_on_commit=False))
        # Scopes and rows of this run only, so reruns on one database stay apart (a worker process joins one).
        self.run = run or uuid.uuid4().hex
        self.keys = [f"payment-{i}" for i in range(keys)]
        self.concurrency = concurrency

    def scope(self, design: str) -> str:
        return f"lab-{self.run}-{design}"

    def add(self, session: AsyncSession, design: str, key: str, step: str = "payment") -> None:
        """Write through a unit of work's session."""
        session.add(LabWrite(run=self.run, design=design, key=key, step=step))

    async def write(self, design: str, key: str, step: str = "payment", *, claim: str | None = None) -> None:
        """Write in a transaction of its own (with the naive claim row when ``claim`` is given)."""
        async with self.engine.begin() as conn:
            await conn.execute(insert(LabWrite).values(run=self.run, design=design, key=key, step=step))
            if claim is not None:
                await conn.execute(insert(LabClaim).values(run=self.run, design=design, key=key, status=claim))

    async def claim(self, design: str, key: str) -> None:
        """Commit a naive IN_PROGRESS claim in its own transaction."""
        async with self.engine.begin() as conn:
            values = {"run": self.run, "design": design, "key": key, "status": "IN_PROGRESS"}
            await conn.execute(insert(LabClaim).values(**values))

    async def finish(self, design: str, key: str) -> None:
        """Mark a naive claim COMPLETED in its own transaction."""
        async with self.engine.begin() as conn:
            mine = (LabClaim.run == self.run) & (LabClaim.design == design) & (LabClaim.key == key)
            await conn.execute(update(LabClaim).where(mine).values(status="COMPLETED"))

    async def claim_status(self, design: str, key: str) -> str | None:
        """The naive check: the key's claim status, or None."""
        async with self.engine.connect() as conn:
            mine = (LabClaim.run == self.run) & (LabClaim.design == design) & (LabClaim.key == key)
            return (await conn.execute(select(LabClaim.status).where(mine).limit(1))).scalar_one_or_none()

    async def once(self, design: str, key: str, step: str = "payment", *, layer: str = "", crash: bool = False) -> None:
        """The barrier's way: the write and the record in one unit of work (crashing after the write if asked)."""
        async with self.barrier.unit_of_work(key, scope=self.scope(design + layer)) as uow:
            if uow.replayed:
                return
            self.add(uow.session, design, key, step)
            await uow.session.flush()  # the write has reached the database when the crash comes
            if crash:
                raise _SimulatedCrashError
            uow.complete({"key": key})

    async def tally(
        self, design: str, label: str, *, barrier: bool, steps: tuple[str, ...] = ("payment",)
    ) -> DesignResult:
        """Count the design's writes against one per key and step."""
        query = select(LabWrite.key, LabWrite.step, func.count()).where(
            LabWrite.run == self.run, LabWrite.design == design
        )
        async with self.engine.connect() as conn:
            counts = {(k, s): n for k, s, n in (await conn.execute(query.group_by(LabWrite.key, LabWrite.step))).all()}
        expected = [(key, step) for key in self.keys for step in steps]
        return DesignResult(
            design=label,
            barrier=barrier,
            expected=len(expected),
            written=sum(counts.values()),
            duplicates=sum(max(counts.get(pair, 0) - 1, 0) for pair in expected),
            lost=sum(1 for pair in expected if pair not in counts),
        )


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, by: timedelta) -> None:
        self.now += by.total_seconds()


class _TTLCache:
    """The usual Redis-style idempotency store: keys evicted once their TTL has passed."""

    def __init__(self, clock: _FakeClock, ttl: timedelta) -> None:
        self._clock, self._ttl = clock, ttl.total_seconds()
        self._entries: dict[str, float] = {}

    def __contains__(self, key: str) -> bool:
        return self._entries.get(key, float("-inf")) > self._clock.now

    def add(self, key: str) -> None:
        self._entries[key] = self._clock.now + self._ttl


async def _ttl_expiry(lab: _Lab) -> ScenarioResult:
    """Each request, a retry within the TTL, then a replay 26 h later (a consumer lagging behind)."""
    clock = _FakeClock()
    cache = _TTLCache(clock, TTL)

    async def naive(key: str) -> None:
        if key not in cache:
            await lab.write("ttl/naive", key)
            cache.add(key)

    async def barrier(key: str) -> None:
        await lab.once("ttl/barrier", key)

    handlers = (naive, barrier)
    for handle in handlers:
        for key in lab.keys * 2:
            await handle(key)
    clock.advance(LAG)  # the barrier never reads this clock: expiry is cleanup's business, not deduplication's
    for handle in handlers:
        for key in lab.keys:
            await handle(key)
    return ScenarioResult(
        "ttl-expiry",
        f"TTL expiry: a replay {LAG.total_seconds() / 3600:g} h later",
        (
            await lab.tally(
                "ttl/naive", f"naive: in-memory TTL cache ({TTL.total_seconds() / 3600:g} h)", barrier=False
            ),
            await lab.tally("ttl/barrier", "barrier: database record", barrier=True),
        ),
        expected_is=f"{len(lab.keys)} payments, one per key, each sent twice, then once more after the lag",
        produced_by=f"a fake clock moved {LAG.total_seconds() / 3600:g} h forward between the sends",
    )


async def _naive_partial(
    lab: _Lab, design: str, key: str, *, on_in_progress: Literal["refuse", "rerun"], crash_after: str | None
) -> None:
    """Claim, write and finish in three transactions; a retry meeting IN_PROGRESS refuses or runs again."""
    status = await lab.claim_status(design, key)
    if status == "COMPLETED" or (status == "IN_PROGRESS" and on_in_progress == "refuse"):
        return  # a replay, or a 409 that no retry will ever get past
    if status is None:
        await lab.claim(design, key)
    if crash_after == "claim":
        raise _SimulatedCrashError
    await lab.write(design, key)
    if crash_after == "write":
        raise _SimulatedCrashError
    await lab.finish(design, key)


async def _partial_execution(lab: _Lab) -> ScenarioResult:
    """A crash between two commits, then a retry; each naive policy meets the crash point that defeats it."""
    policies: tuple[tuple[Literal["refuse", "rerun"], str], ...] = (("refuse", "claim"), ("rerun", "write"))
    for key in lab.keys:
        for on_in_progress, crash_after in policies:
            design = f"partial/naive-{on_in_progress}"
            for crash in (crash_after, None):
                with contextlib.suppress(_SimulatedCrashError):
                    await _naive_partial(lab, design, key, on_in_progress=on_in_progress, crash_after=crash)
        for crash_barrier in (True, False):
            with contextlib.suppress(_SimulatedCrashError):
                await lab.once("partial/barrier", key, crash=crash_barrier)
    return await partial_result(
        lab,
        "a crash between commits",
        "an exception raised where the process would die (after the claim's commit, or mid-work)",
    )


async def partial_result(lab: _Lab, crash: str, produced_by: str) -> ScenarioResult:
    """The partial-execution scenario's tally, the ``crash`` named in its title."""
    return ScenarioResult(
        "partial-execution",
        f"Partial execution: {crash}, then a retry",
        (
            await lab.tally("partial/naive-refuse", "naive: claim committed apart; retry refuses", barrier=False),
            await lab.tally("partial/naive-rerun", "naive: claim committed apart; retry reruns", barrier=False),
            await lab.tally("partial/barrier", "barrier: one unit of work", barrier=True),
        ),
        expected_is=f"{len(lab.keys)} payments, one per key; the first attempt dies, its retry must write it",
        produced_by=produced_by,
    )


async def _naive_burst(lab: _Lab, design: str, key: str) -> None:
    """N concurrent SELECT-then-INSERT requests whose checks all happen before the first insert."""
    checked = 0
    all_checked = anyio.Event()

    async def request() -> None:
        nonlocal checked
        found = await lab.claim_status(design, key)
        checked += 1
        if checked == lab.concurrency:
            all_checked.set()
        await all_checked.wait()  # requests arriving within milliseconds: every check precedes every insert
        if found is None:
            await lab.write(design, key, claim="COMPLETED")

    async with anyio.create_task_group() as burst:
        for _ in range(lab.concurrency):
            burst.start_soon(request)


async def _concurrent_race(lab: _Lab) -> ScenarioResult:
    """N concurrent requests on one key, per key."""
    for key in lab.keys:
        await _naive_burst(lab, "race/naive", key)
        async with anyio.create_task_group() as burst:
            for _ in range(lab.concurrency):
                burst.start_soon(lab.once, "race/barrier", key)
    return await race_result(
        lab, "requests", "concurrent tasks on one event loop whose checks all run before the first insert"
    )


async def race_result(lab: _Lab, senders: str, produced_by: str) -> ScenarioResult:
    """The race scenario's tally; ``senders`` says what sent each key at once (requests, processes)."""
    return ScenarioResult(
        "concurrent-race",
        f"Concurrent check race: {lab.concurrency} {senders} at once per key",
        (
            await lab.tally("race/naive", "naive: SELECT then INSERT", barrier=False),
            await lab.tally("race/barrier", "barrier: atomic claim", barrier=True),
        ),
        expected_is=f"{len(lab.keys)} payments, one per key, each sent by {lab.concurrency} {senders} at once",
        produced_by=produced_by,
    )


@dataclass(frozen=True)
class _Event:
    headers: dict[str, str]
    order: str


async def _layer(lab: _Lab, design: str, *, consumer_barrier: bool) -> None:
    """The API behind the barrier publishes an event; the broker delivers each event twice."""
    broker: list[_Event] = []

    async def api(key: str) -> None:
        async with lab.barrier.unit_of_work(key, scope=lab.scope(f"{design}/api")) as uow:
            if uow.replayed:
                return
            lab.add(uow.session, design, key, "order")
            uow.complete({"order": key})
        broker.append(_Event(headers={"idempotency-key": key}, order=key))  # published after the commit

    async def consume(event: _Event) -> None:
        if consumer_barrier:
            await lab.once(design, event.headers["idempotency-key"], "shipment", layer="/consumer")
        else:
            await lab.write(design, event.order, "shipment")

    for key in lab.keys:
        await api(key)
        await api(key)  # the client's retry: replayed at the API
    for event in list(broker):
        await consume(event)
        await consume(event)  # at-least-once: redelivered after a lost acknowledgement


async def _layer_mismatch(lab: _Lab) -> ScenarioResult:
    """API-level deduplication in front of a consumer that receives each event twice."""
    await _layer(lab, "layer/naive", consumer_barrier=False)
    await _layer(lab, "layer/barrier", consumer_barrier=True)
    return await layer_result(lab, "an in-process broker that delivers each event twice (an acknowledgement lost)")


async def layer_result(lab: _Lab, produced_by: str) -> ScenarioResult:
    """The layer-mismatch scenario's tally: orders by the API, shipments by the consumer."""
    steps = ("order", "shipment")
    return ScenarioResult(
        "layer-mismatch",
        "Layer mismatch: a redelivered event behind an idempotent API",
        (
            await lab.tally("layer/naive", "naive: barrier at the API only", barrier=False, steps=steps),
            await lab.tally("layer/barrier", "barrier: API and consumer, key as header", barrier=True, steps=steps),
        ),
        unit="order + shipment rows",
        expected_is=f"{len(lab.keys)} orders written by the API and {len(lab.keys)} shipments by the consumer",
        produced_by=produced_by,
    )


_SCENARIOS: tuple[tuple[str, Callable[[_Lab], Awaitable[ScenarioResult]]], ...] = (
    ("TTL expiry", _ttl_expiry),
    ("partial execution", _partial_execution),
    ("concurrent check race", _concurrent_race),
    ("layer mismatch", _layer_mismatch),
)


def _scenarios(
    url: str, *, real: bool, broker: str | None
) -> list[tuple[str, Callable[[_Lab], Awaitable[ScenarioResult]]]]:
    """The four scenarios, with ``real`` ones where processes (and a broker, if given) produce the failures."""
    if not real:
        return list(_SCENARIOS)
    from . import _lab_real

    real_ones: dict[str, Callable[[_Lab], Awaitable[ScenarioResult]]] = {
        "partial execution": lambda lab: _lab_real.partial_execution(lab, url),
        "concurrent check race": lambda lab: _lab_real.concurrent_race(lab, url),
    }
    if broker is not None:
        real_ones["layer mismatch"] = lambda lab: _lab_real.layer_mismatch(lab, broker)
    return [(name, real_ones.get(name, scenario)) for name, scenario in _SCENARIOS]


async def run_lab(
    database_url: str | None = None,
    *,
    keys: int = 3,
    concurrency: int = 8,
    on_progress: Callable[[str], object] | None = None,
    real: bool = False,
    broker: str | None = None,
) -> LabReport:
    """Run the four scenarios against naive designs and the barrier, and count their phantom writes.

    Args:
        database_url: Where to run (default: a temporary SQLite file).
        keys: Distinct requests per scenario.
        concurrency: Concurrent copies of each request in the race.
        on_progress: Called with a line before each scenario.
        real: Crash and race with real OS processes (`idembarrier.cli._lab_real`).
        broker: With ``real``, a Kafka-protocol broker (``host:port``) for the layer mismatch.
    """
    with tempfile.TemporaryDirectory(prefix="idembarrier-lab-") as tmp:
        url = database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'lab.db'}"
        engine = create_engine(url)
        try:
            await upgrade(engine)
            async with engine.begin() as conn:
                await conn.run_sync(_Base.metadata.create_all)
            lab = _Lab(engine, keys=keys, concurrency=concurrency)
            database = engine.url.render_as_string(hide_password=True)
            report = LabReport(database=database, real=real, broker=broker if real else None)
            simulated = dict(_SCENARIOS)
            for index, (name, scenario) in enumerate(_scenarios(url, real=real, broker=broker), start=1):
                if on_progress is not None:
                    how = "" if scenario is simulated[name] else " (real)"
                    on_progress(f"[{index}/{len(_SCENARIOS)}] {name}{how}")
                report.scenarios.append(await scenario(lab))
            return report
        finally:
            await engine.dispose()


def format_report(report: LabReport) -> str:
    """Render the report as a table, one row per design."""
    header = f"{'design':<46}{'expected':>9}{'written':>9}{'duplicate':>11}{'lost':>6}"
    lines = [f"database: {report.database}", ""]
    for number, scenario in enumerate(report.scenarios, start=1):
        lines += [f"{number}. {scenario.title} (counts: {scenario.unit})"]
        if scenario.expected_is:
            lines.append(f"   expected: {scenario.expected_is}")
        if scenario.produced_by:
            lines.append(f"   the failure: {scenario.produced_by}")
        lines.append(f"   {header}")
        lines += [
            f"   {d.design:<46}{d.expected:>9}{d.written:>9}{d.duplicates:>11}{d.lost:>6}" for d in scenario.designs
        ]
        lines.append("")
    naive = [d for s in report.scenarios for d in s.designs if not d.barrier]
    duplicates, lost = sum(d.duplicates for d in naive), sum(d.lost for d in naive)
    lines.append(f"naive designs: {duplicates} duplicate rows (extra writes) and {lost} lost rows (never written)")
    lines.append(
        "crashes were SIGKILLed processes and races separate processes (--real); the TTL's clock is simulated"
        + ("" if report.broker else ", and the layer mismatch's broker is in this process (--broker for a real one)")
        if report.real
        else "every failure above is simulated in this one process; --real kills and races real processes"
    )
    lines.append(
        "OK: the barrier made no duplicate and lost no write"
        if report.ok
        else "FAILED: the barrier let phantom writes through"
    )
    return "\n".join(lines)

"""Reconciliation: keys in doubt looked up with a fake provider ledger and resolved or escalated, never guessed.

The fake provider is a real table (``provider_ledger``) in the test database: leased work "calls out" by
inserting its downstream key there, in a transaction of its own, and then dies at a chosen point (its body
raises and abandons the lease, or its process is SIGKILLed). Each crashed key is then turned UNKNOWN the way
production does it (a retry past ``max_reclaims``), and the report of `reconcile` is checked against the
ledger, key by key and in total.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from idembarrier import (
    JSON,
    Barrier,
    ConfigurationError,
    ProviderAnswer,
    ProviderStatus,
    Reconciliation,
    ReconciliationRequiredError,
    Record,
    Status,
    Verdict,
    create_sqlite_engine,
    downstream_key,
    reconcile,
)
from tests._cli import run_async
from tests.conftest import prepare as prepare_schema
from tests.helpers import new_key
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent
SCOPE = "charges"
LEASE = timedelta(milliseconds=200)


class Timing(TypedDict):
    min_age: timedelta
    confirm_after: timedelta | None


NOW = Timing(min_age=timedelta(0), confirm_after=timedelta(0))
"""Options for a test that wants the provider's answers taken as they come (no age, an immediate re-ask)."""

LEDGER = Table(
    "provider_ledger",
    MetaData(),
    Column("downstream_key", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("amount", Integer, nullable=False),
)
CRASH_POINTS = ("before_call", "after_call", "after_checkpoint", "in_finish", None)
"""Where leased work dies: before calling out, right after, after checkpointing the call, inside its
fenced completion (the business writes rolled back), or not at all."""


class Crash(Exception):
    """The holder dies here: its lease is left to expire, as a killed process leaves it."""


class Ledger:
    """The fake provider: a ledger table keyed by downstream key, with a lookup that counts its calls.

    Args:
        engine: Where the ledger table is.
        failing: Downstream keys whose lookup raises (the provider is down for them).
        hidden_once: Downstream keys the first lookup does not find (an eventually consistent provider).
    """

    def __init__(self, engine: AsyncEngine, *, failing: Iterable[str] = (), hidden_once: Iterable[str] = ()) -> None:
        self.engine = engine
        self.failing = set(failing)
        self.hidden_once = set(hidden_once)
        self.asked: Counter[str] = Counter()

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(LEDGER.metadata.create_all)

    async def charge(self, key: str, status: ProviderStatus, amount: int) -> None:
        """The external call: the provider records the operation under its downstream key, and commits."""
        async with self.engine.begin() as conn:
            await conn.execute(insert(LEDGER).values(downstream_key=key, status=status.value, amount=amount))

    async def entries(self) -> dict[str, tuple[ProviderStatus, int]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(LEDGER))).all()
        return {row.downstream_key: (ProviderStatus(row.status), row.amount) for row in rows}

    async def lookup(self, downstream_key: str) -> ProviderAnswer | None:
        """What the ledger holds under ``downstream_key``."""
        self.asked[downstream_key] += 1
        if downstream_key in self.failing:
            raise ConnectionError("provider unreachable")
        if downstream_key in self.hidden_once and self.asked[downstream_key] == 1:
            return None
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(LEDGER).where(LEDGER.c.downstream_key == downstream_key))).first()
        if row is None:
            return None
        return ProviderAnswer(status=ProviderStatus(row.status), amount=row.amount, reference=f"ref-{downstream_key}")


def intended_amount(record: Record) -> int | None:
    """The amount the holder checkpointed before calling out (``amount_of``)."""
    if record.checkpoint_data is None:
        return None
    amount: int = json.loads(record.checkpoint_data)["amount"]
    return amount


@dataclass(frozen=True)
class Plan:
    """One key's leased work: what it would ask the provider for, and where it dies."""

    key: str
    amount: int
    status: ProviderStatus | None  # None: the call never reaches the provider
    crash: str | None


def plans(seed: int, extra: int = 10) -> list[Plan]:
    """Every pairing of provider outcome and crash point once, plus ``extra`` random ones, in random order."""
    rng = random.Random(seed)
    outcomes = [*ProviderStatus, None]
    pairs = list(itertools.product(outcomes, CRASH_POINTS))
    pairs += [(rng.choice(outcomes), rng.choice(CRASH_POINTS)) for _ in range(extra)]
    rng.shuffle(pairs)
    return [Plan(new_key(), rng.randrange(100, 100_000), status, crash) for status, crash in pairs]


async def work(barrier: Barrier, ledger: Ledger, plan: Plan, park: Callable[[], Awaitable[None]]) -> None:
    """The leased work of ``plan``: checkpoint the intent, call out, checkpoint, finish; ``park()`` where it dies."""
    async with barrier.leased(plan.key, scope=SCOPE, lease=LEASE, max_reclaims=0) as lease:
        await lease.checkpoint("calling", {"amount": plan.amount})
        if plan.crash == "before_call":
            await park()
        if plan.status is not None:
            await ledger.charge(lease.downstream_key, plan.status, plan.amount)
        if plan.crash == "after_call":
            await park()
        await lease.checkpoint("called", {"amount": plan.amount})
        if plan.crash == "after_checkpoint":
            await park()
        async with lease.finish() as uow:
            uow.session.add(Payment(key=plan.key, amount=plan.amount))
            await uow.session.flush()
            if plan.crash == "in_finish":
                await park()
            uow.complete({"amount": plan.amount, "by": "holder"})


async def crash() -> None:
    raise Crash


async def turn_unknown(barrier: Barrier, keys: set[str]) -> None:
    """Once every key's lease has run out (database clock), retry each: past max_reclaims=0 it turns UNKNOWN."""
    with anyio.fail_after(20):
        while {u.record.key for u in await barrier.unresolved(limit=1000)} != keys:  # noqa: ASYNC110 - a clock
            await anyio.sleep(0.05)  # waiting for the database's clock to pass the leases' end
    for key in keys:
        with pytest.raises(ReconciliationRequiredError):
            async with barrier.leased(key, scope=SCOPE, max_reclaims=0, wait_timeout=30):
                pytest.fail("a retry ran the work of a key that needs reconciliation")


def expected(entry: tuple[ProviderStatus, int] | None, failing: bool) -> Verdict:
    """The verdict the ledger calls for: the provider's word when it can give one, FAILED when it has none."""
    if failing or (entry is not None and entry[0] is ProviderStatus.PENDING):
        return Verdict.ESCALATED
    if entry is None or entry[0] is ProviderStatus.FAILED:
        return Verdict.FAILED
    return Verdict.COMPLETED


async def check_against_the_ledger(
    barrier: Barrier, ledger: Ledger, crashed: list[Plan], report: Reconciliation
) -> None:
    """Every crashed key resolved or escalated as the ledger says; the report's totals are the ledger's."""
    entries = await ledger.entries()
    by_key = {k.record.key: k for k in report.keys}
    assert sorted(by_key) == sorted(p.key for p in crashed)  # each UNKNOWN key exactly once, no other
    want = {
        p.key: expected(entries.get(downstream_key(SCOPE, p.key)), downstream_key(SCOPE, p.key) in ledger.failing)
        for p in crashed
    }
    assert {key: k.verdict for key, k in by_key.items()} == want
    amounts = {p.key: p.amount for p in crashed}
    for verdict in Verdict:
        assert report.amount(verdict) == sum(amounts[key] for key, v in want.items() if v is verdict), verdict
    assert report.in_doubt_amount == sum(amounts[key] for key, v in want.items() if v is Verdict.ESCALATED)
    assert report.in_doubt_unknown == 0
    assert report.ok is (Verdict.ESCALATED not in want.values())
    # The table agrees: resolved keys replay their outcome, escalated ones are still UNKNOWN and listed.
    for key, verdict in want.items():
        record = await barrier.inspect(key, scope=SCOPE)
        assert record is not None
        assert record.status.value == (Status.UNKNOWN.value if verdict is Verdict.ESCALATED else verdict.value)
    assert {u.record.key for u in await barrier.unresolved()} == {k for k, v in want.items() if v is Verdict.ESCALATED}
    # "Not found" was asked twice before it was believed; a found answer once (unless hidden the first time).
    for p in crashed:
        dk = downstream_key(SCOPE, p.key)
        twice = dk not in ledger.failing and (dk not in entries or dk in ledger.hidden_once)
        assert ledger.asked[dk] == (2 if twice else 1), p


def chosen(plans: list[Plan], rng: random.Random, share: float) -> set[str]:
    return {downstream_key(SCOPE, p.key) for p in plans if rng.random() < share}


@pytest.mark.parametrize("seed", [16, 61])
async def test_keys_of_work_abandoned_at_random_points_are_resolved_as_the_ledger_says(db: Database, seed: int) -> None:
    """Leased work dies at every point after (and before) its call; each UNKNOWN key ends as the ledger says."""
    all_plans, rng = plans(seed), random.Random(seed + 1)
    ledger = Ledger(db.engine, failing=chosen(all_plans, rng, 0.1), hidden_once=chosen(all_plans, rng, 0.2))
    await ledger.create()
    barrier = Barrier(db.sessionmaker)
    for plan in all_plans:
        with contextlib.suppress(Crash):
            await work(barrier, ledger, plan, crash)
    crashed = [p for p in all_plans if p.crash is not None]
    await turn_unknown(barrier, {p.key for p in crashed})
    report = await reconcile(barrier, ledger, amount_of=intended_amount, **NOW)
    await check_against_the_ledger(barrier, ledger, crashed, report)
    assert report.dry_run is False
    assert (report.stale_leases_left, report.limit_reached) == (0, False)
    for plan in all_plans:  # the business rows: only the work that finished wrote one
        assert await db.payments(plan.key) == (plan.crash is None)
    done = next(k for k in report.keys if k.verdict is Verdict.COMPLETED)
    async with barrier.leased(done.record.key, scope=SCOPE) as retry:  # a retry replays the provider's word
        assert retry.replayed
        assert retry.response == {
            "reconciled": True,
            "downstream_key": done.downstream_key,
            "provider_status": "SUCCEEDED",
            "amount": done.amount,
            "reference": f"ref-{done.downstream_key}",
        }
    again = await reconcile(barrier, ledger, amount_of=intended_amount, **NOW)  # a second run: the escalated only
    assert {k.record.key for k in again.keys} == {k.record.key for k in report.keys if k.verdict is Verdict.ESCALATED}


# argv: database URL, the plans as JSON. Runs each plan in turn (those that die park there, their lease
# held, in a task of their own), prints "ready" once all have run or parked, and waits to be killed.
CHILD = """
import json, sys
import anyio
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from idembarrier import Barrier, ProviderStatus, create_sqlite_engine
from tests.test_reconcile import Ledger, Plan, work

async def main(url, planned):
    engine = create_sqlite_engine(url) if url.startswith("sqlite") else create_async_engine(url)
    barrier, ledger = Barrier(async_sessionmaker(engine)), Ledger(engine)
    async with anyio.create_task_group() as group:
        for key, amount, status, crash in json.loads(planned):
            plan = Plan(key, amount, None if status is None else ProviderStatus(status), crash)
            parked = anyio.Event()

            async def park(parked=parked):
                parked.set()
                await anyio.sleep_forever()

            async def run(plan=plan, park=park, parked=parked):
                await work(barrier, ledger, plan, park)
                parked.set()

            group.start_soon(run)
            await parked.wait()
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)

anyio.run(main, *sys.argv[1:])
"""


async def test_keys_of_work_killed_with_sigkill_are_resolved_as_the_ledger_says(db: Database) -> None:
    """A process SIGKILLed with leased work at every point around its call: each key settles as the ledger says."""
    planned = plans(7, extra=0)
    # One holder at most inside its completion, and last: on SQLite it holds the database's write lock.
    planned = [p for p in planned if p.crash != "in_finish"] + [next(p for p in planned if p.crash == "in_finish")]
    ledger = Ledger(db.engine, failing={downstream_key(SCOPE, planned[0].key)})
    await ledger.create()
    argv = json.dumps([[p.key, p.amount, None if p.status is None else p.status.value, p.crash] for p in planned])
    process = await anyio.open_process(
        [sys.executable, "-c", CHILD, db.url, argv], cwd=ROOT, stdin=subprocess.PIPE, stderr=None
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(60):
            line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 4096)
        assert line == b"ready"
        process.send_signal(signal.SIGKILL)
        with anyio.fail_after(30):
            assert await process.wait() == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()
    barrier = Barrier(db.sessionmaker)
    crashed = [p for p in planned if p.crash is not None]
    await turn_unknown(barrier, {p.key for p in crashed})
    report = await reconcile(barrier, ledger, amount_of=intended_amount, **NOW)
    await check_against_the_ledger(barrier, ledger, crashed, report)


# -- the rules for "not found" ----------------------------------------------------------------------------


async def unknown_key(barrier: Barrier, ledger: Ledger, status: ProviderStatus | None, amount: int = 500) -> str:
    """A key whose holder called out (when ``status`` is given) and died; turned UNKNOWN."""
    plan = Plan(new_key(), amount, status, "after_call")
    with pytest.raises(Crash):
        await work(barrier, ledger, plan, crash)
    await turn_unknown(barrier, {plan.key} | {u.record.key for u in await barrier.unresolved()})
    return plan.key


async def test_not_found_is_not_trusted_for_a_key_younger_than_min_age(db: Database) -> None:
    """A not-found answer about a key quiet for less than min_age escalates it; a found answer is trusted at once."""
    ledger = Ledger(db.engine)
    await ledger.create()
    barrier = Barrier(db.sessionmaker)
    missing = await unknown_key(barrier, ledger, None)
    found = await unknown_key(barrier, ledger, ProviderStatus.SUCCEEDED)
    report = await reconcile(barrier, ledger, confirm_after=None, amount_of=intended_amount)  # min_age 15 min
    verdicts = {k.record.key: (k.verdict, k.reason) for k in report.keys}
    assert verdicts[found] == (Verdict.COMPLETED, "the provider says it succeeded")
    assert verdicts[missing][0] is Verdict.ESCALATED
    assert verdicts[missing][1].startswith("not found, but quiet for only")
    assert (report.in_doubt_amount, report.ok) == (500, False)
    record = await barrier.inspect(missing, scope=SCOPE)
    assert record is not None
    assert record.status is Status.UNKNOWN


async def test_a_dry_run_writes_nothing_and_a_second_lookup_catches_an_eventually_consistent_provider(
    db: Database,
) -> None:
    """Believing the first "not found" would fail a charge that happened; asking again finds it."""
    ledger = Ledger(db.engine)
    await ledger.create()
    barrier = Barrier(db.sessionmaker)
    key = await unknown_key(barrier, ledger, ProviderStatus.SUCCEEDED, amount=700)
    ledger.hidden_once.add(downstream_key(SCOPE, key))
    rash = await reconcile(barrier, ledger, min_age=timedelta(0), confirm_after=None, dry_run=True)
    assert [(k.verdict, k.reason) for k in rash.keys] == [(Verdict.FAILED, "not found")]  # the danger
    assert rash.dry_run
    assert [u.record.key for u in await barrier.unresolved()] == [key]  # nothing was written
    ledger.asked.clear()
    careful = await reconcile(barrier, ledger, **NOW)
    assert [(k.verdict, k.amount) for k in careful.keys] == [(Verdict.COMPLETED, 700)]
    assert ledger.asked[downstream_key(SCOPE, key)] == 2
    assert await barrier.unresolved() == []


# -- stale leases ---------------------------------------------------------------------------------------


async def stale_lease(barrier: Barrier, ledger: Ledger, status: ProviderStatus | None) -> str:
    key = new_key()
    with pytest.raises(Crash):
        await work(barrier, ledger, Plan(key, 300, status, "after_checkpoint"), crash)
    await until_stale(barrier, key)
    return key


async def until_stale(barrier: Barrier, key: str) -> None:
    with anyio.fail_after(10):
        while not ((record := await barrier.inspect(key, scope=SCOPE)) and record.stale):  # noqa: ASYNC110 - a clock
            await anyio.sleep(0.02)  # waiting for the database's clock to pass the lease's end


async def test_stale_leases_are_left_to_their_retries_unless_included(db: Database) -> None:
    """By default a stale lease is only counted; with include_stale it is reconciled like an UNKNOWN record."""
    ledger = Ledger(db.engine)
    await ledger.create()
    barrier = Barrier(db.sessionmaker)
    key = await stale_lease(barrier, ledger, ProviderStatus.SUCCEEDED)
    left = await reconcile(barrier, ledger, **NOW)
    assert (left.keys, left.stale_leases_left, left.ok) == ((), 1, True)
    done = await reconcile(barrier, ledger, include_stale=True, **NOW)
    assert [(k.record.status, k.verdict) for k in done.keys] == [(Status.IN_PROGRESS, Verdict.COMPLETED)]
    record = await barrier.inspect(key, scope=SCOPE)
    assert record is not None
    assert record.status is Status.COMPLETED


async def test_a_stale_lease_reclaimed_while_the_provider_is_asked_is_not_resolved(db: Database) -> None:
    """The resolution is fenced by the token looked up: a reclaimer's attempt in between is never overwritten.

    The reclaimer takes the lease over while the provider is asked, calls out itself, and dies too, so the
    lease is stale again when reconciliation would resolve it: without the fence it would record FAILED on
    the strength of a "not found" that predates the reclaimer's charge.
    """
    ledger = Ledger(db.engine)
    await ledger.create()
    barrier = Barrier(db.sessionmaker)
    key = await stale_lease(barrier, ledger, None)

    class Racing(Ledger):
        async def lookup(self, downstream_key: str) -> ProviderAnswer | None:
            answer = await super().lookup(downstream_key)  # not found: nobody has called out yet
            with pytest.raises(Crash):
                async with barrier.leased(key, scope=SCOPE, lease=LEASE, max_reclaims=2) as lease:
                    assert lease.attempt == 2
                    await self.charge(lease.downstream_key, ProviderStatus.SUCCEEDED, 300)
                    raise Crash
            await until_stale(barrier, key)
            return answer

    report = await reconcile(barrier, Racing(db.engine), include_stale=True, min_age=timedelta(0), confirm_after=None)
    assert [k.verdict for k in report.keys] == [Verdict.SKIPPED]
    record = await barrier.inspect(key, scope=SCOPE)
    assert record is not None
    assert (record.status, record.attempt, record.stale) == (Status.IN_PROGRESS, 2, True)
    settled = await reconcile(barrier, ledger, include_stale=True, **NOW)  # the next run sees the charge
    assert [k.verdict for k in settled.keys] == [Verdict.COMPLETED]


# -- what cannot be settled ---------------------------------------------------------------------------------


async def test_a_provider_that_fails_hangs_or_answers_nonsense_escalates_the_key(db: Database) -> None:
    """No answer, a late answer or a malformed one leaves the key UNKNOWN, with the reason."""
    ledger = Ledger(db.engine)
    await ledger.create()
    barrier = Barrier(db.sessionmaker)
    keys = [await unknown_key(barrier, ledger, None) for _ in range(3)]
    hangs, nonsense, fails = (downstream_key(SCOPE, k) for k in keys)

    class Broken:
        async def lookup(self, downstream_key: str) -> ProviderAnswer | None:
            if downstream_key == hangs:
                await anyio.sleep_forever()
            if downstream_key == nonsense:
                return "SUCCEEDED"  # type: ignore[return-value]
            raise RuntimeError("HTTP 503\nfrom the gateway")

    report = await reconcile(barrier, Broken(), lookup_timeout=0.2, **NOW)
    reasons = {k.downstream_key: (k.verdict, k.reason) for k in report.keys}
    assert reasons == {
        hangs: (Verdict.ESCALATED, "the provider did not answer within 0.2s"),
        nonsense: (Verdict.ESCALATED, "the provider answered str, not a ProviderAnswer or None"),
        fails: (Verdict.ESCALATED, "the provider failed: RuntimeError: HTTP 503 from the gateway"),
    }
    assert (report.escalated, report.in_doubt_unknown, report.ok) == (3, 3, False)
    assert {u.record.key for u in await barrier.unresolved()} == set(keys)


async def test_the_response_hook_builds_what_replays_and_its_failure_escalates(db: Database) -> None:
    """A response hook's value is recorded and replayed; a hook that raises keeps that key in doubt."""
    ledger = Ledger(db.engine)
    await ledger.create()
    barrier = Barrier(db.sessionmaker)
    good = await unknown_key(barrier, ledger, ProviderStatus.SUCCEEDED)
    bad = await unknown_key(barrier, ledger, ProviderStatus.FAILED)

    def response(record: Record, answer: ProviderAnswer | None) -> JSON:
        if record.key == bad:
            raise ValueError("no template for declines")
        assert answer is not None
        return {"charge": answer.reference}

    report = await reconcile(barrier, ledger, response=response, **NOW)
    verdicts = {k.record.key: (k.verdict, k.reason) for k in report.keys}
    assert verdicts[good] == (Verdict.COMPLETED, "the provider says it succeeded")
    assert verdicts[bad] == (
        Verdict.ESCALATED,
        "the provider says it failed, but its response could not be built: ValueError: no template for declines",
    )
    async with barrier.leased(good, scope=SCOPE) as retry:
        assert retry.response == {"charge": f"ref-{downstream_key(SCOPE, good)}"}


@pytest.mark.parametrize(
    "options",
    [
        {"min_age": timedelta(seconds=-1)},
        {"confirm_after": timedelta(seconds=-1)},
        {"limit": 0},
        {"concurrency": 0},
        {"lookup_timeout": 0},
    ],
)
async def test_unusable_options_are_refused_before_any_lookup(sqlite_db: Database, options: dict[str, object]) -> None:
    """Bad options raise ConfigurationError; the provider is never asked."""
    ledger = Ledger(sqlite_db.engine)
    with pytest.raises(ConfigurationError):
        await reconcile(Barrier(sqlite_db.sessionmaker), ledger, **options)  # type: ignore[arg-type]
    assert ledger.asked == Counter()


# -- the command line ------------------------------------------------------------------------------------


class Answers:
    """A provider from a dict, for the command line: ``ANSWERS[downstream_key]`` is its answer."""

    async def lookup(self, downstream_key: str) -> ProviderAnswer | None:
        """The answer set for ``downstream_key``, else not found."""
        return ANSWERS.get(downstream_key)

    def amount_of(self, record: Record) -> int | None:
        """The amount the holder checkpointed."""
        return intended_amount(record)


ANSWERS: dict[str, ProviderAnswer] = {}
PROVIDER = Answers()


def from_environment() -> Answers:
    """A factory, as ``--provider`` takes one: the answers come from IDEMBARRIER_TEST_ANSWERS (JSON)."""
    for key, (status, amount) in json.loads(os.environ["IDEMBARRIER_TEST_ANSWERS"]).items():
        ANSWERS[key] = ProviderAnswer(status=ProviderStatus(status), amount=amount)
    return Answers()


async def test_reconcile_command_exits_1_while_a_key_is_escalated_and_0_once_all_are_resolved(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """``idembarrier reconcile`` prints the totals and the amount in doubt; its status says whether any is left."""
    ledger = Ledger(db.engine)
    await ledger.create()
    barrier = Barrier(db.sessionmaker)
    paid, pending = [await unknown_key(barrier, ledger, None, amount=a) for a in (1200, 800)]
    ANSWERS.clear()
    ANSWERS[downstream_key(SCOPE, paid)] = ProviderAnswer(status=ProviderStatus.SUCCEEDED, amount=1200)
    ANSWERS[downstream_key(SCOPE, pending)] = ProviderAnswer(status=ProviderStatus.PENDING, amount=800)
    base = ("reconcile", "--provider", "tests.test_reconcile:PROVIDER", "--database-url", db.url, "--min-age", "0s")
    dry = await run_async(capfd, *base, "--dry-run", "--json")
    assert dry.status == 1
    data = json.loads(dry.out)
    assert {k: data[k] for k in ("dry_run", "completed", "completed_amount", "escalated", "in_doubt_amount")} == {
        "dry_run": True,
        "completed": 1,
        "completed_amount": 1200,
        "escalated": 1,
        "in_doubt_amount": 800,
    }
    assert len(await barrier.unresolved()) == 2  # the dry run wrote nothing
    ran = await run_async(capfd, *base)
    assert ran.status == 1
    assert ran.out.splitlines()[:2] == [
        "2 keys in doubt: resolved 1 (1 COMPLETED, amount 1200; 0 FAILED), escalated 1, skipped 0",
        "amount still in doubt: 800",
    ]
    assert "the provider has it, still pending" in ran.out
    ANSWERS[downstream_key(SCOPE, pending)] = ProviderAnswer(status=ProviderStatus.FAILED, amount=800)
    last = await run_async(capfd, *base, "--json")
    assert (last.status, json.loads(last.out)["failed"], json.loads(last.out)["in_doubt_amount"]) == (0, 1, 0)


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        ("tests.test_reconcile", "idembarrier: --provider takes MODULE:OBJECT, not 'tests.test_reconcile'"),
        (
            "tests.no_such_module:X",
            "idembarrier: cannot load the provider 'tests.no_such_module:X': ModuleNotFoundError",
        ),
        ("tests.test_reconcile:LEDGER", "idembarrier: the provider 'tests.test_reconcile:LEDGER' has no lookup"),
    ],
)
async def test_reconcile_command_refuses_a_provider_it_cannot_load_with_exit_2(
    sqlite_db: Database, capfd: pytest.CaptureFixture[str], spec: str, line: str
) -> None:
    """A malformed spec, a missing module or an object without ``lookup``: one line, exit 2."""
    ran = await run_async(capfd, "reconcile", "--provider", spec, "--database-url", sqlite_db.url)
    assert ran.status == 2
    assert ran.line.startswith(line)


async def test_reconcile_command_takes_a_duration_or_refuses_it(capfd: pytest.CaptureFixture[str]) -> None:
    """``--min-age`` reads 90s, 15m, 7d…; anything else is a usage error (exit 2) before any connection."""
    ran = await run_async(
        capfd, "reconcile", "--provider", "x:y", "--database-url", "sqlite+aiosqlite:///x", "--min-age", "soon"
    )
    assert ran.status == 2
    assert "not a duration" in ran.line


def test_reconcile_runs_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """The real process, with a provider factory: an UNKNOWN key is resolved from what the provider says."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'recon.db'}"

    async def prepare() -> str:
        engine = create_sqlite_engine(url)
        try:
            await prepare_schema(engine)
            barrier, ledger = Barrier(async_sessionmaker(engine)), Ledger(engine)
            await ledger.create()
            return await unknown_key(barrier, ledger, None, amount=42)
        finally:
            await engine.dispose()

    key = anyio.run(prepare)
    env = {k: v for k, v in os.environ.items() if k != "IDEMBARRIER_DATABASE_URL"}
    env["IDEMBARRIER_TEST_ANSWERS"] = json.dumps({downstream_key(SCOPE, key): ["SUCCEEDED", 42]})
    done = subprocess.run(
        [
            *(sys.executable, "-m", "idembarrier", "reconcile", "--provider", "tests.test_reconcile:from_environment"),
            *("--database-url", url, "--min-age", "0", "--no-confirm", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env=env,
        cwd=ROOT,
    )
    assert (done.returncode, done.stderr) == (0, "")
    data = json.loads(done.stdout)
    assert (data["completed"], data["completed_amount"], data["escalated"]) == (1, 42, 0)
    assert data["keys"][0]["key"] == key


async def test_reconcile_command_exits_3_when_the_database_cannot_be_reached(capfd: pytest.CaptureFixture[str]) -> None:
    """A database that refuses the connection is an operational failure: exit 3, one line with the OS's reason."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{sock.getsockname()[1]}/test"
        ran = await run_async(capfd, "reconcile", "--provider", "tests.test_reconcile:PROVIDER", "--database-url", url)
    assert ran.status == 3
    assert os.strerror(errno.ECONNREFUSED) in ran.line

"""The phantom-write lab: every naive design shows its failure mode, the barrier shows none, on both engines."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from idembarrier.cli._lab import DesignResult, LabReport, ScenarioResult, format_report, run_lab
from tests._cli import run
from tests.test_kafka import broker

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import Database

__all__ = ["broker"]  # a fixture, shared with test_kafka

KEYS, CONCURRENCY = 3, 6

# (duplicates, lost) of each naive design, in the lab's order: the failure modes are deterministic.
NAIVE = {
    "ttl-expiry": [(KEYS, 0)],
    "partial-execution": [(0, KEYS), (KEYS, 0)],
    "concurrent-race": [(KEYS * (CONCURRENCY - 1), 0)],
    "layer-mismatch": [(KEYS, 0)],
}


def assert_naive_fails_and_barrier_holds(report: LabReport) -> None:
    """Check the report against the failure modes each naive design must show."""
    assert report.ok
    assert [s.name for s in report.scenarios] == list(NAIVE)
    for scenario in report.scenarios:
        naive = [(d.duplicates, d.lost) for d in scenario.designs if not d.barrier]
        assert naive == NAIVE[scenario.name], scenario.title
        (barrier,) = (d for d in scenario.designs if d.barrier)
        assert (barrier.duplicates, barrier.lost, barrier.written) == (0, 0, barrier.expected), scenario.title


async def test_lab_shows_phantom_writes_only_for_naive_designs_on_sqlite() -> None:
    """On the default embedded SQLite every naive design loses or duplicates writes and the barrier does neither."""
    progress: list[str] = []
    report = await run_lab(keys=KEYS, concurrency=CONCURRENCY, on_progress=progress.append)
    assert report.database.startswith("sqlite+aiosqlite:///")
    assert_naive_fails_and_barrier_holds(report)
    assert progress == [
        "[1/4] TTL expiry",
        "[2/4] partial execution",
        "[3/4] concurrent check race",
        "[4/4] layer mismatch",
    ]
    assert format_report(report).endswith("OK: the barrier made no duplicate and lost no write")


async def test_lab_shows_phantom_writes_only_for_naive_designs_on_postgresql(pg_db: Database) -> None:
    """On PostgreSQL the lab shows the same counts, and a second run on the same database stays apart."""
    for _ in range(2):
        report = await run_lab(pg_db.url, keys=KEYS, concurrency=CONCURRENCY)
        assert report.database.startswith("postgresql+asyncpg://")
        assert_naive_fails_and_barrier_holds(report)
    assert await pg_db.payments() == 0  # the lab writes its own tables only


def test_report_fails_when_the_barrier_shows_a_phantom_write() -> None:
    """A barrier design with a duplicate makes the report not ok and its text say FAILED."""
    leaky = DesignResult("barrier", barrier=True, expected=1, written=2, duplicates=1, lost=0)
    report = LabReport("sqlite", [ScenarioResult("x", "X", (leaky,))])
    assert not report.ok
    assert "FAILED" in format_report(report)


def test_command_line_runs_the_lab_and_exits_zero(capfd: pytest.CaptureFixture[str]) -> None:
    """`python -m idembarrier lab` prints the table, reports progress on stderr and exits 0."""
    done = run(capfd, "lab")
    assert done.status == 0, done.err
    assert "naive: SELECT then INSERT" in done.out
    assert done.out.rstrip().endswith("OK: the barrier made no duplicate and lost no write")
    assert "[4/4] layer mismatch" in done.err


def test_lab_json_parses(capfd: pytest.CaptureFixture[str]) -> None:
    """`lab --json` prints JSON with every design's duplicate and lost writes, and exits 0."""
    done = run(capfd, "lab", "--json")
    assert done.status == 0, done.err
    data = json.loads(done.out)
    assert data["ok"] is True
    assert len(data["scenarios"]) == 4
    designs = [d for s in data["scenarios"] for d in s["designs"]]
    assert all(d["phantom_writes"] > 0 for d in designs if not d["barrier"])
    assert all(d["duplicates"] == d["lost"] == 0 for d in designs if d["barrier"])


def test_report_names_units_explains_expected_and_sums_duplicates_and_losses_apart() -> None:
    """Each scenario says what it counts, why it expects that many and how its failure is made; the totals
    keep duplicates and losses apart, and the report says the failures were simulated in one process."""
    twice = DesignResult("naive: a", barrier=False, expected=2, written=4, duplicates=2, lost=0)
    never = DesignResult("naive: b", barrier=False, expected=2, written=0, duplicates=0, lost=2)
    scenario = ScenarioResult(
        "x", "X", (twice, never), unit="order rows", expected_is="2 orders", produced_by="a simulated crash"
    )
    text = format_report(LabReport("sqlite", [scenario]))
    assert "1. X (counts: order rows)" in text
    assert "   expected: 2 orders" in text
    assert "   the failure: a simulated crash" in text
    assert "naive designs: 2 duplicate rows (extra writes) and 2 lost rows (never written)" in text
    assert "simulated in this one process" in text


REAL_KEYS, REAL_CONCURRENCY = 2, 4
REAL_NAIVE = {
    "ttl-expiry": [(REAL_KEYS, 0)],
    "partial-execution": [(0, REAL_KEYS), (REAL_KEYS, 0)],
    "concurrent-race": [(REAL_KEYS * (REAL_CONCURRENCY - 1), 0)],
    "layer-mismatch": [(REAL_KEYS, 0)],
}
"""What each naive design must show when its failure is real: the same counts as the simulated ones."""


def assert_real(report: LabReport) -> None:
    assert report.ok
    assert report.real
    for scenario in report.scenarios:
        assert [(d.duplicates, d.lost) for d in scenario.designs if not d.barrier] == REAL_NAIVE[scenario.name]
        (barrier,) = (d for d in scenario.designs if d.barrier)
        assert (barrier.duplicates, barrier.lost, barrier.written) == (0, 0, barrier.expected), scenario.title


@pytest.mark.timeout(180)
async def test_real_lab_kills_and_races_processes_on_postgresql_through_a_broker(pg_db: Database, broker: str) -> None:
    """--real on PostgreSQL with the Tansu broker: SIGKILLed workers, racing processes, a real redelivery."""
    progress: list[str] = []
    report = await run_lab(
        pg_db.url, keys=REAL_KEYS, concurrency=REAL_CONCURRENCY, on_progress=progress.append, real=True, broker=broker
    )
    assert_real(report)
    assert report.broker == broker
    assert progress[1:] == ["[2/4] partial execution (real)", "[3/4] concurrent check race (real)",
                            "[4/4] layer mismatch (real)"]  # fmt: skip
    produced = {s.name: s.produced_by for s in report.scenarios}
    assert "SIGKILLed" in produced["partial-execution"]
    assert f"{REAL_CONCURRENCY} OS processes" in produced["concurrent-race"]
    assert broker in produced["layer-mismatch"]
    assert "races separate processes" in format_report(report)


@pytest.mark.timeout(180)
async def test_real_lab_on_sqlite_says_its_broker_is_in_process(tmp_path: Path) -> None:
    """--real on an SQLite file without a broker: real crashes and races; the report says the broker was not."""
    report = await run_lab(
        f"sqlite+aiosqlite:///{tmp_path / 'lab.db'}", keys=REAL_KEYS, concurrency=REAL_CONCURRENCY, real=True
    )
    assert_real(report)
    assert report.broker is None
    assert "--broker for a real one" in format_report(report)


def test_broker_without_real_is_a_usage_error(capfd: pytest.CaptureFixture[str]) -> None:
    """``lab --broker`` alone: exit 2, one line."""
    done = run(capfd, "lab", "--broker", "127.0.0.1:9092")
    assert done.status == 2
    assert "--broker goes with --real" in done.line


async def test_lab_shows_phantom_writes_only_for_naive_designs_on_mariadb(mariadb_db: Database) -> None:
    """On MariaDB through asyncmy the lab shows the same counts, and a second run on the same database stays apart."""
    for _ in range(2):
        report = await run_lab(mariadb_db.url, keys=KEYS, concurrency=CONCURRENCY)
        assert report.database.startswith("mysql+asyncmy://")
        assert_naive_fails_and_barrier_holds(report)
    assert await mariadb_db.payments() == 0  # the lab writes its own tables only


@pytest.mark.timeout(180)
async def test_real_lab_kills_and_races_processes_on_mariadb(mariadb_db: Database) -> None:
    """--real on MariaDB: SIGKILLed workers leave the server to roll back, racing processes each hold a connection."""
    progress: list[str] = []
    report = await run_lab(
        mariadb_db.url, keys=REAL_KEYS, concurrency=REAL_CONCURRENCY, on_progress=progress.append, real=True
    )
    assert_real(report)
    assert report.broker is None
    assert progress[1:] == ["[2/4] partial execution (real)", "[3/4] concurrent check race (real)",
                            "[4/4] layer mismatch"]  # fmt: skip
    assert f"{REAL_CONCURRENCY} OS processes" in {s.name: s.produced_by for s in report.scenarios}["concurrent-race"]

"""The fault storm, CI-sized: ``benchmarks/fault_storm.py`` directly and over HTTP, through the fault proxy.

Each test runs the script (2 client processes, 700 requests, 25 % of them a key sent again) against the
test's own database and reads its JSON report. What must hold: no duplicate effect, no acknowledged write
lost, no exception escaping that is not an `IdembarrierError`, no HTTP 500, nothing leaving the app; and
every kind of fault really happened. Requests arrive on a fixed schedule (700 over 8.75 s), faults fall in
rounds of every kind (a few seconds each, the one begun always finished) while they arrive, and no outcome
is asserted on the order in which faults and requests meet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from benchmarks.fault_storm import ZERO_TARGETS, fault_kinds

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 700
PROCESSES = 2
DUPLICATES = 0.25


async def storm(db: Database, mode: str, tmp_path: Path) -> dict[str, object]:
    """Run the CI-sized storm in ``mode`` on ``db``; return its report, having printed its table."""
    out = tmp_path / "storm.json"
    # fmt: off
    done = await anyio.run_process(
        [
            sys.executable, "benchmarks/fault_storm.py", "--mode", mode, "--database-url", db.url,
            "--requests", str(REQUESTS), "--processes", str(PROCESSES), "--duplicates", str(DUPLICATES),
            "--rate", "40", "--max-silence", "1.2", "--deadline", "0.8", "--json", str(out),
        ],
        cwd=ROOT,
        check=False,
    )
    # fmt: on
    table = done.stdout.decode()
    print(table)
    assert out.exists(), f"the storm wrote no report (exit {done.returncode}):\n{done.stderr.decode()[-3000:]}"
    (report,) = json.loads(out.read_text())
    assert isinstance(report, dict)
    assert done.returncode == (1 if report["violations"] else 0), table
    return report


@pytest.mark.timeout(80)
@pytest.mark.parametrize("mode", ["direct", "http"])
async def test_fault_storm_has_no_duplicate_effect_no_lost_write_and_no_escape(
    pg_db: Database, mode: str, tmp_path: Path
) -> None:
    """700 requests from 2 processes, 25 % duplicates, through every kind of fault: every zero-target is 0."""
    report = await storm(pg_db, mode, tmp_path)
    assert {name: report[name] for name in ZERO_TARGETS} == dict.fromkeys(ZERO_TARGETS, 0), report["samples"]
    assert report["violations"] == []
    faults = report["faults"]
    assert isinstance(faults, dict)
    kinds = fault_kinds(mode)
    assert {kind: faults.get(kind, 0) > 0 for kind in kinds} == dict.fromkeys(kinds, True), faults
    assert report["requests"] == REQUESTS
    assert report["duplicates_sent"] == REQUESTS * DUPLICATES
    assert isinstance(report["duplicates_in_flight_across_processes"], int)
    assert report["duplicates_in_flight_across_processes"] > 0  # concurrent duplicates, from both processes
    assert isinstance(report["acknowledged_requests"], int)
    assert report["acknowledged_requests"] >= 0.9 * REQUESTS  # the storm let most requests through
    outcomes = report["outcomes"]
    assert isinstance(outcomes, dict)
    if mode == "http":
        assert report["server_processes"] == 2
        assert outcomes.get("201 replayed", 0) > 0
        assert all(kind.split()[0] in {"201", "409", "503"} or not kind[0].isdigit() for kind in outcomes), outcomes
    else:
        assert isinstance(report["max_deadline_overrun"], float)
        assert report["max_deadline_overrun"] <= 1.0  # the caller's deadline, overrun by at most 1 s

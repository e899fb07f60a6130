"""The benchmark script still runs against the current schema, and its own correctness check passes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent


async def test_benchmark_runs_briefly_and_checks_its_writes(pg_db: Database) -> None:
    """A seconds-long run of benchmarks/barrier_vs_bare.py exits 0 with every repeat's correctness OK."""
    done = await anyio.run_process(
        [
            sys.executable,
            "benchmarks/barrier_vs_bare.py",
            "--database-url", pg_db.url,
            "--conc", "2",
            "--repeats", "1",
            "--rounds", "1",
            "--block", "0.2",
            "--ramp", "0.05",
            "--warmup", "0.1",
            "--prefill", "50",
        ],
        cwd=ROOT,
        check=False,
    )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "repeat 1: OK" in out
    assert "VERDICT" in out


async def _smoke(script: str, *args: str) -> str:
    """Run ``benchmarks/<script> --smoke``; return its output once it exited 0."""
    done = await anyio.run_process([sys.executable, f"benchmarks/{script}", "--smoke", *args], cwd=ROOT, check=False)
    assert done.returncode == 0, (done.stdout.decode()[-3000:], done.stderr.decode()[-3000:])
    return done.stdout.decode()


async def test_peers_core_smoke_prints_its_tables(pg_db: Database) -> None:
    """benchmarks/peers_core.py --smoke runs every variant (a peer not installed as such) and checks its writes."""
    out = await _smoke("peers_core.py", "--database-url", pg_db.url)
    assert "### Ratios to bare" in out
    for variant in ("bare", "ib_own", "ib_session", "ib_replay", "ib_lookup", "ib_memory", "naive", "idemkit", "dbos"):
        assert f"| {variant} (" in out
    assert "CORRECTNESS: OK" in out


async def test_peers_http_smoke_prints_its_tables(pg_db: Database) -> None:
    """benchmarks/peers_http.py --smoke runs bare FastAPI, idembarrier's middleware and the Redis peers in process."""
    out = await _smoke("peers_http.py", "--database-url", pg_db.url)
    assert "### Ratios to bare FastAPI" in out
    for variant in ("h_bare", "h_ib", "h_ib_replay", "h_ib_replay_cold", "h_snok", "h_idemkit"):
        assert f"| {variant} (" in out
    assert "CORRECTNESS: OK" in out


async def test_brokers_smoke_prints_its_table(pg_db: Database) -> None:
    """benchmarks/brokers.py --smoke runs each broker's bare loop and barrier loop side by side, with a verdict each."""
    out = await _smoke("brokers.py", "--database-url", pg_db.url)
    assert "### The consumer barrier per broker" in out
    for broker in ("kafka", "confluent", "rabbitmq", "nats", "redis"):
        assert f"| {broker} |" in out
        assert f"consumer barrier ({broker}) >= 0.80x the bare loop: M" in out  # MET or MISSED: it ran
    assert "CORRECTNESS: OK" in out

"""benchmarks/purge_beside_claims.py still runs: claims beside each purge variant, its counts checked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from benchmarks.purge_beside_claims import VARIANTS

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent


def latency_rows(out: str) -> dict[str, list[str]]:
    """The latency table's cells after the variant's name, by variant."""
    table = out.split("### Claim latency", 1)[1].split("\n\n", 2)[1]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {row[0]: row[1:] for row in cells}


async def test_purge_smoke_measures_claims_beside_every_variant(pg_db: Database) -> None:
    """A --smoke run exits 0 with its counts OK, a p99 for both block kinds and a purge rate per variant."""
    done = await anyio.run_process(
        [sys.executable, "benchmarks/purge_beside_claims.py", "--smoke", "--database-url", pg_db.url],
        cwd=ROOT,
        check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, (out[-3000:], done.stderr.decode()[-3000:])
    assert "CORRECTNESS: OK; claim errors: 0" in out
    rows = latency_rows(out)
    assert set(rows) == set(VARIANTS)
    for variant, (_qp50, quiet_p99, _pp50, purging_p99, ratio, *_rest, rate) in rows.items():
        assert float(quiet_p99) > 0, variant
        assert float(purging_p99) > 0, variant
        assert float(ratio.split()[0]) > 0, variant
        if variant != "none":
            assert float(rate) > 0, variant
            assert f"claim p99 purging <= 1.3x quiet ({variant}): M" in out  # MET or MISSED: it ran

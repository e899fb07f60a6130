"""benchmarks/records_scale.py and duplicate_storms.py still run: issue 13's no-regression figures, counts checked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from sqlalchemy import text
from sqlalchemy.engine import make_url

from benchmarks import duplicate_storms, records_scale

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent


async def smoke(script: str, url: str) -> str:
    """``script --smoke`` on ``url``'s server: its output, after checking it exited 0 with its counts OK."""
    done = await anyio.run_process(
        [sys.executable, f"benchmarks/{script}", "--smoke", "--database-url", url], cwd=ROOT, check=False
    )
    out = done.stdout.decode()
    assert done.returncode == 0, (out[-3000:], done.stderr.decode()[-3000:])
    assert "CORRECTNESS: OK; errors in measured blocks: 0" in out
    return out


def table_after(out: str, heading: str) -> dict[str, list[str]]:
    """The cells of the Markdown table under ``heading``, by the first cell of each row."""
    lines = out.split(heading, 1)[1].split("\n\n", 2)[1].splitlines()[2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in cells}


async def test_records_scale_smoke_compares_each_size_with_the_smallest(pg_db: Database) -> None:
    """Both kinds of request ran on both sizes (records filled and replayed: a replay that ran its body or
    found no record is an error), and every ratio is a number; the size databases are dropped after."""
    out = await smoke("records_scale.py", pg_db.url)
    rows = table_after(out, "### Larger tables")
    assert set(rows) == {f"{kind}: 20000 ÷ 1e3" for kind in records_scale.KINDS}
    assert all(float(cell.split()[0]) > 0 for cells in rows.values() for cell in cells), rows
    assert set(table_after(out, "### Per request")) == {
        f"{k}_{s}" for k in records_scale.KINDS for s in ("1e3", "20000")
    }
    async with pg_db.engine.connect() as conn:
        query = text("SELECT datname FROM pg_database WHERE starts_with(datname, :prefix)")
        left = (await conn.execute(query, {"prefix": f"{make_url(pg_db.url).database}_"})).scalars().all()
    assert left == []


async def test_records_scale_workers_compute_the_keys_the_fill_writes(pg_db: Database) -> None:
    """key_of(scope, i) is the server's KEY for the same scope and i, for every i the workers draw from."""
    async with pg_db.engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        rows = await raw.fetch(f"SELECT i, {records_scale.KEY} FROM generate_series(1, 50) AS i", "replay_1e3")
    assert len(rows) == 50
    assert all(records_scale.key_of("replay_1e3", i) == key for i, key in rows)


async def test_duplicate_storms_smoke_answers_every_copy_once(pg_db: Database) -> None:
    """Every storm of both libraries executed each key once and gave all its copies one answer."""
    out = await smoke("duplicate_storms.py", pg_db.url)
    assert set(table_after(out, "### Per storm")) == set(duplicate_storms.VARIANTS)
    rows = table_after(out, "### idembarrier ÷ idemkit")
    assert set(rows) == {"ib_one / idemkit_one", "ib_fifty / idemkit_fifty"}
    assert all(float(cell.split()[0]) > 0 for cells in rows.values() for cell in cells), rows

"""benchmarks/engines.py still runs on PostgreSQL, through PgBouncer and on MariaDB, and checks its writes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from benchmarks.engines import LABEL, VARIANTS
from tests._pgbouncer import binary

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("asyncpg", "pgbouncer", "asyncmy")
"""One engine per way of reading the server's CPU: PostgreSQL backends, PgBouncer's process, mariadbd's."""


def per_request(out: str) -> dict[tuple[str, str], list[str]]:
    """The per-request table's cells (req/s, client CPU, server CPU, latencies) by (engine label, variant)."""
    table = out.split("### Per request", 1)[1].split("\n\n", 2)[1]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {(row[0], row[2]): row[3:] for row in cells}


async def test_engines_smoke_measures_every_variant_on_each_engine(pg_db: Database, mariadb_db: Database) -> None:
    """A --smoke run exits 0 with its writes checked, and gives every variant a throughput and a server CPU."""
    binary()  # PgBouncer installed: else the test fails under CI, and is skipped elsewhere
    done = await anyio.run_process(
        [
            sys.executable, "benchmarks/engines.py", "--smoke", "--engines", ",".join(ENGINES),
            "--database-url", pg_db.url, "--mariadb-url", mariadb_db.url,
        ],
        cwd=ROOT,
        check=False,
    )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, (out[-3000:], done.stderr.decode()[-3000:])
    assert "CORRECTNESS: OK; errors in measured blocks: 0" in out
    assert "### Ratios to the engine's bare ORM transaction" in out
    rows = per_request(out)
    assert set(rows) == {(LABEL[engine], variant) for engine in ENGINES for variant in VARIANTS}
    for (engine, variant), (throughput, client, server, _latency) in rows.items():
        assert float(throughput) > 0, (engine, variant)
        assert float(client) > 0, (engine, variant)
        assert float(server) > 0, (engine, variant)

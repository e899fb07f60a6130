"""benchmarks/one_write.py: its smoke run, and the snapshot rule its lock-and-lookup function relies on.

The one-write design takes a transaction-scoped advisory lock on the key, then looks the key's record up; a
duplicate waiting for that lock must see the record its holder committed, or it runs the body again. Under
READ COMMITTED that holds only when the lookup is a statement of its own, started after the lock was granted:
the test shows the function seeing the committed record where one statement holding both does not.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import asyncpg
from sqlalchemy.engine import make_url

import idembarrier
from benchmarks import one_write, peers_core
from benchmarks._database import RECORDS
from idembarrier._keys import fingerprint_digest
from tests.helpers import lock_waiters

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent
# Lock and lookup in one statement: its snapshot is taken when it starts, before it waits for the lock.
ONE_STATEMENT = (
    f"SELECT r.status FROM (SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))) AS locked, "
    f"{RECORDS} AS r WHERE r.scope = $1 AND r.key = $2"
)


async def test_one_write_smoke_measures_every_variant(pg_db: Database) -> None:
    """A --smoke run exits 0 with its counts OK and a throughput ratio for every variant."""
    done = await anyio.run_process(
        [sys.executable, "benchmarks/one_write.py", "--smoke", "--database-url", pg_db.url], cwd=ROOT, check=False
    )
    out = done.stdout.decode()
    assert done.returncode == 0, (out[-3000:], done.stderr.decode()[-3000:])
    assert "CORRECTNESS: OK; errors in measured blocks: 0" in out
    table = out.split("### Ratios to bare", 1)[1].split("\n\n", 2)[1].splitlines()[2:]
    ratios = {line.strip("|").split("|")[0].split(" (")[0].strip(): line.split("|")[2] for line in table}
    assert set(ratios) == set(one_write.VARIANTS)
    assert all(float(cell.split()[0]) > 0 for cell in ratios.values()), ratios


async def waiter_sees(pg_db: Database, statement: str) -> object:
    """What ``statement`` (scope, key) returns to a duplicate that waited while the lock's holder committed."""
    dsn = peers_core.dsn_of(make_url(pg_db.url))
    holder, waiter = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    scope, key = "one-write", str(uuid.uuid4())
    try:
        await holder.execute(one_write.LOCK_LOOKUP_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"))
        holding = holder.transaction()
        await holding.start()
        await holder.execute(one_write.LOCK, scope, key)
        response = idembarrier.JSONCodec().encode({"ok": True})
        retention = idembarrier.Retention()
        await holder.execute(
            one_write.INSERT_FINISHED, scope, key, fingerprint_digest({}), uuid.uuid4(), None, response,
            retention.response, retention.record,
        )  # fmt: skip
        seen: list[object] = []
        async with anyio.create_task_group() as tg:

            async def duplicate() -> None:
                async with waiter.transaction():
                    seen.append(await waiter.fetchval(statement, scope, key))

            tg.start_soon(duplicate)
            await lock_waiters(pg_db)  # the duplicate waits on the holder's advisory lock
            await holding.commit()
        return seen[0]
    finally:
        await holder.close()
        await waiter.close()


async def test_the_functions_lookup_sees_the_record_committed_while_it_waited(pg_db: Database) -> None:
    """The function's lookup is its own statement after the lock: it finds the holder's COMPLETED record."""
    assert await waiter_sees(pg_db, one_write.LOCK_LOOKUP.replace("status, response", "status")) == "COMPLETED"


async def test_one_statement_holding_lock_and_lookup_misses_that_record(pg_db: Database) -> None:
    """The same lock and lookup as one statement finds nothing: its snapshot predates the lock (why a function)."""
    assert await waiter_sees(pg_db, ONE_STATEMENT) is None

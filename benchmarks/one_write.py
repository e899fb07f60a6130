"""One write per first execution: an advisory lock and a lookup, the body, one INSERT of the finished record.

Issue 13, item 2, measured beside today's claim on PostgreSQL with asyncpg, one business insert per request
(``peers_core``'s ``Payment``). Each variant runs in its own worker process, measured with
``benchmarks/_blocks.py``'s paired rounds (a cell is the median of the per-round ratios, with their spread):

* ``bare``: ``session.add(Payment); await session.commit()``: the reference;
* ``ib_own``: today's ``barrier.unit_of_work(key)`` on a fresh key (a first execution);
* ``floor_today``: bare plus today's claim and completion (``idembarrier._postgres``'s ``claim`` and ``finish``
  statements, verbatim) sent straight to the asyncpg connection under the session: what today's design
  costs with nothing of the barrier's Python around it;
* ``one_write``: bare plus ``lock_lookup`` (below: the transaction-scoped advisory lock on the key and the
  lookup of its record, in one round trip), then one ``INSERT`` of the COMPLETED record before the commit;
* ``one_write_2rt``: the same with the lock and the lookup as two statements (two round trips, no function).

Why a function. Under READ COMMITTED a statement's snapshot is taken when the statement starts, before it
waits for the lock: a lookup in the same statement as ``pg_advisory_xact_lock`` (a join on a lock subquery, a
MATERIALIZED lock CTE, a scalar subquery beside it, even a ``FOR SHARE`` lookup) does not see the record that
the previous holder of the lock committed while this one waited, and would run the body a second time. A
VOLATILE PL/pgSQL function takes a new snapshot for each of its statements, so its lookup, which runs after
the lock was granted, sees that record; the holder's commit is visible before its locks are released. The
function is created in the benchmark's database here; in the library it would be a migration.

Usage::

    python benchmarks/one_write.py [--conc 1,8,32] [--rounds 5] [--smoke] [--json out.json]

This is a measurement: it exits 0 whatever the ratios (non-zero only when it cannot run or a variant's writes
do not add up: one payment and one COMPLETED record per execution).
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is benchmarks/_blocks.py
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine  # noqa: E402

import idembarrier  # noqa: E402
from benchmarks import _blocks, peers_core  # noqa: E402
from benchmarks._database import RECORDS, create_databases, fresh_tables, payments_by_variant  # noqa: E402
from idembarrier._keys import fingerprint_digest  # noqa: E402
from idembarrier._postgres import _statements  # noqa: E402
from idembarrier._storage import Names, pool_connection  # noqa: E402

if TYPE_CHECKING:
    import argparse

    from sqlalchemy.engine import URL

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/idembarrier_one_write"
VARIANTS = ("bare", "ib_own", "floor_today", "one_write", "one_write_2rt")
RAW = {"floor_today", "one_write", "one_write_2rt"}
DESCRIPTION = {
    "bare": "bare ORM transaction",
    "ib_own": "idembarrier today, own session (first execution)",
    "floor_today": "bare + today's claim and finish, raw asyncpg",
    "one_write": "bare + lock and lookup (1 round trip) + INSERT COMPLETED",
    "one_write_2rt": "bare + lock, lookup (2 round trips) + INSERT COMPLETED",
}
TARGETS = (  # issue 13's, read off this run: (what, minimum or maximum ratio to bare, metric)
    ("first execution >= 0.80x bare at c=8, 32", 0.80, "throughput"),
    ("first execution PostgreSQL CPU <= 1.8x bare at c=8, 32", 1.8, "server"),
)
RETENTION = idembarrier.Retention()
NAMES = Names(records=RECORDS, outbox=f"{RECORDS}_outbox", failures=f"{RECORDS}_failures", channel=RECORDS)
TODAY = _statements(NAMES)
LOCK_LOOKUP_FUNCTION = f"""
    CREATE FUNCTION idembarrier_lock_lookup(p_scope text, p_key text) RETURNS SETOF {RECORDS}
    LANGUAGE plpgsql VOLATILE AS $body$
    BEGIN
        -- Waits for the key's previous holder to commit or roll back (its lock goes with its transaction).
        PERFORM pg_advisory_xact_lock(hashtextextended(p_scope || ':' || p_key, 0));
        -- A statement of its own, so a snapshot of its own, taken after the lock was granted: it sees the
        -- record the previous holder committed (a commit is visible before the committer's locks go).
        RETURN QUERY SELECT * FROM {RECORDS} WHERE scope = p_scope AND key = p_key;
    END
    $body$"""
# One round trip: the lock, then the lookup under a snapshot taken after it.
LOCK_LOOKUP = "SELECT status, response FROM idembarrier_lock_lookup($1, $2)"
# The same as two statements (lock, then lookup), for the function-less shape. The ':' keeps the keys of
# ('ab', 'c') and ('a', 'bc') apart; a hash collision of two keys only makes them wait for each other.
LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))"
LOOKUP = f"SELECT status, response FROM {RECORDS} WHERE scope = $1 AND key = $2"
# The one write: the finished record, with the horizons today's `finish` sets. No ON CONFLICT: under the
# lock, a key already there was seen by the lookup, so a 23505 here means a writer that took no lock.
INSERT_FINISHED = f"""
    INSERT INTO {RECORDS} (scope, key, fingerprint, status, token, fingerprint_version, response,
                           completed_at, updated_at, response_expires_at, expires_at, cleanup_at)
    SELECT $1, $2, $3, 'COMPLETED', $4, $5, $6, at.now, at.now, at.now + $7::interval, at.now + $8::interval,
           at.now + $7::interval
    FROM (SELECT clock_timestamp() AS now) AS at"""


class Raw(peers_core.Core):
    """floor_today, one_write and one_write_2rt: the statements on the asyncpg connection under the session."""

    codec = idembarrier.JSONCodec()

    async def driver(self, session: AsyncSession) -> Any:
        """The asyncpg connection under ``session``, its transaction begun (as `PostgresStorage.begin` does)."""
        adapted: Any = (await pool_connection(await session.connection())).dbapi_connection
        await adapted._start_transaction()
        return adapted.driver_connection

    async def request(self) -> None:
        assert self.sessionmaker is not None
        scope, key, amount, token = self.name, str(uuid.uuid4()), len(self.name), uuid.uuid4()
        fingerprint = fingerprint_digest({"amount": amount})
        async with self.sessionmaker() as session:
            conn = await self.driver(session)
            if self.name == "floor_today":
                row = await conn.fetchrow(TODAY.claim, scope, key, fingerprint, token, None, RETENTION.response)
                if not row["claimed"]:
                    raise RuntimeError(f"fresh key {key} was not claimed")
            else:
                if self.name == "one_write":
                    row = await conn.fetchrow(LOCK_LOOKUP, scope, key)
                else:
                    await conn.execute(LOCK, scope, key)
                    row = await conn.fetchrow(LOOKUP, scope, key)
                if row is not None:
                    raise RuntimeError(f"fresh key {key} has a record: {row['status']}")
            payment = self.payment()
            session.add(payment)
            response = self.codec.encode({"payment_id": str(payment.id), "amount": amount})
            if self.name == "floor_today":
                done = await conn.fetchval(
                    TODAY.finish, scope, key, token, "COMPLETED", response, RETENTION.response, RETENTION.record
                )
                if done != 1:
                    raise RuntimeError(f"the claim on {key} disappeared")
            else:
                horizons = RETENTION.response, RETENTION.record
                await conn.execute(INSERT_FINISHED, scope, key, fingerprint, token, None, response, *horizons)
            await session.commit()
        self.executed += 1


def make(name: str, config: dict[str, Any]) -> _blocks.Variant:
    if name == "bare":
        return peers_core.Bare(name, config)
    return Raw(name, config) if name in RAW else peers_core.Idembarrier(name, config)


# -- the controller -----------------------------------------------------------------------------------------


async def prepare(url: URL) -> None:
    """Fresh tables (idembarrier's migrated, the payments) and the lock-and-lookup function on them."""
    await create_databases(url)
    await fresh_tables(url, peers_core.Base.metadata, before=["DROP FUNCTION IF EXISTS idembarrier_lock_lookup"])
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(LOCK_LOOKUP_FUNCTION)
    finally:
        await engine.dispose()


async def records_by_scope(url: URL) -> dict[str, int]:
    """The COMPLETED records per scope (each variant writes under its own name)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            query = text(f"SELECT scope, count(*) FROM {RECORDS} WHERE status = 'COMPLETED' GROUP BY scope")
            return {str(s): int(n) for s, n in (await conn.execute(query)).all()}
    finally:
        await engine.dispose()


def check(counts: dict[str, dict[str, int]], payments: dict[str, int], records: dict[str, int]) -> list[str]:
    """``peers_core.check`` (a payment per execution), and a COMPLETED record per execution for all but bare."""
    problems = peers_core.check(counts, payments)
    for name, c in counts.items():
        if name != "bare" and records.get(name, 0) != c["executed"]:
            problems.append(f"{name}: {records.get(name, 0)} COMPLETED records for {c['executed']} executions")
    return problems


def report(run: _blocks.Run, concs: list[int], names: list[str]) -> list[str]:
    """Print the tables (Markdown) and the targets for every variant; return the targets' verdict lines."""
    header = ["variant"]
    for what in ("throughput", "client CPU", "PostgreSQL CPU"):
        header += [f"{what} c={c}" for c in concs]
    rows = [_blocks.ratio_row(run, concs, f"{v} ({DESCRIPTION[v]})", v) for v in names]
    print("\n### Ratios to bare (median of per-round ratios [IQR, or the range under 4 rounds])\n")
    print(_blocks.table(header, rows))

    print("\n### Per request (medians over rounds)\n")
    print(_blocks.per_request_table(run, concs, names))

    verdicts = [
        f"{v}: {what}: {_blocks.verdict(run, concs, metric, v, bound)}"
        for what, bound, metric in TARGETS
        for v in names[1:]
    ]
    _blocks.print_lines("TARGETS (issue 13)", verdicts)
    return verdicts


async def controller(args: argparse.Namespace) -> int:
    url = make_url(args.database_url)
    concs = [int(c) for c in args.conc.split(",")]
    names = list(VARIANTS)
    print(_blocks.versions_line())
    print(
        f"conc {concs} | {args.rounds} rounds x {len(names)} variants, blocks of {args.warmup}+{args.block} s",
        flush=True,
    )
    started = time.perf_counter()
    await prepare(url)
    dsn = peers_core.dsn_of(url)
    config = {"url": url.render_as_string(hide_password=False), "probe_dsn": dsn, "pg_port": url.port or 5432}
    config["prefill"] = 0
    workers = {v: _blocks.Worker(Path(__file__), v, config) for v in names}
    run = _blocks.Run()
    counts = _blocks.run_workers(workers, run, concs, args.rounds, args.warmup, args.block)
    payments = await payments_by_variant(url, peers_core.Payment.__tablename__)
    problems = check(counts, payments, await records_by_scope(url))
    print(f"\nruntime {time.perf_counter() - started:.0f} s | {_blocks.machine_line()}")
    report(run, concs, names)
    return _blocks.conclude(args, problems, run.blocks, _blocks.errors_of(run))


def main(argv: list[str] | None = None) -> int:
    parser = _blocks.script_parser(__doc__, DEFAULT_URL, smoke="a seconds-long run: c=2, 1 round, short blocks")
    parser.add_argument("--conc", default="1,8,32", help="comma-separated concurrencies (default: %(default)s)")
    _blocks.add_run_arguments(parser, rounds=5)
    return _blocks.run_script(parser, argv, make, controller, {"conc": "2", "rounds": 1, "block": 0.2, "warmup": 0.05})


if __name__ == "__main__":
    sys.exit(main())

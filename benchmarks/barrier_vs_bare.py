"""What a unit of work costs next to the bare business write, on PostgreSQL (asyncpg).

Three kinds of request, each one HTTP-handler-sized transaction on an `AsyncEngine`:

* ``bare``: the business write alone (``session.add(Payment(...)); await session.commit()``);
* ``barrier``: the same write inside ``barrier.unit_of_work`` on a fresh key (a first execution);
* ``replay``: ``barrier.unit_of_work`` on one of ``--prefill`` keys recorded beforehand (by the claim);
* ``lookup``: the same replay with ``lookup_first=True`` (one read outside any transaction; the default for a
  key that finished in the same process).

Method (paired blocks): for each concurrency, all three variants run in this one process against one
engine, in short timed blocks taken round-robin (the order rotates every round). Each round yields the
paired ratios barrier/bare and replay/bare, so that drift of the machine (other processes, autovacuum,
checkpoints) cancels out within a round. A repeat reports the medians over its rounds; the summary reports
the medians over repeats. Every repeat starts from freshly created tables. Client CPU per request is
`time.process_time` over a block divided by the requests it completed.

Usage::

    python benchmarks/barrier_vs_bare.py [--conc 1,8,32] [--repeats 3] [--rounds 5] [--json out.json]

The database (``idembarrier_bench`` by default) is created when missing through an AUTOCOMMIT connection
to the ``test`` database of the same server. This is a measurement: the script exits 0 whether the
targets are met or not (it exits non-zero only when it cannot run).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import DateTime, Integer, MetaData, Uuid, func, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import idembarrier
from idembarrier._keys import fingerprint_digest
from idembarrier._schema import VERSION_TABLE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine import URL

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/idembarrier_bench"
ADMIN_DATABASE = "test"
RECORDS = "idempotency_keys"
SCOPE = "bench"
VARIANTS = ("bare", "barrier", "replay", "lookup")
RATIOS = ("barrier", "replay", "lookup")  # each over bare
TARGETS = {"barrier": 0.75, "replay": 1.5, "lookup": 4.0}  # minimum ratio over bare, at the concurrencies below
TARGET_CONCURRENCIES = (8, 32)
# The amount tags each variant's payments, so the correctness check can count them apart.
AMOUNT = {"bare": 1, "barrier": 2, "prefill": 3}


class Base(DeclarativeBase):
    metadata = MetaData()


class Payment(Base):
    __tablename__ = "bench_payments"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    amount: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


# -- the requests -------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One engine at one concurrency, and what its requests need."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    barrier: idembarrier.Barrier[idembarrier.JSON]
    replay_keys: list[str]
    done: Counter[str]
    errors: Counter[str]


async def bare(t: Target) -> None:
    async with t.sessionmaker() as session:
        session.add(Payment(id=uuid.uuid4(), amount=AMOUNT["bare"]))
        await session.commit()


async def first_execution(t: Target) -> None:
    key, amount = str(uuid.uuid4()), AMOUNT["barrier"]
    async with t.barrier.unit_of_work(key, scope=SCOPE, fingerprint={"amount": amount, "key": key}) as uow:
        if uow.replayed:
            raise RuntimeError(f"fresh key {key} was replayed")
        pid = uuid.uuid4()
        uow.session.add(Payment(id=pid, amount=amount))
        uow.complete({"payment_id": str(pid), "amount": amount})


async def replay(t: Target, *, lookup_first: bool = False) -> None:
    key, amount = random.choice(t.replay_keys), AMOUNT["prefill"]
    fingerprint = {"amount": amount, "key": key}
    async with t.barrier.unit_of_work(key, scope=SCOPE, fingerprint=fingerprint, lookup_first=lookup_first) as uow:
        if not uow.replayed:
            raise RuntimeError(f"recorded key {key} was not replayed")  # rolls the claim back
        response = uow.response
        if not isinstance(response, dict) or response.get("amount") != amount:
            raise RuntimeError(f"key {key} replayed {response!r}")


REQUESTS: dict[str, Callable[[Target], Awaitable[None]]] = {
    "bare": bare,
    "barrier": first_execution,
    "replay": replay,
    "lookup": functools.partial(replay, lookup_first=True),
}


# -- setup --------------------------------------------------------------------------------------------------


async def ensure_database(url: URL) -> None:
    """Create ``url``'s database when missing, through an AUTOCOMMIT connection to the ``test`` database."""
    admin = create_async_engine(url.set(database=ADMIN_DATABASE), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            query = text("SELECT 1 FROM pg_database WHERE datname = :name")
            if (await conn.execute(query, {"name": url.database})).scalar() is None:
                quoted = conn.dialect.identifier_preparer.quote(str(url.database))
                await conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
                print(f"created database {url.database}")
    except Exception as exc:  # the database may exist and be reachable all the same
        print(f"note: could not check/create {url.database} through {ADMIN_DATABASE!r}: {exc!r}")
    finally:
        await admin.dispose()


async def raw_connection(conn: Any) -> Any:
    """The asyncpg connection under a SQLAlchemy `AsyncConnection`."""
    return (await conn.get_raw_connection()).driver_connection


def prefill_row(key: str, pid: uuid.UUID, codec: idembarrier.JSONCodec) -> tuple[bytes | None, bytes]:
    """The fingerprint and response a first execution of ``key`` writing payment ``pid`` records."""
    amount = AMOUNT["prefill"]
    return fingerprint_digest({"amount": amount, "key": key}), codec.encode({"payment_id": str(pid), "amount": amount})


async def setup(url: URL, prefill: int) -> list[str]:
    """Recreate the tables, record ``prefill`` keys to replay, and return those keys.

    The first key goes through the barrier; the others are bulk-inserted as the rows it would have written
    (payment and record), which is checked against the first one.
    """
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            tables = f"bench_payments, {RECORDS}_outbox, {RECORDS}_failures, {RECORDS}, {VERSION_TABLE}"
            await conn.exec_driver_sql(f"DROP TABLE IF EXISTS {tables}")
        await idembarrier.upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

        barrier: idembarrier.Barrier[idembarrier.JSON] = idembarrier.Barrier(
            async_sessionmaker(engine, expire_on_commit=False)
        )
        codec = idembarrier.JSONCodec()
        amount = AMOUNT["prefill"]
        keys = [str(uuid.uuid4()) for _ in range(prefill)]
        pids = [uuid.uuid4() for _ in keys]
        async with barrier.unit_of_work(keys[0], scope=SCOPE, fingerprint={"amount": amount, "key": keys[0]}) as uow:
            uow.session.add(Payment(id=pids[0], amount=amount))
            uow.complete({"payment_id": str(pids[0]), "amount": amount})

        rows = [prefill_row(k, p, codec) for k, p in zip(keys[1:], pids[1:], strict=True)]
        async with engine.begin() as conn:
            raw = await raw_connection(conn)
            await raw.copy_records_to_table(
                "bench_payments", records=[(p, amount) for p in pids[1:]], columns=["id", "amount"]
            )
            await raw.execute(
                f"""INSERT INTO {RECORDS} (scope, key, fingerprint, status, response, token, completed_at,
                                           response_expires_at, expires_at)
                    SELECT $1, k, f, 'COMPLETED', r, t, now(), now() + $6::interval, now() + $7::interval
                    FROM unnest($2::text[], $3::bytea[], $4::bytea[], $5::uuid[]) AS u(k, f, r, t)""",
                SCOPE,
                keys[1:],
                [f for f, _ in rows],
                [r for _, r in rows],
                [uuid.uuid4() for _ in rows],
                barrier.options.retention.response,
                barrier.options.retention.record,
            )

        # The bulk rows must be what the barrier writes: same digest and encoding, same shape.
        check = f"""SELECT key, fingerprint, response, status, attempt, completed_at IS NOT NULL,
                           expires_at - completed_at, response_expires_at - completed_at, locked_until IS NULL
                    FROM {RECORDS} WHERE scope = $1 AND key = ANY($2::text[]) ORDER BY key = $3 DESC"""
        async with engine.connect() as conn:
            raw = await raw_connection(conn)
            got = await raw.fetch(check, SCOPE, keys[:2], keys[0])
        expected = {keys[0]: prefill_row(keys[0], pids[0], codec), keys[1]: rows[0]}
        shapes = {tuple(r[3:]) for r in got}
        if len(got) != 2 or len(shapes) != 1 or any((r[1], r[2]) != expected[r[0]] for r in got):
            raise RuntimeError(f"bulk-inserted records differ from the barrier's: {[tuple(r) for r in got]}")

        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql(f"VACUUM ANALYZE bench_payments, {RECORDS}")
    finally:
        await engine.dispose()
    return keys


# -- measuring ----------------------------------------------------------------------------------------------


@dataclass
class Block:
    throughput: float  # requests completed in the measured window, per second
    cpu_us: float  # client CPU per completed request in the whole block, µs
    latencies: list[float]  # seconds, of the requests completed in the measured window


async def run_block(t: Target, variant: str, conc: int, ramp: float, seconds: float) -> Block:
    request = REQUESTS[variant]
    latencies: list[float] = []
    completed = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    t_measure, t_end = t0 + ramp, t0 + ramp + seconds

    async def worker() -> None:
        nonlocal completed
        while (start := time.perf_counter()) < t_end:
            try:
                await request(t)
            except Exception as exc:
                t.errors[f"{variant}: {type(exc).__name__}: {str(exc)[:100]}"] += 1
                continue
            end = time.perf_counter()
            completed += 1
            t.done[variant] += 1
            if t_measure <= end <= t_end:
                latencies.append(end - start)

    await asyncio.gather(*(worker() for _ in range(conc)))
    cpu = time.process_time() - cpu0
    return Block(len(latencies) / seconds, cpu / max(completed, 1) * 1e6, latencies)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def run_concurrency(
    url: URL, conc: int, keys: list[str], done: Counter[str], errors: Counter[str], args: argparse.Namespace
) -> dict[str, Any]:
    engine = create_async_engine(url, pool_size=conc, max_overflow=0)
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    barrier: idembarrier.Barrier[idembarrier.JSON] = idembarrier.Barrier(sessionmaker)
    t = Target(engine, sessionmaker, barrier, keys, done, errors)
    try:

        async def open_connection() -> None:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                await asyncio.sleep(0.05)

        await asyncio.gather(*(open_connection() for _ in range(conc)))  # fill the pool
        warm_end = time.perf_counter() + args.warmup

        async def warm(i: int) -> None:
            while time.perf_counter() < warm_end:
                variant = VARIANTS[i % len(VARIANTS)]
                i += 1
                try:
                    await REQUESTS[variant](t)
                except Exception as exc:
                    errors[f"{variant} (warm-up): {type(exc).__name__}: {str(exc)[:100]}"] += 1
                    continue
                done[variant] += 1

        await asyncio.gather(*(warm(i) for i in range(conc)))

        rounds: list[dict[str, Any]] = []
        latencies: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            blocks = {v: await run_block(t, v, conc, args.ramp, args.block) for v in order}
            for v, b in blocks.items():
                latencies[v].extend(b.latencies)
            bare_tput = blocks["bare"].throughput
            rounds.append(
                {
                    "order": list(order),
                    "throughput": {v: b.throughput for v, b in blocks.items()},
                    "cpu_us": {v: b.cpu_us for v, b in blocks.items()},
                    "ratio": {v: blocks[v].throughput / bare_tput if bare_tput else math.nan for v in RATIOS},
                }
            )
    finally:
        await engine.dispose()
    return {
        "throughput": {v: statistics.median(r["throughput"][v] for r in rounds) for v in VARIANTS},
        "cpu_us": {v: statistics.median(r["cpu_us"][v] for r in rounds) for v in VARIANTS},
        "p50_ms": {v: percentile(latencies[v], 0.50) * 1e3 for v in VARIANTS},
        "p99_ms": {v: percentile(latencies[v], 0.99) * 1e3 for v in VARIANTS},
        "ratio": {v: statistics.median(r["ratio"][v] for r in rounds) for v in RATIOS},
        "rounds": rounds,
    }


async def check_correctness(url: URL, prefill: int, done: Counter[str], errors: Counter[str]) -> dict[str, Any]:
    """Count what the run wrote: one payment per first execution, and one COMPLETED record for it."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            payments: dict[int, int] = dict(
                (await conn.execute(text("SELECT amount, count(*) FROM bench_payments GROUP BY amount"))).all()
            )
            records: dict[str, int] = dict(
                (
                    await conn.execute(
                        text(f"SELECT status, count(*) FROM {RECORDS} WHERE scope = :s GROUP BY status"),
                        {"s": SCOPE},
                    )
                ).all()
            )
            other_scopes = (
                await conn.execute(text(f"SELECT count(*) FROM {RECORDS} WHERE scope <> :s"), {"s": SCOPE})
            ).scalar_one()
            # Each record's response names its payment: it must exist, with the recorded amount.
            linked = (
                await conn.execute(
                    text(
                        f"""SELECT count(*) FROM {RECORDS} k JOIN bench_payments p
                            ON p.id = (convert_from(k.response, 'UTF8')::jsonb ->> 'payment_id')::uuid
                            AND p.amount = (convert_from(k.response, 'UTF8')::jsonb ->> 'amount')::int
                            WHERE k.scope = :s AND k.status = 'COMPLETED'"""
                    ),
                    {"s": SCOPE},
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    completed = records.get("COMPLETED", 0)
    barrier_payments = payments.get(AMOUNT["barrier"], 0)
    result = {
        "barrier_requests": done["barrier"],
        "barrier_payments": barrier_payments,
        "completed_records_minus_prefill": completed - prefill,
        "bare_requests": done["bare"],
        "bare_payments": payments.get(AMOUNT["bare"], 0),
        "prefill_payments": payments.get(AMOUNT["prefill"], 0),
        "replays": done["replay"],
        "records_by_status": records,
        "records_linked_to_their_payment": linked,
        "errors": dict(errors),
    }
    result["ok"] = (
        barrier_payments == completed - prefill == done["barrier"]
        and result["bare_payments"] == done["bare"]
        and result["prefill_payments"] == prefill
        and linked == completed
        and set(records) <= {"COMPLETED"}
        and other_scopes == 0
        and not errors
    )
    return result


# -- reporting ----------------------------------------------------------------------------------------------


def median_of(repeats: list[dict[int, dict[str, Any]]], conc: int, metric: str, variant: str) -> float:
    values: list[float] = [rep[conc][metric][variant] for rep in repeats]
    return statistics.median(values)


def summarize(repeats: list[dict[int, dict[str, Any]]], concs: list[int]) -> dict[int, dict[str, Any]]:
    summary: dict[int, dict[str, Any]] = {}
    for c in concs:
        summary[c] = {
            metric: {v: median_of(repeats, c, metric, v) for v in VARIANTS}
            for metric in ("throughput", "p50_ms", "p99_ms", "cpu_us")
        }
        summary[c]["ratio"] = {v: median_of(repeats, c, "ratio", v) for v in RATIOS}
        summary[c]["ratio_per_repeat"] = {v: [rep[c]["ratio"][v] for rep in repeats] for v in RATIOS}
    return summary


def print_summary(summary: dict[int, dict[str, Any]], repeats: int, rounds: int) -> None:
    print(f"\nRESULTS (medians over {repeats} repeats; ratios: median of {rounds} paired per-round ratios)")
    for c, s in summary.items():
        print(f"\nc={c}")
        print(f"  {'variant':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11}")
        for v in VARIANTS:
            print(
                f"  {v:<9} {s['throughput'][v]:8.0f} {s['p50_ms'][v]:8.2f} {s['p99_ms'][v]:8.2f} {s['cpu_us'][v]:11.0f}"
            )
        for v in RATIOS:
            spread = " ".join(f"{x:.3f}" for x in s["ratio_per_repeat"][v])
            print(f"  {v}/bare = {s['ratio'][v]:.3f}   (per repeat: {spread})")


def verdicts(summary: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    names = {"barrier": "first execution", "replay": "replay", "lookup": "replay, lookup first"}
    for v, minimum in TARGETS.items():
        measured = {c: summary[c]["ratio"][v] for c in TARGET_CONCURRENCIES if c in summary}
        status = "N/A" if not measured else "PASS" if all(x >= minimum for x in measured.values()) else "MISS"
        out.append({"target": names[v], "variant": v, "minimum": minimum, "ratios": measured, "status": status})
    return out


# -- main ---------------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    url = make_url(args.database_url)
    concs = [int(x) for x in args.conc.split(",")]
    await ensure_database(url)
    load_before = os.getloadavg()
    print(
        f"idembarrier {idembarrier.__version__} | SQLAlchemy {sqlalchemy.__version__} | Python "
        f"{platform.python_version()} | {os.cpu_count()} CPUs | load average {load_before[0]:.2f} "
        f"(PostgreSQL and anything else running share this machine)"
    )
    print(
        f"database {url.render_as_string()} | conc {concs} | {args.repeats} repeats x {args.rounds} rounds "
        f"x {len(VARIANTS)} blocks of {args.ramp}+{args.block} s | {args.prefill} prefilled keys",
        flush=True,
    )
    started = time.perf_counter()
    repeats: list[dict[int, dict[str, Any]]] = []
    checks: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        done: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        keys = await setup(url.set(drivername="postgresql+asyncpg"), args.prefill)  # its bulk load is asyncpg's COPY
        results: dict[int, dict[str, Any]] = {}
        for c in concs:
            res = results[c] = await run_concurrency(url, c, keys, done, errors, args)
            print(
                f"repeat {rep + 1} c={c:<3} req/s "
                + " ".join(f"{v}={res['throughput'][v]:.0f}" for v in VARIANTS)
                + " | ratio "
                + " ".join(f"{v}/bare={res['ratio'][v]:.3f}" for v in RATIOS)
                + " | CPU µs/req "
                + " ".join(f"{v}={res['cpu_us'][v]:.0f}" for v in VARIANTS),
                flush=True,
            )
        repeats.append(results)
        checks.append(await check_correctness(url, args.prefill, done, errors))

    summary = summarize(repeats, concs)
    print_summary(summary, args.repeats, args.rounds)

    print("\nCORRECTNESS (per repeat: payments written by the barrier variant vs COMPLETED records in scope")
    print(f"{SCOPE!r} minus the prefill)")
    for rep, chk in enumerate(checks, 1):
        print(
            f"  repeat {rep}: {'OK' if chk['ok'] else 'MISMATCH'}  barrier payments={chk['barrier_payments']}"
            f" records={chk['completed_records_minus_prefill']} requests={chk['barrier_requests']}"
            f" | bare payments={chk['bare_payments']} requests={chk['bare_requests']}"
            f" | replays={chk['replays']} | linked={chk['records_linked_to_their_payment']}"
            f" statuses={chk['records_by_status']} errors={chk['errors'] or 0}"
        )

    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started
    print(f"\nruntime {elapsed:.0f} s | load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print("\nVERDICT (targets at c=8 and c=32)")
    found = verdicts(summary)
    for v in found:
        numbers = ", ".join(f"c={c} {x:.3f}" for c, x in v["ratios"].items()) or "not measured"
        print(f"  {v['target']:<16} >= {v['minimum']:.2f} x bare: {v['status']}  ({numbers})")
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": {
            "idembarrier": idembarrier.__version__,
            "sqlalchemy": sqlalchemy.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "runtime_s": elapsed,
        },
        "repeats": repeats,
        "summary": summary,
        "correctness": checks,
        "verdicts": found,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--database-url", default=DEFAULT_URL, help="postgresql+asyncpg or +psycopg URL (default: %(default)s)"
    )
    parser.add_argument("--conc", default="1,8,32", help="comma-separated concurrencies (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats, each on fresh tables (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of blocks per repeat (default: %(default)s)")
    parser.add_argument("--block", type=float, default=1.0, help="measured seconds per block (default: %(default)s)")
    parser.add_argument(
        "--ramp", type=float, default=0.2, help="unmeasured seconds at the start of a block (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="mixed warm-up seconds per concurrency (default: %(default)s)"
    )
    parser.add_argument("--prefill", type=int, default=20_000, help="keys recorded for replay (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.prefill < 2 or args.repeats < 1 or args.rounds < 1 or args.block <= 0:
        parser.error("need --prefill >= 2, --repeats >= 1, --rounds >= 1 and --block > 0")
    results = asyncio.run(bench(args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

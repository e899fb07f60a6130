"""First executions and replays on a table of 10^4 records beside the same on one of 10^7, on PostgreSQL.

Issue 13's "no regression" at scale: the issue measured a claim's p50 going from 0.20 to 0.24 ms between
10^4 and 10^7 records. Here each size has a database of its own (``<database>_1e4``, ``<database>_1e7``),
filled with that many COMPLETED records of random keys (one ``INSERT ... SELECT generate_series``, in key
order, then ``VACUUM ANALYZE`` and a ``CHECKPOINT``, all unmeasured), and two variants per size, each in its
own worker process, measured with ``benchmarks/_blocks.py``'s paired rounds (blocks of every variant
interleaved, the order rotating each round):

* ``first_<size>``: ``barrier.unit_of_work`` on a fresh key, writing one payment (``peers_core``'s first
  execution): the claim's INSERT lands in an index of that size;
* ``replay_<size>``: the same call on a key drawn at random from the filled ones, replayed by the claim
  (``lookup_first=False``, ``replay_from_memory=False``), so every replay reads the index.

A cell is the median over rounds of the per-round ratio larger size ÷ smallest size, with its spread. The
first executions add their records to the table of their size (a few thousand per block), which is small
beside 10^7 and makes the small table bigger, not smaller.

Usage::

    python benchmarks/records_scale.py [--sizes 10000,10000000] [--conc 1,8] [--rounds 5] [--reuse] [--keep]
                                       [--smoke] [--json out.json]

``--reuse`` keeps a size's filled records when its database already holds exactly that many (filling 10^7
takes minutes); ``--keep`` leaves the databases behind for it, else they are dropped at the end. This is a
measurement: it exits 0 whatever the ratios (non-zero only when it cannot run or its counts do not add up).
"""

from __future__ import annotations

import hashlib
import math
import random
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
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

import idembarrier  # noqa: E402
from benchmarks import _blocks, peers_core  # noqa: E402
from benchmarks._database import RECORDS, create_databases, fresh_tables, payments_by_variant  # noqa: E402
from idembarrier._keys import fingerprint_digest  # noqa: E402

if TYPE_CHECKING:
    import argparse

    from sqlalchemy.engine import URL

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/idembarrier_scale"
KINDS = ("first", "replay")
ISSUE_P50_RATIO = 0.24 / 0.20  # the issue's claim p50 from 10^4 to 10^7 records
# Filled record i's key: md5(scope || i) as a UUID's text (random over the index, and computable by the
# workers: `key_of`).
KEY = "md5($1 || i::text)::uuid::text"
# COMPLETED records as `finish` leaves them, inserted in key order, as an index build would read them.
FILL = f"""
    INSERT INTO {RECORDS} (scope, key, fingerprint, status, token, response, completed_at, updated_at,
                           response_expires_at, expires_at, cleanup_at)
    SELECT $1, k, $2, 'COMPLETED', gen_random_uuid(), $3, now(), now(), now() + $4::interval,
           now() + $5::interval, now() + $4::interval
    FROM (SELECT {KEY} AS k FROM generate_series(1, $6::int) AS i) AS keys
    ORDER BY k"""


def label(size: int) -> str:
    """``1e7`` for 10^7, the number itself otherwise."""
    exponent = round(math.log10(size))
    return f"1e{exponent}" if 10**exponent == size else str(size)


def key_of(scope: str, i: int) -> str:
    """The key of filled record ``i`` (1-based), as ``FILL`` computes it."""
    return str(uuid.UUID(hashlib.md5(f"{scope}{i}".encode()).hexdigest()))


def amount_of(name: str) -> int:
    """What ``peers_core.Idembarrier`` writes and expects for ``name``: its length."""
    return len(name)


class Scaled(peers_core.Idembarrier):
    """first_<size> and replay_<size>, each on the database of its size."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        config = config | {"url": config["urls"][name.split("_", 1)[1]]}
        super().__init__(name, config)
        self.kind, size = name.split("_", 1)
        self.size: int = config["sizes"][size]

    async def open(self, conc: int) -> None:
        await peers_core.Core.open(self, conc)
        assert self.sessionmaker is not None
        self.barrier = idembarrier.Barrier(self.sessionmaker, replay_from_memory=False)

    async def setup(self) -> None:
        return None  # the controller filled the records

    async def request(self) -> None:
        if self.kind == "first":
            await self.first(str(uuid.uuid4()))
        else:
            await self.replay(key_of(self.name, random.randint(1, self.size)), lookup_first=False)


def make(name: str, config: dict[str, Any]) -> _blocks.Variant:
    return Scaled(name, config)


# -- the controller -----------------------------------------------------------------------------------------


async def filled(url: URL, scope: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            if (await conn.execute(text("SELECT to_regclass(:t)"), {"t": RECORDS})).scalar_one() is None:
                return 0  # a database made just now
            query = text(f"SELECT count(*) FROM {RECORDS} WHERE scope = :scope")
            return int((await conn.execute(query, {"scope": scope})).scalar_one())
    finally:
        await engine.dispose()


async def prepare(url: URL, size: int, reuse: bool) -> str:
    """``url``'s database with ``size`` records to replay (filled anew unless ``reuse`` finds them), the rest
    of its rows gone, vacuumed and checkpointed; returns a line saying what it did and the table's size."""
    scope = f"replay_{label(size)}"
    await create_databases(url)
    started = time.perf_counter()
    kept = reuse and await filled(url, scope) == size
    if not kept:
        await fresh_tables(url, peers_core.Base.metadata)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            if kept:
                await raw.execute(f"DELETE FROM {RECORDS} WHERE scope <> $1", scope)
                await raw.execute(f"TRUNCATE {peers_core.Payment.__tablename__}")
            else:
                amount = amount_of(scope)
                response = idembarrier.JSONCodec().encode({"payment_id": "filled", "amount": amount})
                retention = idembarrier.Retention()
                fingerprint = fingerprint_digest({"amount": amount})
                await raw.execute(FILL, scope, fingerprint, response, retention.response, retention.record, size)
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql(f"VACUUM ANALYZE {RECORDS}, {peers_core.Payment.__tablename__}")
            await conn.exec_driver_sql("CHECKPOINT")
            sizes = text(f"SELECT pg_table_size('{RECORDS}'), pg_indexes_size('{RECORDS}')")
            table_bytes, index_bytes = (await conn.execute(sizes)).one()
    finally:
        await engine.dispose()
    what = "kept" if kept else "filled"
    return (
        f"{label(size)}: {size:,} records {what} in {time.perf_counter() - started:.1f} s; table "
        f"{table_bytes / 2**20:,.0f} MiB, indexes {index_bytes / 2**20:,.0f} MiB"
    )


async def drop(urls: list[URL]) -> None:
    await peers_core.drop_databases(urls[0], [str(u.database) for u in urls])


def report(run: _blocks.Run, concs: list[int], sizes: list[int]) -> list[str]:
    """Print the tables (Markdown) and the reading against the issue's figure; return the reading's lines."""
    small = label(sizes[0])
    header = ["larger ÷ smallest"]
    metrics = (("throughput", "throughput"), ("p50_ms", "p50"), ("p99_ms", "p99"), ("server", "PostgreSQL CPU"))
    for _metric, title in metrics:
        header += [f"{title} c={c}" for c in concs]
    rows = []
    for kind in KINDS:
        for size in sizes[1:]:
            over, under = f"{kind}_{label(size)}", f"{kind}_{small}"
            row = [f"{kind}: {label(size)} ÷ {small}"]
            for metric, _title in metrics:
                row += [_blocks.ratio(run, c, metric, over, under).cell() for c in concs]
            rows.append(row)
    print(f"\n### Larger tables ÷ {small} records (median of per-round ratios [IQR, or the range under 4 rounds])\n")
    print(_blocks.table(header, rows))

    print("\n### Per request (medians over rounds)\n")
    names = [f"{kind}_{label(s)}" for kind in KINDS for s in sizes]
    print(_blocks.per_request_table(run, concs, names))

    lines = []
    for kind in KINDS:
        for size in sizes[1:]:
            got = ", ".join(
                f"c={c} {_blocks.ratio(run, c, 'p50_ms', f'{kind}_{label(size)}', f'{kind}_{small}').median:.2f}"
                for c in concs
            )
            lines.append(f"{kind} p50 {label(size)} ÷ {small}: {got} (the issue's claim p50: {ISSUE_P50_RATIO:.2f})")
    _blocks.print_lines("READING (issue 13, no regression at scale)", lines)
    return lines


async def controller(args: argparse.Namespace) -> int:
    url = make_url(args.database_url)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    concs = [int(c) for c in args.conc.split(",")]
    urls = {label(s): url.set(database=f"{url.database}_{label(s)}") for s in sizes}
    names = [f"{kind}_{label(s)}" for s in sizes for kind in KINDS]
    print(_blocks.versions_line())
    print(
        f"sizes {sizes} | conc {concs} | {args.rounds} rounds x {len(names)} variants, blocks of "
        f"{args.warmup}+{args.block} s",
        flush=True,
    )
    started = time.perf_counter()
    try:
        for s in sizes:
            print(await prepare(urls[label(s)], s, args.reuse), flush=True)
        config = {
            "urls": {k: u.render_as_string(hide_password=False) for k, u in urls.items()},
            "sizes": {label(s): s for s in sizes},
            "probe_dsn": peers_core.dsn_of(urls[label(sizes[0])]),
            "pg_port": url.port or 5432,
            "prefill": 0,
        }
        workers = {v: _blocks.Worker(Path(__file__), v, config) for v in names}
        run = _blocks.Run()
        counts = _blocks.run_workers(workers, run, concs, args.rounds, args.warmup, args.block)
        payments: dict[str, int] = {}
        for u in urls.values():
            payments |= await payments_by_variant(u, peers_core.Payment.__tablename__)
        problems = peers_core.check(counts, payments)  # replays raise unless replayed, and write nothing
    finally:
        if not args.keep:
            await drop(list(urls.values()))
    print(f"\nruntime {time.perf_counter() - started:.0f} s | {_blocks.machine_line()}")
    report(run, concs, sizes)
    return _blocks.conclude(args, problems, run.blocks, _blocks.errors_of(run))


def main(argv: list[str] | None = None) -> int:
    parser = _blocks.script_parser(__doc__, DEFAULT_URL, smoke="a seconds-long run: 10^3 and 2x10^4, c=2, 1 round")
    parser.add_argument("--sizes", default="10000,10000000", help="records per table (default: %(default)s)")
    parser.add_argument("--conc", default="1,8", help="comma-separated concurrencies (default: %(default)s)")
    parser.add_argument("--reuse", action="store_true", help="keep a size's records when they are all there")
    parser.add_argument("--keep", action="store_true", help="leave the databases behind (for --reuse)")
    _blocks.add_run_arguments(parser, rounds=5)
    return _blocks.run_script(
        parser, argv, make, controller, {"sizes": "1000,20000", "conc": "2", "rounds": 1, "block": 0.2, "warmup": 0.05}
    )


if __name__ == "__main__":
    sys.exit(main())

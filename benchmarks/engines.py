"""What a unit of work costs next to each engine's own bare ORM transaction: PostgreSQL, PgBouncer, MariaDB, Galera.

For every engine, the variants of ``benchmarks/peers_core.py`` that matter here, each in its own worker
process and measured with ``benchmarks/_blocks.py``'s paired rounds (the order rotating every round; a cell
is the median of the per-round ratios, with their spread):

* ``bare``: ``session.add(Payment); await session.commit()`` on that engine: the reference of its row;
* ``ib_own``: ``barrier.unit_of_work(key, …)`` on a fresh key writing the same row (a first execution);
* ``ib_replay``: the same call on a recorded key, replayed by the claim;
* ``ib_lookup``: the same replay with ``lookup_first=True``.

Engines (``--engines``; each one's ratios are taken only over its own bare transaction):

* ``asyncpg``, ``psycopg``: PostgreSQL directly (``--database-url``). Server CPU is the ``schedstat`` run
  time of the worker's own backends (found by their client ports);
* ``pgbouncer``: the same PostgreSQL through a PgBouncer in transaction mode that this script starts
  (``tests/_pgbouncer.py``) on a free port and stops at the end; asyncpg with ``statement_cache_size=0``, as
  a pooler needs. Server CPU is PgBouncer's own process (its PostgreSQL backends are not attributed);
* ``asyncmy``, ``aiomysql``: MariaDB (``--mariadb-url``). Server CPU is the whole ``mariadbd`` process's
  run time (procfs): it includes its background threads and any other client of that server;
* ``galera``: node 1 of a two-node Galera cluster this script starts (``tests/_galera.py``) and stops,
  through asyncmy; every request goes to that node (its writes replicate and certify on the other). Server
  CPU is that node's ``mariadbd``.

Usage::

    python benchmarks/engines.py [--engines asyncpg,psycopg,pgbouncer,asyncmy,aiomysql,galera]
                                 [--conc 1,8] [--rounds 5] [--smoke] [--json out.json]

Each engine starts from fresh tables (idembarrier's migrated, the payments). This is a measurement: it exits
0 whatever the ratios (non-zero only when it cannot run or an engine's writes do not add up).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is benchmarks/_blocks.py, the servers tests/_*.py
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import URL, make_url  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402

from benchmarks import _blocks, peers_core  # noqa: E402
from benchmarks._database import create_databases, fresh_tables, payments_by_variant  # noqa: E402

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator

ENGINES = ("asyncpg", "psycopg", "pgbouncer", "asyncmy", "aiomysql", "galera")
VARIANTS = ("bare", "ib_own", "ib_replay", "ib_lookup")
DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/idembarrier_engines"
DEFAULT_MARIADB_URL = "mysql+asyncmy://root@127.0.0.1:3306/idembarrier_engines"
LABEL = {
    "asyncpg": "PostgreSQL, asyncpg",
    "psycopg": "PostgreSQL, psycopg 3",
    "pgbouncer": "PostgreSQL through PgBouncer (transaction mode), asyncpg",
    "asyncmy": "MariaDB, asyncmy",
    "aiomysql": "MariaDB, aiomysql",
    "galera": "Galera node 1 of 2, asyncmy",
}
RATIOS = (  # (column, variant, metric), each over the engine's bare in the same round
    ("first execution ÷ bare", "ib_own", "throughput"),
    ("replay ÷ bare", "ib_replay", "throughput"),
    ("replay, lookup first ÷ bare", "ib_lookup", "throughput"),
    ("first execution client CPU ÷ bare", "ib_own", "client"),
    ("first execution server CPU ÷ bare", "ib_own", "server"),
)


# -- the variants: peers_core's, on an engine that may need connect_args -----------------------------------


class _Pooled(peers_core.Core):
    """A pool per block with the engine's ``connect_args`` (PgBouncer: no statement cache)."""

    async def open(self, conc: int) -> None:
        connect_args: dict[str, Any] = self.config.get("connect_args", {})
        self.engine = create_async_engine(
            self.url, pool_size=self.pool(conc), max_overflow=0, connect_args=connect_args
        )
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)


class Bare(peers_core.Bare, _Pooled):
    """The engine's bare ORM transaction."""


class Barrier(peers_core.Idembarrier, _Pooled):
    """ib_own, ib_replay and ib_lookup on the engine."""


def make(name: str, config: dict[str, Any]) -> _blocks.Variant:
    return Bare(name, config) if name == "bare" else Barrier(name, config)


# -- the engines --------------------------------------------------------------------------------------------


@dataclass
class Engine:
    """One engine as the workers reach it, and where its server CPU is read."""

    name: str
    url: URL  # what the workers connect to
    setup_url: URL  # where the tables are created and counted (PgBouncer: the server behind it)
    server: str  # what the server CPU column measures
    connect_args: dict[str, Any] = field(default_factory=dict)
    probe_dsn: str | None = None  # PostgreSQL: the worker's own backends
    pg_port: int = 5432
    server_pid: int | None = None  # else: this process's run time

    @property
    def metric(self) -> str:
        """The `_blocks.Block` field that holds this engine's server CPU."""
        return "server" if self.probe_dsn is not None else "broker"

    def config(self, prefill: int) -> dict[str, Any]:
        return {
            "url": self.url.render_as_string(hide_password=False),
            "prefill": prefill,
            "connect_args": self.connect_args,
            "probe_dsn": self.probe_dsn,
            "pg_port": self.pg_port,
            "broker_pid": self.server_pid,
        }


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def pgbouncer_pid(port: int) -> int | None:
    """The pid of the PgBouncer whose configuration listens on ``port`` (its command line names the file)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if Path(argv[0].decode()).name != "pgbouncer" or len(argv) < 2:
                continue
            config = Path(argv[1].decode()).read_text()
            if f"listen_port = {port}\n" in config:
                return int(proc.name)
    return None


async def mariadbd_pid(url: URL) -> int | None:
    """The pid of the ``mariadbd`` behind ``url``, read from its pid file (``@@pid_file``)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            pid_file = (await conn.execute(text("SELECT @@pid_file"))).scalar_one()
    finally:
        await engine.dispose()
    with contextlib.suppress(OSError, ValueError):
        return int((await asyncio.to_thread(Path(str(pid_file)).read_text)).split()[0])
    return None


@contextlib.asynccontextmanager
async def reach(name: str, pg: URL, mariadb: URL) -> AsyncIterator[Engine]:
    """The `Engine` named ``name``; PgBouncer and Galera are started for the block and stopped after it."""
    stack = contextlib.ExitStack()
    try:
        if name in {"asyncpg", "psycopg"}:
            url = pg.set(drivername=f"postgresql+{name}")
            await create_databases(url)
            yield Engine(name, url, url, "its PostgreSQL backends", probe_dsn=_dsn(url), pg_port=url.port or 5432)
        elif name == "pgbouncer":
            from tests._pgbouncer import pgbouncer

            direct = pg.set(drivername="postgresql+asyncpg")
            await create_databases(direct)
            through = stack.enter_context(pgbouncer(direct))
            pid = pgbouncer_pid(through.port or 0)
            connect_args = {"statement_cache_size": 0}
            yield Engine(name, through, direct, "the PgBouncer process", connect_args, server_pid=pid)
        elif name in {"asyncmy", "aiomysql"}:
            url = mariadb.set(drivername=f"mysql+{name}")
            await create_databases(url)
            pid = await mariadbd_pid(url)
            yield Engine(name, url, url, "the whole mariadbd process", server_pid=pid)
        elif name == "galera":
            from tests._galera import galera_cluster

            cluster = stack.enter_context(galera_cluster())
            node = cluster.nodes[0]
            url = make_url(node.url(str(mariadb.database), driver="asyncmy"))
            await create_databases(url)
            pid = node.process.pid if node.process is not None else None
            yield Engine(name, url, url, "node 1's mariadbd process", server_pid=pid)
        else:
            raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    finally:
        stack.close()


# -- the controller -----------------------------------------------------------------------------------------


def measure_engine(engine: Engine, concs: list[int], args: argparse.Namespace) -> tuple[_blocks.Run, dict[str, Any]]:
    """Every round of every variant on ``engine``; the run and the workers' counts."""
    run = _blocks.Run()
    workers = {v: _blocks.Worker(Path(__file__), v, engine.config(args.prefill)) for v in VARIANTS}
    label = f"{engine.name}: workers"
    return run, _blocks.run_workers(workers, run, concs, args.rounds, args.warmup, args.block, label=label)


def report(results: dict[str, tuple[Engine, _blocks.Run]], concs: list[int]) -> None:
    """Print the ratios and the per-request figures as Markdown tables."""
    header = ["engine", "c", *(column for column, _, _ in RATIOS)]
    rows = []
    for name, (engine, run) in results.items():
        for c in concs:
            cells = []
            for _, variant, metric in RATIOS:
                metric = engine.metric if metric == "server" else metric
                cells.append(_blocks.ratio(run, c, metric, variant, "bare").cell())
            rows.append([LABEL[name], str(c), *cells])
    print("\n### Ratios to the engine's bare ORM transaction (median of per-round ratios [IQR, or the range])\n")
    print(_blocks.table(header, rows))

    header = ["engine", "c", "variant", "req/s", "client CPU µs/req", "server CPU µs/req", "p50 / p99 ms"]
    rows = []
    for name, (engine, run) in results.items():
        for c in concs:
            for v in VARIANTS:
                client, server = (_blocks.median_value(run, c, m, v) for m in ("client", engine.metric))
                p50, p99 = (_blocks.median_field(run, c, f, v) for f in ("p50_ms", "p99_ms"))
                rows.append(
                    [
                        LABEL[name],
                        str(c),
                        v,
                        _blocks.number(_blocks.median_value(run, c, "throughput", v)),
                        _blocks.number(client),
                        _blocks.number(server),
                        f"{_blocks.number(p50, 2)} / {_blocks.number(p99, 1)}",
                    ]
                )
    print("\n### Per request (medians over rounds)\n")
    print(_blocks.table(header, rows))
    print("\nServer CPU is, per engine: " + "; ".join(f"{n}: {e.server}" for n, (e, _) in results.items()))


async def controller(args: argparse.Namespace) -> int:
    pg, mariadb = make_url(args.database_url), make_url(args.mariadb_url)
    concs = [int(c) for c in args.conc.split(",")]
    names = [n for n in args.engines.split(",") if n]
    print(_blocks.versions_line())
    print(
        f"engines {names} | conc {concs} | {args.rounds} rounds x {len(VARIANTS)} variants, blocks of "
        f"{args.warmup}+{args.block} s | {args.prefill} keys recorded per replay variant",
        flush=True,
    )
    started = time.perf_counter()
    results: dict[str, tuple[Engine, _blocks.Run]] = {}
    problems: list[str] = []
    errors: dict[str, int] = {}
    for name in names:
        async with reach(name, pg, mariadb) as engine:
            await fresh_tables(engine.setup_url, peers_core.Base.metadata)
            run, counts = await asyncio.to_thread(measure_engine, engine, concs, args)
            payments = await payments_by_variant(engine.setup_url, peers_core.Payment.__tablename__)
        problems += [f"{name}: {p}" for p in peers_core.check(counts, payments)]
        errors |= {f"{name} {what}": n for what, n in _blocks.errors_of(run).items()}
        results[name] = (engine, run)
    print(f"\nruntime {time.perf_counter() - started:.0f} s | {_blocks.machine_line()}")
    report(results, concs)
    blocks = {name: run.blocks for name, (_, run) in results.items()}
    return _blocks.conclude(args, problems, blocks, errors)


def main(argv: list[str] | None = None) -> int:
    parser = _blocks.script_parser(
        __doc__, DEFAULT_URL, smoke="a seconds-long run: c=2, 1 round, short blocks", url_help="PostgreSQL"
    )
    parser.add_argument("--mariadb-url", default=DEFAULT_MARIADB_URL, help="MariaDB (default: %(default)s)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="which engines (default: %(default)s)")
    parser.add_argument("--conc", default="1,8", help="comma-separated concurrencies (default: %(default)s)")
    parser.add_argument("--prefill", type=int, default=2000, help="keys recorded per replay variant (%(default)s)")
    _blocks.add_run_arguments(parser, rounds=5)
    return _blocks.run_script(
        parser, argv, make, controller, {"conc": "2", "rounds": 1, "block": 0.2, "warmup": 0.05, "prefill": 20}
    )


if __name__ == "__main__":
    sys.exit(main())

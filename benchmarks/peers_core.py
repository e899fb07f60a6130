"""idembarrier beside what its users would write instead: one business insert per request, on PostgreSQL.

Variants, each in its own worker process (see ``benchmarks/_blocks.py`` for the method):

* ``bare``: ``session.add(Payment); await session.commit()``: the reference every ratio is taken over;
* ``ib_own``: ``barrier.unit_of_work(key, …)`` on a fresh key, with the barrier's own session (a first execution);
* ``ib_session``: the same with ``session=`` the caller's session (a released savepoint; the caller commits);
* ``ib_replay``: the same call on a recorded key, replayed by the claim (``lookup_first=False``);
* ``ib_lookup``: the same replay with ``lookup_first=True`` (one read, no transaction);
* ``ib_memory``: the same replay in a process that has read the key before: answered from the finished record
  that read kept (``replay_from_memory``, the default), without the database. ``ib_replay`` and ``ib_lookup``
  run with ``replay_from_memory=False``; ``ib_memory``'s memory lasts across its blocks, each block's warm-up
  reading what it does not hold yet;
* ``naive``: the anti-pattern: ``session.get(Key)``, then ``add(Key) + add(Payment)``, commit (a concurrent
  duplicate gets an IntegrityError, not the stored answer);
* ``idemkit`` / ``idemkit_replay``: ``@idempotent(backend=PostgresBackend)`` around the same ORM transaction,
  an explicit key, the body as ``validation_fingerprint``; replays on recorded keys;
* ``dbos`` / ``dbos_replay``: DBOS Transact, ``@DBOS.workflow`` over ``AsyncSQLAlchemyDatasource.transaction``
  with ``SetWorkflowID(key)``: its defaults (SERIALIZABLE, psycopg), its system database in a database of its own.

A peer that is not importable is listed as "not installed" (the ``bench`` extra installs them all).
Pools: ``pool_size = min(c, 16)``, no overflow, so c = 32 is 32 callers on 16 connections (DBOS: 8 to each of
its two databases, at every c, so that its idle pools and the active variant's fit in ``max_connections``).

Usage::

    python benchmarks/peers_core.py [--conc 1,8,32] [--rounds 4] [--repeats 1] [--smoke] [--json out.json]

This is a measurement: it exits 0 whether idembarrier is ahead or not (non-zero only when it cannot run or a
variant's writes do not add up).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import random
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is benchmarks/_blocks.py
    sys.path.insert(0, str(ROOT))

from sqlalchemy import Integer, MetaData, String, Text, Uuid  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402

import idembarrier  # noqa: E402
from benchmarks import _blocks  # noqa: E402
from benchmarks._database import (  # noqa: E402
    ADMIN_DATABASE,
    DEFAULT_URL,
    create_databases,
    fresh_tables,
    installed,
    payments_by_variant,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncEngine

    from idembarrier._memory import Memory

VARIANTS = (
    "bare",
    "ib_own",
    "ib_session",
    "ib_replay",
    "ib_lookup",
    "ib_memory",
    "naive",
    "idemkit",
    "idemkit_replay",
    "dbos",
    "dbos_replay",
)
NEEDS = {"idemkit": "idemkit", "idemkit_replay": "idemkit", "dbos": "dbos", "dbos_replay": "dbos"}
REPLAYS = {"ib_replay", "ib_lookup", "ib_memory", "idemkit_replay", "dbos_replay"}  # must add no row past their prefill
DESCRIPTION = {
    "bare": "bare ORM transaction",
    "ib_own": "idembarrier, own session (first execution)",
    "ib_session": "idembarrier, caller's session (`session=`)",
    "ib_replay": "idembarrier replay, by the claim",
    "ib_lookup": "idembarrier replay, `lookup_first=True`",
    "ib_memory": "idembarrier replay from memory (a key read here before)",
    "naive": "naive SELECT-then-INSERT barrier",
    "idemkit": "idemkit 1.x `@idempotent` (PostgresBackend)",
    "idemkit_replay": "idemkit replay",
    "dbos": "DBOS Transact workflow + transaction",
    "dbos_replay": "DBOS replay (same workflow id)",
}
COMPARISONS = (  # idembarrier ÷ its alternative, measured in the same rounds
    ("ib_own", "naive"),
    ("ib_own", "idemkit"),
    ("ib_own", "dbos"),
    ("ib_session", "ib_own"),
    ("ib_replay", "idemkit_replay"),
    ("ib_lookup", "idemkit_replay"),
    ("ib_lookup", "ib_replay"),
    ("ib_memory", "ib_lookup"),
    ("ib_memory", "idemkit_replay"),
    ("ib_replay", "dbos_replay"),
)
TARGETS = (  # issue 13's, read off this run: (what, variant, minimum ratio to bare, metric)
    ("first execution >= 0.80x bare at c=8, 32", "ib_own", 0.80, "throughput"),
    ("first execution PostgreSQL CPU <= 1.8x bare at c=8, 32", "ib_own", 1.8, "server"),
    ("replay >= 4x bare at c=8, 32 (lookup first)", "ib_lookup", 4.0, "throughput"),
    ("replay >= 4x bare at c=8, 32 (from memory)", "ib_memory", 4.0, "throughput"),
    ("caller-session path >= 0.70x bare at c=8, 32", "ib_session", 0.70, "throughput"),
)


class Base(DeclarativeBase):
    metadata = MetaData()


class Payment(Base):
    """The business row every variant writes, tagged with the variant so the check can count them apart."""

    __tablename__ = "peers_payments"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    variant: Mapped[str] = mapped_column(String(32), index=True)
    amount: Mapped[int] = mapped_column(Integer)


class NaiveKey(Base):
    """The naive barrier's table: the key as primary key, the response beside it."""

    __tablename__ = "peers_naive_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    response: Mapped[str] = mapped_column(Text)


# -- the variants (each runs in its own worker process) ----------------------------------------------------


class Core:
    """What every variant shares: the URL, a pool per block, the counts for the check."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name, self.config = name, config
        self.url: str = config["url"]
        self.prefill: int = config["prefill"]
        self.executed = 0
        self.replayed = 0
        self.engine: AsyncEngine | None = None
        self.sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self.keys: list[str] = []

    def pool(self, conc: int) -> int:
        return min(conc, 16)

    async def setup(self) -> None:
        return None

    async def open(self, conc: int) -> None:
        self.engine = create_async_engine(self.url, pool_size=self.pool(conc), max_overflow=0)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
        self.engine = self.sessionmaker = None

    async def request(self) -> None:
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        return {"executed": self.executed, "replayed": self.replayed, "prefill": len(self.keys)}

    def payment(self) -> Payment:
        return Payment(id=uuid.uuid4(), variant=self.name, amount=len(self.name))

    async def prefill_with(self, one: Callable[[str], Awaitable[None]]) -> None:
        """Record ``self.prefill`` keys through the variant itself, 16 at a time."""
        keys = [f"{self.name}-{uuid.uuid4()}" for _ in range(self.prefill)]
        queue = list(keys)

        async def filler() -> None:
            while queue:
                await one(queue.pop())

        await asyncio.gather(*(filler() for _ in range(16)))
        self.keys = keys


class Bare(Core):
    async def request(self) -> None:
        assert self.sessionmaker is not None
        async with self.sessionmaker() as session:
            session.add(self.payment())
            await session.commit()
        self.executed += 1


class Idembarrier(Core):
    """ib_own, ib_session, ib_replay, ib_lookup and ib_memory."""

    barrier: idembarrier.Barrier[idembarrier.JSON]
    memory: Memory | None = None  # ib_memory's, kept across its blocks as a long-lived process keeps it

    async def open(self, conc: int) -> None:
        await super().open(conc)
        assert self.sessionmaker is not None
        asks_the_database = self.name in ("ib_replay", "ib_lookup")
        self.barrier = idembarrier.Barrier(self.sessionmaker, replay_from_memory=not asks_the_database)
        if self.name == "ib_memory":
            self.memory = self.memory or self.barrier.runtime.memory
            self.barrier.runtime.memory = self.memory

    async def setup(self) -> None:
        if self.name in REPLAYS:
            await self.open(16)
            try:
                await self.prefill_with(self.first)
            finally:
                await self.close()

    async def first(self, key: str) -> None:
        amount = len(self.name)
        async with self.barrier.unit_of_work(key, scope=self.name, fingerprint={"amount": amount}) as uow:
            if uow.replayed:
                raise RuntimeError(f"fresh key {key} was replayed")
            payment = self.payment()
            uow.session.add(payment)
            uow.complete({"payment_id": str(payment.id), "amount": amount})
        self.executed += 1

    async def in_session(self, key: str) -> None:
        assert self.sessionmaker is not None
        amount = len(self.name)
        async with (
            self.sessionmaker() as session,
            session.begin(),
            self.barrier.unit_of_work(key, scope=self.name, fingerprint={"amount": amount}, session=session) as uow,
        ):
            if uow.replayed:
                raise RuntimeError(f"fresh key {key} was replayed")
            payment = self.payment()
            session.add(payment)
            uow.complete({"payment_id": str(payment.id), "amount": amount})
        self.executed += 1

    async def replay(self, key: str, *, lookup_first: bool) -> None:
        fingerprint = {"amount": len(self.name)}
        async with self.barrier.unit_of_work(
            key, scope=self.name, fingerprint=fingerprint, lookup_first=lookup_first
        ) as uow:
            if not uow.replayed:
                raise RuntimeError(f"recorded key {key} was not replayed")  # rolls the claim back
            if not isinstance(uow.response, dict) or uow.response.get("amount") != len(self.name):
                raise RuntimeError(f"key {key} replayed {uow.response!r}")
        self.replayed += 1

    async def request(self) -> None:
        if self.name == "ib_own":
            await self.first(str(uuid.uuid4()))
        elif self.name == "ib_session":
            await self.in_session(str(uuid.uuid4()))
        else:
            await self.replay(random.choice(self.keys), lookup_first=self.name in ("ib_lookup", "ib_memory"))


class Naive(Core):
    """The barrier people write by hand: look, then insert the key with the business row."""

    async def request(self) -> None:
        assert self.sessionmaker is not None
        key = str(uuid.uuid4())
        async with self.sessionmaker() as session:
            found = await session.get(NaiveKey, key)
            if found is not None:
                self.replayed += 1
                return
            payment = self.payment()
            session.add(NaiveKey(key=key, response=json.dumps({"payment_id": str(payment.id)})))
            session.add(payment)
            await session.commit()
        self.executed += 1


class Idemkit(Core):
    """idemkit's ``@idempotent`` with its PostgreSQL backend around the same ORM transaction."""

    backend: Any = None
    pay: Any = None

    async def open(self, conc: int) -> None:
        from idemkit import MethodConfig, PostgresBackend, idempotent

        # idemkit warns (once) that a UUID key looks volatile: the benchmark's keys are fresh on purpose
        warnings.filterwarnings("ignore", message="idemkit: tool", category=UserWarning)

        await super().open(conc)
        pool = self.pool(conc)
        dsn = self.config["dsn"]
        self.backend = PostgresBackend.from_url(dsn, min_size=pool, max_size=pool)
        sessionmaker = self.sessionmaker
        assert sessionmaker is not None

        async def pay(amount: int) -> dict[str, Any]:
            async with sessionmaker() as session:
                payment = self.payment()
                session.add(payment)
                await session.commit()
            self.executed += 1
            return {"payment_id": str(payment.id), "amount": amount}

        config = MethodConfig(
            scope=lambda args: self.name,
            validation_fingerprint=lambda args: json.dumps({"amount": args["amount"]}).encode(),
        )
        self.pay = idempotent(backend=self.backend, config=config)(pay)

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.aclose()
            self.backend = None
        await super().close()

    async def setup(self) -> None:
        if self.name in REPLAYS:
            await self.open(16)
            try:
                await self.prefill_with(self.call)
            finally:
                await self.close()

    async def call(self, key: str) -> None:
        answer = await self.pay(len(self.name), idempotency_key=key)
        if answer.get("amount") != len(self.name):
            raise RuntimeError(f"idemkit answered {answer!r}")

    async def request(self) -> None:
        if self.name == "idemkit":
            await self.call(str(uuid.uuid4()))
        else:
            before = self.executed
            await self.call(random.choice(self.keys))
            if self.executed != before:
                raise RuntimeError("an idemkit replay ran its body")
            self.replayed += 1


class Dbos(Core):
    """DBOS Transact: a workflow whose id is the key, over one datasource transaction."""

    dbos: Any = None
    datasource: Any = None
    workflow: Any = None
    launched = False

    async def launch(self) -> None:
        dbos = importlib.import_module("dbos")
        self.dbos = dbos
        url = make_url(self.url)
        self.datasource = await dbos.AsyncSQLAlchemyDatasource.create(
            url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False),
            engine_kwargs={"pool_size": 8, "max_overflow": 0},
        )
        datasource = self.datasource

        @datasource.transaction()  # type: ignore[untyped-decorator]
        async def insert_payment(amount: int) -> dict[str, Any]:
            payment = self.payment()
            datasource.sql_session().add(payment)
            self.executed += 1
            return {"payment_id": str(payment.id), "amount": amount}

        @dbos.DBOS.workflow()  # type: ignore[untyped-decorator]
        async def pay(amount: int) -> dict[str, Any]:
            result: dict[str, Any] = await insert_payment(amount)
            return result

        self.workflow = pay
        config = {
            "name": f"peers-{self.name}",
            "system_database_url": self.config["dbos_system_urls"][self.name],
            "sys_db_pool_size": 8,
            "executor_id": self.name,
            "log_level": "WARNING",
        }
        dbos.DBOS(config=config)
        await asyncio.to_thread(dbos.DBOS.launch)
        self.launched = True

    async def setup(self) -> None:
        await self.launch()
        if self.name in REPLAYS:
            await self.prefill_with(self.call)

    async def open(self, conc: int) -> None:
        return None  # DBOS's pools live as long as DBOS: 8 connections to each database

    async def close(self) -> None:
        # Idle between blocks: give the application database's connections back (the server's
        # max_connections is shared by every variant); the system database's pool stays DBOS's.
        await self.datasource.engine.dispose()

    async def call(self, key: str) -> None:
        with self.dbos.SetWorkflowID(key):
            answer = await self.workflow(len(self.name))
        if answer.get("amount") != len(self.name):
            raise RuntimeError(f"DBOS answered {answer!r}")

    async def request(self) -> None:
        if self.name == "dbos":
            await self.call(str(uuid.uuid4()))
        else:
            before = self.executed
            await self.call(random.choice(self.keys))
            if self.executed != before:
                raise RuntimeError("a DBOS replay ran its transaction")
            self.replayed += 1


def make(name: str, config: dict[str, Any]) -> _blocks.Variant:
    kinds: dict[str, type[Core]] = {"bare": Bare, "naive": Naive, "idemkit": Idemkit, "dbos": Dbos}
    kind = next((k for prefix, k in kinds.items() if name.startswith(prefix)), Idembarrier)
    return kind(name, config)


# -- the controller -----------------------------------------------------------------------------------------


async def prepare(url: URL, dbos_databases: list[str]) -> None:
    """Fresh tables in ``url``'s database (idembarrier's migrated, idemkit's, the payments) and DBOS's databases."""
    await create_databases(url, dbos_databases)
    await fresh_tables(
        url, Base.metadata, before=["DROP TABLE IF EXISTS idemkit_records", "DROP SCHEMA IF EXISTS dbos CASCADE"]
    )
    if importlib.util.find_spec("idemkit") is not None:
        from idemkit.backends.postgres import init_pg

        await init_pg(dsn_of(url))


async def drop_databases(url: URL, names: list[str]) -> None:
    admin = create_async_engine(url.set(database=ADMIN_DATABASE), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            for name in names:
                quoted = conn.dialect.identifier_preparer.quote(name)
                await conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await admin.dispose()


def dsn_of(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def check(counts: dict[str, dict[str, int]], payments: dict[str, int]) -> list[str]:
    """Each executing variant wrote one row per execution; the replays added none past their prefill."""
    problems = []
    for name, c in counts.items():
        rows = payments.get(name, 0)
        if rows != c["executed"]:
            problems.append(f"{name}: {rows} payment rows for {c['executed']} executions")
        if name in REPLAYS and c["executed"] != c["prefill"]:
            problems.append(f"{name}: {c['executed']} executions for {c['prefill']} recorded keys")
    return problems


def report(run: _blocks.Run, concs: list[int], names: list[str], missing: list[str]) -> list[str]:
    """Print the tables (Markdown) and the targets; return the targets' verdict lines."""
    header = ["variant"]
    header += [f"throughput c={c}" for c in concs]
    header += [f"client CPU c={c}" for c in concs]
    header += [f"PostgreSQL CPU c={c}" for c in concs]
    rows = []
    for v in [*names, *missing]:
        if v in missing:
            rows.append([f"{v} ({DESCRIPTION[v]})", *["not installed"] * (3 * len(concs))])
            continue
        rows.append(_blocks.ratio_row(run, concs, f"{v} ({DESCRIPTION[v]})", v))
    print("\n### Ratios to bare (median of per-round ratios [IQR, or the range under 4 rounds])\n")
    print(_blocks.table(header, rows))

    header = ["idembarrier ÷ alternative"] + [f"throughput c={c}" for c in concs]
    header += [f"client CPU c={c}" for c in concs] + [f"PostgreSQL CPU c={c}" for c in concs]
    rows = []
    for a, b in COMPARISONS:
        if a in names and b in names:
            row = [f"{a} / {b}"]
            for metric in ("throughput", "client", "server"):
                row += [_blocks.ratio(run, c, metric, a, b).cell() for c in concs]
            rows.append(row)
    print("\n### idembarrier ÷ each alternative\n")
    print(_blocks.table(header, rows))

    print("\n### Per request (medians over rounds)\n")
    print(_blocks.per_request_table(run, concs, names))

    verdicts = [
        f"{what}: {_blocks.verdict(run, concs, metric, variant, bound) if variant in names else 'not measured'}"
        for what, variant, bound, metric in TARGETS
    ]
    _blocks.print_lines("TARGETS (issue 13)", verdicts)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = _blocks.script_parser(__doc__, DEFAULT_URL, smoke="a seconds-long run: c=2, 1 round, short blocks")
    parser.add_argument("--conc", default="1,8,32", help="comma-separated concurrencies (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats, each on fresh tables (default: %(default)s)")
    parser.add_argument("--prefill", type=int, default=2000, help="keys recorded per replay variant (%(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which variants (default: all)")
    _blocks.add_run_arguments(parser, rounds=4)
    return _blocks.run_script(
        parser,
        argv,
        make,
        controller,
        {"conc": "2", "rounds": 1, "repeats": 1, "block": 0.2, "warmup": 0.05, "prefill": 20},
    )


async def controller(args: argparse.Namespace) -> int:
    url = make_url(args.database_url)
    concs = [int(c) for c in args.conc.split(",")]
    wanted = [v for v in args.variants.split(",") if v]
    if "bare" not in wanted:
        wanted.insert(0, "bare")
    names = [v for v in wanted if installed(NEEDS, v)]
    missing = [v for v in wanted if not installed(NEEDS, v)]
    print(_blocks.versions_line())
    print(
        f"conc {concs} | {args.repeats} repeat(s) x {args.rounds} rounds x {len(names)} variants, blocks of "
        f"{args.warmup}+{args.block} s | not installed: {', '.join(missing) or 'none'}",
        flush=True,
    )
    started = time.perf_counter()
    run = _blocks.Run()
    problems: list[str] = []
    dbos_urls = {v: url.set(database=f"{url.database}_{v}").render_as_string(hide_password=False) for v in names}
    dbos_databases = [str(make_url(dbos_urls[v]).database) for v in names if v.startswith("dbos")]
    for repeat in range(args.repeats):
        await prepare(url, dbos_databases)
        config = {
            "url": url.render_as_string(hide_password=False),
            "dsn": dsn_of(url),
            "probe_dsn": dsn_of(url),
            "pg_port": url.port or 5432,
            "prefill": args.prefill,
            "dbos_system_urls": {
                v: make_url(u).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
                for v, u in dbos_urls.items()
            },
        }
        workers = {v: _blocks.Worker(Path(__file__), v, config) for v in names}
        counts = _blocks.run_workers(workers, run, concs, args.rounds, args.warmup, args.block, repeat=repeat)
        problems += check(counts, await payments_by_variant(url, "peers_payments"))
    await drop_databases(url, dbos_databases)
    print(f"\nruntime {time.perf_counter() - started:.0f} s | {_blocks.machine_line()}")
    report(run, concs, names, missing)
    return _blocks.conclude(args, problems, run.blocks, _blocks.errors_of(run))


if __name__ == "__main__":
    sys.exit(main())

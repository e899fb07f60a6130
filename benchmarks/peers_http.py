"""idembarrier's HTTP middleware beside bare FastAPI and the Redis-backed idempotency middlewares.

One FastAPI route, ``POST /payments``, inserting one row through SQLAlchemy (asyncpg), answered 201 JSON.
The app is called **in process** through a minimal ASGI caller: no sockets, no HTTP parsing, no server. So
the ratios are those of the application and its middleware; a real server (uvicorn) adds the same constant
to every variant and shrinks every ratio.

Variants, each in its own worker process (see ``benchmarks/_blocks.py`` for the method):

* ``h_bare``: the route with ``Depends(get_session)``: add, commit. The reference.
* ``h_ib``: idembarrier's `IdempotencyMiddleware` (``idembarrier.asgi``); the route writes through
  ``Depends(unit_of_work_session)``, the response recorded in the same transaction. Fresh keys.
* ``h_ib_replay``: recorded keys, replayed in the process that recorded them (the barrier's memory of keys
  finished here makes a key's first replay in a block one read, no transaction; the next ones are answered
  from the finished record that read kept, without the database).
* ``h_ib_replay_cold``: the same keys replayed by another process, which has no memory of them: the claim's
  replay (BEGIN, claim, ROLLBACK).
* ``h_snok`` / ``h_snok_replay``: asgi-idempotency-header 0.2 (``IdempotencyHeaderMiddleware`` with its
  ``RedisBackend``) around the bare app.
* ``h_idemkit`` / ``h_idemkit_replay``: idemkit's ASGI ``IdempotencyMiddleware`` with its ``RedisBackend``
  around the bare app.

Both Redis-backed peers keep their records in Redis (127.0.0.1:6379), apart from the route's writes: neither
is atomic with them. Pools: ``pool_size = c``. Redis CPU comes from ``INFO cpu`` and Redis is shared, so small
values are noise.

Usage::

    python benchmarks/peers_http.py [--conc 1,8,32] [--rounds 4] [--smoke] [--json out.json]
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is benchmarks/_blocks.py
    sys.path.insert(0, str(ROOT))

from fastapi import Depends, FastAPI, Request  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from sqlalchemy import Integer, MetaData, String, Uuid  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402

import idembarrier  # noqa: E402
from benchmarks import _blocks  # noqa: E402
from benchmarks._database import (  # noqa: E402
    DEFAULT_URL,
    create_databases,
    fresh_tables,
    installed,
    payments_by_variant,
)
from idembarrier.asgi import HTTPResponse, HTTPResponseCodec, IdempotencyMiddleware, unit_of_work_session  # noqa: E402

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Awaitable, Callable
    from typing import TypeAlias

    from sqlalchemy.ext.asyncio import AsyncEngine

    ASGIApp: TypeAlias = Callable[[Any, Any, Any], Awaitable[Any]]  # any ASGI application, whoever typed it

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
VARIANTS = (
    "h_bare",
    "h_ib",
    "h_ib_replay",
    "h_ib_replay_cold",
    "h_snok",
    "h_snok_replay",
    "h_idemkit",
    "h_idemkit_replay",
)
NEEDS = {
    "h_snok": "idempotency_header_middleware",
    "h_snok_replay": "idempotency_header_middleware",
    "h_idemkit": "idemkit",
    "h_idemkit_replay": "idemkit",
}
REPLAYS = {"h_ib_replay", "h_ib_replay_cold", "h_snok_replay", "h_idemkit_replay"}
DESCRIPTION = {
    "h_bare": "bare FastAPI",
    "h_ib": "idembarrier middleware, first request",
    "h_ib_replay": "idembarrier replay, same process",
    "h_ib_replay_cold": "idembarrier replay, another process",
    "h_snok": "asgi-idempotency-header + Redis, first",
    "h_snok_replay": "asgi-idempotency-header replay",
    "h_idemkit": "idemkit ASGI + Redis, first",
    "h_idemkit_replay": "idemkit ASGI replay",
}
COMPARISONS = (
    ("h_ib", "h_snok"),
    ("h_ib", "h_idemkit"),
    ("h_ib_replay", "h_snok_replay"),
    ("h_ib_replay", "h_idemkit_replay"),
    ("h_ib_replay_cold", "h_idemkit_replay"),
    ("h_ib_replay", "h_ib_replay_cold"),
)
BODY = b'{"amount": 7}'


class Base(DeclarativeBase):
    metadata = MetaData()


class Payment(Base):
    """The route's row, tagged with the variant so the check can count them apart."""

    __tablename__ = "peers_http_payments"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    variant: Mapped[str] = mapped_column(String(32), index=True)
    amount: Mapped[int] = mapped_column(Integer)


class PaymentIn(BaseModel):
    amount: int


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The bare route's session (a FastAPI dependency), from the app's sessionmaker."""
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session:
        yield session


# -- the in-process ASGI caller -----------------------------------------------------------------------------


async def post(app: ASGIApp, key: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """``POST /payments`` with ``Idempotency-Key: key`` straight into ``app``; its status, headers and body."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/payments",
        "raw_path": b"/payments",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"idempotency-key", key.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("bench", 80),
        "state": {},
    }
    answered = asyncio.Event()
    sent_body = False
    status, headers, chunks = 0, {}, []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    await app(scope, receive, send)
    return status, headers, b"".join(chunks)


# -- the variants -------------------------------------------------------------------------------------------


class Http:
    """One app for the worker's life; a pool per block, bound to the app's sessionmaker."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name, self.config = name, config
        self.url: str = config["url"]
        self.prefill: int = config["prefill"]
        self.run_id: str = config["run_id"]
        self.executed = self.replayed = 0
        self.keys: list[str] = []
        self.engine: AsyncEngine | None = None
        self.sessionmaker: async_sessionmaker[AsyncSession] = async_sessionmaker(expire_on_commit=False)
        self.app: ASGIApp = self.build()

    # the app

    def payment(self) -> Payment:
        return Payment(id=uuid.uuid4(), variant=self.name, amount=7)

    def bare_app(self) -> FastAPI:
        app = FastAPI()
        app.state.sessionmaker = self.sessionmaker

        @app.post("/payments", status_code=201)
        async def create(body: PaymentIn, session: Annotated[AsyncSession, Depends(get_session)]) -> dict[str, Any]:
            payment = self.payment()
            session.add(payment)
            await session.commit()
            self.executed += 1
            return {"id": str(payment.id), "amount": body.amount}

        return app

    def build(self) -> ASGIApp:
        return self.bare_app()

    async def wrap(self) -> ASGIApp:
        """The app as a block calls it (the Redis peers build their middleware on a fresh client here)."""
        return self.app

    # the worker's protocol

    async def setup(self) -> None:
        if self.name in REPLAYS:
            await self.open(16)
            try:
                await self.record(self.prefill)
            finally:
                await self.close()

    async def record(self, n: int) -> None:
        keys = [f"{self.name}-{self.run_id}-{i}" for i in range(n)]
        queue = list(keys)

        async def filler() -> None:
            while queue:
                status, _, body = await post(self.current, queue.pop())
                if status != 201:
                    raise RuntimeError(f"recording answered {status}: {body[:200]!r}")

        await asyncio.gather(*(filler() for _ in range(16)))
        self.keys = keys

    current: ASGIApp

    async def open(self, conc: int) -> None:
        self.engine = create_async_engine(self.url, pool_size=conc, max_overflow=0)
        self.sessionmaker.configure(bind=self.engine)
        self.current = await self.wrap()

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
        self.engine = None

    async def request(self) -> None:
        if self.name in REPLAYS:
            before = self.executed
            status, _, body = await post(self.current, random.choice(self.keys))
            if status != 201 or self.executed != before:
                raise RuntimeError(f"a replay answered {status} {body[:200]!r} and ran the route: {before}")
            self.replayed += 1
        else:
            status, _, body = await post(self.current, str(uuid.uuid4()))
            if status != 201:
                raise RuntimeError(f"answered {status}: {body[:200]!r}")

    def counts(self) -> dict[str, int]:
        return {"executed": self.executed, "replayed": self.replayed, "prefill": len(self.keys)}


class Idembarrier(Http):
    barrier: idembarrier.Barrier[HTTPResponse]

    def build(self) -> ASGIApp:
        app = FastAPI()

        @app.post("/payments", status_code=201)
        async def create(
            body: PaymentIn, session: Annotated[AsyncSession, Depends(unit_of_work_session)]
        ) -> dict[str, Any]:
            payment = self.payment()
            session.add(payment)
            self.executed += 1
            return {"id": str(payment.id), "amount": body.amount}

        self.barrier = idembarrier.Barrier(self.sessionmaker, codec=HTTPResponseCodec())
        return IdempotencyMiddleware(app, self.barrier, scope_of=lambda head: "bench")

    async def setup(self) -> None:
        if self.name == "h_ib_replay":
            await super().setup()
        elif self.name == "h_ib_replay_cold":  # the keys h_ib_replay recorded, in its own process
            self.keys = [f"h_ib_replay-{self.run_id}-{i}" for i in range(self.prefill)]

    async def request(self) -> None:
        if self.name == "h_ib_replay_cold":
            # Another process has no memory of the key, and every replay here would teach this one: forget
            # so that each replay is the claim's.
            self.barrier.runtime.memory.clear()
        await super().request()

    def counts(self) -> dict[str, int]:
        counts = super().counts()
        if self.name == "h_ib_replay_cold":
            counts["prefill"] = 0  # it recorded nothing itself
        return counts


class Snok(Http):
    """asgi-idempotency-header: a Redis client per block."""

    client: Any = None

    async def wrap(self) -> ASGIApp:
        import redis.asyncio as aioredis
        from idempotency_header_middleware import IdempotencyHeaderMiddleware
        from idempotency_header_middleware.backends.redis import RedisBackend

        self.client = aioredis.from_url(self.config["redis_url"])
        prefix = f"peers-{self.run_id}-"
        backend = RedisBackend(self.client, keys_key=prefix + "keys", response_key=prefix + "r-", expiry=900)
        app: ASGIApp = IdempotencyHeaderMiddleware(app=self.app, backend=backend)
        return app

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        await super().close()


class Idemkit(Http):
    """idemkit's ASGI middleware: a Redis client per block."""

    backend: Any = None

    async def wrap(self) -> ASGIApp:
        import redis.asyncio as aioredis
        from idemkit import HttpConfig, IdempotencyMiddleware
        from idemkit.backends.redis import RedisBackend

        self.backend = RedisBackend(aioredis.from_url(self.config["redis_url"]), namespace=f"peers-{self.run_id}")
        config = HttpConfig(scope=lambda request: "bench", expires_after_seconds=900)
        app: ASGIApp = IdempotencyMiddleware(self.app, backend=self.backend, config=config)
        return app

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.aclose()
            self.backend = None
        await super().close()


def make(name: str, config: dict[str, Any]) -> _blocks.Variant:
    kinds: dict[str, type[Http]] = {"h_bare": Http, "h_ib": Idembarrier, "h_snok": Snok, "h_idemkit": Idemkit}
    kind = next(k for prefix, k in kinds.items() if name.startswith(prefix))
    return kind(name, config)


# -- the controller -----------------------------------------------------------------------------------------


def check(counts: dict[str, dict[str, int]], payments: dict[str, int]) -> list[str]:
    """Each variant wrote one row per execution of the route; the replays ran it only for their recording."""
    problems = []
    for name, c in counts.items():
        if payments.get(name, 0) != c["executed"]:
            problems.append(f"{name}: {payments.get(name, 0)} payment rows for {c['executed']} executions")
        if name in REPLAYS and c["executed"] != c["prefill"]:
            problems.append(f"{name}: the route ran {c['executed']} times for {c['prefill']} recorded keys")
    return problems


def report(run: _blocks.Run, concs: list[int], names: list[str], missing: list[str]) -> None:
    header = ["variant"] + [f"throughput c={c}" for c in concs] + [f"client CPU c={c}" for c in concs]
    rows = []
    for v in [*names, *missing]:
        if v in missing:
            rows.append([f"{v} ({DESCRIPTION[v]})", *["not installed"] * (2 * len(concs))])
            continue
        row = [f"{v} ({DESCRIPTION[v]})"]
        for metric in ("throughput", "client"):
            row += [_blocks.ratio(run, c, metric, v, "h_bare").cell() for c in concs]
        rows.append(row)
    print("\n### Ratios to bare FastAPI (median of per-round ratios [IQR, or the range under 4 rounds])\n")
    print(_blocks.table(header, rows))

    header = ["idembarrier ÷ alternative"] + [f"throughput c={c}" for c in concs]
    header += [f"client CPU c={c}" for c in concs]
    rows = []
    for a, b in COMPARISONS:
        if a in names and b in names:
            row = [f"{a} / {b}"]
            for metric in ("throughput", "client"):
                row += [_blocks.ratio(run, c, metric, a, b).cell() for c in concs]
            rows.append(row)
    print("\n### idembarrier ÷ each alternative\n")
    print(_blocks.table(header, rows))

    header = ["variant"]
    for c in concs:
        header += [f"c={c} req/s", f"c={c} client / PG / Redis µs"]
    rows = []
    for v in names:
        row = [v]
        for c in concs:
            row.append(_blocks.number(_blocks.median_value(run, c, "throughput", v)))
            cpu = [_blocks.number(_blocks.median_value(run, c, m, v)) for m in ("client", "server", "broker")]
            row.append(" / ".join(cpu))
        rows.append(row)
    print("\n### CPU per request, µs (medians over rounds; Redis is shared, so small values are noise)\n")
    print(_blocks.table(header, rows))

    print("\nTARGETS (issue 13)")
    at = [c for c in concs if c in (8, 32)] or concs
    if {"h_ib", "h_bare"} <= set(names):
        first = {c: _blocks.ratio(run, c, "throughput", "h_ib", "h_bare").median for c in at}
        line = ", ".join(f"c={c} {x:.2f}" for c, x in first.items())
        met = all(x >= 0.75 for x in first.values())
        print(f"  HTTP first request >= 0.75x bare FastAPI: {'MET' if met else 'MISSED'} ({line})")
    else:
        print("  HTTP first request >= 0.75x bare FastAPI: not measured (h_ib or h_bare not run)")
    peers = [p for p in ("h_snok_replay", "h_idemkit_replay") if p in names]
    if peers and "h_ib_replay" in names:
        worst = {}
        for c in at:
            fastest = max(peers, key=lambda p: _blocks.median_value(run, c, "throughput", p))
            worst[c] = (_blocks.ratio(run, c, "throughput", "h_ib_replay", fastest).median, fastest)
        line = ", ".join(f"c={c} {x:.2f} (vs {p})" for c, (x, p) in worst.items())
        met = all(x >= 1.0 for x, _ in worst.values())
        print(f"  HTTP replay >= 1.0x the faster Redis-backed middleware: {'MET' if met else 'MISSED'} ({line})")
    else:
        print("  HTTP replay >= 1.0x the faster Redis-backed middleware: not measured (peers not installed)")


def main(argv: list[str] | None = None) -> int:
    parser = _blocks.script_parser(__doc__, DEFAULT_URL, smoke="a seconds-long run: c=2, 1 round, short blocks")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="Redis for the peers (default: %(default)s)")
    parser.add_argument("--conc", default="1,8,32", help="comma-separated concurrencies (default: %(default)s)")
    parser.add_argument("--prefill", type=int, default=2000, help="keys recorded per replay variant (%(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which variants (default: all)")
    _blocks.add_run_arguments(parser, rounds=4)
    return _blocks.run_script(
        parser, argv, make, controller, {"conc": "2", "rounds": 1, "block": 0.2, "warmup": 0.05, "prefill": 20}
    )


async def redis_answers(url: str) -> bool:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_connect_timeout=2)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.ConnectionError):
        return False
    finally:
        await client.aclose()


async def controller(args: argparse.Namespace) -> int:
    url = make_url(args.database_url)
    concs = [int(c) for c in args.conc.split(",")]
    wanted = [v for v in args.variants.split(",") if v]
    if "h_bare" not in wanted:
        wanted.insert(0, "h_bare")
    if "h_ib_replay_cold" in wanted and "h_ib_replay" not in wanted:
        wanted.insert(wanted.index("h_ib_replay_cold"), "h_ib_replay")  # it records the cold one's keys
    names = [v for v in wanted if installed(NEEDS, v)]
    missing = [v for v in wanted if not installed(NEEDS, v)]
    redis_url = args.redis_url if any(v in NEEDS for v in names) and await redis_answers(args.redis_url) else None
    if redis_url is None and any(v in NEEDS for v in names):
        print(f"Redis does not answer at {args.redis_url}: the Redis-backed peers are left out")
        missing += [v for v in names if v in NEEDS]
        names = [v for v in names if v not in NEEDS]
    print(_blocks.versions_line())
    print(
        f"in-process ASGI (no server, no sockets) | conc {concs} | {args.rounds} rounds x {len(names)} variants, "
        f"blocks of {args.warmup}+{args.block} s | pool = c | not installed: {', '.join(missing) or 'none'}",
        flush=True,
    )
    started = time.perf_counter()
    await create_databases(url)
    await fresh_tables(url, Base.metadata)
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    config = {
        "url": url.render_as_string(hide_password=False),
        "probe_dsn": dsn,
        "pg_port": url.port or 5432,
        "prefill": args.prefill,
        "run_id": uuid.uuid4().hex[:10],
        "redis_url": redis_url,
        "redis_probe_url": redis_url,
    }
    workers = {v: _blocks.Worker(Path(__file__), v, config) for v in names}
    run = _blocks.Run()
    # Set up in order: h_ib_replay records the keys h_ib_replay_cold replays.
    counts = _blocks.run_workers(workers, run, concs, args.rounds, args.warmup, args.block)
    problems = check(counts, await payments_by_variant(url, "peers_http_payments"))
    print(f"\nruntime {time.perf_counter() - started:.0f} s | {_blocks.machine_line()}")
    report(run, concs, names, missing)
    return _blocks.conclude(args, problems, run.blocks, _blocks.errors_of(run))


if __name__ == "__main__":
    sys.exit(main())

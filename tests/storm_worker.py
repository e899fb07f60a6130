"""One client process of the fault storm (``benchmarks/fault_storm.py``), and the HTTP app it storms.

Run as ``python -m tests.storm_worker direct|http TARGET PLAN RESULT``: TARGET is the database URL (through
the fault proxy) for ``direct``, the server's base URL for ``http``. The process reads its sends from the
JSON file PLAN, warms up, prints ``ready``, waits for ``go T0`` on stdin (T0 on the system-wide monotonic
clock, the same in every process), then starts each send at ``T0 + slot / rate``: a send and its duplicate
given the same slot, in this process or another, start at the same moment. A send whose attempt fails with a
retryable answer is retried with the same key, as a careful client does. Every attempt is written to RESULT.

``direct`` runs units of work on the barrier (`Barrier.unit_of_work` for keys of even amounts,
`Barrier.execute` for odd ones), each attempt under the caller's own ``asyncio.timeout``; ``http`` posts to
the app below, served by uvicorn (``uvicorn tests.storm_worker:create_app --factory``), and now and then
abandons a request midway.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sys
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypedDict

import anyio
import httpx
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from idembarrier import (
    JSON,
    Barrier,
    ConnectionLostError,
    IdembarrierError,
    KeyInProgressError,
    StorageError,
    UnitOfWork,
)
from idembarrier._poolers import SAFE_CONNECT_ARGS
from idembarrier.asgi import HTTPResponse, HTTPResponseCodec, IdempotencyMiddleware, unit_of_work, unit_of_work_session
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from typing import TypeAlias

    from idembarrier.asgi._types import Receive, Scope, Send

    Attempt: TypeAlias = Callable[[str, int, random.Random], Awaitable["Outcome"]]
    """One attempt of a send: given its key, its amount and the client's random source."""

SCOPE = "storm"
POOL = 10
"""Pooled connections per process (client process in ``direct``, uvicorn worker in ``http``)."""
POOL_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0
CLEANUP_TIMEOUT = 0.3
WAIT_TIMEOUT = 1.5
"""How long a concurrent duplicate waits for the key's holder before `KeyInProgressError` (409)."""
HTTP_TIMEOUT = 20.0
ESCAPE = "ESCAPE "
"""The prefix of an outcome that is neither an answer nor one of our exceptions."""


class Plan(TypedDict):
    """What one client process sends: ``sends`` are ``[index, key, amount, slot]``."""

    rate: float
    in_flight: int
    deadline: float
    attempts: int
    abandon: float
    seed: int
    sends: list[tuple[int, str, int, float]]


class Result(TypedDict):
    """What one client process saw: ``attempts`` are ``[send, key, attempt, outcome, start, end, payment id]``."""

    pid: int
    attempts: list[tuple[int, str, int, str, float, float, int | None]]
    escapes: list[str]
    samples: dict[str, str]
    """The first message seen for each outcome that is an exception."""
    max_overrun: float


Outcome = tuple[str, int | None, bool]
"""An attempt's outcome, the payment id it acknowledged (if any), and whether to retry."""


def new_result() -> Result:
    return Result(pid=os.getpid(), attempts=[], escapes=[], samples={}, max_overrun=0.0)


def escape(exc: BaseException) -> tuple[str, str]:
    """The outcome naming an escaped exception, and its traceback."""
    kind = f"{ESCAPE}{type(exc).__module__}.{type(exc).__qualname__}"
    return kind, "".join(traceback.format_exception(exc))


class Client:
    """Runs a plan's sends on schedule, each retried with the same key while its answer says to retry."""

    def __init__(self, plan: Plan, attempt: Attempt, result: Result) -> None:
        self.plan = plan
        self.attempt = attempt
        self.rng = random.Random(plan["seed"])
        self.result = result
        self.limiter = anyio.CapacityLimiter(plan["in_flight"])

    async def run(self, t0: float) -> Result:
        async with anyio.create_task_group() as tg:
            for index, key, amount, slot in sorted(self.plan["sends"], key=lambda send: send[3]):
                # An open-loop arrival schedule: a send's start time is fixed by its slot, not by others' ends.
                await anyio.sleep(max(0.0, t0 + slot / self.plan["rate"] - time.monotonic()))
                tg.start_soon(self.send, index, key, amount)
        return self.result

    async def send(self, index: int, key: str, amount: int) -> None:
        async with self.limiter:
            for attempt in range(1, self.plan["attempts"] + 1):
                start = time.monotonic()
                outcome, payment_id, retry = await self.attempt(key, amount, self.rng)
                self.result["attempts"].append((index, key, attempt, outcome, start, time.monotonic(), payment_id))
                if not retry:
                    return
                await anyio.sleep(self.rng.uniform(0.02, 0.1) * attempt)  # a client's backoff


async def pay(session: AsyncSession, key: str, amount: int) -> int:
    """The business write: one payment row for ``key``; return its id."""
    payment = Payment(key=key, amount=amount)
    session.add(payment)
    await session.flush()
    return payment.id


def direct_attempt(barrier: Barrier[JSON], result: Result, deadline: float) -> Attempt:
    """One unit of work per attempt, under the caller's own deadline."""

    async def once(key: str, amount: int) -> int:
        body = {"amount": amount}
        if amount % 2:

            async def handler(session: AsyncSession) -> JSON:
                return {"id": await pay(session, key, amount)}

            response = await barrier.execute(key, handler, scope=SCOPE, fingerprint=body)
        else:
            async with barrier.unit_of_work(key, scope=SCOPE, fingerprint=body) as uow:
                if not uow.replayed:
                    uow.complete({"id": await pay(uow.session, key, amount)})
            response = uow.response
        assert isinstance(response, dict)
        payment_id = response["id"]
        assert isinstance(payment_id, int)
        return payment_id

    async def attempt(key: str, amount: int, _rng: random.Random) -> Outcome:
        loop = asyncio.get_running_loop()
        timeout = asyncio.timeout(deadline)
        try:
            async with timeout:
                payment_id = await once(key, amount)
        except TimeoutError as exc:
            if not timeout.expired():
                kind, trace = escape(exc)
                result["escapes"].append(trace)
                return kind, None, True
            when = timeout.when()
            assert when is not None
            result["max_overrun"] = max(result["max_overrun"], loop.time() - when)
            return "TimeoutError (the caller's own deadline)", None, True
        except IdembarrierError as exc:
            kind = type(exc).__name__
            if isinstance(exc, ConnectionLostError) and exc.outcome_unknown:
                kind += " (outcome unknown)"
            if timeout.expired():
                kind += " (after the caller's deadline)"
            result["samples"].setdefault(kind, f"{type(exc).__name__}: {exc}"[:400])
            return kind, None, isinstance(exc, StorageError | KeyInProgressError)
        except Exception as exc:  # counting what escapes is the point of the storm
            kind, trace = escape(exc)
            result["escapes"].append(trace)
            return kind, None, True
        return "ok", payment_id, False

    return attempt


def kind_of(response: httpx.Response) -> str:
    """What an answer was: its status, and for a problem its type's last segment."""
    content_type = response.headers.get("content-type", "")
    if content_type == "application/problem+json":
        return f"{response.status_code} {str(response.json()['type']).rsplit('/', 1)[1]}"
    if response.status_code >= 500:
        return f"{response.status_code} {content_type or 'without a content type'}"
    replayed = " replayed" if response.headers.get("idempotent-replayed") == "true" else ""
    return f"{response.status_code}{replayed}"


def http_attempt(client: httpx.AsyncClient, abandon: float) -> Attempt:
    """One POST per attempt; with probability ``abandon`` the client gives up on it within 50 ms."""

    async def attempt(key: str, amount: int, rng: random.Random) -> Outcome:
        patience = rng.uniform(0.001, 0.05) if rng.random() < abandon else math.inf
        with anyio.move_on_after(patience) as scope:
            try:
                response = await client.post("/payments", json={"amount": amount}, headers={"Idempotency-Key": key})
            except httpx.HTTPError as exc:
                return f"no answer ({type(exc).__name__})", None, True
        if scope.cancelled_caught:
            return "abandoned by the client", None, True
        kind = kind_of(response)
        if response.status_code == 201:
            return kind, int(response.json()["id"]), False
        return kind, None, response.status_code in (409, 503) or response.status_code >= 500

    return attempt


async def ready_then_go() -> float:
    """Say ``ready``, then return the T0 of the ``go T0`` line the orchestrator answers with."""
    print("ready", flush=True)
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    word, t0 = line.split()
    assert word == "go", line
    return float(t0)


def connect_args(url: str) -> dict[str, object]:
    """The driver's connect timeout, under the name each driver gives it; behind a pooler (``STORM_POOLER=1``)
    also the settings that keep no prepared statement in a server session (`idembarrier._poolers`)."""
    driver = make_url(url).drivername
    timeout: dict[str, dict[str, object]] = {
        "postgresql+asyncpg": {"timeout": CONNECT_TIMEOUT},
        "postgresql+psycopg": {"connect_timeout": math.ceil(CONNECT_TIMEOUT)},
    }
    args = dict(timeout.get(driver, {"connect_timeout": CONNECT_TIMEOUT}))  # asyncmy, aiomysql: seconds
    if os.environ.get("STORM_POOLER"):
        args.update(SAFE_CONNECT_ARGS.get(driver, {}))
    return args


async def run_direct(url: str, plan: Plan) -> Result:
    engine = create_async_engine(
        url,
        pool_size=POOL,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
        connect_args=connect_args(url),
    )
    barrier: Barrier[JSON] = Barrier(
        async_sessionmaker(engine, expire_on_commit=False), cleanup_timeout=CLEANUP_TIMEOUT, wait_timeout=WAIT_TIMEOUT
    )
    try:
        async with engine.connect() as conn:  # the schema check and one pooled connection, before the storm
            await conn.execute(text("SELECT 1"))
        result = new_result()
        client = Client(plan, direct_attempt(barrier, result, plan["deadline"]), result)
        return await client.run(await ready_then_go())
    finally:
        await engine.dispose()


async def run_http(base_url: str, plan: Plan) -> Result:
    limits = httpx.Limits(max_connections=plan["in_flight"])
    async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT, limits=limits) as http:
        assert (await http.get("/health")).status_code == 200
        client = Client(plan, http_attempt(http, plan["abandon"]), new_result())
        return await client.run(await ready_then_go())


def main() -> None:
    mode, target, plan_path, result_path = sys.argv[1:5]
    plan: Plan = json.loads(Path(plan_path).read_text())
    runner = run_direct if mode == "direct" else run_http
    result = asyncio.run(runner(target, plan))
    Path(result_path).write_text(json.dumps(result))


# -- the HTTP app, one per uvicorn worker ----------------------------------------------------------------------

Work = Annotated[UnitOfWork[HTTPResponse], Depends(unit_of_work)]
Session = Annotated[AsyncSession, Depends(unit_of_work_session)]


class PaymentIn(BaseModel):
    amount: int


class Recorder:
    """The outermost ASGI layer: appends every exception that leaves the app to a file, then re-raises it."""

    def __init__(self, app: FastAPI, errors: Path) -> None:
        self.app = app
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            kind, trace = escape(exc)
            line = json.dumps({"pid": os.getpid(), "kind": kind, "traceback": trace})
            with self.errors.open("a") as out:  # one short append per line: O_APPEND keeps lines whole
                out.write(line + "\n")
            raise


def create_app() -> Recorder:
    """The storm's payments app on ``STORM_DATABASE_URL``; escapes go to the file ``STORM_ERRORS``."""
    engine = create_async_engine(
        os.environ["STORM_DATABASE_URL"],
        pool_size=POOL,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
        connect_args=connect_args(os.environ["STORM_DATABASE_URL"]),
    )
    barrier = Barrier(
        async_sessionmaker(engine, expire_on_commit=False),
        codec=HTTPResponseCodec(),
        cleanup_timeout=CLEANUP_TIMEOUT,
        wait_timeout=WAIT_TIMEOUT,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(IdempotencyMiddleware, barrier=barrier, scope_of=lambda _request: SCOPE)

    @app.post("/payments", status_code=201)
    async def create(body: PaymentIn, uow: Work, session: Session) -> dict[str, object]:
        return {"id": await pay(session, uow.key, body.amount), "key": uow.key}

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"pid": os.getpid()}

    return Recorder(app, Path(os.environ["STORM_ERRORS"]))


if __name__ == "__main__":
    main()

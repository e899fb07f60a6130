"""The probe's targets: one orders endpoint behind each Idempotency-Key implementation, on a real uvicorn.

Every app answers ``POST /orders`` (``{"amount": n}``) with 201 and ``{"id": …, "amount": n}`` after a
processor round trip of `LATENCY` (so concurrent duplicates overlap), fails before any effect when the
request carries ``X-Fail`` (``1``: the route raises, a 500; ``503``: it answers 503), and counts its effects
at ``GET /orders/count``. The principal is
the ``Authorization`` header. What differs is the layer in front:

- `idembarrier_app`: idembarrier's middleware, the order row in the unit of work (PostgreSQL);
- `idemkit_app`: idemkit's ASGI middleware on Redis, scoped by principal, keys required;
- `header_app`: asgi-idempotency-header's middleware on Redis, as its README sets it up;
- `naive_app`: SELECT the key's stored answer, else run and INSERT it (SQLite): no lock, no fingerprint.
"""

from __future__ import annotations

import socket
import threading
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from idembarrier import Barrier, OnConflict
from idembarrier.asgi import (
    HTTPResponseCodec,
    IdempotencyMiddleware,
    RequestHead,
)
from tests.asgi_app import Session, Work  # noqa: TC001 - FastAPI reads the annotations at runtime
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from starlette.responses import Response

    from idembarrier.asgi._types import Message, Receive, Scope, Send

LATENCY = 0.3
"""Seconds each order takes: long enough for the probe's duplicates to arrive while it runs."""
REDIS_URL = "redis://127.0.0.1:6379/0"


class OrderIn(BaseModel):
    amount: int


def _failure(request: Request) -> JSONResponse | None:
    """The answer ``X-Fail`` asks for, before any effect: a clean failure."""
    if request.headers.get("x-fail") == "1":
        raise RuntimeError("the processor failed")
    if request.headers.get("x-fail") == "503":
        return JSONResponse({"error": "the processor is unavailable"}, status_code=503)
    return None


def _in_memory_orders(app: FastAPI) -> FastAPI:
    """The orders endpoint with its effects in a list: what a Redis-fronted service's own store stands for."""
    orders: list[int] = []

    @app.post("/orders", status_code=201, response_model=None)
    async def order(body: OrderIn, request: Request) -> JSONResponse | dict[str, object]:
        if (failure := _failure(request)) is not None:
            return failure
        await anyio.sleep(LATENCY)
        orders.append(body.amount)
        return {"id": len(orders), "amount": body.amount}

    @app.get("/orders/count")
    async def count() -> dict[str, int]:
        return {"count": len(orders)}

    return app


def principal(request: RequestHead) -> str:
    """The scope of a request's key: the credential it was sent with."""
    return request.headers.get("authorization", "anonymous")


def idembarrier_app(database_url: str) -> FastAPI:
    """The orders endpoint behind idembarrier's middleware: the order row and the answer commit together."""
    engine = create_async_engine(database_url, pool_size=20, max_overflow=0)
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    barrier = Barrier(sessionmaker, codec=HTTPResponseCodec())
    app.add_middleware(IdempotencyMiddleware, barrier=barrier, scope_of=principal, on_conflict=OnConflict.FAIL)

    @app.post("/orders", status_code=201, response_model=None)
    async def order(body: OrderIn, request: Request, uow: Work, session: Session) -> JSONResponse | dict[str, object]:
        if (failure := _failure(request)) is not None:
            return failure
        await anyio.sleep(LATENCY)
        payment = Payment(key=uow.key, amount=body.amount)
        session.add(payment)
        await session.flush()
        return {"id": payment.id, "amount": body.amount}

    @app.get("/orders/count")
    async def count() -> dict[str, int]:
        async with sessionmaker() as session:
            return {"count": await session.scalar(select(func.count()).select_from(Payment)) or 0}

    return app


def idemkit_app() -> FastAPI:
    """The orders endpoint behind idemkit's ASGI middleware on Redis, keys scoped by principal and required."""
    from idemkit import HttpConfig
    from idemkit import IdempotencyMiddleware as IdemkitMiddleware
    from idemkit.backends.redis import RedisBackend

    backend = RedisBackend.from_url(REDIS_URL, namespace=f"probe-{uuid.uuid4().hex}")
    app = FastAPI()
    config = HttpConfig(scope=lambda request: request.headers.get("authorization"), require_key_for_mutations=True)
    app.add_middleware(IdemkitMiddleware, backend=backend, config=config)
    return _in_memory_orders(app)


def header_app() -> FastAPI:
    """The orders endpoint behind asgi-idempotency-header's middleware on Redis, set up as its README shows."""
    from idempotency_header_middleware import IdempotencyHeaderMiddleware
    from idempotency_header_middleware.backends import RedisBackend
    from redis.asyncio import Redis

    prefix = f"probe-{uuid.uuid4().hex}"
    redis = Redis.from_url(REDIS_URL)
    backend = RedisBackend(redis, keys_key=f"{prefix}-keys", response_key=f"{prefix}-responses")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await redis.aclose()  # the middleware leaves its client to the app

    app = FastAPI(lifespan=lifespan)
    # Its middleware is a dataclass, not the factory type Starlette's stubs expect; it is called the same way.
    app.add_middleware(IdempotencyHeaderMiddleware, backend=backend)  # type: ignore[arg-type]
    return _in_memory_orders(app)


class NaiveIdempotency:
    """Looks the key's answer up, and stores it after the route ran: a check, then an act, with nothing between."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_async_engine(database_url)
        self.ready = False

        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            yield
            await self.engine.dispose()

        self.app = _in_memory_orders(FastAPI(lifespan=lifespan))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = dict(scope.get("headers", ())).get(b"idempotency-key") if scope["type"] == "http" else None
        if key is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        async with self.engine.begin() as conn:
            if not self.ready:
                await conn.execute(text("CREATE TABLE IF NOT EXISTS answers (key TEXT, status INT, body TEXT)"))
                self.ready = True
            found = (await conn.execute(text("SELECT status, body FROM answers WHERE key = :k"), {"k": key})).first()
        if found is not None:
            await _send_json(send, found[0], found[1].encode())
            return
        messages: list[Message] = []

        async def keep(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, keep)
        status = next(m["status"] for m in messages if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        async with self.engine.begin() as conn:
            row = {"k": key, "s": status, "b": body.decode()}
            await conn.execute(text("INSERT INTO answers (key, status, body) VALUES (:k, :s, :b)"), row)
        for message in messages:
            await send(message)


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def careless_app() -> FastAPI:
    """The orders endpoint with no idempotency at all, whose every answer claims to be a replay."""
    app = FastAPI()
    orders: list[int] = []

    @app.middleware("http")
    async def mark(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["idempotent-replayed"] = "true"
        return response

    @app.post("/orders", status_code=201)
    async def order(body: OrderIn) -> dict[str, object]:
        await anyio.sleep(LATENCY)
        orders.append(body.amount)
        return {"order": {"number": len(orders)}, "amount": body.amount}

    @app.get("/orders/all")
    async def listing() -> list[int]:
        return orders

    return app


def naive_app(database_url: str) -> NaiveIdempotency:
    """The orders endpoint behind the SELECT-then-INSERT layer."""
    return NaiveIdempotency(database_url)


@contextmanager
def serving(app: object) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a loopback port in a thread; yield its base URL.

    The socket listens before uvicorn starts, so early requests wait in its backlog: no polling.
    """
    sock = socket.create_server(("127.0.0.1", 0), backlog=256)
    config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="critical", ws="none", http="h11")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-probe", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def probe_args(base: str, *extra: str) -> list[str]:
    """The command line that probes ``base``'s orders endpoint with every clause made checkable."""
    return [
        "probe",
        f"{base}/orders",
        "--count-url",
        "/orders/count",
        "--credential",
        "Authorization: Bearer alice",
        "--other-credential",
        "Authorization: Bearer bob",
        "--fail-header",
        "X-Fail: 1",
        "--rate",
        "100",
        *extra,
    ]


__all__ = ["careless_app", "header_app", "idembarrier_app", "idemkit_app", "naive_app", "probe_args", "serving"]

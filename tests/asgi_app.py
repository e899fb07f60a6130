"""The HTTP tests' server: a FastAPI payments app behind IdempotencyMiddleware, on a real uvicorn on loopback.

uvicorn runs in a thread with its own event loop, and so does the app's engine (asyncpg connections belong
to one loop): the tests read the database through the fixture's engine, on theirs. Threads meet through
`threading.Event`, never through sleeps.
"""

from __future__ import annotations

import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import anyio
import httpx
import uvicorn
from fastapi import BackgroundTasks, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from idembarrier import Barrier, UnitOfWork, create_sqlite_engine
from idembarrier.asgi import (
    STATE_KEY,
    HTTPResponse,
    HTTPResponseCodec,
    IdempotencyMiddleware,
    RequestHead,
    unit_of_work,
    unit_of_work_session,
)
from tests.helpers import Boom
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from idembarrier.asgi._types import Receive, Scope, Send
    from tests.conftest import Database

Work = Annotated[UnitOfWork[HTTPResponse], Depends(unit_of_work)]
Session = Annotated[AsyncSession, Depends(unit_of_work_session)]


class PaymentIn(BaseModel):
    amount: int


@dataclass
class Gate:
    """Holds the `/payments/held` route inside its body, its writes uncommitted, until `release` is set."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    async def wait_entered(self) -> None:
        """Return once a request is inside the held route."""
        assert await anyio.to_thread.run_sync(self.entered.wait, 20), "no request entered the held route"


@dataclass
class Site:
    """A running server: its client, its gate, and what the application raised."""

    client: httpx.AsyncClient
    gate: Gate
    recorder: Recorder
    crashes: list[str]
    """Each entry makes one call of `/payments/crash` fail after its write."""

    @property
    def errors(self) -> list[BaseException]:
        """What left the application, in order."""
        return self.recorder.errors

    async def wait_error(self) -> BaseException:
        """Return the first exception that left the application, once one has."""
        assert await anyio.to_thread.run_sync(self.recorder.raised.wait, 20), "the application raised nothing"
        return self.recorder.errors[0]


def tenant_of(request: RequestHead) -> str:
    """The scope of a request's key: its tenant, as an authentication layer would have established it."""
    return request.headers.get("x-tenant", "public")


def build_app(database_url: str, site_gate: Gate, crashes: list[str], **options: object) -> FastAPI:
    """The payments app, its engine opened and disposed of on the server's own loop."""
    if database_url.startswith("sqlite"):
        engine = create_sqlite_engine(database_url)
    else:
        engine = create_async_engine(database_url, pool_size=40, max_overflow=0)
    barrier = Barrier(async_sessionmaker(engine, expire_on_commit=False), codec=HTTPResponseCodec())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(IdempotencyMiddleware, barrier=barrier, scope_of=tenant_of, **options)  # type: ignore[arg-type]

    async def pay(session: AsyncSession, uow: UnitOfWork[HTTPResponse], amount: int) -> Payment:
        payment = Payment(key=uow.key, amount=amount)
        session.add(payment)
        await session.flush()
        return payment

    @app.post("/payments", status_code=201)
    async def create(body: PaymentIn, uow: Work, session: Session, response: Response) -> dict[str, object]:
        payment = await pay(session, uow, body.amount)
        response.headers["location"] = f"/payments/{payment.id}"
        response.headers["x-trace"] = "trace-1"
        response.set_cookie("session", "minted-for-the-first-request")
        return {"id": payment.id, "amount": body.amount, "tenant": uow.scope, "key": uow.key}

    @app.patch("/payments/{payment_id}")
    async def amend(payment_id: int, body: PaymentIn, uow: Work, session: Session) -> dict[str, object]:
        await pay(session, uow, body.amount)
        return {"amended": payment_id}

    @app.post("/payments/held", status_code=201)
    async def held(body: PaymentIn, uow: Work, session: Session) -> dict[str, object]:
        payment = await pay(session, uow, body.amount)
        site_gate.entered.set()
        await anyio.to_thread.run_sync(site_gate.release.wait, 30)
        return {"id": payment.id, "key": uow.key}

    @app.post("/payments/crash", status_code=201)
    async def crash(body: PaymentIn, uow: Work, session: Session) -> dict[str, object]:
        payment = await pay(session, uow, body.amount)
        if crashes:
            raise Boom(crashes.pop())
        return {"id": payment.id}

    @app.post("/payments/clash", status_code=201)
    async def clash(body: PaymentIn, uow: Work, session: Session) -> dict[str, object]:
        session.add(Payment(id=body.amount, key=uow.key, amount=body.amount))  # flushed, and refused, at commit
        return {"id": body.amount}

    @app.post("/payments/declined")
    async def declined(body: PaymentIn, uow: Work, session: Session) -> JSONResponse:
        await pay(session, uow, body.amount)
        return JSONResponse({"error": "card declined"}, status_code=402)

    @app.post("/payments/refused")
    async def refused(body: PaymentIn, uow: Work, session: Session) -> JSONResponse:
        await pay(session, uow, body.amount)
        return JSONResponse({"error": "not now"}, status_code=409)

    @app.post("/payments/unavailable")
    async def unavailable(body: PaymentIn, uow: Work, session: Session) -> JSONResponse:
        await pay(session, uow, body.amount)
        return JSONResponse({"error": "processor down"}, status_code=503)

    @app.post("/payments/stream")
    async def stream(body: PaymentIn, uow: Work, session: Session) -> StreamingResponse:
        payment = await pay(session, uow, body.amount)

        async def receipt() -> AsyncIterator[bytes]:
            for line in (f"payment {payment.id}\n", f"amount {body.amount}\n", "done\n"):
                yield line.encode()

        return StreamingResponse(receipt(), media_type="text/plain", headers={"location": f"/p/{payment.id}"})

    @app.post("/payments/large")
    async def large(body: PaymentIn, uow: Work, session: Session) -> Response:
        await pay(session, uow, body.amount)
        return Response(b"x" * body.amount, media_type="application/octet-stream")

    @app.post("/payments/empty", status_code=204)
    async def empty(body: PaymentIn, uow: Work, session: Session) -> Response:
        await pay(session, uow, body.amount)
        return Response(status_code=204)

    @app.post("/payments/late")
    async def late(body: PaymentIn, uow: Work, session: Session, tasks: BackgroundTasks) -> dict[str, object]:
        await pay(session, uow, body.amount)

        async def write_after_the_response() -> None:
            await pay(session, uow, body.amount + 1)

        tasks.add_task(write_after_the_response)
        return {"ok": True}

    @app.post("/unguarded-ok")
    async def unguarded(request: Request) -> dict[str, object]:
        return {"guarded": STATE_KEY in request.state._state, "body": (await request.body()).decode()}

    @app.get("/payments")
    async def listing(request: Request) -> dict[str, object]:
        return {"guarded": STATE_KEY in request.state._state, "query": request.url.query}

    @app.get("/payments/session")
    async def session_on_get(session: Session) -> dict[str, object]:
        return {"unreachable": True}

    return app


class Recorder:
    """The outermost ASGI layer: keeps what the application raised (Starlette has already answered 500)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.errors: list[BaseException] = []
        self.raised = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            self.errors.append(exc)
            self.raised.set()


@asynccontextmanager
async def serve(app: Recorder) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a loopback port in a thread; yield its base URL.

    The caller's loop keeps running while uvicorn stops: a `tests.faultproxy.FaultProxy` on it must go on
    forwarding while the app's engine closes its connections.
    """
    # The socket listens before uvicorn starts: early requests queue in its backlog until it serves them.
    sock = socket.create_server(("127.0.0.1", 0), backlog=512)
    config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="critical", ws="none", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join, 30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@asynccontextmanager
async def running(db: Database, **options: object) -> AsyncIterator[Site]:
    """Run the payments app on ``db`` with the middleware's ``options``; yield it with a client."""
    gate, crashes = Gate(), list[str]()
    recorder = Recorder(build_app(db.url, gate, crashes, **options))
    limits = httpx.Limits(max_connections=200)
    async with serve(recorder) as url, httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        health = await client.get("/payments")  # answers once uvicorn serves: no polling
        assert health.status_code == 200
        try:
            yield Site(client, gate, recorder, crashes)
        finally:
            gate.release.set()  # never leave a held route, and so the server, waiting

"""A payments API whose ``POST /payments`` is idempotent by its ``Idempotency-Key``.

Run it with one command (embedded SQLite in ``./payments_api.db`` unless ``IDEMBARRIER_DATABASE_URL`` names
another database, PostgreSQL for instance)::

    python -m examples.payments_api          # or: uvicorn examples.payments_api:app

then drive it with ``python -m examples.retry_session --url http://127.0.0.1:8000``.

The payment row and the HTTP response the client gets commit in one transaction: a retry replays the
response, a concurrent duplicate gets 409 (and replays once it retries), a reused key with another body gets
422, a declined card (402) is stored and replayed like a success, and a crash stores nothing.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated

import anyio
import uvicorn
from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy import Integer, MetaData, String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import idembarrier
from idembarrier import Barrier, OnConflict, UnitOfWork
from idembarrier.asgi import (
    HTTPResponse,
    HTTPResponseCodec,
    IdempotencyMiddleware,
    RequestHead,
    ScopeRefusedError,
    document_idempotency,
    unit_of_work,
    unit_of_work_session,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///payments_api.db"
DECLINED_CARD = "4000000000000002"
"""The card number the fake processor declines."""
AMOUNT_MAX = 2**31 - 1
"""The largest amount the ``amount`` column (a 32-bit INTEGER) holds, in cents."""
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Base(DeclarativeBase):
    metadata = MetaData()


class Payment(Base):
    __tablename__ = "example_payments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(255))
    order_id: Mapped[str] = mapped_column(String(255))
    amount: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))


# What the columns can store: 1-255 characters, none of them a control character (PostgreSQL refuses NUL).
OrderId = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]


class PaymentIn(BaseModel):
    """A payment request, validated to what the table holds, so a bad input is a 422 and never a 500."""

    order_id: OrderId
    amount: int = Field(gt=0, le=AMOUNT_MAX, description="in cents")
    card: str = Field(default="4242424242424242", pattern=r"^[0-9]{12,19}$", description="12-19 digits")


Work = Annotated[UnitOfWork[HTTPResponse], Depends(unit_of_work)]
Session = Annotated[AsyncSession, Depends(unit_of_work_session)]


def tenant_of(request: RequestHead) -> str:
    """The scope of a request's key: its tenant.

    A real API takes it from authentication (the API key's account, the token's subject), never from a
    value the client picks freely; the ``X-Tenant`` header stands in for that here. A value that names no
    tenant is refused (403) before anything runs.
    """
    tenant = request.headers.get("x-tenant", "demo")
    if not _TENANT.fullmatch(tenant):
        raise ScopeRefusedError("X-Tenant names no tenant: 1-64 letters, digits, '.', '_' or '-'", status=403)
    return tenant


def create_app(database_url: str | None = None, *, processor_latency: float = 0.2) -> FastAPI:
    """Build the API on ``database_url`` (default: ``IDEMBARRIER_DATABASE_URL``, else embedded SQLite)."""
    url = database_url or os.environ.get("IDEMBARRIER_DATABASE_URL") or DEFAULT_DATABASE_URL
    engine = idembarrier.create_sqlite_engine(url) if url.startswith("sqlite") else create_async_engine(url)
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    barrier = Barrier(sessionmaker, codec=HTTPResponseCodec())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await idembarrier.upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    app = FastAPI(title="payments (idembarrier example)", lifespan=lifespan)
    app.add_middleware(
        IdempotencyMiddleware,
        barrier=barrier,
        scope_of=tenant_of,
        on_conflict=OnConflict.FAIL,  # the draft's answer to a concurrent duplicate: 409, retry later
        store_statuses={402},  # a declined card is an outcome: replay it, never charge again
        normalise_body=json.loads,  # the same JSON with keys reordered is the same request
    )
    document_idempotency(app)  # the key header, the problems and the replay headers in /openapi.json

    @app.post(
        "/payments",
        status_code=201,
        response_model=None,
        responses={
            400: {"description": "The body is not JSON (FastAPI's answer)", "content": {"application/json": {}}},
            402: {"description": "The card was declined: recorded, and replayed to a retry"},
        },
    )
    async def pay(body: PaymentIn, uow: Work, session: Session, response: Response) -> Response | dict[str, object]:
        """Charge the card once per key: the payment row and this response commit together."""
        await anyio.sleep(processor_latency)  # the card processor's round trip
        declined = body.card == DECLINED_CARD
        payment = Payment(
            tenant=uow.scope, order_id=body.order_id, amount=body.amount, status="declined" if declined else "paid"
        )
        session.add(payment)
        await session.flush()
        if declined:
            return JSONResponse({"payment_id": payment.id, "error": "card declined"}, status_code=402)
        response.headers["location"] = f"/payments/{payment.id}"
        return {"payment_id": payment.id, "order_id": body.order_id, "amount": body.amount, "status": "paid"}

    @app.get("/payments")
    async def payments() -> list[dict[str, object]]:
        """Every payment made, to check that no order was charged twice."""
        async with sessionmaker() as session:
            rows = (await session.scalars(select(Payment).order_by(Payment.id))).all()
        return [
            {"payment_id": p.id, "tenant": p.tenant, "order_id": p.order_id, "amount": p.amount, "status": p.status}
            for p in rows
        ]

    return app


app = create_app()


def main() -> None:
    """Serve the API on 127.0.0.1:8000 (``PORT`` overrides the port)."""
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":
    main()

"""The guide's wiring (docs/messaging.md): a request's unit of work publishes, a retried request publishes nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import httpx
from fastapi import Depends, FastAPI

import idembarrier
from idembarrier.asgi import HTTPResponse, HTTPResponseCodec, IdempotencyMiddleware, unit_of_work
from idembarrier.kafka import KEY_HEADER, SCOPE_HEADER, OutboxRelay, message_id
from tests.models import Payment
from tests.test_outbox import Collecting

if TYPE_CHECKING:
    from tests.conftest import Database


async def test_a_request_publishes_once_however_often_it_is_retried(db: Database) -> None:
    """Two POSTs with one Idempotency-Key: one business row, one outbox message, relayed with the key's headers."""
    barrier = idembarrier.Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, barrier=barrier, scope_of=lambda request: "orders")

    @app.post("/orders", status_code=201)
    async def create_order(
        uow: Annotated[idembarrier.UnitOfWork[HTTPResponse], Depends(unit_of_work)],
    ) -> dict[str, object]:
        uow.session.add(Payment(key="o-1", amount=1))
        uow.publish("orders", b"created", key=b"o-1")
        return {"ok": True}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        answers = [(await client.post("/orders", headers={"Idempotency-Key": "k-1"}, json={})) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [201, 201]
    assert await db.payments() == 1
    publisher = Collecting()
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    (message,) = publisher.messages
    record = await barrier.inspect("k-1", scope="orders")
    assert record is not None
    assert message.message_id == message_id("orders", "k-1", 0, execution=record.token)
    assert (KEY_HEADER, b"k-1") in message.headers
    assert (SCOPE_HEADER, b"orders") in message.headers

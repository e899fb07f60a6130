"""One process of the FastStream crash and chaos tests: a relay or a FastStream app, running until killed.

Run as ``python -m tests.faststream_worker ROLE DATABASE_URL QUEUE GROUP``, ROLE one of:

    relay                   relays the outbox through a FastStream `RabbitBroker` (the topic is the queue).
    relay-dies-published    publishes one batch, prints ``published`` and hangs before marking it sent.
    consumer                a FastStream app whose subscriber of QUEUE sits behind `BarrierMiddleware`:
                            each event one payment row keyed by its body.
    consumer-dies-committed the same; after the first database commit of a subscriber's writes it prints
                            ``committed`` and hangs before FastStream acks.

A worker prints ``started`` once connected (the app: after its startup, its subscriber consuming). The
hanging ones block the event loop (``time.sleep``) so that nothing more reaches the broker or the database
until the test SIGKILLs them at that very point.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from faststream import Context, FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import idembarrier
from idembarrier.faststream import SESSION, BarrierMiddleware, FastStreamPublisher
from idembarrier.messaging import OutboxRelay
from tests.models import Payment
from tests.rabbitmq_worker import RABBITMQ_URL, PublishesThenHangs, hang

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


SESSION_OF_THE_UNIT_OF_WORK = Context(SESSION)
"""The subscriber's session parameter: the unit of work's, from FastStream's context."""


async def relay(url: str, *, dies: bool) -> None:
    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    broker = RabbitBroker(RABBITMQ_URL, logger=None)
    async with broker:
        await broker.start()
        publisher = FastStreamPublisher(broker)
        print("started", flush=True)
        await OutboxRelay(barrier, PublishesThenHangs(publisher) if dies else publisher, batch_size=50).run()


def app(url: str, queue: str, group: str) -> FastStream:
    """The consumer: a FastStream app whose broker puts the barrier in front of its one subscriber."""
    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    middleware = BarrierMiddleware(barrier, group=group, backoff=(0.05, 0.5))
    broker = RabbitBroker(RABBITMQ_URL, middlewares=[middleware], logger=None)

    @broker.subscriber(RabbitQueue(queue, durable=True, declare=False), channel=Channel(prefetch_count=20))
    async def record_payment(body: bytes, session: AsyncSession = SESSION_OF_THE_UNIT_OF_WORK) -> dict[str, str]:
        session.add(Payment(key=body.decode(), amount=1))
        return {"applied": body.decode()}

    application = FastStream(broker, logger=None)

    @application.after_startup
    def started() -> None:
        print("started", flush=True)

    return application


def dies_after_commit() -> None:
    """Hang after the first commit that wrote a payment (this process's only sessions are units of work)."""

    @event.listens_for(Session, "before_flush")
    def written(session: Session, *_: object) -> None:
        session.info.setdefault("written", []).extend(session.new)

    @event.listens_for(Session, "after_commit")
    def committed(session: Session) -> None:
        if any(isinstance(row, Payment) for row in session.info.get("written", ())):
            hang("committed")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    role, url, queue, group = sys.argv[1:5]
    if role.startswith("relay"):
        asyncio.run(relay(url, dies=role == "relay-dies-published"))
        return
    if role == "consumer-dies-committed":
        dies_after_commit()
    asyncio.run(app(url, queue, group).run())


if __name__ == "__main__":
    main()

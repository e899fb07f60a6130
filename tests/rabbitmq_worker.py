"""One process of the RabbitMQ crash and chaos tests: a relay or a consumer, running until it is killed.

Run as ``python -m tests.rabbitmq_worker ROLE DATABASE_URL QUEUE GROUP``, ROLE one of:

    relay                   relays the outbox to the default exchange (the topic is the queue's name).
    relay-dies-published    publishes one batch, prints ``published`` and hangs before marking it sent.
    consumer                consumes QUEUE: each event one payment row keyed by its body.
    consumer-dies-committed consumes; after the first database commit of a handler's writes it prints
                            ``committed`` and hangs before the ack.

A worker prints ``started`` once connected. The hanging ones block the event loop (``time.sleep``) so that
nothing more reaches the broker or the database until the test SIGKILLs them at that very point.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING

import aio_pika
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import idembarrier
from idembarrier.messaging import OutboxRelay
from idembarrier.rabbitmq import AioPikaDelivery, AioPikaPublisher, run_rabbitmq_consumer
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncSession

    from idembarrier.messaging import Message, Publisher

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
"""The broker of the tests (`tests.test_rabbitmq` reads the same URL)."""


async def record_payment(session: AsyncSession, delivery: AioPikaDelivery) -> idembarrier.JSON:
    """The consumer's business write: one payment row per event, keyed by its body."""
    session.add(Payment(key=(delivery.value or b"").decode(), amount=1))
    return {"applied": (delivery.value or b"").decode()}


def hang(what: str) -> None:
    """Say ``what`` happened, then block the whole process until it is killed."""
    print(what, flush=True)
    time.sleep(600)  # blocking on purpose: the event loop must not send the ack or the mark
    sys.exit("not killed")


class PublishesThenHangs:
    """A publisher that dies (hangs until killed) after the broker confirmed a batch, before it is marked."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    async def publish(self, messages: Sequence[Message]) -> None:
        await self.publisher.publish(messages)
        hang("published")


async def relay(url: str, *, dies: bool) -> None:
    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    connection = await aio_pika.connect_robust(RABBITMQ_URL, reconnect_interval=0.2)
    publisher = AioPikaPublisher(await connection.channel())
    print("started", flush=True)
    await OutboxRelay(barrier, PublishesThenHangs(publisher) if dies else publisher, batch_size=50).run()


async def consumer(url: str, queue_name: str, group: str, *, dies: bool) -> None:
    if dies:  # this process's only sessions are the consumer's units of work

        @event.listens_for(Session, "before_flush")
        def written(session: Session, *_: object) -> None:
            session.info.setdefault("written", []).extend(session.new)

        @event.listens_for(Session, "after_commit")
        def committed(session: Session) -> None:
            if any(isinstance(row, Payment) for row in session.info.get("written", ())):
                hang("committed")

    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    connection = await aio_pika.connect_robust(RABBITMQ_URL, reconnect_interval=0.2)
    channel = await connection.channel()
    queue = await channel.declare_queue(queue_name, passive=True)
    print("started", flush=True)
    await run_rabbitmq_consumer(queue, barrier, record_payment, group=group, prefetch=20, backoff=(0.05, 0.5))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    role, url, queue, group = sys.argv[1:5]
    if role.startswith("relay"):
        asyncio.run(relay(url, dies=role == "relay-dies-published"))
    else:
        asyncio.run(consumer(url, queue, group, dies=role == "consumer-dies-committed"))


if __name__ == "__main__":
    main()

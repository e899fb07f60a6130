"""One process of the JetStream tests: a relay, a consumer, or a consumer that dies right after its commit.

Run as ``python -m tests.nats_worker relay|consumer|die-after-commit DATABASE_URL NATS_URL STREAM DURABLE``.
A consumer applies each event as one payment row keyed by the event's value, so a test counts effects per
event. ``die-after-commit`` SIGKILLs itself from the session's ``after_commit`` hook of its first message:
the database has committed the handler's writes and the record, and the ack has not been sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import nats
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import idembarrier
from idembarrier.messaging import OutboxRelay
from idembarrier.nats import JetStreamPublisher, run_jetstream_consumer
from tests.models import Payment

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from idembarrier.nats import JetStreamDelivery


async def record_payment(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
    """The consumer's business write: one payment row per event, keyed by the event's value."""
    session.add(Payment(key=(delivery.value or b"").decode(), amount=1))
    return {"applied": (delivery.value or b"").decode(), "sequence": delivery.sequence}


async def die_after_commit(session: AsyncSession, delivery: JetStreamDelivery) -> idembarrier.JSON:
    """`record_payment`, and the process SIGKILLed the moment its transaction has committed, before the ack."""

    def die(_: Session) -> None:
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    event.listen(session.sync_session, "after_commit", die, once=True)
    return await record_payment(session, delivery)


async def main(role: str, url: str, server: str, stream: str, durable: str) -> None:
    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    client = await nats.connect(server)
    print("started", flush=True)
    if role == "relay":
        await OutboxRelay(barrier, JetStreamPublisher(client), batch_size=50).run()
    handler = die_after_commit if role == "die-after-commit" else record_payment
    js = client.jetstream()
    await run_jetstream_consumer(
        (js, stream, durable), barrier, handler, group=durable, batch=20, backoff=(0.05, 0.5), poll_timeout=0.5
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    role, url, server, stream, durable = sys.argv[1:6]
    asyncio.run(main(role, url, server, stream, durable))

"""One process of the Redis Streams tests: a relay or a consumer, running until it is killed.

Run as ``python -m tests.redis_worker ROLE DATABASE_URL STREAM [GROUP CONSUMER_NAME CLAIM_IDLE [WORK]]``:

    relay             relays the outbox to Redis
    consumer          consumes ``STREAM`` as ``CONSUMER_NAME`` of ``GROUP``; the name ``*`` stands for
                      ``consumer-<pid>``, a fresh name per process (the chaos test's replacements)
    stalls-before-ack consumes, and at its first XACK (its database commit done) prints
                      ``committed <entry id>`` and waits to be killed

A consumer applies each entry as one payment row keyed by the entry's value, so the tests count effects per
event; with ``WORK`` (seconds) its handler takes that long first, as real work would, so that a kill finds
entries read and not yet acknowledged. Redis is the local server (127.0.0.1:6379).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

import anyio
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import idembarrier
from idembarrier.messaging import OutboxRelay
from idembarrier.redis import RedisStreamPublisher, run_redis_consumer
from tests.models import Payment

if TYPE_CHECKING:
    from redis.typing import KeyT, StreamIdT
    from sqlalchemy.ext.asyncio import AsyncSession

    from idembarrier.redis import StreamEntry

REDIS_URL = "redis://127.0.0.1:6379/0"


async def record_payment(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
    """The consumer's business write: one payment row per entry, keyed by its value."""
    session.add(Payment(key=(entry.value or b"").decode(), amount=1))
    return {"applied": (entry.value or b"").decode()}


class StallsBeforeAck(Redis):
    """A client whose XACK announces itself on stdout and never returns: the process dies at that point."""

    async def xack(self, name: KeyT, groupname: str, *ids: StreamIdT) -> int:  # type: ignore[override]
        print("committed", *(i.decode() if isinstance(i, bytes) else str(i) for i in ids), flush=True)
        await anyio.Event().wait()  # until the test's SIGKILL
        raise AssertionError  # pragma: no cover


async def relay(url: str) -> None:
    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    client = Redis.from_url(REDIS_URL)
    await OutboxRelay(barrier, RedisStreamPublisher(client), batch_size=50).run()


async def consumer(
    url: str, stream: str, group: str, name: str, claim_idle: float, *, stall: bool, work: float = 0.0
) -> None:
    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    client = (StallsBeforeAck if stall else Redis).from_url(REDIS_URL)

    async def handler(session: AsyncSession, entry: StreamEntry) -> idembarrier.JSON:
        await anyio.sleep(work)  # the work a real handler does
        return await record_payment(session, entry)

    print("started", flush=True)
    await run_redis_consumer(
        client,
        stream,
        barrier,
        handler,
        group=group,
        consumer_name=name,
        count=10,
        claim_idle=claim_idle,
        backoff=(0.05, 0.5),
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    role, url, stream = sys.argv[1:4]
    if role == "relay":
        asyncio.run(relay(url))
        return
    group, name, claim_idle = sys.argv[4:7]
    work = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    if name == "*":
        name = f"consumer-{os.getpid()}"
    asyncio.run(consumer(url, stream, group, name, float(claim_idle), stall=role == "stalls-before-ack", work=work))


if __name__ == "__main__":
    main()

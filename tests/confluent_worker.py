"""One process of the confluent-kafka tests: a relay or a consumer, running until it is killed.

Run as ``python -m tests.confluent_worker relay|consumer|stall DATABASE_URL BROKER TOPIC GROUP``. A consumer
applies each event as one payment row keyed by the event's value. ``stall`` is a consumer that, at its first
offset commit (its batch's database commits done), prints ``committing`` and hangs there, to be killed.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import idembarrier
from idembarrier.confluent import ConfluentConsumer, ConfluentPublisher, run_confluent_consumer
from idembarrier.kafka import OutboxRelay, run_consumer
from tests.test_kafka import record_payment


def consumer_config(broker: str, group: str) -> dict[str, object]:
    """An AIOConsumer for the tests: from the start, manual commits, short group timeouts."""
    return {
        "bootstrap.servers": broker,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }


async def relay(url: str, broker: str) -> None:
    import confluent_kafka

    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    producer = confluent_kafka.Producer({"bootstrap.servers": broker, "enable.idempotence": False})
    await OutboxRelay(barrier, ConfluentPublisher(producer), batch_size=50).run()


class Stalling(ConfluentConsumer):
    """A consumer that hangs at its first offset commit, after its batch's database commits."""

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        print("committing", flush=True)
        await asyncio.Event().wait()


async def consumer(url: str, broker: str, topic: str, group: str, *, stall: bool) -> None:
    from confluent_kafka.aio import AIOConsumer

    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    client = AIOConsumer(consumer_config(broker, group))
    await client.subscribe([topic])
    print("started", flush=True)
    if stall:
        await run_consumer(Stalling(client), barrier, record_payment, group=group, poll_timeout=0.2)
    else:
        await run_confluent_consumer(client, barrier, record_payment, group=group, max_records=20, backoff=(0.05, 0.5))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    role, url, broker, topic, group = sys.argv[1:6]
    if role == "relay":
        asyncio.run(relay(url, broker))
    else:
        asyncio.run(consumer(url, broker, topic, group, stall=role == "stall"))


if __name__ == "__main__":
    main()

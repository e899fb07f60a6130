"""One process of the messaging chaos test: a relay or a consumer, running until it is killed.

Run as ``python -m tests.chaos_worker relay|consumer DATABASE_URL BROKER TOPIC GROUP``. A consumer applies
each event as one payment row keyed by the event's value, so the test counts effects per event.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import idembarrier
from idembarrier.kafka import AIOKafkaPublisher, OutboxRelay, run_consumer
from tests.test_kafka import make_consumer, record_payment


async def relay(url: str, broker: str) -> None:
    from aiokafka import AIOKafkaProducer

    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    producer = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
    await producer.start()
    await OutboxRelay(barrier, AIOKafkaPublisher(producer), batch_size=50).run()


async def consumer(url: str, broker: str, topic: str, group: str) -> None:
    barrier = idembarrier.Barrier(async_sessionmaker(create_async_engine(url)))
    client = make_consumer(broker, topic, group)
    await client.start()
    print("started", flush=True)
    await run_consumer(client, barrier, record_payment, group=group, max_records=20, backoff=(0.05, 0.5))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    role, url, broker, topic, group = sys.argv[1:6]
    if role == "relay":
        asyncio.run(relay(url, broker))
    else:
        asyncio.run(consumer(url, broker, topic, group))


if __name__ == "__main__":
    main()

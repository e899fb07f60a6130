"""RabbitMQ consumer loop edges: options refused before the queue is consumed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import idembarrier
from idembarrier.rabbitmq import run_rabbitmq_consumer
from tests.rabbitmq_worker import record_payment
from tests.test_rabbitmq import broker, connection

if TYPE_CHECKING:
    from tests.conftest import Database
    from tests.test_rabbitmq import Broker

__all__ = ["broker", "connection"]  # fixtures, shared with test_rabbitmq


async def test_a_prefetch_under_one_is_refused(pg_db: Database, broker: Broker) -> None:
    """prefetch=0 (RabbitMQ's "unlimited") is a ConfigurationError, not a consumer without flow control."""
    queue = await broker.queue()
    with pytest.raises(idembarrier.ConfigurationError, match="prefetch"):
        await run_rabbitmq_consumer(
            queue, idembarrier.Barrier(pg_db.sessionmaker), record_payment, group="billing", prefetch=0
        )

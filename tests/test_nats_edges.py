"""JetStream consumer loop edges: options and consumers refused before a message is touched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

import idembarrier
from idembarrier.nats import run_jetstream_consumer
from tests.nats_worker import record_payment
from tests.test_nats import client, stream

if TYPE_CHECKING:
    from tests.conftest import Database
    from tests.test_nats import Stream

__all__ = ["client", "stream"]  # fixtures, shared with test_nats


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"batch": 0}, "batch"),
        ({"poll_timeout": 0}, "poll_timeout"),
        ({"backoff": (0.0, 1.0)}, "backoff"),
        ({"backoff": (2.0, 1.0)}, "backoff"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
async def test_unusable_options_are_refused_before_binding(
    pg_db: Database, stream: Stream, options: dict[str, Any], named: str
) -> None:
    """A batch under 1, a non-positive poll timeout, a bad backoff or negative max_retries: ConfigurationError."""
    with pytest.raises(idembarrier.ConfigurationError, match=named):
        await run_jetstream_consumer(
            (stream.js, stream.name, "never-bound"), idembarrier.Barrier(pg_db.sessionmaker), record_payment,
            group="g", **options,
        )  # fmt: skip


async def test_a_push_consumer_is_refused(pg_db: Database, stream: Stream) -> None:
    """A consumer with a deliver subject (a push consumer) is refused at start: the loop pulls."""
    config = ConsumerConfig(
        durable_name="pushed", ack_policy=AckPolicy.EXPLICIT, deliver_subject=f"{stream.name}-deliver"
    )
    await stream.js.add_consumer(stream.name, config)
    sub = await stream.js.pull_subscribe_bind("pushed", stream.name)
    try:
        with pytest.raises(idembarrier.ConfigurationError, match="push consumer"):
            await run_jetstream_consumer(sub, idembarrier.Barrier(pg_db.sessionmaker), record_payment, group="g")
    finally:
        await sub.unsubscribe()

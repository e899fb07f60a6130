"""The outbox on a two-node Galera cluster: a polling relay on either node, and two relays, one per node.

MariaDB has no LISTEN: the relay polls. A message committed on node 1 is relayed by a relay on node 2 once.
Two relays on two nodes are at-least-once, not exactly-once: ``SKIP LOCKED`` holds on one node only, so both
claim and publish the same pending rows, and certification refuses the second relay's mark
(`SerializationError`; it retries and finds them sent). The duplicate carries the same message id, which the
consumer's barrier deduplicates. Measured here, lined up and in a 40-message run.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import pytest

from idembarrier import Barrier, SerializationError
from idembarrier.kafka import OutboxRelay
from tests.test_galera import Nodes, galera_cluster, nodes
from tests.test_outbox import Collecting

if TYPE_CHECKING:
    from collections.abc import Sequence

    from idembarrier.kafka import Message

__all__ = ["galera_cluster", "nodes"]  # fixtures, shared with test_galera


async def publish(barrier: Barrier, key: str) -> str:
    """One unit of work that publishes one message; return its id."""
    async with barrier.unit_of_work(key, scope="orders") as uow:
        message_id = uow.publish("orders", key.encode(), key=key.encode())
        uow.complete(None)
    return message_id


class Holding(Collecting):
    """A publisher that, given a batch, sets ``given`` and acknowledges it only once ``go`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.given = anyio.Event()
        self.go = anyio.Event()

    async def publish(self, messages: Sequence[Message]) -> None:
        await super().publish(messages)
        self.given.set()
        await self.go.wait()


@pytest.mark.parametrize("nodes", ["aiomysql"], indirect=True)
async def test_a_relay_on_the_other_node_publishes_a_message_once(nodes: Nodes) -> None:
    """A unit of work on node 1 publishes; a polling relay on node 2 relays it once and marks it sent on both."""
    message_id = await publish(nodes.barriers[0], f"o-{uuid.uuid4()}")
    publisher = Collecting()
    relay = OutboxRelay(nodes.barriers[1], publisher, poll_interval=0.01, max_poll_interval=0.05)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: relay.run(stop=stop, task_status=task_status))
        with anyio.fail_after(30):
            # The relay's polls and node 2's applier, which no event reports: polled, not used to order tasks.
            while await nodes.pending(1):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert await relay.relay_once() == 0  # nothing left to claim on node 2
        stop.set()
    assert [m.message_id for m in publisher.messages] == [message_id]
    assert await nodes.pending(0) == 0


@pytest.mark.parametrize("nodes", ["aiomysql"], indirect=True)
async def test_two_relays_on_two_nodes_can_both_publish_a_message_and_one_mark_is_refused(nodes: Nodes) -> None:
    """Relays on both nodes claim the same message (SKIP LOCKED holds on one node only) and both publish it;
    the second mark loses certification (a documented SerializationError, nothing marked by it): at-least-once
    across nodes, the duplicate carrying the same message id for the consumer's barrier. The row is sent once."""
    message_id = await publish(nodes.barriers[0], f"o-{uuid.uuid4()}")
    assert await nodes.pending(1) == 1  # node 2 has applied it
    publishers = [Holding(), Holding()]
    relays = [OutboxRelay(nodes.barriers[n], publishers[n]) for n in (0, 1)]
    outcomes: list[int | BaseException | None] = [None, None]
    finished = [anyio.Event(), anyio.Event()]

    async def relay_once(n: int) -> None:
        try:
            outcomes[n] = await relays[n].relay_once()
        except Exception as exc:
            outcomes[n] = exc
        finally:
            finished[n].set()

    async with anyio.create_task_group() as tg:
        for n in (0, 1):
            tg.start_soon(relay_once, n)
        with anyio.fail_after(30):
            for publisher in publishers:
                await publisher.given.wait()  # both hold the row, one lock per node
            publishers[0].go.set()
            await finished[0].wait()
            publishers[1].go.set()
    assert outcomes[0] == 1
    assert isinstance(outcomes[1], SerializationError), repr(outcomes[1])
    assert [m.message_id for p in publishers for m in p.messages] == [message_id, message_id]
    assert await nodes.pending(0) == await nodes.pending(1) == 0
    assert await relays[1].relay_once() == 0


@pytest.mark.parametrize("nodes", ["aiomysql"], indirect=True)
async def test_two_polling_relays_on_two_nodes_publish_every_message_at_least_once(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    """40 messages published on both nodes, relayed by a polling relay on each: every message is published,
    each at least once; what a relay's failed batch logged is a SerializationError only; all are marked sent.
    The double publications are counted (the figure the README gives)."""
    ids = [await publish(nodes.barriers[i % 2], f"o-{uuid.uuid4()}") for i in range(40)]
    publishers = [Collecting(), Collecting()]
    relays = [
        OutboxRelay(nodes.barriers[n], publishers[n], batch_size=5, poll_interval=0.01, max_poll_interval=0.05)
        for n in (0, 1)
    ]
    stop = anyio.Event()
    with caplog.at_level(logging.ERROR, logger="idembarrier.relay"):
        async with anyio.create_task_group() as tg:
            for relay in relays:
                await tg.start(lambda task_status, relay=relay: relay.run(stop=stop, task_status=task_status))
            with anyio.fail_after(60):
                # Both relays' polls, which no event reports: polled, not used to order tasks.
                while await nodes.pending(0) or await nodes.pending(1):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            stop.set()
    published = Counter(m.message_id for p in publishers for m in p.messages)
    assert set(published) == set(ids)
    failures = [r.exc_info[1] for r in caplog.records if r.exc_info is not None]
    assert all(isinstance(exc, SerializationError) for exc in failures), failures
    doubles = sum(n - 1 for n in published.values())
    print(
        f"galera relays: {len(ids)} messages, 2 relays (one per node), {published.total()} publications, "
        f"{doubles} published twice, {len(failures)} batches refused at certification, by node "
        f"{[len(p.messages) for p in publishers]}"
    )

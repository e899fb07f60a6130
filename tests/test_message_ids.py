"""One message id per execution: a key that legitimately runs again publishes messages consumers see as new."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

import idembarrier
from idembarrier import ExpiredReplay, Retention
from idembarrier.kafka import CONTRACT_HEADER, MESSAGE_ID_HEADER, OutboxRelay, consume, message_id
from tests.helpers import new_key
from tests.models import Payment
from tests.test_kafka import Delivered
from tests.test_outbox import Collecting

if TYPE_CHECKING:
    from idembarrier.kafka import Message
    from tests.conftest import Database

GONE = Retention(response=timedelta(0), record=timedelta(days=30))
"""The response expires at completion; the compact record stays."""
FORGOTTEN = Retention(response=timedelta(0), record=timedelta(0))
"""Both horizons at completion: cleanup deletes the record, and the key is new again."""


async def order(barrier: idembarrier.Barrier, key: str, retention: Retention) -> bool:
    """Run the order's unit of work (a payment and one message) unless it replays; return whether it ran."""
    async with barrier.unit_of_work(key, scope="orders", retention=retention) as uow:
        if uow.replayed:
            return False
        uow.session.add(Payment(key=key, amount=1))
        uow.publish("orders", key.encode(), key=key.encode())
        uow.complete(None)
    return True


async def consume_all(barrier: idembarrier.Barrier, messages: list[Message]) -> list[bool]:
    """Consume ``messages`` in the group ``billing``; return, per message, whether it was a duplicate."""

    async def apply(session: object, message: object) -> idembarrier.JSON:
        return None

    seen = []
    for offset, m in enumerate(messages):
        delivered = Delivered(m.value, list(m.headers), offset=offset)
        seen.append((await consume(barrier, delivered, apply, group="billing")).duplicate)
    return seen


async def test_allow_reexecution_after_compaction_commits_and_its_event_is_new(db: Database) -> None:
    """Under ALLOW a late request runs again: its message commits beside the first one's and is consumed."""
    barrier = idembarrier.Barrier(db.sessionmaker, on_expired_replay=ExpiredReplay.ALLOW)
    key = new_key()
    assert await order(barrier, key, GONE)
    assert (await barrier.purge()).compacted == 1
    assert await order(barrier, key, GONE)  # the first execution's outbox row is still there, pending
    publisher = Collecting()
    assert await OutboxRelay(barrier, publisher).relay_once() == 2
    first, second = publisher.messages
    assert first.message_id != second.message_id
    assert await consume_all(barrier, publisher.messages) == [False, False]
    assert await db.payments(key) == 2


async def test_a_key_new_again_after_retention_publishes_new_ids(db: Database) -> None:
    """A key whose record cleanup deleted runs as new, and its message is not taken for the old one."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    key = new_key()
    publisher = Collecting()
    relay = OutboxRelay(barrier, publisher)
    assert await order(barrier, key, FORGOTTEN)
    assert await relay.relay_once() == 1
    assert (await barrier.purge()).deleted == 1
    assert await order(barrier, key, FORGOTTEN)
    assert await relay.relay_once() == 1
    assert await consume_all(barrier, publisher.messages) == [False, False]


async def test_a_redelivery_of_one_execution_keeps_its_id(db: Database) -> None:
    """A relay that re-publishes, and a redelivery, carry the id the unit of work returned: a duplicate."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        mid = uow.publish("orders", b"o-1")
        uow.complete(None)
    publisher = Collecting()
    await OutboxRelay(barrier, publisher).relay_once()
    (message,) = publisher.messages
    assert message.message_id == mid
    assert (MESSAGE_ID_HEADER, mid.encode()) in message.headers
    assert (CONTRACT_HEADER, b"2") in message.headers
    assert await consume_all(barrier, [message, message]) == [False, True]


def test_message_id_differs_per_execution_and_position() -> None:
    """The id is a function of scope, key, execution and position; each one changes it."""
    one, two = uuid.uuid4(), uuid.uuid4()
    first = message_id("orders", "o-1", 0, execution=one)
    others = {
        message_id("orders", "o-1", 0, execution=two),
        message_id("orders", "o-1", 1, execution=one),
        message_id("other", "o-1", 0, execution=one),
        message_id("orders", "o-2", 0, execution=one),
    }
    assert first not in others
    assert len(others) == 4

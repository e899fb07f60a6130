"""The transactional outbox: messages commit with the unit of work, carry deterministic ids, and relay once."""

from __future__ import annotations

import uuid
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import idembarrier
from idembarrier._outbox import CONTRACT_HEADER, KEY_HEADER, MESSAGE_ID_HEADER, SCOPE_HEADER, Message, message_id
from idembarrier.kafka import OutboxRelay
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tests.conftest import Database


class Collecting:
    """A publisher that keeps what it was given, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.messages.extend(messages)


class Failing:
    """A publisher whose broker never acknowledges."""

    async def publish(self, messages: Sequence[Message]) -> None:
        raise ConnectionError("broker down")


async def outbox(db: Database) -> list[tuple[str, str, str, int, bool]]:
    """Return (message_id, scope, record_key, position, sent) of every outbox row, in insertion order."""
    sql = "SELECT message_id, scope, record_key, position, sent_at IS NOT NULL FROM idempotency_keys_outbox ORDER BY id"
    async with db.engine.connect() as conn:
        rows: list[Any] = list((await conn.exec_driver_sql(sql)).all())
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3]), bool(r[4])) for r in rows]


async def order(barrier: idembarrier.Barrier, key: str, *topics: str) -> list[str]:
    """Run a unit of work that writes a payment and publishes one message per topic; return the ids."""
    async with barrier.unit_of_work(key, scope="orders") as uow:
        uow.session.add(Payment(key=key, amount=1))
        ids = [uow.publish(topic, f"{key}@{topic}".encode(), key=key.encode()) for topic in topics]
        uow.complete(None)
    return ids


async def test_published_messages_commit_with_the_unit_of_work(db: Database) -> None:
    """Messages published in a committed unit of work are in the outbox, pending, in publication order."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    ids = await order(barrier, "o-1", "orders", "audit")
    assert await outbox(db) == [(ids[0], "orders", "o-1", 0, False), (ids[1], "orders", "o-1", 1, False)]
    assert await db.payments("o-1") == 1


async def test_rolled_back_unit_of_work_publishes_nothing(db: Database) -> None:
    """A body that raises after publishing leaves neither the business row nor a message."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    with pytest.raises(RuntimeError, match="boom"):
        async with barrier.unit_of_work("o-1", scope="orders") as uow:
            uow.session.add(Payment(key="o-1", amount=1))
            uow.publish("orders", b"created")
            raise RuntimeError("boom")
    assert await outbox(db) == []
    assert await db.payments() == 0


async def test_caller_rollback_discards_the_messages(db: Database) -> None:
    """With the caller's session, the messages follow the caller's transaction: its rollback discards them."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    async with db.sessionmaker() as session, session.begin():
        async with barrier.unit_of_work("o-1", scope="orders", session=session) as uow:
            uow.publish("orders", b"created")
            uow.complete(None)
        await session.rollback()
    assert await outbox(db) == []


async def test_replay_publishes_nothing(db: Database) -> None:
    """A second unit of work with the same key is a replay: it cannot publish, and the outbox keeps one message."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    await order(barrier, "o-1", "orders")
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        assert uow.replayed
        with pytest.raises(idembarrier.UnitOfWorkError, match="replayed"):
            uow.publish("orders", b"again")
    assert len(await outbox(db)) == 1


def test_message_id_is_pinned() -> None:
    """The message id is ``msg-`` and 128 bits of hex, pinned: consumers in other processes and releases
    deduplicate by it, so a change to its derivation must fail here first."""
    one, two = uuid.UUID(int=1), uuid.UUID(int=2)
    assert message_id("orders", "o-1", 0, execution=one) == "msg-35d7c08b8490a45705f223b37147fa13"
    assert message_id("orders", "o-1", 1, execution=one) == "msg-321aebd1f8d911fb9364d896af71dc9b"
    assert message_id("orders", "o-1", 0, execution=two) == "msg-cd7c9e970b4daae06d0411c7718385f6"


async def test_publish_returns_the_deterministic_id_and_sets_contract_headers(db: Database) -> None:
    """The id `publish` returns is `message_id`'s of the claim's token; the headers carry the contract."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    async with barrier.unit_of_work("o-1", scope="orders") as uow:
        mid = uow.publish("orders", b"v", headers={"trace": b"t-1"})
        uow.complete(None)
    record = await barrier.inspect("o-1", scope="orders")
    assert record is not None
    assert mid == message_id("orders", "o-1", 0, execution=record.token)
    publisher = Collecting()
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    (message,) = publisher.messages
    assert message.headers == (
        (CONTRACT_HEADER, b"2"),
        (MESSAGE_ID_HEADER, mid.encode()),
        (KEY_HEADER, b"o-1"),
        (SCOPE_HEADER, b"orders"),
        ("trace", b"t-1"),
    )
    assert (message.topic, message.key, message.value, message.message_id) == ("orders", None, b"v", mid)


async def test_publish_refuses_reserved_headers_and_non_bytes(db: Database) -> None:
    """Reserved header names, non-bytes values and publishing outside `async with` are refused."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    unit = barrier.unit_of_work("o-1", scope="orders")
    with pytest.raises(idembarrier.UnitOfWorkError, match="inside"):
        unit.publish("orders", b"v")
    async with unit as uow:
        with pytest.raises(idembarrier.UnitOfWorkError, match="set by idembarrier"):
            uow.publish("orders", b"v", headers={MESSAGE_ID_HEADER: b"mine"})
        with pytest.raises(idembarrier.UnitOfWorkError, match="must be bytes"):
            uow.publish("orders", b"v", headers={"trace": "text"})  # type: ignore[dict-item]
        with pytest.raises(idembarrier.UnitOfWorkError, match="are bytes"):
            uow.publish("orders", "text")  # type: ignore[arg-type]
        uow.complete(None)
    assert await outbox(db) == []


async def test_relay_publishes_pending_messages_once_and_marks_them_sent(db: Database) -> None:
    """A relay publishes every pending message in insertion order, marks it sent, and finds nothing next time."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    ids = await order(barrier, "o-1", "a", "b") + await order(barrier, "o-2", "a")
    publisher = Collecting()
    relay = OutboxRelay(barrier, publisher, batch_size=2)
    assert [await relay.relay_once() for _ in range(3)] == [2, 1, 0]
    assert [m.message_id for m in publisher.messages] == ids
    assert all(sent for *_, sent in await outbox(db))


async def test_failed_publish_leaves_messages_pending_for_the_next_relay(db: Database) -> None:
    """A publisher error marks nothing sent; the next relay publishes the same messages, same ids."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    ids = await order(barrier, "o-1", "a")
    with pytest.raises(ConnectionError):
        await OutboxRelay(barrier, Failing()).relay_once()
    assert not any(sent for *_, sent in await outbox(db))
    publisher = Collecting()
    assert await OutboxRelay(barrier, publisher).relay_once() == 1
    assert [m.message_id for m in publisher.messages] == ids


async def test_run_relays_until_stopped_and_retries_after_failures(db: Database) -> None:
    """`run` retries a failing publisher with backoff, relays once it recovers, and returns when stopped."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    ids = await order(barrier, "o-1", "a")
    stop = anyio.Event()
    attempts = 0

    class Flaky:
        def __init__(self) -> None:
            self.messages: list[Message] = []

        async def publish(self, messages: Sequence[Message]) -> None:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise ConnectionError("broker down")
            self.messages.extend(messages)
            stop.set()

    publisher = Flaky()
    relay = OutboxRelay(barrier, publisher, poll_interval=0.01, max_poll_interval=0.02)
    with anyio.fail_after(10):
        await relay.run(stop=stop)
    assert [m.message_id for m in publisher.messages] == ids
    assert attempts == 2


async def test_relay_refuses_bad_settings(db: Database) -> None:
    """A batch size below 1 or inconsistent poll intervals are refused."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    with pytest.raises(ValueError, match="batch_size"):
        OutboxRelay(barrier, Collecting(), batch_size=0)
    with pytest.raises(ValueError, match="poll"):
        OutboxRelay(barrier, Collecting(), poll_interval=2, max_poll_interval=1)


async def test_two_racing_relays_publish_each_message_once_in_key_order(pg_db: Database) -> None:
    """Two relays over one outbox split it: every message is published once, each key's in order."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    expected: dict[bytes, list[str]] = {}
    for n in range(6):
        expected[f"o-{n}".encode()] = await order(barrier, f"o-{n}", "a", "a", "a")
    held, released = anyio.Event(), anyio.Event()
    log = Collecting()  # every publication, in the order the broker would see them
    first, second = Collecting(), Collecting()

    class Holding:
        """Holds its batch (and its locks) until the other relay has taken what it could."""

        async def publish(self, messages: Sequence[Message]) -> None:
            held.set()
            await released.wait()
            await first.publish(messages)
            await log.publish(messages)

    class Logging:
        async def publish(self, messages: Sequence[Message]) -> None:
            await second.publish(messages)
            await log.publish(messages)

    other = OutboxRelay(barrier, Logging(), batch_size=100)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(OutboxRelay(barrier, Holding(), batch_size=4).relay_once)
            await held.wait()
            while await other.relay_once():
                pass
            released.set()
        while await other.relay_once():  # what the held keys still had pending
            pass
    assert first.messages, "the holding relay published its batch"
    assert second.messages, "the second relay skipped the held rows and published others meanwhile"
    published = [m.message_id for m in log.messages]
    assert sorted(published) == sorted(mid for ids in expected.values() for mid in ids)
    for key, ids in expected.items():
        assert [m.message_id for m in log.messages if m.key == key] == ids


async def backdate_sent(db: Database, hours: int, *, below_id: int) -> None:
    """Mark the outbox rows with an id below ``below_id`` as sent ``hours`` ago (database clock)."""
    past = {
        "postgresql": f"now() - interval '{hours} hours'",
        "mysql": f"UTC_TIMESTAMP(6) - INTERVAL {hours} HOUR",  # MariaDB: timestamps hold UTC
    }.get(db.dialect, f"datetime('now', '-{hours} hours')")
    async with db.engine.begin() as conn:
        await conn.exec_driver_sql(f"UPDATE idempotency_keys_outbox SET sent_at = {past} WHERE id < {below_id}")


async def test_purge_sent_deletes_only_sent_rows_past_the_retention(db: Database) -> None:
    """Sent rows older than the retention go, in batches; recently sent and pending rows stay."""
    barrier = idembarrier.Barrier(db.sessionmaker)
    for n in range(5):
        await order(barrier, f"o-{n}", "a")
    relay = OutboxRelay(barrier, Collecting())
    assert await relay.relay_once() == 5
    await backdate_sent(db, 2, below_id=4)  # rows 1-3 sent two hours ago; 4 and 5 just now
    pending = await order(barrier, "o-pending", "a")
    async with db.engine.begin() as conn:  # a pending row older than any retention still stays
        await conn.exec_driver_sql("UPDATE idempotency_keys_outbox SET created_at = '2000-01-01' WHERE sent_at IS NULL")
    assert await relay.purge_sent(timedelta(hours=3)) == 0
    assert await relay.purge_sent(timedelta(hours=1), batch_size=2) == 3
    left = await outbox(db)
    assert [(key, sent) for _, _, key, _, sent in left] == [("o-3", True), ("o-4", True), ("o-pending", False)]
    assert left[-1][0] == pending[0]
    assert await relay.purge_sent(timedelta(0)) == 2
    assert [key for _, _, key, _, _ in await outbox(db)] == ["o-pending"]


async def test_purge_sent_refuses_bad_settings(db: Database) -> None:
    """A batch size below 1 or a negative retention is refused."""
    relay = OutboxRelay(idembarrier.Barrier(db.sessionmaker), Collecting())
    with pytest.raises(ValueError, match="batch_size"):
        await relay.purge_sent(timedelta(hours=1), batch_size=0)
    with pytest.raises(ValueError, match="negative"):
        await relay.purge_sent(timedelta(hours=-1))


async def test_purge_sent_skips_rows_a_relay_holds(pg_db: Database) -> None:
    """On PostgreSQL a purge skips the rows a relay has claimed, instead of waiting for them."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    await order(barrier, "o-1", "a")
    await OutboxRelay(barrier, Collecting()).relay_once()
    await backdate_sent(pg_db, 2, below_id=2)
    async with pg_db.engine.begin() as conn:
        await conn.exec_driver_sql("SELECT id FROM idempotency_keys_outbox FOR UPDATE")
        with anyio.fail_after(10):
            assert await OutboxRelay(barrier, Collecting()).purge_sent(timedelta(hours=1)) == 0
    assert await OutboxRelay(barrier, Collecting()).purge_sent(timedelta(hours=1)) == 1


async def test_relay_wakes_on_notify_long_before_its_poll_interval(pg_db: Database) -> None:
    """A relay idling on a 30 s poll interval delivers a freshly committed message at once (LISTEN/NOTIFY)."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    idle, delivered, stop = anyio.Event(), anyio.Event(), anyio.Event()
    publisher = Collecting()

    class Watched(OutboxRelay):
        async def relay_once(self) -> int:
            sent = await super().relay_once()
            if sent:
                delivered.set()
            else:
                idle.set()
            return sent

    relay = Watched(barrier, publisher, poll_interval=30, max_poll_interval=30)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(partial(relay.run, stop=stop))
            await idle.wait()  # found the outbox empty: now waiting up to 30 s, or for a notification
            ids = await order(barrier, "o-1", "a")
            await delivered.wait()
            stop.set()
    assert [m.message_id for m in publisher.messages] == ids


@pytest.mark.parametrize("pg_db", ["asyncpg"], indirect=True)  # it breaks asyncpg's LISTEN; psycopg's: test_psycopg
async def test_relay_polls_when_it_cannot_listen(
    pg_db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay whose LISTEN fails logs it and falls back to polling."""
    import asyncpg

    async def refuse(*_: object) -> None:
        raise asyncpg.PostgresError("LISTEN refused")

    monkeypatch.setattr(asyncpg.Connection, "add_listener", refuse)
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    ids = await order(barrier, "o-1", "a")
    stop = anyio.Event()

    class Stopping(Collecting):
        async def publish(self, messages: Sequence[Message]) -> None:
            await super().publish(messages)
            stop.set()

    publisher = Stopping()
    relay = OutboxRelay(barrier, publisher, poll_interval=0.01, max_poll_interval=0.02)
    with anyio.fail_after(10):
        await relay.run(stop=stop)
    assert [m.message_id for m in publisher.messages] == ids
    assert "the relay polls" in caplog.text

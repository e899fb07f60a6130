"""Across boundaries: relay the outbox to Kafka, and run a barrier at every consumer.

The id travels: a unit of work publishes (`UnitOfWork.publish`) → the message waits in the outbox, committed
with the record → `OutboxRelay` publishes it with the ``idempotency-message-id`` header → `consume` runs the
consumer's writes in a unit of work keyed by that id, under the scope ``consumer:<group>``. Whatever is
delivered twice (a relay that re-publishes after a crash, a redelivery after a consumer crash) has one
effect.

Needs the ``kafka`` extra (aiokafka) only for `AIOKafkaPublisher`; the rest works with any client.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import anyio
from sqlalchemy import delete, func, select, update

from ._exceptions import ConfigurationError, IdembarrierError
from ._outbox import (
    KEY_HEADER,
    MESSAGE_ID_HEADER,
    SCOPE_HEADER,
    Message,
    decode_headers,
    message_id,
    notify_channel,
    outbox_for,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
    from datetime import timedelta

    from aiokafka import AIOKafkaProducer
    from anyio.abc import TaskStatus
    from sqlalchemy import Delete, Select, Table
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier

__all__ = [
    "KEY_HEADER",
    "MESSAGE_ID_HEADER",
    "SCOPE_HEADER",
    "AIOKafkaPublisher",
    "Consumed",
    "ConsumerMessage",
    "Message",
    "MissingMessageId",
    "MissingMessageIdError",
    "OffsetConsumer",
    "OutboxRelay",
    "Publisher",
    "consume",
    "message_id",
    "run_consumer",
]

R = TypeVar("R")
M = TypeVar("M", bound="ConsumerMessage")
P = TypeVar("P")
M_co = TypeVar("M_co", bound="ConsumerMessage", covariant=True)

_log = logging.getLogger(__name__)


# -- relay ------------------------------------------------------------------------------------------------


class Publisher(Protocol):
    """Publishes the relay's messages to a broker."""

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` in order, headers and key included; return once the broker acknowledged all.

        Raise if any was not acknowledged: the relay then marks none of the batch sent, and re-publishes it.
        """
        ...


class AIOKafkaPublisher:
    """`Publisher` over a started ``aiokafka.AIOKafkaProducer``; the caller starts and stops it.

    Messages are sent one after another and awaited together: aiokafka keeps one batch in flight per
    partition, so messages with the same key (same partition) arrive in the relay's order.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def publish(self, messages: Sequence[Message]) -> None:
        """Send ``messages`` and wait for every acknowledgement; see `Publisher.publish`."""
        pending = [await self.producer.send(m.topic, m.value, key=m.key, headers=list(m.headers)) for m in messages]
        for acknowledged in pending:
            await acknowledged


class OutboxRelay:
    """Moves committed messages from the outbox to a `Publisher`, then marks them sent.

    Each batch is one transaction: claim up to ``batch_size`` pending rows in insertion order, publish them,
    mark them sent, commit. A relay that dies between publishing and committing leaves the rows pending, and
    the next relay publishes them again (with the same message id: consumers deduplicate). On PostgreSQL
    several relays run side by side: rows are claimed ``FOR UPDATE SKIP LOCKED``, and a relay claims a
    (topic, key) only while no other relay holds it, so each key's messages are published in order. On
    SQLite the write lock serializes relays.

    Between batches `run` waits, with a backoff between ``poll_interval`` and ``max_poll_interval`` while
    the outbox is empty or the publisher fails. On PostgreSQL it also listens, on a connection of its own,
    to the channel named after the outbox table: every unit of work that published notifies it in its
    commit, so the relay wakes at once and polling is only the fallback (a lost notification, a listener
    that could not start). On SQLite it polls.

    Args:
        barrier: The barrier whose records table's outbox is relayed.
        publisher: Where messages go.
        batch_size: Most rows per transaction.
        poll_interval: First wait, in seconds, after an empty or failed batch.
        max_poll_interval: Longest wait between polls.
    """

    def __init__(
        self,
        barrier: Barrier[R],
        publisher: Publisher,
        *,
        batch_size: int = 100,
        poll_interval: float = 0.05,
        max_poll_interval: float = 2.0,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size!r}")
        if not 0 < poll_interval <= max_poll_interval:
            raise ConfigurationError("poll intervals must satisfy 0 < poll_interval <= max_poll_interval")
        self._barrier = barrier
        self._publisher = publisher
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._max_poll_interval = max_poll_interval
        self._outbox = outbox_for(barrier._table)

    async def relay_once(self) -> int:
        """Publish one batch and mark it sent, in one transaction; return how many messages it held."""
        barrier = self._barrier
        async with barrier.sessionmaker() as session:
            conn = await session.connection()
            storage = await barrier._storage_on(conn)
            await storage.begin(barrier.options.wait_timeout)
            claim = _claim(conn.dialect.name, self._outbox, self._batch_size)
            rows = (await conn.execute(claim)).all()
            if not rows:
                return 0
            messages = [
                Message(
                    id=row.id,
                    message_id=row.message_id,
                    topic=row.topic,
                    key=row.key,
                    value=row.value,
                    headers=decode_headers(row.headers),
                )
                for row in rows
            ]
            await self._publisher.publish(messages)
            outbox = self._outbox
            ids = [m.id for m in messages]
            await conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(sent_at=func.now()))
            await session.commit()
        return len(messages)

    async def run(
        self,
        *,
        stop: anyio.Event | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Relay until ``stop`` is set (or the task is cancelled), backing off while idle or failing.

        A failed batch is logged and retried after the backoff; it stays pending meanwhile. Started with
        ``task_group.start(relay.run)``, it reports started once it listens for notifications (PostgreSQL).
        """
        wake = _Wake()
        async with anyio.create_task_group() as tg, self._listening(wake.set):
            if stop is not None:
                tg.start_soon(_set_on, stop, wake.set)
            task_status.started()
            delay = self._poll_interval
            while stop is None or not stop.is_set():
                wake.arm()  # before the batch: a notification that arrives during it wakes the next wait
                try:
                    sent = await self.relay_once()
                except Exception:
                    _log.exception("idembarrier: relaying the outbox failed; retrying in %.2fs", delay)
                    sent = 0
                if sent:
                    delay = self._poll_interval
                    continue
                with anyio.move_on_after(delay):
                    await wake.wait()
                delay = min(delay * 2, self._max_poll_interval)
            tg.cancel_scope.cancel()

    @asynccontextmanager
    async def _listening(self, wake: Callable[[], object]) -> AsyncIterator[None]:
        """LISTEN on the outbox's channel on a dedicated connection, calling ``wake`` per NOTIFY.

        PostgreSQL through asyncpg only; elsewhere, and after any failure to listen (logged), the relay polls.
        A listening connection that dies later leaves the relay polling until it is restarted.
        """
        engine = self._barrier.sessionmaker.kw.get("bind")
        if engine is None or engine.dialect.name != "postgresql" or engine.dialect.driver != "asyncpg":
            yield
            return
        channel = notify_channel(self._barrier._table)

        def on_notify(*_: object) -> None:
            wake()

        async with AsyncExitStack() as stack:
            driver = None
            try:
                conn = await stack.enter_async_context(engine.connect())
                driver = (await conn.get_raw_connection()).driver_connection
                await driver.add_listener(channel, on_notify)
            except Exception:
                _log.exception("idembarrier: listening on %r failed; the relay polls", channel)
                driver = None
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):  # give the connection back clean, even when cancelled
                    if driver is not None:
                        try:
                            await driver.remove_listener(channel, on_notify)
                        except Exception:  # pragma: no cover - a dead connection: never pool it
                            await conn.invalidate()
                    await stack.aclose()

    async def purge_sent(self, older_than: timedelta, *, batch_size: int = 1000) -> int:
        """Delete the messages marked sent more than ``older_than`` ago (database clock); return how many.

        Pending messages are never deleted. Each batch of at most ``batch_size`` rows is a transaction of its
        own; on PostgreSQL it skips rows a relay holds, so purging runs beside the relays.
        """
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size!r}")
        if older_than.total_seconds() < 0:
            raise ConfigurationError(f"older_than must not be negative, not {older_than!r}")
        barrier, total = self._barrier, 0
        while True:
            async with barrier.sessionmaker() as session:
                conn = await session.connection()
                storage = await barrier._storage_on(conn)
                await storage.begin(barrier.options.wait_timeout)
                purge = _purge_sent(conn.dialect.name, self._outbox, older_than, batch_size)
                deleted: int = (await conn.execute(purge)).rowcount
                await session.commit()
            total += deleted
            if deleted < batch_size:
                return total


class _Wake:
    """A wake-up that can be re-armed: `set` wakes the current (or next) `wait` once."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def arm(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


async def _set_on(event: anyio.Event, wake: Callable[[], object]) -> None:
    await event.wait()
    wake()


def _claim(dialect: str, outbox: Table, limit: int) -> Select[tuple[object, ...]]:
    """The statement that claims the next pending rows, oldest first."""
    c = outbox.c
    query = (
        select(c.id, c.message_id, c.topic, c.key, c.value, c.headers)
        .where(c.sent_at.is_(None))
        .order_by(c.id)
        .limit(limit)
    )
    if dialect != "postgresql":
        return query  # SQLite: the transaction holds the database's write lock; no other relay runs now
    # SKIP LOCKED: a relay never waits for, nor re-claims, a row another relay holds; a row that relay then
    # marks sent is re-checked after its commit and dropped. The transaction-scoped advisory lock on
    # (topic, key) keeps the other relays off that key's later rows until this one commits: order per key.
    partition = func.hashtextextended(c.topic + ":" + func.coalesce(func.encode(c.key, "hex"), ""), 0)
    return query.where(func.pg_try_advisory_xact_lock(partition)).with_for_update(skip_locked=True)


def _purge_sent(dialect: str, outbox: Table, older_than: timedelta, limit: int) -> Delete:
    """The statement that deletes the oldest sent rows marked sent before the retention, ``limit`` at most."""
    c = outbox.c
    if dialect == "postgresql":
        cutoff = func.now() - older_than
    else:  # SQLite stores the database clock as text, 'YYYY-MM-DD HH:MM:SS'
        cutoff = func.datetime("now", f"-{older_than.total_seconds()} seconds")
    oldest = select(c.id).where(c.sent_at.is_not(None), c.sent_at <= cutoff).order_by(c.id).limit(limit)
    if dialect == "postgresql":
        # SKIP LOCKED: a row a relay claimed is pending in its eyes; never wait for it nor delete under it.
        oldest = oldest.with_for_update(skip_locked=True)
    return delete(outbox).where(c.id.in_(oldest.scalar_subquery()))


# -- consumer barrier -------------------------------------------------------------------------------------


class ConsumerMessage(Protocol):
    """What `consume` reads from a consumed message (an aiokafka ``ConsumerRecord`` has all of it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class MissingMessageId(StrEnum):
    """What `consume` does with a message that lacks the ``idempotency-message-id`` header."""

    REJECT = "reject"
    """Raise `MissingMessageIdError`; the handler does not run."""
    DERIVE = "derive"
    """Key it by ``<topic>:<partition>:<offset>`` with a warning: a redelivery is caught, a re-publish is not."""


class MissingMessageIdError(IdembarrierError):
    """Raised when a consumed message has no ``idempotency-message-id`` header and the policy rejects it."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        super().__init__(f"message {topic}:{partition}:{offset} has no {MESSAGE_ID_HEADER!r} header")
        self.topic = topic
        self.partition = partition
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Consumed(Generic[R]):
    """What `consume` did with a message."""

    message_id: str
    """The key the consumer's barrier used."""
    duplicate: bool
    """Whether the message was seen before: the handler did not run, ``response`` is the recorded one."""
    response: R


async def consume(
    barrier: Barrier[R],
    message: M,
    handler: Callable[[AsyncSession, M], Awaitable[R]],
    *,
    group: str,
    on_missing_id: MissingMessageId = MissingMessageId.REJECT,
) -> Consumed[R]:
    """Run ``handler(session, message)`` once per message id, in a unit of work of the consumer's own.

    The key is the message's ``idempotency-message-id`` header, the scope ``consumer:<group>`` and the
    fingerprint the message's value. The handler's writes and the record commit together; commit the
    consumer's offset only after this returns, so a crash in between means a redelivery, which is a
    duplicate here. A handler that raises commits nothing and propagates unchanged.

    Raises:
        MissingMessageIdError: The header is missing and ``on_missing_id`` is REJECT.
        FingerprintMismatchError: Another message with the same id but another value was consumed.
    """
    key = _message_key(message, on_missing_id)
    async with barrier.unit_of_work(key, scope=f"consumer:{group}", fingerprint=message.value) as uow:
        if not uow.replayed:
            uow.complete(await handler(uow.session, message))
    return Consumed(message_id=key, duplicate=uow.replayed, response=uow.response)


class OffsetConsumer(Protocol[P, M_co]):
    """The part of an ``aiokafka.AIOKafkaConsumer`` that `run_consumer` uses (started, auto-commit off)."""

    async def getmany(self, *, timeout_ms: int = 0) -> Mapping[P, Sequence[M_co]]:
        """Up to a batch of messages per partition, waiting at most ``timeout_ms`` for the first."""
        ...

    async def commit(self, offsets: dict[P, int]) -> None:
        """Commit, per partition, the offset of the next message to consume."""
        ...


async def run_consumer(
    consumer: OffsetConsumer[P, M],
    barrier: Barrier[R],
    handler: Callable[[AsyncSession, M], Awaitable[R]],
    *,
    group: str,
    stop: anyio.Event | None = None,
    on_missing_id: MissingMessageId = MissingMessageId.REJECT,
    poll_timeout: float = 1.0,
) -> int:
    """Consume until ``stop`` is set: each message through `consume`, then its offset committed.

    The offset is committed only after the database commit, one message at a time: a crash in between means
    a redelivery, which `consume` recognises as a duplicate. When ``stop`` is set, the loop stops fetching,
    finishes the message in flight, commits its offset and returns; the rest of a fetched batch is not
    committed and is delivered again to whoever consumes the partitions next (stop ``consumer`` then, or
    seek it to the committed offsets before consuming again: its position moved past that rest). An
    exception (the handler's, `MissingMessageIdError`, `FingerprintMismatchError`) propagates with the
    failing message's offset uncommitted. The caller starts and stops ``consumer``, with
    ``enable_auto_commit=False``.

    Args:
        consumer: A started consumer, e.g. ``aiokafka.AIOKafkaConsumer``.
        barrier: The consumer's barrier.
        handler: Called as ``handler(session, message)`` once per message id; see `consume`.
        group: The consumer group: the barrier's scope is ``consumer:<group>``.
        stop: Set it to shut down gracefully; without it, cancel the task.
        on_missing_id: The policy for a message without the id header.
        poll_timeout: Longest wait, in seconds, for one fetch.

    Returns:
        How many messages the handler applied (duplicates not counted).
    """
    applied = 0
    while stop is None or not stop.is_set():
        batches = await _fetch(consumer, stop, int(poll_timeout * 1000))
        for partition, messages in batches.items():
            for message in messages:
                if stop is not None and stop.is_set():
                    return applied
                done = await consume(barrier, message, handler, group=group, on_missing_id=on_missing_id)
                applied += not done.duplicate
                await consumer.commit({partition: message.offset + 1})
    return applied


async def _fetch(consumer: OffsetConsumer[P, M], stop: anyio.Event | None, timeout_ms: int) -> Mapping[P, Sequence[M]]:
    """One fetch, given up (nothing fetched) as soon as ``stop`` is set."""
    fetched: Mapping[P, Sequence[M]] = {}
    async with anyio.create_task_group() as tg:
        if stop is not None:
            tg.start_soon(_set_on, stop, tg.cancel_scope.cancel)
        fetched = await consumer.getmany(timeout_ms=timeout_ms)
        tg.cancel_scope.cancel()
    return fetched


def _message_key(message: ConsumerMessage, policy: MissingMessageId) -> str:
    for name, value in message.headers:
        if name == MESSAGE_ID_HEADER:
            return value.decode()
    if MissingMessageId(policy) is MissingMessageId.REJECT:
        raise MissingMessageIdError(message.topic, message.partition, message.offset)
    warnings.warn(
        f"message {message.topic}:{message.partition}:{message.offset} has no {MESSAGE_ID_HEADER!r} header: "
        "deduplicating it by its offset, which misses duplicates the producer created",
        stacklevel=2,
    )
    return f"{message.topic}:{message.partition}:{message.offset}"

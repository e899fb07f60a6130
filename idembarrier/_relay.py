"""The outbox relay: committed messages to a broker, in order per key, with poison messages parked.

Sequence (one batch): claim up to ``batch_size`` pending rows in insertion order → publish them → mark the
acknowledged ones sent → commit. A message the broker refuses for good (`MessageRefusedError`) counts a
refusal on its row; after ``max_attempts`` it is parked, and its (topic, key)'s later messages wait behind it
while every other key flows. Anything else the publisher raises (the broker is down, a timeout) is
transient: nothing is counted, and the batch is retried after a backoff with jitter.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ._backoff import Backoff
from ._exceptions import ConfigurationError, IdembarrierError
from ._outbox import Message, Parked, notify_channel
from ._storage import listen

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextlib import AbstractAsyncContextManager
    from datetime import timedelta

    from anyio.abc import TaskStatus

    from ._barrier import Barrier
    from ._runtime import Runtime
    from ._storage import Storage

__all__ = ["MessageRefusedError", "OutboxRelay", "Parked", "Publisher", "outbox_counts"]

R = TypeVar("R")

_log = logging.getLogger("idembarrier.relay")

_MAX_ERROR = 2000
"""The longest error text kept on a row."""


class MessageRefusedError(IdembarrierError):
    """Raised by a `Publisher` when the broker refused one message for good (too large, invalid topic).

    The messages before it in the batch were acknowledged; the relay marks those sent and counts a refusal
    on this one. Raise anything else for a transient failure, after which nothing of the batch is marked.
    """

    def __init__(self, message: Message, reason: str) -> None:
        super().__init__(f"the broker refused message {message.message_id} to {message.topic!r}: {reason}")
        self.message = message
        self.reason = reason


class Publisher(Protocol):
    """Publishes the relay's messages to a broker."""

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` in order, headers and key included; return once the broker acknowledged all.

        Raise `MessageRefusedError` for the first message the broker refused for good (the ones before it
        were acknowledged), or any other exception for a transient failure: the relay then marks none of
        the batch sent and publishes it again.
        """
        ...


class OutboxRelay:
    """Moves committed messages from the outbox to a `Publisher`, then marks them sent.

    Each batch is one transaction (see the module's sequence). A relay that dies between publishing and
    committing leaves the rows pending, and the next relay publishes them again (with the same message id:
    consumers deduplicate). On PostgreSQL several relays run side by side: rows are claimed ``FOR UPDATE
    SKIP LOCKED``, and a relay claims a (topic, key) only while no other relay holds it, so each key's
    messages are published in order. On SQLite the write lock serializes relays.

    Between batches `run` waits, with a backoff with jitter between ``poll_interval`` and
    ``max_poll_interval`` while the outbox is empty or the publisher fails. On PostgreSQL it also listens
    for the notification every publishing commit sends (see `idembarrier._listen`), so it wakes at once and
    polling is only the fallback.

    Args:
        barrier: The barrier whose records table's outbox is relayed.
        publisher: Where messages go.
        batch_size: Most rows per transaction.
        poll_interval: First wait, in seconds, after an empty or failed batch.
        max_poll_interval: Longest wait between polls.
        max_attempts: Refusals after which a message is parked.
        listen_url: A direct PostgreSQL URL for the notifications, when the barrier's engine goes through
            a transaction pooler (where LISTEN is accepted but belongs to no session). Default: the
            barrier's engine.
    """

    def __init__(
        self,
        barrier: Barrier[R],
        publisher: Publisher,
        *,
        batch_size: int = 100,
        poll_interval: float = 0.05,
        max_poll_interval: float = 2.0,
        max_attempts: int = 5,
        listen_url: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size!r}")
        if not 0 < poll_interval <= max_poll_interval:
            raise ConfigurationError("poll intervals must satisfy 0 < poll_interval <= max_poll_interval")
        if max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be at least 1, not {max_attempts!r}")
        if listen_url is not None:
            _check_listen_url(listen_url)
        self._runtime = barrier.runtime
        self._publisher = publisher
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._max_poll_interval = max_poll_interval
        self._max_attempts = max_attempts
        self._listen_url = listen_url

    async def relay_once(self) -> int:
        """Publish one batch and mark what the broker acknowledged sent, in one transaction; return how many.

        Raises:
            StorageError: The database failed; nothing was marked.
            Exception: Whatever the publisher raised for a transient failure; nothing was marked.
        """
        try:
            async with self._transaction() as storage:
                sent = await self._publish(storage, await storage.claim_outbox(self._batch_size))
                if sent:
                    await storage.mark_sent([m.id for m in sent])
        except _PublishFailed as failed:
            raise failed.cause from None  # the publisher's own error, unchanged (the batch rolled back)
        return len(sent)

    async def _publish(self, storage: Storage, pending: list[Message]) -> list[Message]:
        """Publish ``pending``, counting refusals; return the messages the broker acknowledged."""
        sent: list[Message] = []
        while pending:
            try:
                await self._publisher.publish(pending)
            except MessageRefusedError as refused:
                at = pending.index(refused.message)
                sent += pending[:at]
                await self._refused(storage, refused)
                # The refused message's key waits behind it (order); the batch's other keys go on.
                held = (refused.message.topic, refused.message.key)
                pending = [m for m in pending[at + 1 :] if m.key is None or (m.topic, m.key) != held]
                continue
            except Exception as exc:
                raise _PublishFailed(exc) from exc
            sent += pending
            break
        return sent

    async def _refused(self, storage: Storage, refused: MessageRefusedError) -> None:
        """Count a refusal on the message's row (locked by this batch's claim), parking it at the limit."""
        error = refused.reason[:_MAX_ERROR]
        attempts, parked = await storage.refuse(refused.message.id, error, self._max_attempts)
        if parked:
            _log.error(
                "idembarrier: parked message %s after %d refusals (%s); its key's later messages wait behind it "
                "until it is released or dropped",
                refused.message.message_id,
                attempts,
                refused.reason,
            )
        else:
            _log.warning("idembarrier: %s (refusal %d of %d)", refused, attempts, self._max_attempts)

    def _transaction(self) -> AbstractAsyncContextManager[Storage]:
        """A transaction of the relay's own, opened as a claim opens it (waiting for SQLite's write lock)."""
        return _transaction(self._runtime, "relaying the outbox")

    async def run(
        self,
        *,
        stop: anyio.Event | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Relay until ``stop`` is set (or the task is cancelled), backing off while idle or failing.

        A failed batch is logged and retried after the backoff; it stays pending meanwhile. Started with
        ``task_group.start(relay.run)``, it reports started once its first attempt to listen has finished
        (PostgreSQL), listening or not.
        """
        wake = _Wake()
        backoff = Backoff(self._poll_interval, self._max_poll_interval)
        async with anyio.create_task_group() as tg:
            if stop is not None:
                tg.start_soon(_set_on, stop, wake.set)
            engine = self._runtime.sessionmaker.kw.get("bind")
            await tg.start(listen, engine, self._listen_url, notify_channel(self._runtime.table), wake.set)
            task_status.started()
            while stop is None or not stop.is_set():
                wake.arm()  # before the batch: a notification that arrives during it wakes the next wait
                try:
                    sent = await self.relay_once()
                except Exception:
                    _log.exception("idembarrier: relaying the outbox failed; retrying")
                    sent = 0
                if sent:
                    backoff.reset()
                    continue
                with anyio.move_on_after(backoff.next()):
                    await wake.wait()
            tg.cancel_scope.cancel()

    # -- operating on parked messages -------------------------------------------------------------------

    async def parked(self, *, limit: int = 100) -> list[Parked]:
        """The parked messages, oldest first."""
        async with self._transaction() as storage:
            return await storage.parked(limit)

    async def release(self, message_id: str) -> bool:
        """Unpark a message: its refusals start again from 0 and it is published next; return whether it was parked."""
        async with self._transaction() as storage:
            return await storage.release_parked(message_id)

    async def drop(self, message_id: str) -> bool:
        """Delete a parked message for good, letting its key's later messages go; return whether it was parked."""
        async with self._transaction() as storage:
            dropped = await storage.drop_parked(message_id)
        if dropped:
            _log.warning("idembarrier: dropped parked message %s; it will never be published", message_id)
        return dropped

    async def counts(self) -> tuple[int, int]:
        """How many messages are pending (parked included), and how many of them are parked."""
        return await outbox_counts(self._runtime)

    async def purge_sent(self, older_than: timedelta, *, batch_size: int = 1000) -> int:
        """Delete the messages marked sent more than ``older_than`` ago (database clock); return how many.

        Pending messages (parked ones included) are never deleted. Each batch of at most ``batch_size`` rows
        is a transaction of its own; on PostgreSQL it skips rows a relay holds, so purging runs beside the
        relays.
        """
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size!r}")
        if older_than.total_seconds() < 0:
            raise ConfigurationError(f"older_than must not be negative, not {older_than!r}")
        total = 0
        while True:
            async with self._transaction() as storage:
                deleted = await storage.purge_sent(older_than, batch_size)
            total += deleted
            if deleted < batch_size:
                return total


def _check_listen_url(url: str) -> None:
    """Refuse a ``listen_url`` that is not a PostgreSQL URL for asyncpg, the one driver that LISTENs here."""
    try:
        drivername = make_url(url).drivername
    except ArgumentError as exc:
        raise ConfigurationError(f"listen_url is not a database URL: {exc}") from exc
    if drivername != "postgresql+asyncpg":
        raise ConfigurationError(f"listen_url must be a postgresql+asyncpg:// URL, not {drivername}://")


async def outbox_counts(runtime: Runtime[R]) -> tuple[int, int]:
    """How many messages of ``runtime``'s outbox are pending (parked included), and how many are parked."""
    async with _transaction(runtime, "counting the outbox") as storage:
        return await storage.outbox_counts()


def _transaction(runtime: Runtime[R], doing: str) -> AbstractAsyncContextManager[Storage]:
    """A transaction of ``runtime``'s own that waits for SQLite's write lock as long as a claim would."""
    return runtime.transaction(doing, wait=runtime.options.wait_timeout)


class _PublishFailed(Exception):
    """Carries a publisher's transient error out of the batch's transaction, which must not translate it."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(repr(cause))
        self.cause = cause


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

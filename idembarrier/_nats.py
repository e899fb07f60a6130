"""The JetStream adapter's internals: `JetStreamPublisher`, `JetStreamDelivery`, `run_jetstream_consumer`.

See `idembarrier.nats` for what each layer of deduplication covers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

from ._backoff import Backoff, Retries
from ._delivery import Applied, ConsumerBarrier, MissingMessageId, Retry
from ._exceptions import ConfigurationError
from ._outbox import MESSAGE_KEY_HEADER  # JetStream has no key: the subject is the topic
from ._relay import MessageRefusedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.api import ConsumerConfig
    from nats.js.client import JetStreamContext
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier
    from ._delivery import DeadLetterDestination, Processed
    from ._outbox import Message

__all__ = ["MESSAGE_KEY_HEADER", "JetStreamDelivery", "JetStreamPublisher", "run_jetstream_consumer"]

R = TypeVar("R")

_log = logging.getLogger("idembarrier.nats")

_MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream's own deduplication header

# JetStream API error codes (the server's ``err_code``) that a retry does not change.
_TOO_LARGE_FOR_STREAM = 10054  # JSStreamMessageExceedsMaximumErr: over the stream's max_msg_size
_NOT_THE_EXPECTED_STREAM = 10060  # JSStreamNotMatchErr: the subject is another stream's than ``stream``
_REFUSED_CODES = frozenset({_TOO_LARGE_FOR_STREAM, _NOT_THE_EXPECTED_STREAM})

_HEADER_LINE = len(b"NATS/1.0\r\n")
_ACK_TIMEOUT = 5.0
"""Seconds an ack waits for the server's confirmation before the loop counts it as a transient failure."""


class JetStreamPublisher:
    """`Publisher` over a connected ``nats.aio.client.Client``'s JetStream; the caller connects and closes it.

    Each message is published to the subject named by its topic with the contract headers, its key in
    `MESSAGE_KEY_HEADER`, and ``Nats-Msg-Id`` = its message id; each PubAck is awaited before the next
    message goes, so the stream holds a batch in the relay's order. A PubAck with ``duplicate`` is a success:
    the stream has the message already (a re-publish within its ``duplicate_window``).

    Refused for good (`MessageRefusedError`, which the relay counts and eventually parks): no stream listens
    on the subject; the message with its headers is over the connection's ``max_payload`` (checked before
    sending: the server would close the connection) or over the stream's ``max_msg_size``; a header that
    NATS cannot carry unchanged (a name that is not a token, a value that is not UTF-8 text or would be
    trimmed or split); a subject that is not one; with ``stream``, a subject of another stream. Everything
    else (a timeout, a reconnect, a stream out of space) is transient.

    The client is taken rather than a JetStream context because the size limit is the connection's.

    Args:
        client: A connected client.
        stream: The stream every message is expected to land in (``Nats-Expected-Stream``); default: any.
        timeout: Seconds to wait for each PubAck.
        domain: The JetStream domain, where the account has several.
    """

    def __init__(
        self, client: Client, *, stream: str | None = None, timeout: float = 5.0, domain: str | None = None
    ) -> None:
        self.client = client
        self.stream = stream
        self.timeout = timeout
        self.jetstream = client.jetstream(timeout=timeout, domain=domain)

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` one after another, each PubAck awaited; see `Publisher.publish`."""
        from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
        from nats.js.errors import APIError, NoStreamResponseError

        for m in messages:
            headers = self._headers(m)
            try:
                await self.jetstream.publish(
                    m.topic, m.value, timeout=self.timeout, stream=self.stream, headers=headers
                )
            except NoStreamResponseError as exc:
                raise MessageRefusedError(m, f"no stream listens on subject {m.topic!r}") from exc
            except (BadHeaderError, BadSubjectError, MaxPayloadError) as exc:
                raise MessageRefusedError(m, repr(exc)) from exc
            except APIError as exc:
                if exc.err_code in _REFUSED_CODES:
                    raise MessageRefusedError(m, str(exc)) from exc
                raise

    def _headers(self, m: Message) -> dict[str, str]:
        """The NATS headers of ``m``, or `MessageRefusedError` when NATS would not carry them unchanged."""
        from nats.aio.client import _HEADER_KEY_RE  # the name syntax nats-py enforces, rather than a copy

        headers: dict[str, str] = {}
        carried = list(m.headers)
        if m.key is not None:
            carried.append((MESSAGE_KEY_HEADER, m.key))
        for name, raw in carried:
            if not _HEADER_KEY_RE.fullmatch(name):
                raise MessageRefusedError(m, f"header name {name!r} is not a NATS header token")
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MessageRefusedError(m, f"header {name!r} is not UTF-8 text, which NATS headers are") from None
            if value != value.strip() or "\r" in value or "\n" in value:
                raise MessageRefusedError(m, f"header {name!r} would be trimmed or split in a NATS header")
            headers.setdefault(name, value)  # the first of a repeated name counts, as consumers read it
        headers[_MSG_ID_HEADER] = m.message_id  # last: a dead letter's copy of a message gets its own id
        size = _HEADER_LINE + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items()) + 2 + len(m.value)
        if size > self.client.max_payload:
            raise MessageRefusedError(
                m, f"{size} bytes with headers, over the server's max_payload of {self.client.max_payload}"
            )
        return headers


class JetStreamDelivery:
    """A message delivered by a JetStream consumer, as the consumer barrier reads it (a `Delivery`).

    ``source`` is the stream and ``position`` its stream sequence, so ``<stream>:<sequence>`` names the
    message wherever its subject. nats-py hands headers over as a mapping: of a repeated header, only one
    value reaches the consumer, and a value that is not UTF-8 arrives with replacement characters.
    """

    __slots__ = ("_headers", "msg", "num_delivered", "sequence", "stream")

    def __init__(self, msg: Msg) -> None:
        metadata = msg.metadata  # raises NotJSMessageError for a message that did not come from JetStream
        self.msg = msg
        """The nats-py message: ack it only after the barrier answered (the loop does)."""
        self.stream = metadata.stream
        """The stream it is stored in."""
        self.sequence = metadata.sequence.stream
        """Its sequence in the stream."""
        self.num_delivered = metadata.num_delivered
        """How many times JetStream has delivered it, this time included."""
        self._headers = tuple((name, value.encode()) for name, value in (msg.headers or {}).items())

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]:
        """Its headers, values as UTF-8 bytes."""
        return self._headers

    @property
    def value(self) -> bytes | None:
        """Its payload."""
        return self.msg.data

    @property
    def key(self) -> bytes | None:
        """The outbox message's key, from `MESSAGE_KEY_HEADER`; ``None`` without it."""
        for name, value in self._headers:
            if name == MESSAGE_KEY_HEADER:
                return value
        return None

    @property
    def source(self) -> str:
        """The stream it came from."""
        return self.stream

    @property
    def position(self) -> str:
        """Its stream sequence, as text."""
        return str(self.sequence)

    @property
    def subject(self) -> str:
        """The subject it was published to."""
        return self.msg.subject


async def run_jetstream_consumer(
    subscription: JetStreamContext.PullSubscription | tuple[JetStreamContext, str, str],
    barrier: Barrier[R],
    handler: Callable[[AsyncSession, JetStreamDelivery], Awaitable[R]],
    *,
    group: str,
    stop: anyio.Event | None = None,
    batch: int = 10,
    poll_timeout: float = 1.0,
    on_missing_id: MissingMessageId = MissingMessageId.REJECT,
    max_attempts: int | None = 5,
    dead_letter: DeadLetterDestination[JetStreamDelivery] | None = None,
    max_retries: int | None = None,
    backoff: tuple[float, float] = (0.1, 30.0),
) -> int:
    """Consume from a durable pull consumer until ``stop`` is set; return how many handlers' writes committed.

    Each fetched message goes through `ConsumerBarrier.process` and is acked (awaiting the server's
    confirmation) only after the database commit: `Applied`, `Duplicate`, `DeadLettered`. A crash in
    between means a redelivery after the consumer's ``ack_wait``, which the barrier answers as a duplicate.
    On `Retry` (a transient failure, or a handler failure under ``max_attempts``) the message is nak'ed with
    the next backoff delay as its redelivery delay, and the rest of the batch goes on; when no message of a
    batch got through, the loop also waits that delay before fetching again, so a database outage is not a
    busy loop. While a handler runs, the loop tells JetStream it is in progress every third of ``ack_wait``,
    so a long handler is not redelivered to another consumer meanwhile.

    When ``stop`` is set the loop finishes and acks the message in flight, naks the batch's others (they
    go at once to another consumer) and returns; a fetch in progress ends first, so stopping takes up to
    ``poll_timeout``. Whatever propagates (a fatal error, the handler's exception when ``max_attempts`` is
    ``None``, the last transient error past ``max_retries``, a cancellation) leaves the failing message
    unacked, for redelivery after ``ack_wait``, and naks the rest of the batch.

    The consumer must exist, with explicit acks, and a ``max_deliver`` of at least ``max_attempts`` (best
    unlimited, see the module); the loop checks that once, at start.

    Args:
        subscription: A pull subscription (``await js.pull_subscribe_bind(durable, stream)``), or
            ``(js, stream, durable)`` to bind one for the loop's run (unsubscribed when it returns).
        barrier: The consumer's barrier.
        handler: Called as ``handler(session, delivery)`` once per message id.
        group: The consumer group: the barrier's scope is ``consumer:<group>``. Usually the durable's name.
        stop: Set it to shut down gracefully; without it, cancel the task.
        batch: Most messages per fetch.
        poll_timeout: Seconds a fetch waits for a first message.
        on_missing_id: The policy for a message without the id header (REJECT: its dead letter).
        max_attempts: Handler failures of one message id after which it is dead-lettered; ``None``: never,
            the handler's exception propagates.
        dead_letter: Also called for each poison message, in the transaction that records it FAILED (e.g.
            `DeadLetterTopic` with a subject of a dead-letter stream).
        max_retries: Consecutive transient failures after which the last one propagates; ``None``: no limit.
        backoff: The first and the longest delay, in seconds, of the backoff with jitter.

    Raises:
        ConfigurationError: The options or the consumer's settings are unusable (no such consumer, acks not
            explicit, ``max_deliver`` below ``max_attempts``).
        nats.errors.ConnectionClosedError: The client is closed (by its owner, or once its reconnect attempts
            ran out): nats-py never reopens it, so the loop does not retry; connect again and restart it.
    """
    if batch < 1:
        raise ConfigurationError(f"batch must be at least 1, not {batch!r}")
    if poll_timeout <= 0:
        raise ConfigurationError(f"poll_timeout must be positive, not {poll_timeout!r}")
    if not 0 < backoff[0] <= backoff[1]:
        raise ConfigurationError("backoff must satisfy 0 < first <= longest")
    if max_retries is not None and max_retries < 0:
        raise ConfigurationError(f"max_retries must be at least 0 or None, not {max_retries!r}")
    consumer: ConsumerBarrier[JetStreamDelivery, R] = ConsumerBarrier(
        barrier, handler, group=group, on_missing_id=on_missing_id, max_attempts=max_attempts, dead_letter=dead_letter
    )
    loop = _Loop(consumer, stop, batch, poll_timeout, max_retries, Backoff(*backoff))
    if not isinstance(subscription, tuple):
        return await loop.run(subscription)
    js, stream, durable = subscription
    bound = await js.pull_subscribe_bind(durable, stream)
    try:
        return await loop.run(bound)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_ACK_TIMEOUT):
            try:
                await bound.unsubscribe()
            except Exception as exc:  # a closed client: what the loop raised, if anything, is what propagates
                _log.info("idembarrier: could not unsubscribe from consumer %r (%r)", durable, exc)


class _Loop(Generic[R]):
    """One run of `run_jetstream_consumer`: its counters and its backoff."""

    def __init__(
        self,
        consumer: ConsumerBarrier[JetStreamDelivery, R],
        stop: anyio.Event | None,
        batch: int,
        poll_timeout: float,
        max_retries: int | None,
        backoff: Backoff,
    ) -> None:
        self.consumer, self.stop, self.batch, self.poll_timeout = consumer, stop, batch, poll_timeout
        self.retries = Retries(backoff, max_retries, stop, _log)
        self.progress_every = 0.0

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def run(self, sub: JetStreamContext.PullSubscription) -> int:
        applied = 0
        self.progress_every = await self._settings(sub) / 3
        while not self.stopped():
            messages = await self._fetch(sub)
            delay: float | None = None
            for at, msg in enumerate(messages):
                if self.stopped():
                    await _release(messages[at:])
                    return applied
                try:
                    outcome = await self._process(msg)
                except BaseException:
                    await _release(messages[at + 1 :])  # the failing one stays unacked: ack_wait redelivers it
                    raise
                if isinstance(outcome, Retry):
                    delay = self.retries.backoff.next()
                    await _nak(msg, delay)
                    try:
                        self.retries.failed(outcome.cause, outcome.what, delay)
                    except BaseException:
                        await _release(messages[at + 1 :])
                        raise
                    continue
                applied += isinstance(outcome, Applied)  # its writes committed, whether the ack goes or not
                try:
                    await msg.ack_sync(timeout=_ACK_TIMEOUT)
                except Exception as exc:  # its redelivery is a duplicate
                    if _closed(exc):
                        await _release(messages[at + 1 :])
                        raise
                    delay = self.retries.failed(exc, f"acking {msg.subject} {_where(msg)}")
                    continue
                delay = None
                self.retries.reset()
            if delay is not None:  # nothing of the batch got through: do not fetch again at once
                await self.retries.wait(delay)
        return applied

    async def _settings(self, sub: JetStreamContext.PullSubscription) -> float:
        """Check the consumer's settings once; return its ``ack_wait`` in seconds."""
        from nats.js.errors import NotFoundError

        while True:
            try:
                info = await sub.consumer_info()
            except NotFoundError as exc:
                raise ConfigurationError(
                    f"the subscription's JetStream consumer does not exist ({exc}): create it first, "
                    "js.add_consumer(stream, ConsumerConfig(durable_name=..., ack_policy=AckPolicy.EXPLICIT))"
                ) from exc
            except Exception as exc:
                if _closed(exc):
                    raise
                await self.retries.after(exc, "reading the consumer's settings")
                continue
            _check(info.config, self.consumer.max_attempts)
            return info.config.ack_wait or 30.0

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """One fetch; an empty list when none came within ``poll_timeout``, a client error backed off."""
        try:
            return await sub.fetch(self.batch, timeout=self.poll_timeout)
        except TimeoutError:  # nats-py's own and asyncio's (both TimeoutError): nothing came in time
            return []
        except Exception as exc:
            if _closed(exc):
                raise
            await self.retries.after(exc, "fetching from JetStream")
            return []

    async def _process(self, msg: Msg) -> Processed[R]:
        """The barrier's answer for ``msg``, with in-progress acks sent while it works."""
        delivery = JetStreamDelivery(msg)
        answer: Processed[R] | None = None
        # The keep-alive has a scope of its own: cancelling the group's would throw the cancellation into this
        # frame, after which CPython 3.11 reports no line of it or its callers to coverage until they next wait.
        keep_alive = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_alive, msg, keep_alive)
            try:
                answer = await self.consumer.process(delivery)
            except Exception as exc:  # out of the task group as itself, not in an exception group
                failure: Exception | None = exc
            else:
                failure = None
            keep_alive.cancel()
        if failure is not None:
            raise failure
        assert answer is not None
        return answer

    async def _keep_alive(self, msg: Msg, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self.progress_every)
                try:
                    await msg.in_progress()
                except Exception as exc:  # the connection is away: ack_wait may redeliver it, the barrier holds
                    _log.info("idembarrier: could not tell JetStream %s is in progress (%r)", _where(msg), exc)


def _check(config: ConsumerConfig, max_attempts: int | None) -> None:
    """Refuse a consumer on which the barrier's contract cannot hold."""
    from nats.js.api import AckPolicy

    if config.deliver_subject:
        raise ConfigurationError(f"consumer {config.durable_name!r} is a push consumer; use a pull consumer")
    if config.ack_policy not in (None, AckPolicy.EXPLICIT):
        raise ConfigurationError(
            f"consumer {config.durable_name!r} acks {config.ack_policy}; the barrier needs AckPolicy.EXPLICIT "
            "(each message acked after its own commit)"
        )
    limit = config.max_deliver
    if max_attempts is not None and limit is not None and 0 < limit < max_attempts:
        raise ConfigurationError(
            f"consumer {config.durable_name!r} has max_deliver={limit} < max_attempts={max_attempts}: JetStream "
            "would stop delivering a poison message before the barrier dead-letters it; set max_deliver=-1"
        )


def _closed(exc: Exception) -> bool:
    """Whether ``exc`` says the client is closed for good (nats-py never reopens a closed client)."""
    from nats.errors import ConnectionClosedError

    return isinstance(exc, ConnectionClosedError)


def _where(msg: Msg) -> str:
    try:
        metadata = msg.metadata
    except Exception:
        return "a message"
    return f"{metadata.stream}:{metadata.sequence.stream}"


async def _nak(msg: Msg, delay: float | None) -> None:
    """Nak ``msg`` (redelivered after ``delay``); a failure only means it comes back after ``ack_wait``."""
    try:
        await msg.nak(delay=delay)
    except Exception as exc:
        _log.info("idembarrier: could not nak %s (%r); it is redelivered after ack_wait", _where(msg), exc)


async def _release(messages: Sequence[Msg]) -> None:
    """Nak fetched messages not processed, so another consumer gets them at once, even while cancelled."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(_ACK_TIMEOUT):
        for msg in messages:
            await _nak(msg, None)

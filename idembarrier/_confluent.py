"""confluent-kafka at both ends (the implementation behind `idembarrier.confluent`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ._consumer import run_consumer
from ._delivery import MissingMessageId
from ._exceptions import ConfigurationError
from ._relay import MessageRefusedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

    import confluent_kafka
    from confluent_kafka.aio import AIOConsumer
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._barrier import Barrier
    from ._delivery import DeadLetterDestination
    from ._outbox import Message

__all__ = ["ConfluentConsumer", "ConfluentPublisher", "ConfluentRecord", "run_confluent_consumer"]

R = TypeVar("R")

_REFUSED = ("MSG_SIZE_TOO_LARGE", "INVALID_MSG_SIZE", "INVALID_MSG", "TOPIC_EXCEPTION", "INVALID_RECORD")
"""The ``KafkaError`` codes of a message the broker or the client refuses for good; the rest are transient."""


@dataclass(frozen=True, slots=True)
class ConfluentRecord:
    """A consumed ``confluent_kafka.Message`` as `idembarrier.kafka.ConsumerMessage` reads one (attributes).

    A header without a value (Kafka's null) reads as empty bytes, not as no header: an id header sent empty
    is malformed (dead-lettered), whatever the missing-id policy, rather than taken for a missing one.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    message: Any = field(repr=False, compare=False)
    """The ``confluent_kafka.Message`` itself (its timestamp, its leader epoch...)."""

    @classmethod
    def of(cls, message: confluent_kafka.Message) -> ConfluentRecord:
        """The record of ``message``."""
        raw = message.headers() or []
        pairs = list(raw.items()) if isinstance(raw, dict) else raw
        headers = tuple((str(name), _bytes(value) or b"") for name, value in pairs)
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if topic is None or partition is None or offset is None:  # pragma: no cover - error events are skipped
            raise ValueError("not a record: an error event")
        return cls(topic, partition, offset, _bytes(message.key()), _bytes(message.value()), headers, message)


@contextmanager
def _closing() -> Iterator[None]:
    """A closed consumer's ``RuntimeError`` as ``anyio.ClosedResourceError``, which `run_consumer` does not retry.

    confluent-kafka raises ``RuntimeError`` for a call on a closed consumer (``AIOConsumer`` and the C client
    both) and ``KafkaException`` for everything the broker or librdkafka reports.
    """
    try:
        yield
    except RuntimeError as exc:
        raise anyio.ClosedResourceError from exc


def _bytes(value: object) -> bytes | None:
    return value if isinstance(value, bytes) else None if value is None else str(value).encode()


class ConfluentConsumer:
    """``AIOConsumer`` as the `idembarrier.kafka.OffsetConsumer` that `run_consumer` drives.

    Partitions are ``(topic, partition)`` pairs. Seeks are applied before the next fetch: the loop seeks
    back before it retries or returns, and only the next fetch reads from there.
    """

    def __init__(self, consumer: AIOConsumer) -> None:
        self.consumer = consumer
        self._seeks: dict[tuple[str, int], int] = {}

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[tuple[str, int], Sequence[ConfluentRecord]]:
        """Up to ``max_records`` records by partition; a consumer error is raised as ``KafkaException``, a
        closed consumer as ``anyio.ClosedResourceError``."""
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        with anyio.CancelScope(shield=True), _closing():  # see the module: a fetch in a thread is never abandoned
            for (topic, partition), offset in list(self._seeks.items()):
                await self.consumer.seek(TopicPartition(topic, partition, offset))
                del self._seeks[topic, partition]
            messages = await self.consumer.consume(num_messages=max_records or 500, timeout=timeout_ms / 1000)
        batches: dict[tuple[str, int], list[ConfluentRecord]] = {}
        for message in messages:
            if (error := message.error()) is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            record = ConfluentRecord.of(message)
            batches.setdefault((record.topic, record.partition), []).append(record)
        return batches

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit, synchronously, the next offset to consume of each partition."""
        from confluent_kafka import TopicPartition

        partitions = [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]
        with _closing():
            await self.consumer.commit(offsets=partitions, asynchronous=False)

    def seek(self, partition: tuple[str, int], offset: int) -> None:
        """Make the next fetch of ``partition`` start at ``offset``."""
        self._seeks[partition] = offset


async def run_confluent_consumer(
    consumer: AIOConsumer,
    barrier: Barrier[R],
    handler: Callable[[AsyncSession, ConfluentRecord], Awaitable[R]],
    *,
    group: str,
    stop: anyio.Event | None = None,
    on_missing_id: MissingMessageId = MissingMessageId.REJECT,
    poll_timeout: float = 1.0,
    max_records: int = 100,
    max_attempts: int | None = 5,
    dead_letter: DeadLetterDestination[ConfluentRecord] | None = None,
    max_retries: int | None = None,
    backoff: tuple[float, float] = (0.1, 30.0),
) -> int:
    """Consume with ``consumer`` until ``stop`` is set; `idembarrier.kafka.run_consumer`'s loop and contract.

    ``consumer`` is an ``AIOConsumer`` the caller created with ``enable.auto.commit`` false, subscribed, and
    closes. ``handler`` receives each record as a `ConfluentRecord`. The arguments are `run_consumer`'s.

    Returns:
        How many messages the handler applied (duplicates and dead letters not counted).

    Raises:
        ConfigurationError: An unusable option: ``run_consumer``'s, or a ``poll_timeout`` that is not positive
            (librdkafka waits for ever on a negative one, in a thread no stop reaches, and returns at once on 0).
    """
    if not poll_timeout > 0:
        raise ConfigurationError(f"poll_timeout must be positive, not {poll_timeout!r}")
    return await run_consumer(
        ConfluentConsumer(consumer),
        barrier,
        handler,
        group=group,
        stop=stop,
        on_missing_id=on_missing_id,
        poll_timeout=poll_timeout,
        max_records=max_records,
        max_attempts=max_attempts,
        dead_letter=dead_letter,
        max_retries=max_retries,
        backoff=backoff,
    )


class ConfluentPublisher:
    """`idembarrier.kafka.Publisher` over a ``confluent_kafka.Producer``; the caller creates and flushes it.

    Each batch is queued with its headers, then ``flush`` waits (in a worker thread, at most ``timeout``
    seconds) for every delivery report. Messages with the same key go to the same partition in the relay's
    order (librdkafka keeps per-partition order; set ``enable.idempotence`` where the broker supports it, so
    that its retries cannot reorder them). A message librdkafka or the broker refuses for good (too large,
    invalid) raises `MessageRefusedError` once the ones before it are acknowledged; every other failure,
    and a flush that times out, is transient.
    """

    def __init__(self, producer: confluent_kafka.Producer, *, timeout: float = 30.0) -> None:
        self.producer = producer
        self.timeout = timeout

    async def publish(self, messages: Sequence[Message]) -> None:
        """Queue ``messages`` and wait for every delivery report; see `idembarrier.kafka.Publisher.publish`."""
        from confluent_kafka import KafkaException

        reports: list[confluent_kafka.KafkaError | bool | None] = [False] * len(messages)  # False: no report yet

        def reporter(at: int) -> Callable[[confluent_kafka.KafkaError | None, object], None]:
            def report(error: confluent_kafka.KafkaError | None, _message: object) -> None:
                reports[at] = error

            return report

        for at, m in enumerate(messages):
            try:
                self.producer.produce(m.topic, m.value, m.key, headers=list(m.headers), on_delivery=reporter(at))
            except KafkaException as exc:  # refused before sending: too large, invalid
                await self._flushed()
                self._check(messages[:at], reports[:at])
                if _refused(exc.args[0]):
                    raise MessageRefusedError(m, repr(exc)) from exc
                raise
            except BufferError:  # the local queue is full: what was queued goes out, this one again later
                await self._flushed()
                self._check(messages[:at], reports[:at])
                raise
        if await self._flushed():
            raise TimeoutError(f"confluent-kafka did not deliver the batch within {self.timeout} s")
        self._check(messages, reports)

    async def _flushed(self) -> int:
        """Wait for the delivery reports in a worker thread; return how many messages are still in flight."""
        remaining: int = await anyio.to_thread.run_sync(self.producer.flush, self.timeout)
        return remaining

    @staticmethod
    def _check(messages: Sequence[Message], reports: Sequence[confluent_kafka.KafkaError | bool | None]) -> None:
        """Raise for the first message that was not delivered: refused for good, or transiently."""
        from confluent_kafka import KafkaException

        for m, report in zip(messages, reports, strict=True):
            if report is None:
                continue
            if report is False:
                raise TimeoutError(f"no delivery report for message {m.message_id}")
            assert not isinstance(report, bool)
            if _refused(report):
                raise MessageRefusedError(m, report.str())
            raise KafkaException(report)


def _refused(error: object) -> bool:
    """Whether librdkafka's ``error`` refuses the message for good (by its code)."""
    from confluent_kafka import KafkaError

    refused = {getattr(KafkaError, name) for name in _REFUSED}
    return isinstance(error, KafkaError) and not error.retriable() and error.code() in refused

"""The replay-window check: does each scope keep its records longer than a replay can lag its request?

A consumer scope (``consumer:<group>``) sees a message again as long as the broker keeps it: a consumer
reset to the earliest offset replays the topic's whole retention. It also sees, for the first time, messages
as old as its lag: the oldest message it has not consumed yet may duplicate a request whose record was
written that long ago (by another path, or by a producer's retry). A scope's **replay window** is therefore
the longest of its topics' ``retention.ms`` and its group's lag (the age of its oldest unconsumed message),
read from a Kafka-protocol broker, and of any window declared for it. The scope is **at risk** when its
record retention is shorter, or when its window cannot be known (a topic kept forever, ``retention.ms``
neither readable nor declared).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource

__all__ = ["Part", "ScopeWindow", "check", "human", "read_broker"]


@dataclass(frozen=True, slots=True)
class Part:
    """One bound on a scope's replay window and where it came from.

    Attributes:
        source: What it is, in words (``topic orders retention.ms``, ``group billing lag``, ``declared``).
        window: How long a replay may lag by it; ``None`` when it has no bound (kept forever, or unknown).
        note: Why it has no bound, if it has none.
    """

    source: str
    window: timedelta | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class ScopeWindow:
    """One scope's record retention against its replay window."""

    scope: str
    retention: timedelta
    parts: tuple[Part, ...]

    @property
    def window(self) -> timedelta | None:
        """The longest bound (``None``: some part has none)."""
        if any(part.window is None for part in self.parts):
            return None
        return max((part.window for part in self.parts if part.window is not None), default=timedelta(0))

    @property
    def at_risk(self) -> bool:
        """Whether a replay may come after the record is gone."""
        window = self.window
        return window is None or self.retention < window

    @property
    def reason(self) -> str:
        """Why the scope is at risk, or why it is not, in words."""
        unbounded = [part for part in self.parts if part.window is None]
        if unbounded:
            return "; ".join(f"{part.source}: {part.note}" for part in unbounded)
        window = self.window
        longest = max(self.parts, key=lambda part: part.window or timedelta(0))
        verb = "shorter than" if self.at_risk else "covers"
        return f"record retention {human(self.retention)} {verb} {human(window)} ({longest.source})"


def human(value: timedelta | None) -> str:
    """A retention or a window as an operator reads it: ``30d``, ``6d 3h``, ``1:30:00``, ``unbounded``."""
    if value is None:
        return "unbounded"
    if value >= timedelta(days=1):  # to the hour: a window of days is not read to the second
        days, hours = divmod(round(value / timedelta(hours=1)), 24)
        return f"{days}d" if not hours else f"{days}d {hours}h"
    return str(timedelta(seconds=round(value.total_seconds())))


def check(retention: Mapping[str, timedelta], parts: Mapping[str, Sequence[Part]]) -> list[ScopeWindow]:
    """Each scope of ``parts`` with its record retention (``retention[scope]``), in scope order."""
    return [ScopeWindow(scope, retention[scope], tuple(parts[scope])) for scope in sorted(parts)]


async def read_broker(
    bootstrap: str, groups: Mapping[str, Sequence[str]], *, request_timeout: float = 10.0
) -> dict[str, list[Part]]:
    """Read each group's topics' ``retention.ms`` and the group's lag from a Kafka-protocol broker.

    Args:
        bootstrap: The broker's ``host:port`` list.
        groups: The topics each consumer group consumes; its scope is ``consumer:<group>``.
        request_timeout: Longest wait, in seconds, for each of the broker's answers.

    Returns:
        The parts read, by scope: one per topic (its retention) and one per group (its lag).
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    timeout_ms = round(request_timeout * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=timeout_ms
        )
        try:
            await consumer.start()
            topics = sorted({topic for listed in groups.values() for topic in listed})
            kept = await _retention(admin, [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics])
            partitions = await _partitions(admin, topics)
            found: dict[str, list[Part]] = {}
            for group, listed in groups.items():
                found[f"consumer:{group}"] = [
                    *(kept.get(topic, Part(f"topic {topic} retention.ms", None, "not readable")) for topic in listed),
                    await _lag(
                        admin, consumer, group, [tp for topic in listed for tp in partitions[topic]], timeout_ms
                    ),
                ]
            return found
        finally:
            await consumer.stop()
    finally:
        await admin.close()


async def _retention(admin: AIOKafkaAdminClient, resources: list[ConfigResource]) -> dict[str, Part]:
    """``retention.ms`` of each topic that has one (``-1``: kept forever)."""
    found: dict[str, Part] = {}
    for response in await admin.describe_configs(resources):
        for _error, _message, _type, name, entries in response.resources:
            for entry in entries:
                if entry[0] != "retention.ms" or entry[1] is None:
                    continue
                source = f"topic {name} retention.ms"
                ms = int(entry[1])
                found[name] = (
                    Part(source, None, "kept forever (-1)") if ms < 0 else Part(source, timedelta(milliseconds=ms))
                )
    return found


async def _partitions(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, list[TopicPartition]]:
    from aiokafka.structs import TopicPartition

    described = await admin.describe_topics(topics)
    return {d["topic"]: [TopicPartition(d["topic"], p["partition"]) for p in d["partitions"]] for d in described}


async def _lag(
    admin: AIOKafkaAdminClient,
    consumer: AIOKafkaConsumer,
    group: str,
    partitions: list[TopicPartition],
    timeout_ms: int,
) -> Part:
    """The age of the group's oldest unconsumed message: how far behind it is, in time."""
    source = f"group {group} lag"
    if not partitions:
        return Part(source, timedelta(0))
    committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
    ends = await consumer.end_offsets(partitions)
    oldest: int | None = None  # the smallest timestamp (ms) of a message the group has yet to consume
    for tp in partitions:
        offset = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else None
        if ends[tp] == 0 or (offset is not None and offset >= ends[tp]):
            continue  # nothing left to consume on this partition
        # One partition assigned at a time, and only with something to read: a consumer left assigned to an
        # empty partition keeps asking the broker for its position, which Tansu never answers.
        consumer.assign([tp])
        try:
            if offset is None:  # the group consumed nothing: its oldest unconsumed message is the first one kept
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
            batch = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        finally:
            consumer.unsubscribe()
        for message in batch.get(tp, []):
            oldest = message.timestamp if oldest is None else min(oldest, message.timestamp)
    if oldest is None:
        return Part(source, timedelta(0))
    return Part(source, max(timedelta(0), timedelta(milliseconds=time.time() * 1000 - oldest)))

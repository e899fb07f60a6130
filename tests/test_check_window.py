"""``idembarrier check-window``: record retentions against replay windows read from a Tansu broker or declared.

Tansu answers DescribeConfigs with the ``retention.ms`` a topic was created with, and OffsetFetch for the
partitions it is asked about; the group's lag is the age of its oldest unconsumed message, whose timestamp
the test sets when it produces it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from idembarrier import Barrier, Retention
from idembarrier._window import Part, ScopeWindow
from tests._cli import run_async
from tests.test_kafka import broker

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["broker"]  # a fixture, shared with test_kafka

ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400_000
BARRIER = Barrier(
    async_sessionmaker(create_async_engine("sqlite+aiosqlite://")),
    retention=Retention(response=timedelta(days=7), record=timedelta(days=30)),
    retention_by_scope={"consumer:audit": Retention(response=timedelta(days=7), record=timedelta(days=90))},
    max_replay_window=timedelta(days=14),
)
"""An application's barrier, as ``--barrier`` loads it (never connected: only its options are read)."""


async def topic(broker: str, *, retention_ms: int | None, ages_days: Sequence[float] = (), group: str = "") -> str:
    """A new topic (``retention.ms`` as given), messages produced ``ages_days`` ago, the group at offset 1."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.structs import OffsetAndMetadata

    name = f"t-{uuid.uuid4().hex[:8]}"
    configs = {} if retention_ms is None else {"retention.ms": str(retention_ms)}
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=configs)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        now = int(time.time() * 1000)
        for age in ages_days:
            await producer.send_and_wait(name, b"m", timestamp_ms=now - int(age * DAY))
    finally:
        await producer.stop()
    if group:  # the group consumed the first message only
        consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            partition = TopicPartition(name, 0)
            consumer.assign([partition])
            await consumer.commit({partition: OffsetAndMetadata(1, "")})
        finally:
            await consumer.stop()
    return name


async def check(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, dict[str, object]]]:
    ran = await run_async(capfd, "check-window", *args, "--json")
    assert ran.err == "", ran.err
    return ran.status, {s["scope"]: s for s in json.loads(ran.out)["scopes"]}


async def test_a_topic_kept_longer_than_the_records_puts_its_scope_at_risk(
    broker: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """retention.ms read from the broker: 40 days against 30 days of records is at risk, 7 days is covered."""
    long, short = await topic(broker, retention_ms=40 * DAY), await topic(broker, retention_ms=7 * DAY)
    status, scopes = await check(
        capfd, "--bootstrap-servers", broker, "--group", f"billing={long}", "--group", f"mail={short}"
    )
    assert status == 1
    assert scopes["consumer:billing"]["at_risk"] is True
    assert scopes["consumer:billing"]["reason"] == f"record retention 30d shorter than 40d (topic {long} retention.ms)"
    assert scopes["consumer:mail"]["at_risk"] is False
    assert scopes["consumer:mail"]["window_seconds"] == 7 * 86400
    ran = await run_async(capfd, "check-window", "--bootstrap-servers", broker, "--group", f"billing={long}")
    assert ran.out.splitlines()[0] == "1 of 1 scopes at risk: a replay may come after its record is gone"


async def test_a_group_lagging_past_the_record_retention_is_at_risk(
    broker: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The lag is the age of the oldest unconsumed message: 5 days behind with 3 days of records is at risk."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    name = await topic(broker, retention_ms=DAY, ages_days=(6, 5, 0.5), group=group)
    args = ("--bootstrap-servers", broker, "--group", f"{group}={name}")
    status, scopes = await check(capfd, *args, "--default-retention", "3d")
    assert status == 1
    lag = next(p for p in scopes[f"consumer:{group}"]["parts"] if p["source"] == f"group {group} lag")  # type: ignore[attr-defined]
    assert 5 * 86400 - 60 < lag["window_seconds"] < 5 * 86400 + 60
    status, _ = await check(capfd, *args, "--default-retention", "6d")
    assert status == 0
    fresh = f"g-{uuid.uuid4().hex[:8]}"  # a group that committed nothing lags by the topic's oldest message
    status, scopes = await check(capfd, "--bootstrap-servers", broker, "--group", f"{fresh}={name}")
    assert status == 0
    assert scopes[f"consumer:{fresh}"]["reason"] == f"record retention 30d covers 6d (group {fresh} lag)"


async def test_a_declaration_stands_in_for_what_the_broker_does_not_expose(
    broker: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A topic without a readable retention.ms is at risk (unknown) until its scope's window is declared."""
    name = await topic(broker, retention_ms=None)
    args = ("--bootstrap-servers", broker, "--group", f"orders={name}")
    status, scopes = await check(capfd, *args)
    if scopes["consumer:orders"]["window_seconds"] is not None:  # pragma: no cover - a broker that gives defaults
        pytest.skip("this broker reports a default retention.ms; the fallback is not needed")
    assert status == 1
    assert scopes["consumer:orders"]["reason"] == f"topic {name} retention.ms: not readable"
    status, scopes = await check(capfd, *args, "--declare", "consumer:orders=14d")
    assert (status, scopes["consumer:orders"]["reason"]) == (0, "record retention 30d covers 14d (declared)")


async def test_a_topic_kept_forever_is_at_risk_whatever_the_retention(
    broker: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """retention.ms = -1: a replay may come at any time, so no record retention covers it."""
    name = await topic(broker, retention_ms=-1)
    status, scopes = await check(capfd, "--bootstrap-servers", broker, "--group", f"ledger={name}")
    assert status == 1
    assert scopes["consumer:ledger"]["reason"] == f"topic {name} retention.ms: kept forever (-1)"


async def test_the_barrier_gives_the_retentions_and_its_window_counts_as_declared(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """--barrier reads retention_by_scope and max_replay_window from the application's own Barrier."""
    spec = "tests.test_check_window:BARRIER"
    status, scopes = await check(capfd, "--barrier", spec, "--declare", "consumer:audit=60d", "--declare", "x=1h")
    assert status == 0
    assert scopes["consumer:audit"]["reason"] == "record retention 90d covers 60d (declared)"
    assert scopes["x"]["reason"] == "record retention 30d covers 14d (the barrier's max_replay_window)"
    status, scopes = await check(capfd, "--barrier", spec, "--declare", "x=31d")
    assert status == 1
    assert scopes["x"]["at_risk"] is True


async def test_declared_windows_alone_need_no_broker(capfd: pytest.CaptureFixture[str]) -> None:
    """Without a broker, declarations and --retention decide; the text lists the scopes at risk."""
    ran = await run_async(capfd, "check-window", "--declare", "a=40d", "--declare", "b=2h", "--retention", "a=60d")
    assert ran.status == 0
    assert ran.out.splitlines()[0] == "2 scopes checked: every record retention covers its replay window"
    ran = await run_async(capfd, "check-window", "--declare", "a=40d", "--declare", "b=90m")
    assert ran.status == 1
    assert ran.out.splitlines()[2].split() == [
        "a",
        "30d",
        "40d",
        "AT",
        "RISK",
        *["record", "retention", "30d", "shorter", "than", "40d", "(declared)"],
    ]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "name the scopes to check"),
        (("--group", "g=t"), "--group needs --bootstrap-servers"),
        (("--declare", "a"), "takes NAME=DURATION"),
        (("--declare", "a=soon"), "not a duration"),
        (("--declare", "a=1d", "--barrier", "tests.test_check_window:DAY"), "is a int, not a Barrier"),
        (("--declare", "a=1d", "--barrier", "tests.nowhere:B"), "cannot load the barrier"),
        (("--declare", "a=1d", "--timeout", "0"), "--timeout must be a positive number"),
    ],
)
async def test_bad_usage_exits_2_with_one_line(
    capfd: pytest.CaptureFixture[str], args: tuple[str, ...], words: str
) -> None:
    ran = await run_async(capfd, "check-window", *args)
    assert ran.status == 2
    assert words in ran.line


async def test_a_broker_that_cannot_be_reached_exits_3(capfd: pytest.CaptureFixture[str]) -> None:
    """Nobody listening: exit 3 with one line naming the broker."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening
        where = f"127.0.0.1:{sock.getsockname()[1]}"
        ran = await run_async(capfd, "check-window", "--bootstrap-servers", where, "--group", "g=t", "--timeout", "2")
    assert ran.status == 3
    assert ran.line.startswith(f"idembarrier: broker {where}: ")


async def test_group_without_aiokafka_is_a_usage_error(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the kafka extra, --group exits 2 naming it."""
    monkeypatch.setitem(sys.modules, "aiokafka.errors", None)  # what the import finds when it is not installed
    ran = await run_async(capfd, "check-window", "--bootstrap-servers", "127.0.0.1:1", "--group", "g=t")
    assert ran.status == 2
    assert "idembarrier[kafka]" in ran.line


def test_the_window_is_the_longest_bound_and_an_unknown_one_is_a_risk() -> None:
    """ScopeWindow's arithmetic, on its own."""
    parts = (Part("topic t retention.ms", timedelta(days=7)), Part("group g lag", timedelta(days=9)))
    assert ScopeWindow("s", timedelta(days=8), parts).at_risk
    assert not ScopeWindow("s", timedelta(days=9), parts).at_risk
    assert ScopeWindow("s", timedelta(days=99), (*parts, Part("topic u retention.ms", None, "x"))).at_risk
    assert not ScopeWindow("s", timedelta(0), ()).at_risk


def test_check_window_runs_in_a_fresh_interpreter() -> None:
    """The real process: declared windows only, exit 1 and the scope at risk in the JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "idembarrier", "check-window", "--declare", "consumer:x=45d", "--json"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=ROOT,
    )
    assert (done.returncode, json.loads(done.stdout)["at_risk"], done.stderr) == (1, ["consumer:x"], "")

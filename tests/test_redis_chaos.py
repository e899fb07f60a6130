"""Redis Streams chaos: relays and the consumers of one group SIGKILLed at random; no event lost or doubled."""

from __future__ import annotations

import random
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING

import anyio
import pytest

import idembarrier
from tests.test_chaos import Crew, effects, kill_while, publish_events
from tests.test_redis_streams import pending, redis, streams

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from tests.conftest import Database
    from tests.test_redis_streams import Streams

__all__ = ["redis", "streams"]  # fixtures, shared with test_redis_streams

EVENTS = 600
CHAOS_SECONDS = 25.0
CLAIM_IDLE = "1.0"  # seconds: a killed consumer's entries are claimed by a live one this soon
WORK = "0.02"  # seconds a handler works: a kill finds entries read and not yet acknowledged


async def consumers_pending(redis: Redis, stream: str, group: str) -> dict[str, int]:
    """Each consumer of ``group`` (XINFO CONSUMERS) with the number of entries pending under its name."""
    return {
        (c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])): int(c["pending"])
        for c in await redis.xinfo_consumers(stream, group)
    }


@pytest.mark.timeout(300)
async def test_chaos_killed_relays_and_consumers_of_one_group_apply_every_event_exactly_once(
    pg_db: Database, redis: Redis, streams: Streams
) -> None:
    """600 events; 2 relays and 2 consumers of one group SIGKILLed at random, each replacement under a fresh
    name claiming the dead one's pending entries (XAUTOCLAIM): each event has one effect, nothing stays pending."""
    stream, group = streams.new("chaos"), f"ledger-{uuid.uuid4().hex[:8]}"
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    relays = Crew("relay", [pg_db.url, stream], 2, module="tests.redis_worker")
    consumers = Crew("consumer", [pg_db.url, stream, group, "*", CLAIM_IDLE, WORK], 2, module="tests.redis_worker")
    orphaned: dict[str, int] = {}  # killed consumer → its pending entries when it died, left to be claimed
    started = time.monotonic()

    async def kill_a_consumer() -> None:
        consumers.kill_one(rng)
        alive = {f"consumer-{process.pid}" for process in consumers.processes}
        for name, count in (await consumers_pending(redis, stream, group)).items():
            if name not in alive:
                orphaned.setdefault(name, count)

    async def kill() -> None:
        if rng.random() < 0.5:
            relays.kill_one(rng)
        else:
            await kill_a_consumer()

    try:
        produce = partial(publish_events, barrier, stream, EVENTS, every=15, pause=0.4)
        await kill_while(produce, kill, rng, CHAOS_SECONDS)
        with anyio.fail_after(120):
            # Other processes' progress, which no event of ours reports: polled, not used to order tasks.
            while len(seen := await effects(pg_db)) < EVENTS or await pending(redis, stream, group):  # noqa: ASYNC110
                await anyio.sleep(0.2)
        left = await consumers_pending(redis, stream, group)
        published = await redis.xlen(stream)
    finally:
        relays.stop()
        consumers.stop()
    seconds = time.monotonic() - started
    duplicated = sorted(event for event, n in seen.items() if n > 1)
    report = (
        f"seed {seed}: {EVENTS} events ({published} stream entries), {relays.kills} relay kills, "
        f"{consumers.kills} consumer kills leaving {sum(orphaned.values())} pending entries to claim; "
        f"applied once {sum(n == 1 for n in seen.values())}, lost {EVENTS - len(seen)}, "
        f"duplicated {len(duplicated)}; {seconds:.1f} s"
    )
    print(report)
    assert seen == {f"event-{i}": 1 for i in range(EVENTS)}, report
    assert sum(orphaned.values()) > 0, report  # the takeover was exercised
    assert all(n == 0 for n in left.values()), left  # the dead consumers' entries were all claimed and acked

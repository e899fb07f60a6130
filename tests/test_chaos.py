"""Messaging chaos: relays and consumers killed at random, a rebalance forced; no event lost or doubled."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import func, select

import idembarrier
from tests.models import Payment
from tests.test_kafka import broker

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from typing import Any

    from tests.conftest import Database

__all__ = ["broker"]  # a fixture, shared with test_kafka

EVENTS = 1000
PARTITIONS = 4
CHAOS_SECONDS = 20.0


class Crew:
    """The worker processes of one role, each replaced by a fresh one when killed."""

    def __init__(self, role: str, args: list[str], size: int, *, module: str = "tests.chaos_worker") -> None:
        self.role, self.args, self.module = role, args, module
        self.processes = [self._spawn() for _ in range(size)]
        self.kills = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", self.module, self.role, *self.args]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL one process at random and start its replacement."""
        at = rng.randrange(len(self.processes))
        self.processes[at].send_signal(signal.SIGKILL)
        self.processes[at].wait()
        self.processes[at] = self._spawn()
        self.kills += 1

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


async def publish_events(
    barrier: idembarrier.Barrier[idembarrier.JSON],
    topic: str,
    events: int,
    *,
    every: int,
    pause: float,
    keyed: bool = True,
) -> None:
    """Publish ``event-0`` … ``event-<events - 1>``, one unit of work each (key ``order-<i>``, message key
    ``account-<i % 16>`` unless not ``keyed``), pausing ``pause`` s after every ``every``-th so that the events
    spread over the chaos."""
    for i in range(events):
        async with barrier.unit_of_work(f"order-{i}", scope="orders") as uow:
            uow.publish(topic, f"event-{i}".encode(), key=f"account-{i % 16}".encode() if keyed else None)
            uow.complete(None)
        if i % every == 0:
            await anyio.sleep(pause)


async def kill_while(
    produce: Callable[[], Coroutine[Any, Any, None]],
    kill: Callable[[], Awaitable[None]],
    rng: random.Random,
    seconds: float,
    *,
    gap: tuple[float, float] = (0.4, 1.2),
) -> None:
    """Run ``produce`` to its end while calling ``kill`` at random intervals within ``gap`` for ``seconds``."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        with anyio.move_on_after(seconds):
            while True:
                await anyio.sleep(rng.uniform(*gap))  # chaos timing, not ordering
                await kill()


def kill_either(rng: random.Random, relays: Crew, consumers: Crew) -> Callable[[], Awaitable[None]]:
    """A ``kill`` for `kill_while`: SIGKILL a relay or a consumer, even odds."""

    async def kill() -> None:
        (relays if rng.random() < 0.5 else consumers).kill_one(rng)

    return kill


async def effects(db: Database) -> dict[str, int]:
    query = select(Payment.key, func.count()).group_by(Payment.key)
    async with db.engine.connect() as conn:
        return {str(key): int(n) for key, n in (await conn.execute(query)).all()}


@pytest.mark.timeout(300)
async def test_killed_relays_and_consumers_apply_every_event_exactly_once(pg_db: Database, broker: str) -> None:
    """1,000 events, 2 relays and 2 consumers SIGKILLed at random, one rebalance forced: each event has one effect."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic, group = f"chaos-{uuid.uuid4().hex[:8]}", f"ledger-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    args = [pg_db.url, broker, topic, group]
    relays, consumers = Crew("relay", args, 2), Crew("consumer", args, 2)
    rebalancer: subprocess.Popen[bytes] | None = None
    try:

        async def produce() -> None:
            for i in range(EVENTS):
                async with barrier.unit_of_work(f"order-{i}", scope="orders") as uow:
                    uow.publish(topic, f"event-{i}".encode(), key=f"account-{i % 16}".encode())
                    uow.complete(None)
                if i % 50 == 0:
                    await anyio.sleep(0.3)  # spread the events over the chaos

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            with anyio.move_on_after(CHAOS_SECONDS):
                round_ = 0
                while True:
                    await anyio.sleep(rng.uniform(0.5, 1.5))  # chaos timing, not ordering
                    round_ += 1
                    (relays if rng.random() < 0.5 else consumers).kill_one(rng)
                    if round_ == 5:  # a third member joins the group, then leaves: a forced rebalance
                        rebalancer = Crew("consumer", args, 1).processes[0]
                    if round_ == 10 and rebalancer is not None:
                        rebalancer.send_signal(signal.SIGKILL)
                        rebalancer.wait()
        with anyio.fail_after(150):
            # Other processes' progress, which no event of ours reports: polled, not used to order tasks.
            while len(seen := await effects(pg_db)) < EVENTS:  # noqa: ASYNC110
                await anyio.sleep(0.5)
    finally:
        relays.stop()
        consumers.stop()
        if rebalancer is not None and rebalancer.poll() is None:
            rebalancer.kill()
            rebalancer.wait()
    report = f"seed {seed}: {relays.kills} relay kills, {consumers.kills} consumer kills, 1 forced rebalance"
    print(report)
    assert seen == {f"event-{i}": 1 for i in range(EVENTS)}, report

"""The barrier on a two-node MariaDB Galera cluster: duplicates of one key sent to both nodes at once.

Galera locks nothing across nodes: a duplicate on the other node claims the key too and runs its body, and
certification refuses its COMMIT (error 1213, SQLSTATE 40001) once the first one committed, or the winner's
applied writes abort it (a brute-force abort, 1213 at its next statement). For the barrier that is a lost
race: the loser's writes are rolled back, and it raises `KeyInProgressError` (the winner's record found in a
fresh transaction: retry later, and the retry replays it) or `SerializationError` (the winner not yet visible
on that node: retry safely). Never a raw driver error, never a second business row.

The cluster is the session's (`tests._galera`); each test gets a database of its own, migrated on node 1 and
replicated to node 2 (DDL is applied on every node in total order before it returns).
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

import idembarrier
from idembarrier import Barrier, KeyInProgressError, SerializationError, Status
from tests import _galera
from tests.models import Base, Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from idembarrier import JSON

SCOPE = "payments"
LOST_RACE = (KeyInProgressError, SerializationError)
"""What a unit of work whose duplicate on the other node committed first may raise, as documented."""


class Nodes:
    """One engine and barrier per node, on the same database."""

    def __init__(self, engines: list[AsyncEngine]) -> None:
        self.engines = engines
        self.barriers = [Barrier(async_sessionmaker(engine)) for engine in engines]

    async def payments(self, key: str, node: int = 0) -> int:
        """Business rows of ``key``, counted on ``node`` once it has applied everything committed before."""
        async with self.engines[node].connect() as conn:
            await conn.execute(text("SET SESSION wsrep_sync_wait = 1"))  # a causal read: waits for the applier
            return int((await conn.execute(select(func.count()).where(Payment.key == key))).scalar_one())


@pytest.fixture(scope="session")
def galera_cluster() -> _galera.Cluster:
    """The session's two-node Galera cluster; fails under CI (skipped elsewhere) without Galera."""
    return _galera.shared()


@pytest.fixture(params=["asyncmy", "aiomysql"])
async def nodes(galera_cluster: _galera.Cluster, request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    """A migrated database of its own, with an engine per node through the driver of the parameter."""
    name = f"idembarrier_g_{uuid.uuid4().hex[:12]}"
    galera_cluster.nodes[0].sql(f"CREATE DATABASE {name}")
    engines = [
        create_async_engine(node.url(name, driver=request.param), pool_size=20, max_overflow=20)
        for node in galera_cluster.nodes
    ]
    try:
        await idembarrier.upgrade(engines[0])
        async with engines[0].begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield Nodes(engines)
    finally:
        for engine in engines:
            await engine.dispose()
        galera_cluster.nodes[0].sql(f"DROP DATABASE IF EXISTS {name}")


class Call:
    """One unit of work on one node that writes its payment, then waits for ``go`` before it commits."""

    def __init__(self, barrier: Barrier, key: str, node: int) -> None:
        self.barrier, self.key, self.node = barrier, key, node
        self.in_body = anyio.Event()
        self.go = anyio.Event()
        self.done = anyio.Event()
        self.ran = False
        self.replayed = False
        self.response: JSON = None
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            async with self.barrier.unit_of_work(self.key, scope=SCOPE) as uow:
                if uow.replayed:
                    self.replayed, self.response = True, uow.response
                else:
                    self.ran = True
                    payment = Payment(key=self.key, amount=100)
                    uow.session.add(payment)
                    await uow.session.flush()
                    self.in_body.set()
                    await self.go.wait()
                    uow.complete({"payment_id": payment.id, "node": self.node})
            if not self.replayed:
                self.response = uow.response
        except Exception as exc:
            self.error = exc
        finally:
            self.in_body.set()
            self.done.set()


async def test_a_duplicate_on_the_other_node_runs_and_loses_at_commit(nodes: Nodes) -> None:
    """Both nodes claim the key and run the body (no lock crosses nodes); the first COMMIT wins, the other
    raises a lost race (KeyInProgressError or SerializationError), one payment; a retry on the loser's node
    replays the winner. Each node wins half of the keys."""
    keys = [f"galera-{uuid.uuid4()}" for _ in range(6)]
    outcomes: Counter[str] = Counter()
    for i, key in enumerate(keys):
        winner_node = i % 2
        calls = [Call(nodes.barriers[n], key, n) for n in range(2)]
        winner, loser = calls[winner_node], calls[1 - winner_node]
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(call.run)
            with anyio.fail_after(30):
                await winner.in_body.wait()
                await loser.in_body.wait()
            assert winner.ran, "the winner ran its body"
            assert loser.ran, "the other node let the duplicate run its body too: no row lock crosses nodes"
            winner.go.set()
            with anyio.fail_after(30):
                await winner.done.wait()
            assert winner.error is None
            loser.go.set()
        assert isinstance(loser.error, LOST_RACE), repr(loser.error)
        outcomes[type(loser.error).__name__] += 1
        if isinstance(loser.error, KeyInProgressError):
            assert loser.error.record is not None
            assert loser.error.record.status is Status.COMPLETED
        assert await nodes.payments(key, loser.node) == 1  # the loser's node has applied the winner's COMMIT
        retry = Call(nodes.barriers[loser.node], key, loser.node)
        await retry.run()
        assert retry.replayed
        assert retry.response == winner.response
    assert await nodes.payments(keys[0], 0) == 1
    assert sum(outcomes.values()) == len(keys)
    print(f"galera lined-up: {len(keys)} keys, 2 calls each, loser outcomes {dict(outcomes)}")


class Storm:
    """Duplicates of each key on both nodes at once; every body waits until its key has a body on each node."""

    def __init__(self, nodes: Nodes, keys: list[str]) -> None:
        self.nodes = nodes
        self.in_body: dict[str, set[int]] = {key: set() for key in keys}
        self.crossed = {key: anyio.Event() for key in keys}
        self.bodies: Counter[str] = Counter()
        self.executed: dict[str, list[JSON]] = {key: [] for key in keys}
        self.replayed: dict[str, list[JSON]] = {key: [] for key in keys}
        self.errors: Counter[str] = Counter()
        self.unexpected: list[BaseException] = []

    async def call(self, key: str, node: int) -> None:
        try:
            async with self.nodes.barriers[node].unit_of_work(key, scope=SCOPE) as uow:
                if uow.replayed:
                    self.replayed[key].append(uow.response)
                    return
                self.bodies[key] += 1
                payment = Payment(key=key, amount=100)
                uow.session.add(payment)
                await uow.session.flush()
                self.in_body[key].add(node)
                if len(self.in_body[key]) == 2:
                    self.crossed[key].set()
                with anyio.fail_after(30):
                    await self.crossed[key].wait()  # both nodes hold an uncommitted claim of the key
                uow.complete({"payment_id": payment.id, "node": node})
            self.executed[key].append(uow.response)
        except LOST_RACE as exc:
            self.errors[type(exc).__name__] += 1
        except Exception as exc:
            self.unexpected.append(exc)


async def test_a_storm_of_duplicates_on_both_nodes_executes_each_key_once(nodes: Nodes) -> None:
    """16 keys, 4 calls each (2 per node), all at once: every key's body runs on both nodes, one commits.

    0 duplicate business rows; every call executed (once per key), replayed that execution, or raised a
    documented lost race; no other error; afterwards each key replays its one execution on both nodes.
    """
    keys = [f"storm-{uuid.uuid4()}" for _ in range(16)]
    storm = Storm(nodes, keys)
    async with anyio.create_task_group() as tg:
        for key in keys:
            for node in (0, 1, 0, 1):
                tg.start_soon(storm.call, key, node)
    assert storm.unexpected == []
    for key in keys:
        assert len(storm.executed[key]) == 1, key
        assert storm.replayed[key] == storm.executed[key] * len(storm.replayed[key])
        assert await nodes.payments(key, 0) == await nodes.payments(key, 1) == 1
        assert storm.bodies[key] >= 2  # one on each node at least: the cross-node race happened
        for node in (0, 1):
            async with nodes.barriers[node].unit_of_work(key, scope=SCOPE) as uow:
                assert uow.replayed
                assert uow.response == storm.executed[key][0]
    requests = 4 * len(keys)
    executions = sum(len(e) for e in storm.executed.values())
    replays = sum(len(r) for r in storm.replayed.values())
    assert executions + replays + sum(storm.errors.values()) == requests
    print(
        f"galera storm: {requests} requests, {requests - len(keys)} duplicates, {executions} executions, "
        f"{sum(storm.bodies.values())} bodies run, {replays} replays, errors {dict(storm.errors)}, "
        "0 duplicate rows"
    )

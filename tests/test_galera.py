"""The barrier on a two-node MariaDB Galera cluster: duplicates of one key sent to both nodes at once.

Galera locks nothing across nodes: a duplicate on the other node claims the key too and runs its body, and
certification refuses its COMMIT (error 1213, SQLSTATE 40001) once the first one committed, or the winner's
applied writes abort it (a brute-force abort, 1213 at its next statement). For the barrier that is a lost
race: the loser's writes are rolled back, and it raises `KeyInProgressError` (the winner's record found in a
fresh transaction: retry later, and the retry replays it) or `SerializationError` (the winner not yet visible
on that node: retry safely). Never a raw driver error, never a second business row.

The same holds between OS processes (`tests.galera_worker`), two per node, and for a process SIGKILLed
before its COMMIT: nothing of it was replicated, and a retry on the other node executes once. The outbox is
in `tests.test_galera_outbox`, engine-check's cross-node measurements in `tests.test_galera_engine_check`;
both use this module's fixtures.

The cluster is the session's (`tests._galera`); each test gets a database of its own, migrated on node 1 and
replicated to node 2 (DDL is applied on every node in total order before it returns).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

import idembarrier
from idembarrier import Barrier, KeyInProgressError, SerializationError, Status
from tests import _galera
from tests.models import Base, Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import Process

    from idembarrier import JSON

ROOT = Path(__file__).resolve().parent.parent
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

    async def records(self, key: str, node: int = 0) -> list[str]:
        """The statuses of ``key``'s records on ``node``, read causally as `payments` does."""
        async with self.engines[node].connect() as conn:
            await conn.execute(text("SET SESSION wsrep_sync_wait = 1"))
            rows = await conn.execute(text("SELECT status FROM idempotency_keys WHERE `key` = :k"), {"k": key})
            return [str(status) for status in rows.scalars()]

    async def pending(self, node: int = 0) -> int:
        """Outbox messages not yet sent, counted causally on ``node``."""
        async with self.engines[node].connect() as conn:
            await conn.execute(text("SET SESSION wsrep_sync_wait = 1"))
            sql = text("SELECT count(*) FROM idempotency_keys_outbox WHERE sent_at IS NULL")
            return int((await conn.execute(sql)).scalar_one())

    def url(self, node: int) -> str:
        """The URL of ``node``'s engine, password included, for a worker process."""
        return self.engines[node].url.render_as_string(hide_password=False)


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
        async with engines[1].connect() as conn:
            # DDL reaches node 2 before it returns (total order), but the migrations' version row is an ordinary
            # write, applied there a little later: without this causal read a first call on node 2 can find the
            # schema at an older revision (SchemaError).
            await conn.execute(text("SET SESSION wsrep_sync_wait = 1"))
            await conn.execute(text("SELECT version_num FROM idembarrier_alembic_version"))
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
            assert loser.ran, (
                f"{loser.error!r}: the other node let the duplicate run its body too: no row lock crosses nodes"
            )
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


# -- OS processes: a storm on both nodes, and a crash before COMMIT -------------------------------------------


class Worker:
    """A `tests.galera_worker` process on one node, spoken to by lines on its stdin and stdout."""

    def __init__(self, process: Process, node: int) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process, self.node = process, node
        self.stdout = BufferedByteReceiveStream(process.stdout)

    async def line(self) -> str:
        """The next line the worker printed, without its newline."""
        return (await self.stdout.receive_until(b"\n", 1 << 24)).decode()

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(f"{line}\n".encode())


async def spawn(*args: str) -> Process:
    """A `tests.galera_worker` process; its stderr goes to the test's."""
    command = [sys.executable, "-m", "tests.galera_worker", *args]
    return await anyio.open_process(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)


class Orchestra:
    """Releases each key's bodies (``commit KEY`` to every worker) once the key has a body on both nodes."""

    def __init__(self, workers: list[Worker], keys: list[str]) -> None:
        self.workers, self.keys = workers, keys
        self.bodies: Counter[str] = Counter()
        self.nodes_in: dict[str, set[int]] = {key: set() for key in keys}
        self.released: set[str] = set()
        self.lock = anyio.Lock()  # one release at a time: stdin is closed only after every key's last send
        self.results: list[dict[str, list[tuple[str, JSON]]]] = []
        """Per worker, per key: what each call saw (``executed``, ``replayed`` or an exception's name), and the
        response."""
        self.escapes: list[str] = []

    async def follow(self, worker: Worker) -> None:
        while True:
            word, _, rest = (await worker.line()).partition(" ")
            if word == "result":
                result = json.loads(rest)
                self.results.append({k: [(str(o), r) for o, r in v] for k, v in result["seen"].items()})
                self.escapes += result["escapes"]
                return
            assert word == "body", word
            self.bodies[rest] += 1
            self.nodes_in[rest].add(worker.node)
            if len(self.nodes_in[rest]) == 2 and rest not in self.released:
                async with self.lock:
                    self.released.add(rest)
                    for each in self.workers:
                        await each.send(f"commit {rest}")
                    if len(self.released) == len(self.keys):  # every key released: the workers may finish
                        for each in self.workers:
                            assert each.process.stdin is not None
                            await each.process.stdin.aclose()


@pytest.mark.parametrize("nodes", ["asyncmy"], indirect=True)
async def test_os_processes_on_both_nodes_execute_each_key_once(nodes: Nodes) -> None:
    """4 OS processes, 2 per node, 2 calls per key each (16 keys, 128 calls, 112 duplicates), all at once; each
    key's bodies commit only once it has a body on both nodes, so every race crosses nodes.

    0 duplicate business rows; one execution per key; every other call replayed it or raised a documented lost
    race (KeyInProgressError / SerializationError); nothing else escapes; each key replays on both nodes.
    """
    keys = [f"proc-{uuid.uuid4()}" for _ in range(16)]
    calls = 2
    placement = (0, 1, 0, 1)
    workers = [Worker(await spawn("storm", nodes.url(n), str(n), str(calls), *keys), n) for n in placement]
    orchestra = Orchestra(workers, keys)
    try:
        with anyio.fail_after(120):
            for worker in workers:
                assert await worker.line() == "ready"
            for worker in workers:
                await worker.send("go")
            async with anyio.create_task_group() as tg:
                for worker in workers:
                    tg.start_soon(orchestra.follow, worker)
            for worker in workers:
                assert await worker.process.wait() == 0
    finally:
        for worker in workers:
            if worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()
    assert orchestra.escapes == []
    outcomes: Counter[str] = Counter()
    executed: dict[str, list[JSON]] = {key: [] for key in keys}
    for seen in orchestra.results:
        for key, calls_of_key in seen.items():
            for outcome, response in calls_of_key:
                outcomes[outcome] += 1
                if outcome == "executed":
                    executed[key].append(response)
    requests = len(workers) * calls * len(keys)
    assert sum(outcomes.values()) == requests
    assert set(outcomes) <= {"executed", "replayed", "KeyInProgressError", "SerializationError"}, outcomes
    assert outcomes["executed"] == len(keys)
    for seen in orchestra.results:
        for key, calls_of_key in seen.items():
            assert all(r == executed[key][0] for o, r in calls_of_key if o == "replayed"), key
    for key in keys:
        assert len(executed[key]) == 1, key
        assert orchestra.nodes_in[key] == {0, 1}  # the race crossed nodes
        assert await nodes.payments(key, 0) == await nodes.payments(key, 1) == 1
        for node in (0, 1):
            async with nodes.barriers[node].unit_of_work(key, scope=SCOPE) as uow:
                assert uow.replayed
                assert uow.response == executed[key][0]
    print(
        f"galera processes: {len(workers)} processes (2 per node), {requests} requests, {requests - len(keys)} "
        f"duplicates, {outcomes['executed']} executions, {orchestra.bodies.total()} bodies run, "
        f"{outcomes['replayed']} replays, errors "
        f"{ {k: v for k, v in outcomes.items() if k not in ('executed', 'replayed')} }, 0 duplicate rows"
    )


@pytest.mark.parametrize("nodes", ["aiomysql"], indirect=True)
async def test_a_process_killed_before_its_commit_leaves_nothing_and_a_retry_on_the_other_node_runs_once(
    nodes: Nodes,
) -> None:
    """A process SIGKILLed on node 1 after its body flushed, before COMMIT: nothing of it reaches either node
    (no payment, no record); a retry on node 2 executes once; node 1 then replays that execution."""
    key = f"crash-{uuid.uuid4()}"
    async with await spawn("crash", nodes.url(0), key) as child:
        worker = Worker(child, 0)
        with anyio.fail_after(30):
            assert await worker.line() == "flushed"
        child.kill()
        assert await child.wait() == -signal.SIGKILL
    for node in (0, 1):
        assert await nodes.payments(key, node) == 0
        assert await nodes.records(key, node) == []
    retry = Call(nodes.barriers[1], key, 1)
    retry.go.set()
    await retry.run()
    assert retry.error is None
    assert retry.ran
    assert not retry.replayed
    for node in (0, 1):
        assert await nodes.payments(key, node) == 1  # causal: node 1 has applied the retry's COMMIT
        assert await nodes.records(key, node) == ["COMPLETED"]
    again = Call(nodes.barriers[0], key, 0)
    await again.run()
    assert again.replayed
    assert again.response == retry.response

"""The error contract: whatever the driver or the pool does, what leaves the public API is the caller's or ours.

Every failure below is one a caller meets in production: pooled connections whose backends were terminated
while idle, a pool with no free connection, a server that refuses or never answers the connect.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from idembarrier import (
    JSON,
    Barrier,
    ConnectionLostError,
    IdembarrierError,
    PoolTimeoutError,
    StorageError,
)
from idembarrier._errors import translate, translating
from idembarrier.kafka import OutboxRelay
from tests.faultproxy import FaultProxy
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.conftest import Database

POOL = 8


@pytest.fixture
async def engine(pg_db: Database) -> AsyncIterator[AsyncEngine]:
    """A small pool of its own, so that every one of its connections can be made to die while idle."""
    small = create_async_engine(pg_db.url, pool_size=POOL, max_overflow=0)
    try:
        yield small
    finally:
        await small.dispose()


async def pay(barrier: Barrier[JSON], key: str) -> JSON:
    """One payment under ``key``."""
    async with barrier.unit_of_work(key, scope="payments") as uow:
        if not uow.replayed:
            uow.session.add(Payment(key=key, amount=1))
            uow.complete({"paid": key})
    return uow.response


async def fill_pool(barrier: Barrier[JSON]) -> None:
    """Run POOL payments at once, so that the pool holds POOL idle connections afterwards."""
    async with anyio.create_task_group() as tg:
        for _ in range(POOL):
            tg.start_soon(pay, barrier, f"warm-{uuid.uuid4()}")


async def terminate_idle(pg_db: Database, *, wait: bool = True) -> int:
    """Terminate the idle backends of the test database (the small pool's); with ``wait``, until they are gone.

    Without waiting, the next calls may reach a connection whose server is still going away.
    """
    timeout = 10000 if wait else 0
    async with pg_db.engine.connect() as conn:
        done = await conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, :timeout)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle'"
            ),
            {"timeout": timeout},
        )
        return int(done.scalar_one())


def escapes(outcomes: Counter[str]) -> int:
    """How many calls raised something that is neither ours nor absent."""
    return sum(n for kind, n in outcomes.items() if kind != "ok" and not kind.startswith("ours:"))


@pytest.mark.parametrize("wait", [True, False], ids=["terminated", "terminating"])
async def test_pooled_connections_terminated_while_idle_never_escape_as_driver_errors(
    pg_db: Database, engine: AsyncEngine, wait: bool
) -> None:
    """80 calls after every idle pooled backend was terminated: no exception but ours, and every payment lands."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(engine))
    await fill_pool(barrier)
    assert engine.pool.checkedin() == POOL  # type: ignore[attr-defined]
    assert await terminate_idle(pg_db, wait=wait) >= POOL
    outcomes: Counter[str] = Counter()

    async def call(i: int) -> None:
        try:
            await pay(barrier, f"after-{i}")
        except IdembarrierError as exc:
            outcomes[f"ours:{type(exc).__name__}"] += 1
        except Exception as exc:  # counting what escapes is the point of this test
            outcomes[f"{type(exc).__module__}.{type(exc).__name__}"] += 1
        else:
            outcomes["ok"] += 1

    async with anyio.create_task_group() as tg:  # 80 callers queue for the POOL dead connections at once
        for i in range(80):
            tg.start_soon(call, i)
    print(f"80 calls after terminating the idle pool: {dict(outcomes)}; escapes: {escapes(outcomes)}")
    assert escapes(outcomes) == 0
    # Nothing of ours was sent on a dead connection before the claim: each call took a fresh one.
    assert outcomes["ok"] == 80
    assert await pg_db.payments() == POOL + 80


async def test_terminated_idle_connection_is_replaced_for_every_operation(pg_db: Database, engine: AsyncEngine) -> None:
    """inspect, stats, unresolved and purge each run on a fresh connection after the pooled one died idle."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(engine))
    await fill_pool(barrier)
    await terminate_idle(pg_db)
    assert await barrier.inspect("nothing", scope="payments") is None
    await terminate_idle(pg_db)
    assert (await barrier.stats()).outcomes
    await terminate_idle(pg_db)
    assert await barrier.unresolved() == []
    await terminate_idle(pg_db)
    assert (await barrier.purge()).deleted == 0


class Unused:
    """A publisher the relay never reaches in these tests."""

    async def publish(self, messages: object) -> None:
        raise AssertionError("nothing is published here")


async def test_terminated_idle_connection_is_replaced_for_the_relay(pg_db: Database, engine: AsyncEngine) -> None:
    """The relay's own transactions (its counts, its parked list) take a fresh connection after idle deaths."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(engine))
    relay = OutboxRelay(barrier, Unused())
    await fill_pool(barrier)
    await terminate_idle(pg_db)
    assert await relay.counts() == (0, 0)
    await terminate_idle(pg_db)
    assert await relay.parked() == []


async def test_terminated_idle_connection_is_replaced_for_a_lease(pg_db: Database, engine: AsyncEngine) -> None:
    """A lease claimed after the pool's connections died idle is claimed on a fresh one and finishes."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(engine))
    await fill_pool(barrier)
    await terminate_idle(pg_db)
    async with barrier.leased("lease-1", scope="payments") as lease:
        await terminate_idle(pg_db)
        await lease.checkpoint("charged")
        await terminate_idle(pg_db)
        async with lease.finish() as uow:
            uow.complete({"paid": True})
    assert await pg_db.records("lease-1") == [("payments", "lease-1", "COMPLETED")]


async def test_pool_exhaustion_is_a_pool_timeout_error(pg_db: Database) -> None:
    """With every pooled connection checked out past the pool timeout, entering raises PoolTimeoutError."""
    tiny = create_async_engine(pg_db.url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(tiny))
    try:
        async with tiny.connect():
            with pytest.raises(PoolTimeoutError) as caught:
                await pay(barrier, "starved")
            with pytest.raises(PoolTimeoutError):
                await barrier.inspect("starved", scope="payments")
    finally:
        await tiny.dispose()
    assert isinstance(caught.value, StorageError)
    assert await pg_db.payments("starved") == 0


async def test_refused_connect_is_a_connect_error_keeping_the_os_reason(pg_db: Database) -> None:
    """A refused connect raises ConnectError (nothing ran), whose message keeps the OS's reason."""
    async with FaultProxy.for_url(pg_db.url) as proxy:
        refused = create_async_engine(proxy.url(pg_db.url))
        proxy.refuse()
        try:
            with pytest.raises(ConnectionLostError) as caught:
                await pay(Barrier(async_sessionmaker(refused)), "refused")
        finally:
            await refused.dispose()
    assert type(caught.value).__name__ == "ConnectError"
    assert not caught.value.outcome_unknown
    assert "refused" in str(caught.value).lower()


async def test_connection_cut_during_the_handshake_is_a_connect_error() -> None:
    """A server that ends the connection mid-handshake (after its SSL answer) raises ConnectError: nothing ran."""

    async def cut_after_the_startup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # the SSLRequest
        writer.write(b"N")  # no SSL: the client sends its StartupMessage next
        await reader.read(8192)
        writer.close()  # and the "server" goes away without answering it

    server = await asyncio.start_server(cut_after_the_startup, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test")
    try:
        with pytest.raises(ConnectionLostError) as caught:
            await pay(Barrier(async_sessionmaker(engine)), "cut-at-startup")
    finally:
        await engine.dispose()
        server.close()
        await server.wait_closed()
    assert type(caught.value).__name__ == "ConnectError"
    assert not caught.value.outcome_unknown


async def test_connect_that_times_out_is_a_connect_error(pg_db: Database) -> None:
    """A connect the server never answers (past the driver's timeout) raises ConnectError, not TimeoutError."""
    async with FaultProxy.for_url(pg_db.url) as proxy:
        silent = create_async_engine(proxy.url(pg_db.url), connect_args={"timeout": 0.3})
        proxy.blackhole()
        try:
            with pytest.raises(ConnectionLostError) as caught:
                await pay(Barrier(async_sessionmaker(silent)), "silent")
            with pytest.raises(ConnectionLostError):
                await Barrier(async_sessionmaker(silent)).inspect("silent", scope="payments")
        finally:
            await proxy.heal()
            await silent.dispose()
    assert type(caught.value).__name__ == "ConnectError"
    assert "timed out" in str(caught.value)


def test_asyncpg_protocol_stuck_in_another_state_is_a_lost_connection() -> None:
    """asyncpg's InternalClientError (its protocol in a state it cannot leave) translates to ConnectionLostError."""
    stuck = asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
    assert isinstance(translate(stuck, "claiming the key"), ConnectionLostError)


def test_translating_raises_ours_from_the_drivers_error() -> None:
    """A driver error in a `translating` block leaves it as our StorageError, naming the step, from the driver's."""
    stuck = asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
    with pytest.raises(ConnectionLostError, match=r"^claiming the key: ") as caught, translating("claiming the key"):
        raise stuck
    assert caught.value.__cause__ is stuck


def test_translating_lets_the_callers_own_errors_through() -> None:
    """What is not the database's (the caller's own error, or one of ours) leaves a `translating` block unchanged."""
    for error in (ValueError("the caller's"), StorageError("ours")):
        with pytest.raises(type(error)) as caught, translating("claiming the key"):
            raise error
        assert caught.value is error


async def test_replay_whose_cleanup_fails_still_returns_the_response(pg_db: Database) -> None:
    """A replay whose connection is cut before its rollback returns the recorded response, raising nothing."""
    async with FaultProxy.for_url(pg_db.url) as proxy:
        proxied = create_async_engine(proxy.url(pg_db.url), pool_size=2, max_overflow=0)
        barrier: Barrier[JSON] = Barrier(async_sessionmaker(proxied))
        try:
            assert await pay(barrier, "replayed") == {"paid": "replayed"}
            async with barrier.unit_of_work("replayed", scope="payments") as uow:
                assert uow.replayed
                assert proxy.cut_all() == 1
            assert uow.response == {"paid": "replayed"}
            assert await pay(barrier, "replayed") == {"paid": "replayed"}  # the pool serves a live connection
        finally:
            await proxied.dispose()
    assert await pg_db.payments("replayed") == 1

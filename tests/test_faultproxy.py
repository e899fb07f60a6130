"""Units of work through `tests.faultproxy`: what a caller is told when the network fails at each moment.

A COMMIT whose reply never arrives has an unknown outcome, and only then: `ConnectionLostError` says so
with ``outcome_unknown``, and a retry with the same key replays (it committed) or runs (it did not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from idembarrier import Barrier, ConnectionLostError, StorageError
from tests.faultproxy import CommitCut, FaultProxy
from tests.helpers import new_key, pay
from tests.models import Payment

if TYPE_CHECKING:
    from tests.conftest import Database


async def test_proxy_forwards_a_unit_of_work(pg_db: Database, proxied: AsyncEngine) -> None:
    """Without a fault, a unit of work through the proxy commits as it would directly."""
    key = new_key()
    assert await pay(Barrier(async_sessionmaker(proxied)), key) == {"payment_id": 1, "amount": 100}
    assert await pg_db.payments(key) == 1


@pytest.mark.parametrize(("how", "committed"), [(CommitCut.DROP, 0), (CommitCut.BEFORE_REPLY, 1)])
async def test_commit_without_a_reply_is_an_unknown_outcome(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine, how: CommitCut, committed: int
) -> None:
    """A COMMIT whose reply is lost raises ConnectionLostError(outcome_unknown=True), whether it committed or not."""
    barrier, key = Barrier(async_sessionmaker(proxied)), new_key()
    proxy.cut_at_commit(how)
    with pytest.raises(ConnectionLostError) as caught:
        await pay(barrier, key)
    assert caught.value.outcome_unknown
    assert proxy.commit_cut.is_set()
    assert await pg_db.payments(key) == committed


@pytest.mark.parametrize("how", [CommitCut.DROP, CommitCut.BEFORE_REPLY])
async def test_retry_after_an_unknown_outcome_replays_or_runs_once(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine, how: CommitCut
) -> None:
    """The retry with the same key after a lost COMMIT reply leaves exactly one payment."""
    barrier, key = Barrier(async_sessionmaker(proxied)), new_key()
    proxy.cut_at_commit(how)
    with pytest.raises(ConnectionLostError):
        await pay(barrier, key)
    response = await pay(barrier, key)
    async with pg_db.engine.connect() as conn:
        (paid,) = (await conn.execute(select(Payment.id).where(Payment.key == key))).scalars()
    assert response == {"payment_id": paid, "amount": 100}  # the one payment, replayed or run by the retry


async def test_connection_cut_before_the_commit_is_a_known_outcome(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine
) -> None:
    """A connection cut while the body runs raises ConnectionLostError(outcome_unknown=False): nothing committed."""
    barrier, key = Barrier(async_sessionmaker(proxied)), new_key()
    with pytest.raises(ConnectionLostError) as caught:
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=1))
            await uow.session.flush()
            assert proxy.cut_all() == 1
            await uow.session.flush()  # the flush above emptied the session: this one round-trips nothing
            uow.session.add(Payment(key=key, amount=2))
            await uow.session.flush()
    assert not caught.value.outcome_unknown
    assert await pg_db.payments(key) == 0
    assert proxy.faults["cut"] == 1


async def test_commit_cut_after_its_reply_leaves_the_commit_acknowledged(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine
) -> None:
    """A connection cut just after the COMMIT's reply was forwarded: the caller is told it committed."""
    key = new_key()
    proxy.cut_at_commit(CommitCut.AFTER_REPLY)
    assert await pay(Barrier(async_sessionmaker(proxied)), key) == {"payment_id": 1, "amount": 100}
    assert proxy.faults["cut_after_commit_reply"] == 1
    assert await pg_db.payments(key) == 1


async def test_refused_connects_are_a_storage_error_until_healed(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine
) -> None:
    """While the proxy refuses connects, entering raises a StorageError; once healed, the same port serves."""
    barrier, key = Barrier(async_sessionmaker(proxied)), new_key()
    proxy.refuse()
    with pytest.raises(StorageError):
        await pay(barrier, key)
    await proxy.heal()
    assert await pay(barrier, key) == {"payment_id": 1, "amount": 100}


async def test_half_open_connection_answers_nothing(pg_db: Database, proxy: FaultProxy) -> None:
    """Half-open towards the client, a query reaches the server and its answer never comes back."""
    conn = await asyncpg.connect(proxy.url(pg_db.url).replace("postgresql+asyncpg", "postgresql"))
    try:
        await conn.execute("CREATE TABLE seen (n int)")
        proxy.half_open("to_client")
        with pytest.raises(TimeoutError):
            await conn.execute("INSERT INTO seen VALUES (1)", timeout=0.5)  # a deadline, not an ordering
    finally:
        conn.terminate()
    direct = await asyncpg.connect(pg_db.url.replace("postgresql+asyncpg", "postgresql"))
    try:
        assert await direct.fetchval("SELECT count(*) FROM seen") == 1  # autocommitted, its reply dropped
    finally:
        await direct.close()


async def test_blackhole_accepts_and_never_answers(pg_db: Database, proxy: FaultProxy) -> None:
    """A blackholed proxy accepts the connection, and the server's greeting never comes."""
    proxy.blackhole()
    with pytest.raises(TimeoutError):
        await asyncpg.connect(proxy.url(pg_db.url).replace("postgresql+asyncpg", "postgresql"), timeout=0.5)
    await proxy.heal()
    with anyio.fail_after(10):
        conn = await asyncpg.connect(proxy.url(pg_db.url).replace("postgresql+asyncpg", "postgresql"))
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()

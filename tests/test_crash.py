"""What a unit of work leaves behind when its process, its backend or its database goes away.

PostgreSQL rolls back the transaction of a backend whose client vanished or that was terminated, so the
claim and the business rows disappear together and a retry runs the body again, exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import asyncpg
import psycopg
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from idembarrier import (
    Barrier,
    ConnectionLostError,
    IdembarrierError,
    KeyInProgressError,
    OnConflict,
)
from tests.helpers import lock_waiters, new_key, pay
from tests.models import Payment

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent
DRIVER_ERRORS = (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError, psycopg.Error)
"""What a lost connection looks like before idembarrier translates it: SQLAlchemy's or the driver's own."""

# The child claims the key, flushes a payment, reports its backend and then blocks until it is killed. If
# the parent goes away instead, stdin reaches its end and the child leaves by an exception: nothing commits.
CHILD = """
import asyncio, sys
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from idembarrier import Barrier
from tests.helpers import lock_waiters, new_key, pay
from tests.models import Payment

async def main(url, key):
    barrier = Barrier(async_sessionmaker(create_async_engine(url)))
    async with barrier.unit_of_work(key, scope="payments") as uow:
        uow.session.add(Payment(key=key, amount=100))
        await uow.session.flush()
        pid = (await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        print("flushed", pid, flush=True)
        sys.stdin.readline()
        raise SystemExit("the parent went away")

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def backend_pid(session: AsyncSession) -> int:
    """The PostgreSQL backend serving ``session``'s connection."""
    pid: int = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    return pid


async def terminate(db: Database, pid: int) -> None:
    """Terminate backend ``pid`` and wait (up to 10 s) until its process has exited."""
    async with db.engine.connect() as conn:
        done = (await conn.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})).scalar()
    assert done, f"backend {pid} did not exit"


GONE = text("SELECT 1 FROM pg_stat_activity WHERE pid = :pid")


async def wait_until_gone(db: Database, pid: int) -> None:
    """Poll pg_stat_activity until backend ``pid`` has ended, for at most 10 s."""
    with anyio.fail_after(10):
        while True:
            async with db.engine.connect() as conn:
                found = (await conn.execute(GONE, {"pid": pid})).first()
            if found is None:
                return
            await anyio.sleep(0.01)


async def enter(barrier: Barrier, key: str, *, on_conflict: OnConflict = OnConflict.WAIT) -> None:
    """Enter a unit of work for ``key`` that must be refused: reaching its body fails the test."""
    async with barrier.unit_of_work(key, scope="payments", on_conflict=on_conflict, wait_timeout=60):
        pytest.fail(f"a unit of work for {key!r} entered where it must be refused")


async def assert_retry_runs_once_and_replays(db: Database, barrier: Barrier, key: str) -> None:
    assert await db.payments(key) == 0
    assert await db.records(key) == []
    first = await pay(barrier, key, on_conflict=OnConflict.FAIL)  # the claim is free: no waiting
    assert await db.payments(key) == 1
    assert await db.records(key) == [("payments", key, "COMPLETED")]
    assert await pay(barrier, key) == first
    assert await db.payments(key) == 1


async def test_sigkilled_process_leaves_no_claim_and_the_retry_runs_once(pg_db: Database) -> None:
    """A process killed mid-transaction leaves no row and no record; the retry runs once, then replays."""
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    command = [sys.executable, "-c", CHILD, pg_db.url, key]
    async with await anyio.open_process(command, cwd=ROOT, stdin=subprocess.PIPE, stderr=None) as child:
        assert child.stdout is not None
        with anyio.fail_after(30):
            line = await BufferedByteReceiveStream(child.stdout).receive_until(b"\n", 1024)
        word, pid = line.decode().split()
        assert word == "flushed"
        with pytest.raises(KeyInProgressError):
            await enter(barrier, key, on_conflict=OnConflict.FAIL)
        child.kill()
        assert await child.wait() == -signal.SIGKILL
    await wait_until_gone(pg_db, int(pid))
    await assert_retry_runs_once_and_replays(pg_db, barrier, key)


async def test_terminated_backend_surfaces_as_connection_lost_on_the_bodys_next_statement(
    pg_db: Database,
) -> None:
    """A body statement after its backend was terminated raises ConnectionLostError from the driver error."""
    barrier, key = Barrier(pg_db.sessionmaker), new_key()

    async def body_runs_on() -> None:
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=100))
            await uow.session.flush()
            await terminate(pg_db, await backend_pid(uow.session))
            await uow.session.execute(text("SELECT 1"))

    with pytest.raises(ConnectionLostError) as caught:
        await body_runs_on()
    assert isinstance(caught.value.__cause__, DRIVER_ERRORS)
    await assert_retry_runs_once_and_replays(pg_db, barrier, key)


async def test_terminated_backend_surfaces_as_connection_lost_from_the_barriers_commit(
    pg_db: Database,
) -> None:
    """A backend terminated before the outcome is recorded makes the exit raise ConnectionLostError."""
    barrier, key = Barrier(pg_db.sessionmaker), new_key()

    async def body_completes() -> None:
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=100))
            await uow.session.flush()
            await terminate(pg_db, await backend_pid(uow.session))
            uow.complete({"payment_id": 1})

    with pytest.raises(ConnectionLostError) as caught:
        await body_completes()
    assert isinstance(caught.value.__cause__, DRIVER_ERRORS)
    await assert_retry_runs_once_and_replays(pg_db, barrier, key)


async def test_waiting_duplicate_whose_backend_is_terminated_gets_connection_lost(pg_db: Database) -> None:
    """A duplicate terminated while it waits on the claim raises ConnectionLostError; the holder commits."""
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    lost: list[ConnectionLostError] = []

    async def duplicate() -> None:
        with pytest.raises(ConnectionLostError) as caught:
            await enter(barrier, key, on_conflict=OnConflict.WAIT)
        lost.append(caught.value)

    async with barrier.unit_of_work(key, scope="payments") as uow:
        payment = Payment(key=key, amount=100)
        uow.session.add(payment)
        await uow.session.flush()
        async with anyio.create_task_group() as tg:
            tg.start_soon(duplicate)
            [waiter] = await lock_waiters(pg_db)
            await terminate(pg_db, waiter)
        uow.complete({"payment_id": payment.id})
    assert len(lost) == 1
    assert isinstance(lost[0].__cause__, DRIVER_ERRORS)
    assert await pg_db.payments(key) == 1
    assert await pg_db.records(key) == [("payments", key, "COMPLETED")]
    assert await pay(barrier, key) == uow.response


async def test_unreachable_database_raises_connection_lost_chained_to_the_os_error() -> None:
    """Entering a unit of work on a database that refuses connections raises ConnectionLostError."""
    engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/idembarrier")
    try:
        with pytest.raises(ConnectionLostError) as caught:
            await enter(Barrier(async_sessionmaker(engine)), new_key())
    finally:
        await engine.dispose()
    assert isinstance(caught.value, IdembarrierError)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


# psycopg reads nothing on an idle connection, so its dead one is found at the claim (docs/engines.md; its own
# test is tests/test_psycopg.py).
@pytest.mark.parametrize("pg_db", ["asyncpg"], indirect=True)
async def test_pooled_connection_killed_while_idle_is_replaced_before_the_claim(pg_db: Database) -> None:
    """A pooled connection whose backend died while idle is discarded: the next claim runs on a fresh one."""
    engine = create_async_engine(pg_db.url, pool_size=1, max_overflow=0)
    try:
        barrier = Barrier(async_sessionmaker(engine))
        async with barrier.unit_of_work("warm", scope="s") as uow:
            pid = (await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            uow.complete(None)
        async with pg_db.engine.connect() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
        async with barrier.unit_of_work("after", scope="s") as uow:  # nothing was sent on the dead one
            pid_after = (await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            uow.complete("ran")
        assert uow.response == "ran"
        assert pid_after != pid
    finally:
        await engine.dispose()

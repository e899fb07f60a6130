"""Deadlines on psycopg 3: kept under anyio's cancel scopes and under a single asyncio cancellation alike.

psycopg answers the cancellation of a task waiting on a query by cancelling that query on the server
(`AsyncConnection.wait`: a cancel request of up to 5 s, then up to 5 s for the query to end) before the
`CancelledError` goes on; only a second cancellation cuts that short. anyio's deadlines (`anyio.fail_after`,
`CancelScope`) deliver the cancellation again until it is taken; `asyncio.timeout` cancels once, and without
the barrier's answer (`idembarrier._psycopg._PromptCancellation`) its caller got control back 5 to 10 s late
on a silent connection. The barrier's own wait bound still cancels on the server and keeps the connection.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from idembarrier import JSON, Barrier
from tests.helpers import lock_waiters
from tests.models import Payment
from tests.test_deadlines import DEADLINE, OVERRUN, SILENCES, backend_pid, proxied

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from tests.conftest import Database
    from tests.faultproxy import FaultProxy

__all__ = ["proxied"]  # a fixture, shared with test_deadlines

pytestmark = pytest.mark.parametrize("pg_db", ["psycopg"], indirect=True)


@asynccontextmanager
async def anyio_deadline(seconds: float) -> AsyncIterator[None]:
    with anyio.fail_after(seconds):
        yield


DEADLINES: dict[str, Callable[[float], AbstractAsyncContextManager[object]]] = {
    "anyio.fail_after": anyio_deadline,
    "asyncio.timeout": asyncio.timeout,
}


@pytest.mark.parametrize("deadline", list(DEADLINES))
@pytest.mark.parametrize("silence", list(SILENCES))
async def test_a_deadline_around_a_body_on_a_silent_connection_is_kept(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine, silence: str, deadline: str
) -> None:
    """The caller's deadline around a body stuck on a silent psycopg connection returns within 1 s of it."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(proxied))
    first = await backend_pid(barrier, "warm")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with DEADLINES[deadline](DEADLINE), barrier.unit_of_work("silent", scope="payments") as uow:
            uow.session.add(Payment(key="silent", amount=1))
            await uow.session.flush()
            SILENCES[silence](proxy)
            await uow.session.execute(text("SELECT 1"))
    overrun = time.monotonic() - started - DEADLINE
    await proxy.heal()
    assert overrun <= OVERRUN, f"{deadline}, {silence}: control back {overrun:.3f} s after the deadline"
    assert await backend_pid(barrier, "after") != first  # the silent connection never went back to the pool
    assert await pg_db.payments("silent") == 0


@pytest.mark.parametrize("deadline", list(DEADLINES))
async def test_a_deadline_that_expires_in_the_commit_on_a_silent_connection_is_kept(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine, deadline: str
) -> None:
    """A deadline that expires in our COMMIT on a silent psycopg connection is overrun by at most 1 s."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(proxied))
    first = await backend_pid(barrier, "warm")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with DEADLINES[deadline](DEADLINE), barrier.unit_of_work("silent", scope="payments") as uow:
            uow.session.add(Payment(key="silent", amount=1))
            uow.complete({"paid": "silent"})
            proxy.blackhole()  # the COMMIT is never forwarded
    overrun = time.monotonic() - started - DEADLINE
    await proxy.heal()
    assert overrun <= OVERRUN, f"{deadline}: control back {overrun:.3f} s after the deadline"
    with anyio.fail_after(10):
        assert await backend_pid(barrier, "after") != first
    assert await pg_db.payments("silent") == 0


async def test_a_callers_deadline_inside_the_claims_own_wait_on_a_silent_connection_is_kept(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine
) -> None:
    """A single asyncio cancellation that lands while the claim waits for a holder, under the barrier's own
    longer bound, is the caller's: control comes back within 1 s though the connection has gone silent."""
    holder, duplicate = Barrier(pg_db.sessionmaker), Barrier(async_sessionmaker(proxied), wait_timeout=60)
    first = await backend_pid(duplicate, "warm")
    deadlines: list[asyncio.Timeout] = []
    returned = anyio.Event()

    async def wait_on_the_holder() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as deadline:
                deadlines.append(deadline)
                async with duplicate.unit_of_work("held", scope="payments"):
                    pytest.fail("the duplicate ran its body while the holder held the key")
        returned.set()

    async with anyio.create_task_group() as tg, holder.unit_of_work("held", scope="payments") as uow:
        tg.start_soon(wait_on_the_holder)
        await lock_waiters(pg_db, 1)  # the duplicate's claim waits on the holder's row, under its 60 s bound
        proxy.blackhole()
        deadlines[0].reschedule(asyncio.get_running_loop().time() + DEADLINE)
        started = time.monotonic()
        with anyio.fail_after(30):
            await returned.wait()
        overrun = time.monotonic() - started - DEADLINE
        uow.complete({"paid": "held"})
    await proxy.heal()
    assert overrun <= OVERRUN, f"control back {overrun:.3f} s after the deadline"
    assert await backend_pid(duplicate, "after") != first  # the silent connection never went back to the pool

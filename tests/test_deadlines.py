"""Deadlines: the cleanup after a failure or a cancellation is bounded, and a silent connection is discarded.

A unit of work whose connection stops answering (the proxy blackholes it, or forwards only one way) must
not hold its caller past the caller's own deadline by more than the barrier's ``cleanup_timeout``; the
connection that did not answer is closed and invalidated, so that the pool's next caller gets a live one.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from idembarrier import JSON, Barrier, ConfigurationError
from tests.faultproxy import FaultProxy
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from tests.conftest import Database

DEADLINE = 2.0
OVERRUN = 1.0
"""The most a caller's deadline may be overrun by, with the default ``cleanup_timeout``."""


@pytest.fixture
async def proxied(pg_db: Database, proxy: FaultProxy) -> AsyncIterator[AsyncEngine]:
    """One pooled connection through the proxy: the next caller gets it back unless it was discarded."""
    engine = create_async_engine(proxy.url(pg_db.url), pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        yield engine
    finally:
        await engine.dispose()


SILENCES: dict[str, Callable[[FaultProxy], None]] = {
    "blackhole": FaultProxy.blackhole,
    "half_open_to_client": lambda proxy: proxy.half_open("to_client"),
    "half_open_to_server": lambda proxy: proxy.half_open("to_server"),
}


async def backend_pid(barrier: Barrier[JSON], key: str) -> int:
    """Run a payment under ``key`` and return the backend that served it."""
    async with barrier.unit_of_work(key, scope="payments") as uow:
        uow.session.add(Payment(key=key, amount=1))
        pid = int((await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        uow.complete({"paid": key})
    return pid


@pytest.mark.parametrize("silence", list(SILENCES))
async def test_callers_deadline_is_kept_when_the_connection_goes_silent(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine, silence: str
) -> None:
    """A caller's asyncio.timeout(2) around a body stuck on a silent connection returns within 1 s of it."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(proxied))
    first = await backend_pid(barrier, "warm")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(DEADLINE), barrier.unit_of_work("silent", scope="payments") as uow:
            uow.session.add(Payment(key="silent", amount=1))
            await uow.session.flush()  # the claim and the row are in; now the connection stops answering
            SILENCES[silence](proxy)
            await uow.session.execute(text("SELECT 1"))
    overrun = time.monotonic() - started - DEADLINE
    print(f"{silence}: control back {overrun:.3f} s after the caller's deadline")
    assert overrun <= OVERRUN
    await proxy.heal()
    assert await backend_pid(barrier, "after") != first  # the silent connection never went back to the pool
    assert await pg_db.payments("silent") == 0
    assert await pg_db.payments("after") == 1


@pytest.mark.parametrize("moment", ["claim", "commit"])
async def test_callers_deadline_is_kept_when_the_connection_goes_silent_in_our_statements(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine, moment: str
) -> None:
    """A deadline that expires in the claim or the COMMIT on a silent connection is overrun by at most 1 s."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(proxied))
    first = await backend_pid(barrier, "warm")
    if moment == "claim":
        proxy.blackhole()  # the pooled connection looks alive, and the claim's first statement gets no answer
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(DEADLINE), barrier.unit_of_work("silent", scope="payments") as uow:
            uow.session.add(Payment(key="silent", amount=1))
            uow.complete({"paid": "silent"})
            proxy.blackhole()  # the COMMIT is never forwarded
    overrun = time.monotonic() - started - DEADLINE
    print(f"silent at the {moment}: control back {overrun:.3f} s after the caller's deadline")
    assert overrun <= OVERRUN
    await proxy.heal()
    with anyio.fail_after(10):  # a connection left mid-statement in the pool would hang the next caller
        assert await backend_pid(barrier, "after") != first
    assert await pg_db.payments("silent") == 0


async def test_failing_body_on_a_silent_connection_raises_within_the_cleanup_timeout(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine
) -> None:
    """A body that raises once its connection went silent gets its own exception back after cleanup_timeout."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(proxied), cleanup_timeout=0.3)
    first = await backend_pid(barrier, "warm")
    with pytest.raises(LookupError):
        async with barrier.unit_of_work("failing", scope="payments") as uow:
            uow.session.add(Payment(key="failing", amount=1))
            await uow.session.flush()
            proxy.blackhole()
            started = time.monotonic()
            raise LookupError("the body's own failure")
    took = time.monotonic() - started
    print(f"cleanup of a failing body on a silent connection took {took:.3f} s")
    assert took <= 0.3 + 0.5
    await proxy.heal()
    assert await backend_pid(barrier, "after") != first
    assert await pg_db.payments("failing") == 0


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
async def test_cleanup_timeout_must_be_a_positive_finite_number(pg_db: Database, value: float) -> None:
    """A cleanup_timeout that is not a positive, finite number of seconds is refused when the barrier is built."""
    with pytest.raises(ConfigurationError):
        Barrier(pg_db.sessionmaker, cleanup_timeout=value)

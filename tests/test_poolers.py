"""Behind PgBouncer in transaction mode: a default engine is refused at once, a configured one keeps every guarantee.

Each test starts a PgBouncer (`tests._pgbouncer`) in front of its own database. Transaction pooling hands each
transaction whichever server session is free, so whatever a driver keeps in a session (named prepared
statements) is missing or taken in the next transaction; idembarrier's first transaction checks for that
(`idembarrier._poolers`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

import idembarrier
from idembarrier import Barrier, ConfigurationError, ConnectionLostError, OnConflict
from idembarrier.kafka import OutboxRelay
from tests._pgbouncer import pgbouncer
from tests.conftest import Database
from tests.helpers import new_key, pay
from tests.models import Payment
from tests.test_crash import assert_retry_runs_once_and_replays, backend_pid, terminate
from tests.test_outbox import Collecting
from tests.test_relay import until_relayed, woken_through

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from sqlalchemy.engine import URL

DRIVERS = pytest.mark.parametrize("pg_db", ["asyncpg", "psycopg"], indirect=True)
SETTING = {"postgresql+asyncpg": "statement_cache_size", "postgresql+psycopg": "prepare_threshold"}
"""The setting the refusal must name, per driver."""


def configured(url: URL) -> AsyncEngine:
    """An engine that keeps nothing in a server session across transactions (the guide's settings)."""
    if url.drivername == "postgresql+psycopg":
        return create_async_engine(url, connect_args={"prepare_threshold": None})
    return create_async_engine(url, connect_args={"statement_cache_size": 0})


@pytest.fixture
def through(pg_db: Database) -> Iterator[URL]:
    """The test database's URL through a PgBouncer of its own, in transaction mode."""
    with pgbouncer(make_url(pg_db.url)) as url:
        yield url


@pytest.fixture
async def pooled(through: URL) -> AsyncIterator[Database]:
    """The test database through the pooler, with a configured engine."""
    engine = configured(through)
    try:
        yield Database(through.render_as_string(hide_password=False), engine, async_sessionmaker(engine))
    finally:
        await engine.dispose()


@DRIVERS
async def test_a_default_engine_behind_a_pooler_is_refused_at_once(pg_db: Database, through: URL) -> None:
    """The first unit of work on a default engine raises ConfigurationError naming the setting; nothing ran."""
    engine = create_async_engine(through)
    ran: list[str] = []
    try:
        barrier = Barrier(async_sessionmaker(engine))
        for _ in range(3):  # every call, not only the first: the check runs until it passes
            with pytest.raises(ConfigurationError, match=SETTING[through.drivername]) as caught:
                async with barrier.unit_of_work(new_key(), scope="payments") as uow:
                    ran.append("body")
                    uow.complete(None)
            assert "transaction pooler" in str(caught.value)
    finally:
        await engine.dispose()
    assert ran == []
    assert await pg_db.records() == []


@DRIVERS
async def test_concurrent_duplicates_through_a_pooler_execute_once(pg_db: Database, pooled: Database) -> None:
    """30 keys, 4 duplicates of each lined up together, through the pooler: one execution and one answer per key."""
    barrier = Barrier(pooled.sessionmaker)
    keys = [new_key() for _ in range(30)]
    answers: dict[str, list[object]] = {key: [] for key in keys}
    go = anyio.Event()

    async def duplicate(key: str) -> None:
        await go.wait()
        answers[key].append(await pay(barrier, key, on_conflict=OnConflict.WAIT))

    async with anyio.create_task_group() as tg:
        for key in keys:
            for _ in range(4):
                tg.start_soon(duplicate, key)
        await anyio.wait_all_tasks_blocked()
        go.set()
    assert {key: len(set(map(repr, got))) for key, got in answers.items()} == dict.fromkeys(keys, 1)
    assert {key: len(got) for key, got in answers.items()} == dict.fromkeys(keys, 4)
    assert await pg_db.payments() == len(keys)
    assert {status for _, _, status in await pg_db.records()} == {"COMPLETED"}
    for key in keys:  # later retries replay through the pooler too
        assert await pay(barrier, key) == answers[key][0]
    assert await pg_db.payments() == len(keys)


@DRIVERS
async def test_a_server_backend_terminated_behind_a_pooler_leaves_nothing(pg_db: Database, pooled: Database) -> None:
    """The server session under a unit of work is terminated: ConnectionLostError, nothing kept, the retry runs once."""
    barrier, key = Barrier(pooled.sessionmaker), new_key()
    with pytest.raises(ConnectionLostError):
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=100))
            await uow.session.flush()
            await terminate(pg_db, await backend_pid(uow.session))  # the server's pid, as the session sees it
            uow.complete({"payment_id": 1})
    await assert_retry_runs_once_and_replays(pg_db, barrier, key)


async def test_a_relay_behind_a_pooler_says_once_that_it_polls(
    pooled: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """LISTEN through the pooler is accepted and hears nothing: one warning naming listen_url, then polling."""
    barrier = idembarrier.Barrier(pooled.sessionmaker)
    publisher = Collecting()
    relay = OutboxRelay(barrier, publisher, poll_interval=0.01, max_poll_interval=0.05)
    with caplog.at_level(logging.WARNING, logger="idembarrier.relay"):
        await until_relayed(relay, barrier, publisher, linger=0.2)
    warnings = [r.getMessage() for r in caplog.records if "receives no notifications" in r.getMessage()]
    assert len(warnings) == 1
    assert "listen_url" in warnings[0]
    assert [m.key for m in publisher.messages] == [b"A"]


async def test_a_relay_behind_a_pooler_is_woken_through_its_listen_url(pg_db: Database, pooled: Database) -> None:
    """With a direct ``listen_url`` the relay of a pooled engine is woken by NOTIFY at once (polls are 30 s apart)."""
    publisher = await woken_through(idembarrier.Barrier(pooled.sessionmaker), pg_db.url)
    assert [m.key for m in publisher.messages] == [b"A"]

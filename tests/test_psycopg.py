"""PostgreSQL through psycopg 3: what is its own beside asyncpg (the core behaviour runs on both drivers).

The core modules run their PostgreSQL tests through psycopg too (`tests.conftest.PSYCOPG_MODULES`, terminated
backends included). Here: the classification of psycopg's errors, a refused connect, and the relay's LISTEN.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
import psycopg.errors
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import idembarrier
from idembarrier import Barrier, ConnectError, ConnectionLostError, SerializationError
from idembarrier._engines import check_url
from idembarrier._errors import connection_lost, lock_not_available, translate
from idembarrier.kafka import OutboxRelay
from tests.conftest import Database
from tests.helpers import new_key
from tests.test_crash import backend_pid, enter, terminate
from tests.test_relay import test_the_relay_listens_again_after_its_backend_is_terminated as _listens_again

if TYPE_CHECKING:
    from collections.abc import Sequence

    from idembarrier._outbox import Message

DRIVER_ERRORS = (DBAPIError, psycopg.Error)
"""What a lost connection looks like before idembarrier translates it: SQLAlchemy's or psycopg's own."""


def test_a_psycopg_url_is_accepted() -> None:
    """postgresql+psycopg passes the engine check; its synchronous spelling does not."""
    assert check_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    with pytest.raises(idembarrier.ConfigurationError, match="postgresql\\+psycopg"):
        check_url("postgresql+psycopg2://u@h/d")


def test_psycopg_errors_are_classified_by_type_and_sqlstate() -> None:
    """No SQLSTATE on an OperationalError is a lost connection; the server's errors go by their SQLSTATE."""
    assert connection_lost(psycopg.OperationalError("consuming input failed"))
    assert connection_lost(psycopg.errors.AdminShutdown("terminating connection"))
    assert not connection_lost(psycopg.errors.LockNotAvailable("lock timeout"))
    assert lock_not_available(psycopg.errors.LockNotAvailable("lock timeout"))
    assert isinstance(translate(psycopg.errors.SerializationFailure("x"), "t"), SerializationError)
    assert isinstance(translate(psycopg.errors.DeadlockDetected("x"), "t"), SerializationError)
    unique = translate(psycopg.errors.UniqueViolation("x"), "t")
    assert unique is not None
    assert not isinstance(unique, ConnectionLostError)
    assert unique.sqlstate == "23505"


async def test_unreachable_database_raises_connect_error() -> None:
    """Entering a unit of work on a database that refuses psycopg's connection raises ConnectError."""
    engine = create_async_engine("postgresql+psycopg://postgres@127.0.0.1:1/idembarrier")
    try:
        with pytest.raises(ConnectError) as caught:
            await enter(Barrier(async_sessionmaker(engine)), new_key())
    finally:
        await engine.dispose()
    assert isinstance(caught.value.__cause__, DRIVER_ERRORS)


async def test_relay_polls_when_psycopgs_listen_fails(
    psycopg_db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay whose psycopg LISTEN connection cannot be opened logs it and falls back to polling."""

    connect = psycopg.AsyncConnection.connect

    async def refuse_autocommit(*args: Any, **kwargs: Any) -> object:
        if kwargs.get("autocommit"):  # the relay's own LISTEN connection; the engine's pool connects as usual
            raise psycopg.OperationalError("LISTEN refused")
        return await connect(*args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", staticmethod(refuse_autocommit))
    barrier = Barrier(psycopg_db.sessionmaker)
    async with barrier.unit_of_work(new_key(), scope="orders") as uow:
        uow.publish("orders", b"placed", key=b"o-1")
        uow.complete(None)
    stop = anyio.Event()
    sent: list[Message] = []

    class Stopping:
        async def publish(self, messages: Sequence[Message]) -> None:
            sent.extend(messages)
            stop.set()

    relay = OutboxRelay(barrier, Stopping(), poll_interval=0.01, max_poll_interval=0.02)
    with caplog.at_level(logging.WARNING, "idembarrier.relay"), anyio.fail_after(10):
        await relay.run(stop=stop)
    assert [m.value for m in sent] == [b"placed"]
    assert "the relay polls" in caplog.text


async def test_the_relay_listens_again_after_its_psycopg_backend_is_terminated(psycopg_db: Database) -> None:
    """psycopg's LISTEN connection, terminated, is opened again, and a NOTIFY then wakes the relay at once."""
    # The barrier goes through psycopg; the test's own queries (a LIKE '… %' pattern) through asyncpg.
    admin = create_async_engine(make_url(psycopg_db.url).set(drivername="postgresql+asyncpg"))
    try:
        await _listens_again(Database(psycopg_db.url, admin, psycopg_db.sessionmaker))
    finally:
        await admin.dispose()


async def test_pooled_connection_killed_while_idle_fails_the_claim_and_the_next_one_reconnects(
    psycopg_db: Database,
) -> None:
    """psycopg reads nothing while idle: a backend dead in the pool is met at the claim, nothing ran, then replaced."""
    engine = create_async_engine(psycopg_db.url, pool_size=1, max_overflow=0)
    try:
        barrier = Barrier(async_sessionmaker(engine))
        async with barrier.unit_of_work("warm", scope="s") as uow:
            pid = await backend_pid(uow.session)
            uow.complete(None)
        await terminate(psycopg_db, pid)
        with pytest.raises(ConnectionLostError) as caught:
            await enter(barrier, "after")
        assert not caught.value.outcome_unknown
        assert await psycopg_db.records("after") == []
        async with barrier.unit_of_work("after", scope="s") as uow:
            assert await backend_pid(uow.session) != pid
            uow.complete("ran")
        assert uow.response == "ran"
    finally:
        await engine.dispose()

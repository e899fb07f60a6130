"""The caller-session path: the savepoint's statements go to the driver, SQLAlchemy's view of the session stays exact.

Each scenario runs twice on a fresh session, once through ``unit_of_work(session=...)`` and once through
SQLAlchemy's own ``session.begin_nested()``; what the session holds afterwards (identity map, pending and
deleted objects, expired attributes) must be the same. On PostgreSQL (asyncpg and psycopg) and SQLite.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from sqlalchemy import event, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from idembarrier import Barrier, ConnectionLostError, StorageError
from idembarrier._savepoint import NAME
from tests.conftest import ADMIN_URL, Database
from tests.helpers import Boom, new_key, pay
from tests.models import Payment

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@pytest.fixture(params=["asyncpg", "psycopg", "sqlite"])
def caller_db(request: pytest.FixtureRequest) -> Database:
    """The test's database, through asyncpg, psycopg 3 or SQLite."""
    fixture = {"asyncpg": "pg_db", "psycopg": "psycopg_db", "sqlite": "sqlite_db"}[request.param]
    database: Database = request.getfixturevalue(fixture)
    return database


@pytest.fixture(params=["asyncpg", "psycopg"])
def postgres(request: pytest.FixtureRequest) -> Database:
    """The test's PostgreSQL database, through asyncpg or psycopg 3."""
    database: Database = request.getfixturevalue({"asyncpg": "pg_db", "psycopg": "psycopg_db"}[request.param])
    return database


def picture(session: AsyncSession, objects: dict[str, Payment]) -> dict[str, object]:
    """What the session says about each object, and what it holds: the state an exact rollback must leave."""
    states: dict[str, object] = {}
    for name, obj in objects.items():
        state = inspect(obj)
        states[name] = (
            state.transient,
            state.pending,
            state.persistent,
            state.detached,
            obj in session,
            sorted(state.expired_attributes),
        )
    return {
        "objects": states,
        "new": sorted(o.key for o in session.new if isinstance(o, Payment)),
        "dirty": sorted(o.key for o in session.dirty if isinstance(o, Payment)),
        "deleted": sorted(o.key for o in session.deleted if isinstance(o, Payment)),
        "identity": len(session.identity_map),
    }


Body = Callable[[AsyncSession, dict[str, Payment]], Awaitable[None]]


async def scenario(db: Database, body: Body, *, through: Barrier | None) -> tuple[dict[str, object], str]:
    """Load two payments, write one of the caller's own, run ``body`` inside a savepoint that it makes fail.

    Returns the session's picture after the rollback and the key of the unit of work (when ``through``).
    """
    key = new_key()
    async with db.sessionmaker() as session:
        loaded = list((await session.execute(select(Payment).where(Payment.key.in_(["a", "b"])))).scalars())
        objects = {p.key: p for p in loaded}
        objects["caller"] = Payment(key="caller", amount=5)
        session.add(objects["caller"])
        await session.flush()
        with pytest.raises(Boom):
            if through is None:
                async with session.begin_nested():
                    await body(session, objects)
                    raise Boom
            else:
                async with through.unit_of_work(key, scope="payments", session=session) as uow:
                    assert uow.session is session
                    await body(session, objects)
                    raise Boom
        seen = picture(session, objects)
        await session.commit()
    return seen, key


async def seed(db: Database) -> None:
    async with db.sessionmaker() as session, session.begin():
        session.add_all([Payment(key="a", amount=1), Payment(key="b", amount=2)])


async def adds_flushes_and_changes(session: AsyncSession, objects: dict[str, Payment]) -> None:
    objects["flushed"] = Payment(key="flushed", amount=10)
    session.add(objects["flushed"])
    await session.flush()  # inserted inside the savepoint
    objects["pending"] = Payment(key="pending", amount=11)
    session.add(objects["pending"])  # never flushed
    objects["a"].amount = 100  # a loaded object changed and flushed
    await session.flush()
    objects["b"].amount = 200  # changed, not flushed


async def deletes(session: AsyncSession, objects: dict[str, Payment]) -> None:
    await session.delete(objects["a"])
    await session.flush()
    await session.delete(objects["b"])  # deleted, not flushed


async def autoflushes(session: AsyncSession, objects: dict[str, Payment]) -> None:
    objects["auto"] = Payment(key="auto", amount=12)
    session.add(objects["auto"])
    # The query autoflushes the new payment inside the savepoint, as it would in begin_nested().
    assert (await session.execute(select(Payment.amount).where(Payment.key == "auto"))).scalar_one() == 12


@pytest.mark.parametrize("body", [adds_flushes_and_changes, deletes, autoflushes])
async def test_a_failing_body_leaves_the_session_as_begin_nested_does(caller_db: Database, body: Body) -> None:
    """After a body that wrote and raised, the session is exactly what SQLAlchemy's own savepoint leaves."""
    await seed(caller_db)
    expected, _ = await scenario(caller_db, body, through=None)
    async with caller_db.engine.begin() as conn:  # the same starting point for the second run
        await conn.execute(text("DELETE FROM payments WHERE key = 'caller'"))
    seen, key = await scenario(caller_db, body, through=Barrier(caller_db.sessionmaker))
    assert seen == expected
    added = {"flushed", "pending", "auto"}
    assert not any(name in added for name in seen["new"])  # type: ignore[attr-defined]
    assert await caller_db.records(key) == []  # the claim rolled back with the body
    assert await caller_db.payments("caller") == 1  # the caller's own write committed
    assert await caller_db.payments("a") == await caller_db.payments("b") == 1
    for gone in added:
        assert await caller_db.payments(gone) == 0


async def test_objects_loaded_before_are_intact(caller_db: Database) -> None:
    """A loaded object the body did not touch keeps its loaded state; one it changed is expired and reloads."""
    await seed(caller_db)
    barrier = Barrier(caller_db.sessionmaker)
    async with caller_db.sessionmaker() as session:
        a, b = (await session.execute(select(Payment).order_by(Payment.key))).scalars()
        a_id = a.id
        with pytest.raises(Boom):
            async with barrier.unit_of_work(new_key(), scope="payments", session=session):
                a.amount = 100
                await session.flush()
                raise Boom
        assert inspect(b).expired_attributes == set()
        assert b.amount == 2
        assert "amount" in inspect(a).expired_attributes
        assert (await session.execute(select(Payment.amount).where(Payment.id == a_id))).scalar_one() == 1
        await session.refresh(a)
        assert a.amount == 1
        await session.commit()


async def test_a_clean_body_hands_its_objects_to_the_callers_transaction(caller_db: Database) -> None:
    """On release the body's objects are persistent in the caller's session and commit with it."""
    barrier, key = Barrier(caller_db.sessionmaker), new_key()
    async with caller_db.sessionmaker() as session:
        async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
            payment = Payment(key=key, amount=3)
            session.add(payment)
            uow.complete({"ok": True})
        assert inspect(payment).persistent
        assert session.in_transaction()
        assert not session.in_nested_transaction()
        assert await caller_db.records(key) == []
        await session.commit()
    assert await caller_db.payments(key) == 1
    assert await caller_db.records(key) == [("payments", key, "COMPLETED")]


async def test_a_replay_inside_a_caller_session(caller_db: Database) -> None:
    """A finished key replays inside the caller's session; the caller's own writes around it commit."""
    barrier, key = Barrier(caller_db.sessionmaker), new_key()
    first = await pay(barrier, key)
    async with caller_db.sessionmaker() as session:
        session.add(Payment(key="caller", amount=1))
        async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
            assert uow.replayed
            assert uow.response == first
        assert not session.in_nested_transaction()
        session.add(Payment(key="after", amount=1))
        await session.commit()
    assert await caller_db.payments(key) == 1
    assert await caller_db.payments("caller") == await caller_db.payments("after") == 1


async def test_nested_units_of_work_end_their_own_savepoints(caller_db: Database) -> None:
    """A unit of work inside another's body (one caller session): the inner one's failure undoes only its part."""
    barrier, outer, inner = Barrier(caller_db.sessionmaker), new_key(), new_key()
    async with caller_db.sessionmaker() as session:
        async with barrier.unit_of_work(outer, scope="payments", session=session) as uow:
            session.add(Payment(key=outer, amount=1))
            with pytest.raises(Boom):
                async with barrier.unit_of_work(inner, scope="payments", session=session):
                    session.add(Payment(key=inner, amount=1))
                    await session.flush()
                    raise Boom
            uow.complete(None)
        await session.commit()
    assert await caller_db.payments(outer) == 1
    assert await caller_db.payments(inner) == 0
    assert await caller_db.records(outer) == [("payments", outer, "COMPLETED")]
    assert await caller_db.records(inner) == []


async def test_savepoint_statements_bypass_sqlalchemy_core(caller_db: Database) -> None:
    """SQLAlchemy's Core sends no SAVEPOINT nor RELEASE: the driver does, under the unit of work's own name."""
    sent: list[str] = []

    def record(*args: Any) -> None:
        sent.append(str(args[2]))  # before_cursor_execute(conn, cursor, statement, ...)

    event.listen(caller_db.engine.sync_engine, "before_cursor_execute", record)
    try:
        barrier, key = Barrier(caller_db.sessionmaker), new_key()
        async with caller_db.sessionmaker() as session:
            async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
                session.add(Payment(key=key, amount=1))
                uow.complete(None)
            await session.commit()
    finally:
        event.remove(caller_db.engine.sync_engine, "before_cursor_execute", record)
    assert not [s for s in sent if "SAVEPOINT" in s.upper()]
    assert await caller_db.payments(key) == 1


def terminate_at_flush(session: AsyncSession, pid: int) -> Callable[[Session, Any], None]:
    """A listener that kills backend ``pid`` from another connection once the session's flush has run."""

    def kill(_session: Session, _context: Any) -> None:
        url = ADMIN_URL.set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))

    event.listen(session.sync_session, "after_flush_postexec", kill, once=True)
    return kill


async def test_a_failing_release_is_ours(postgres: Database) -> None:
    """A connection lost at the RELEASE (after the body's flush) raises ConnectionLostError, never the driver's."""
    barrier, key = Barrier(postgres.sessionmaker), new_key()
    async with postgres.sessionmaker() as session:
        with pytest.raises(StorageError) as caught:
            async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                terminate_at_flush(session, pid)
                session.add(Payment(key=key, amount=1))  # flushed at the release, then the backend dies
                uow.complete(None)
        assert isinstance(caught.value, ConnectionLostError)
        assert "savepoint" in str(caught.value)
        await session.invalidate()  # the caller's connection died: the caller gives it up
    assert await postgres.records(key) == []
    assert await postgres.payments(key) == 0


async def test_a_release_the_body_made_impossible_is_ours(postgres: Database) -> None:
    """A body that released the savepoint itself makes ours fail: a StorageError with its SQLSTATE (3B001)."""
    barrier, key = Barrier(postgres.sessionmaker), new_key()
    async with postgres.sessionmaker() as session:
        with pytest.raises(StorageError) as caught:
            async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
                await session.execute(text(f"RELEASE SAVEPOINT {NAME}"))
                uow.complete(None)
        assert caught.value.sqlstate == "3B001"
        await session.rollback()
    assert await postgres.records(key) == []

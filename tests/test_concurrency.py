"""Concurrent duplicates of one key: one execution, identical replays, and no driver error leaking out.

A winner claims the key and holds it, uncommitted, inside its body until the test releases it. Duplicates
are lined up with events, and shown to be waiting on the claim before the winner is released: PostgreSQL
reports the lock wait itself, MariaDB in ``SHOW ENGINE INNODB STATUS``; SQLite, which has no such view, is
watched for the ``BEGIN IMMEDIATE`` that its write lock holds up.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Self

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from idembarrier import (
    JSON,
    Barrier,
    FingerprintMismatchError,
    KeyInProgressError,
    OnConflict,
    Status,
)
from tests import models
from tests.helpers import Boom, lock_waiters, new_key
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from types import TracebackType

    from anyio.abc import TaskStatus

    from tests.conftest import Database

SCOPE = "payments"
PG_POOL = 40
"""Connections a many-caller test shares on PostgreSQL. The fixture's pool would open one per caller, past
the server's max_connections (100); callers beyond the pool queue for a connection, as in a real app."""


@asynccontextmanager
async def pooled(db: Database) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A sessionmaker whose pool the server can honour for hundreds of concurrent callers."""
    if db.dialect not in ("postgresql", "mysql"):  # MariaDB: 200 connections opened at once outrun the bounds
        yield db.sessionmaker  # create_sqlite_engine's pool already queues callers beyond 15 connections
        return
    engine = create_async_engine(db.url, pool_size=PG_POOL, max_overflow=0)
    try:
        yield async_sessionmaker(engine)
    finally:
        await engine.dispose()


class Waiters:
    """Tells when duplicates wait for the holder of their key; used as ``async with`` before anyone claims."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._begun = 0
        self._seen = anyio.Event()

    def _count(self, _conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("BEGIN IMMEDIATE"):
            self._begun += 1
            self._seen.set()

    async def __aenter__(self) -> Self:
        if self._db.dialect == "sqlite":
            event.listen(self._db.engine.sync_engine, "before_cursor_execute", self._count)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._db.dialect == "sqlite":
            event.remove(self._db.engine.sync_engine, "before_cursor_execute", self._count)

    async def until(self, waiting: int) -> None:
        """Return once ``waiting`` duplicates wait on the claim while the holder is inside its body."""
        with anyio.fail_after(20):
            if self._db.dialect in ("postgresql", "mysql"):  # MariaDB: InnoDB's monitor lists the waits
                await lock_waiters(self._db, waiting)
            else:
                while self._begun < waiting + 1:  # the holder's BEGIN IMMEDIATE, then one per duplicate
                    self._seen = anyio.Event()
                    await self._seen.wait()


class Winner:
    """Claims a key, writes its payment and holds the claim, uncommitted, until `release` is set."""

    def __init__(self, barrier: Barrier, key: str, *, fingerprint: object = None, fails: bool = False) -> None:
        self.barrier, self.key, self.fingerprint, self.fails = barrier, key, fingerprint, fails
        self.release = anyio.Event()
        self.response: JSON = None
        self.finished = False
        self.error: Boom | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the unit of work; ``task_status.started()`` tells the caller the key is held."""
        try:
            async with self.barrier.unit_of_work(self.key, scope=SCOPE, fingerprint=self.fingerprint) as uow:
                assert not uow.replayed
                payment = Payment(key=self.key, amount=100)
                uow.session.add(payment)
                await uow.session.flush()
                task_status.started()
                await self.release.wait()
                if self.fails:
                    raise Boom("the winner's body failed")
                uow.complete({"payment_id": payment.id, "by": "winner"})
            self.response = uow.response
        except Boom as exc:
            self.error = exc
        self.finished = True


async def write_payment(session: AsyncSession, key: str, by: str) -> JSON:
    payment = Payment(key=key, amount=100)
    session.add(payment)
    await session.flush()
    return {"payment_id": payment.id, "by": by}


async def write_never(session: AsyncSession) -> JSON:
    raise AssertionError("a duplicate must not run the body")


async def test_hundreds_of_duplicates_run_once_and_get_one_response(db: Database) -> None:
    """Concurrent duplicates of one key run the body once, and every caller gets the winner's response."""
    callers = 200
    key, started, everyone_started = new_key(), 0, anyio.Event()
    bodies, in_progress, responses = 0, 0, list[JSON]()

    async with pooled(db) as sessionmaker, Waiters(db) as waiters:
        barrier = Barrier(sessionmaker, on_conflict=OnConflict.WAIT, wait_timeout=60)

        async def body(session: AsyncSession) -> JSON:
            nonlocal bodies
            bodies += 1
            response = await write_payment(session, key, "winner")
            await everyone_started.wait()
            await waiters.until(10)  # at least 10 duplicates are blocked on the claim while we hold it
            return response

        async def call() -> None:
            nonlocal started, in_progress
            started += 1
            if started == callers:
                everyone_started.set()
            try:
                responses.append(await barrier.execute(key, body, scope=SCOPE))
            except KeyInProgressError:
                in_progress += 1
            # Any other exception leaves the task group and fails the test.

        with anyio.fail_after(50):
            async with anyio.create_task_group() as tg:
                for _ in range(callers):
                    tg.start_soon(call)

    assert (bodies, in_progress) == (1, 0)
    assert responses == [{"payment_id": 1, "by": "winner"}] * callers
    assert await db.payments(key) == 1
    assert await db.records(key) == [(SCOPE, key, "COMPLETED")]


async def test_fail_fast_duplicates_raise_while_the_winner_holds_the_key(db: Database) -> None:
    """With OnConflict.FAIL, per call or per barrier, duplicates raise KeyInProgressError without waiting.

    On SQLite the winner holds the database's write lock, which the duplicates give up on at once.
    """
    key = new_key()
    waiting = Barrier(db.sessionmaker, on_conflict=OnConflict.WAIT)
    failing = Barrier(db.sessionmaker, on_conflict=OnConflict.FAIL)
    winner = Winner(waiting, key)
    errors: list[KeyInProgressError] = []

    async def duplicate(barrier: Barrier, on_conflict: OnConflict | None) -> None:
        with pytest.raises(KeyInProgressError) as caught:
            await barrier.execute(key, write_never, scope=SCOPE, on_conflict=on_conflict)
        errors.append(caught.value)

    async with anyio.create_task_group() as tg:
        await tg.start(winner.run)
        # A duplicate that waited would wait for the winner, released only after this block: it times out.
        with anyio.fail_after(3):
            async with anyio.create_task_group() as duplicates:
                for _ in range(10):
                    duplicates.start_soon(duplicate, waiting, OnConflict.FAIL)
                    duplicates.start_soon(duplicate, failing, None)
        assert not winner.finished
        winner.release.set()

    assert len(errors) == 20
    assert all(error.key == key and error.waited == 0.0 for error in errors)
    assert await waiting.execute(key, write_never, scope=SCOPE, on_conflict=OnConflict.FAIL) == winner.response
    assert await failing.execute(key, write_never, scope=SCOPE) == winner.response
    assert await db.payments(key) == 1


async def test_wait_timeout_raises_key_in_progress_then_the_retry_replays(db: Database) -> None:
    """A duplicate outwaiting wait_timeout raises KeyInProgressError; after the winner commits, it replays."""
    key, barrier = new_key(), Barrier(db.sessionmaker)
    winner = Winner(barrier, key)
    async with anyio.create_task_group() as tg:
        await tg.start(winner.run)
        began = anyio.current_time()
        with pytest.raises(KeyInProgressError) as caught:
            await barrier.execute(key, write_never, scope=SCOPE, wait_timeout=0.2)
        waited = anyio.current_time() - began
        assert not winner.finished
        winner.release.set()
    assert caught.value.waited == pytest.approx(0.2)
    assert waited >= 0.2
    assert await barrier.execute(key, write_never, scope=SCOPE, wait_timeout=0.2) == winner.response
    assert await db.payments(key) == 1


async def test_winner_rollback_lets_the_waiting_duplicate_run(db: Database) -> None:
    """When the winner's body raises, a duplicate waiting on the claim runs its own body instead."""
    key, barrier = new_key(), Barrier(db.sessionmaker, wait_timeout=30)
    winner = Winner(barrier, key, fails=True)
    async with Waiters(db) as waiters, anyio.create_task_group() as tg:
        await tg.start(winner.run)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as duplicate:

                async def run_duplicate() -> None:
                    response = await barrier.execute(
                        key, lambda session: write_payment(session, key, "duplicate"), scope=SCOPE
                    )
                    assert isinstance(response, dict)
                    assert response["by"] == "duplicate"

                duplicate.start_soon(run_duplicate)
                await waiters.until(1)
                winner.release.set()
    assert isinstance(winner.error, Boom)
    assert await db.payments(key) == 1
    assert await db.records(key) == [(SCOPE, key, "COMPLETED")]


async def test_fail_fast_conflict_leaves_the_callers_transaction_usable(pg_db: Database) -> None:
    """KeyInProgressError with session= leaves the caller's transaction usable: it writes on and commits."""
    key, barrier = new_key(), Barrier(pg_db.sessionmaker, on_conflict=OnConflict.FAIL)
    winner = Winner(barrier, key)
    async with anyio.create_task_group() as tg:
        await tg.start(winner.run)
        async with pg_db.sessionmaker() as session:
            session.add(Payment(key="caller-before", amount=1))
            await session.flush()
            with pytest.raises(KeyInProgressError):
                async with barrier.unit_of_work(key, scope=SCOPE, session=session):
                    raise AssertionError("a duplicate must not enter the block")
            session.add(Payment(key="caller-after", amount=2))
            await session.flush()
            await session.commit()
        winner.release.set()
    assert await pg_db.payments("caller-before") == 1
    assert await pg_db.payments("caller-after") == 1
    assert await pg_db.payments(key) == 1
    assert await pg_db.records(key) == [(SCOPE, key, "COMPLETED")]


async def test_waiting_duplicate_with_another_fingerprint_gets_a_mismatch(db: Database) -> None:
    """A duplicate with a different fingerprint that waited on the claim raises FingerprintMismatchError."""
    key, barrier = new_key(), Barrier(db.sessionmaker, wait_timeout=30)
    winner = Winner(barrier, key, fingerprint={"amount": 100})
    mismatches: list[FingerprintMismatchError] = []

    async def duplicate() -> None:
        with pytest.raises(FingerprintMismatchError) as caught:
            await barrier.execute(key, write_never, scope=SCOPE, fingerprint={"amount": 999})
        mismatches.append(caught.value)

    async with Waiters(db) as waiters, anyio.create_task_group() as tg:
        await tg.start(winner.run)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as duplicates:
                duplicates.start_soon(duplicate)
                await waiters.until(1)
                winner.release.set()
    [mismatch] = mismatches
    assert mismatch.key == key
    assert mismatch.record is not None
    assert mismatch.record.status is Status.COMPLETED
    assert await db.payments(key) == 1


# One OS process hammering the keys given on its command line. It imports the installed idembarrier (its
# working directory is not the repository), so the business table is declared by `tests.models`' own text.
CHILD_MAIN = """
import json, os, sys

import anyio
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from idembarrier import Barrier, KeyInProgressError, OnConflict


async def main(url, attempts, keys):
    engine = create_async_engine(url, pool_size=8, max_overflow=0)
    barrier = Barrier(async_sessionmaker(engine), on_conflict=OnConflict.WAIT, wait_timeout=30)
    summary = {"responses": {key: [] for key in keys}, "in_progress": 0, "errors": []}

    async def attempt(key):
        async def body(session):
            payment = Payment(key=key, amount=1)
            session.add(payment)
            await session.flush()
            return {"payment_id": payment.id, "pid": os.getpid()}

        try:
            summary["responses"][key].append(await barrier.execute(key, body, scope="payments"))
        except KeyInProgressError:
            summary["in_progress"] += 1
        except Exception as exc:
            summary["errors"].append(type(exc).__name__)

    print("ready", flush=True)
    if (await anyio.to_thread.run_sync(sys.stdin.readline)).strip() != "go":
        sys.exit("no start line")
    async with anyio.create_task_group() as tg:
        for _ in range(attempts):
            for key in keys:
                tg.start_soon(attempt, key)
    await engine.dispose()
    print(json.dumps(summary), flush=True)


anyio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3:])
"""
CHILD = Path(models.__file__).read_text() + CHILD_MAIN


async def test_processes_hammering_the_same_keys_run_each_once(pg_db: Database, tmp_path: Path) -> None:
    """Duplicates from several OS processes run each key's body once and all replay the same response."""
    processes, attempts, keys = 4, 20, [new_key() for _ in range(3)]
    summaries: list[dict[str, object]] = []
    with anyio.fail_after(50):
        async with AsyncExitStack() as stack:
            children = [
                await stack.enter_async_context(
                    await anyio.open_process(
                        [sys.executable, "-c", CHILD, pg_db.url, str(attempts), *keys],
                        stderr=None,
                        cwd=tmp_path,
                    )
                )
                for _ in range(processes)
            ]
            outputs = []
            for child in children:
                assert child.stdout is not None
                outputs.append(BufferedByteReceiveStream(child.stdout))
                assert await outputs[-1].receive_until(b"\n", 100) == b"ready"
            for child in children:  # every child is connected and waiting: start them together
                assert child.stdin is not None
                await child.stdin.send(b"go\n")
            for child, output in zip(children, outputs, strict=True):
                summaries.append(json.loads(await output.receive_until(b"\n", 1_000_000)))
                assert await child.wait() == 0

    assert [summary["errors"] for summary in summaries] == [[]] * processes
    assert [summary["in_progress"] for summary in summaries] == [0] * processes
    for key in keys:
        seen = Counter(
            json.dumps(response, sort_keys=True)
            for summary in summaries
            for response in summary["responses"][key]  # type: ignore[index]
        )
        assert list(seen.values()) == [processes * attempts], seen
        assert await pg_db.payments(key) == 1
    assert await pg_db.records() == sorted((SCOPE, key, "COMPLETED") for key in keys)


async def test_first_call_checks_the_schema_within_a_pool_of_one(pg_db: Database) -> None:
    """The first call's schema check runs on its unit of work's connection: a pool of one suffices."""
    key = new_key()
    engine = create_async_engine(pg_db.url, pool_size=1, max_overflow=0, pool_timeout=1)
    try:
        async with Barrier(async_sessionmaker(engine)).unit_of_work(key, scope=SCOPE) as uow:
            uow.complete(None)
    finally:
        await engine.dispose()
    assert await pg_db.records(key) == [(SCOPE, key, "COMPLETED")]


async def test_sqlite_connection_gets_its_busy_timeout_back(sqlite_db: Database) -> None:
    """A unit of work bounds SQLite's wait for the write lock by its own, then restores the connection's."""
    barrier = Barrier(sqlite_db.sessionmaker)
    async with sqlite_db.sessionmaker() as session:
        before = (await session.execute(text("PRAGMA busy_timeout"))).scalar_one()
        async with barrier.unit_of_work(new_key(), scope=SCOPE, session=session, wait_timeout=0.25) as uow:
            uow.complete(None)
        after = (await session.execute(text("PRAGMA busy_timeout"))).scalar_one()
    assert before == after == 30_000


async def test_wait_timeout_leaves_the_callers_transaction_usable(pg_db: Database) -> None:
    """A bounded wait that runs out cancels only the claim: the caller's own transaction still commits."""
    key = new_key()
    barrier = Barrier(pg_db.sessionmaker)
    winner = Winner(barrier, key)
    async with anyio.create_task_group() as tg:
        await tg.start(winner.run)
        async with pg_db.sessionmaker() as session:
            session.add(Payment(key="caller", amount=1))
            await session.flush()
            with pytest.raises(KeyInProgressError):
                await barrier.execute(key, write_never, scope=SCOPE, session=session, wait_timeout=0.1)
            session.add(Payment(key="caller", amount=2))
            await session.commit()
        winner.release.set()
    assert await pg_db.payments("caller") == 2
    assert await pg_db.payments(key) == 1


async def test_repeatable_read_duplicates_replay_instead_of_failing_to_serialize(pg_db: Database) -> None:
    """Under REPEATABLE READ a duplicate that waited on the winner retries in a new transaction and replays."""
    engine = create_async_engine(pg_db.url, isolation_level="REPEATABLE READ", pool_size=10)
    try:
        barrier, key = Barrier(async_sessionmaker(engine)), new_key()
        winner = Winner(barrier, key)
        responses: list[JSON] = []

        async def duplicate() -> None:
            responses.append(await barrier.execute(key, write_never, scope=SCOPE))

        async with Waiters(pg_db) as waiters, anyio.create_task_group() as tg:
            await tg.start(winner.run)
            for _ in range(5):
                tg.start_soon(duplicate)
            await waiters.until(5)
            winner.release.set()
    finally:
        await engine.dispose()
    assert responses == [winner.response] * 5
    assert await pg_db.payments(key) == 1


async def test_cancelled_wait_for_sqlites_write_lock_stays_a_cancellation(sqlite_db: Database) -> None:
    """A duplicate cancelled while it waits for SQLite's write lock ends cancelled; nothing else escapes.

    aiosqlite cannot abandon a blocked BEGIN IMMEDIATE: the cancellation completes once the lock frees.
    """
    barrier, key = Barrier(sqlite_db.sessionmaker), new_key()
    winner = Winner(barrier, key)
    waiting = anyio.CancelScope()

    async def duplicate() -> None:
        with waiting:
            await barrier.execute(key, write_never, scope=SCOPE, wait_timeout=30)

    async with Waiters(sqlite_db) as waiters, anyio.create_task_group() as tg:
        await tg.start(winner.run)
        tg.start_soon(duplicate)
        await waiters.until(1)
        waiting.cancel()
        winner.release.set()
    assert waiting.cancelled_caught
    assert await barrier.execute(key, write_never, scope=SCOPE) == winner.response
    assert await sqlite_db.payments(key) == 1


@pytest.mark.parametrize("on_conflict", [OnConflict.FAIL, OnConflict.WAIT])
@pytest.mark.parametrize("callers", [False, True])
async def test_finished_key_busy_with_cleanup_still_replays(
    pg_db: Database, on_conflict: OnConflict, callers: bool
) -> None:
    """A finished record that cleanup holds (an uncommitted compaction) replays instead of answering 409."""
    barrier, key = Barrier(pg_db.sessionmaker, wait_timeout=0.2), new_key()
    first = await barrier.execute(key, lambda session: write_payment(session, key, "first"), scope=SCOPE)
    async with pg_db.engine.connect() as cleanup:  # holds the row as a compaction batch would
        await cleanup.execute(
            text("UPDATE idempotency_keys SET updated_at = clock_timestamp() WHERE key = :key"), {"key": key}
        )
        if callers:
            async with pg_db.sessionmaker() as session:
                replayed = await barrier.execute(
                    key, write_never, scope=SCOPE, session=session, on_conflict=on_conflict
                )
                await session.commit()
        else:
            replayed = await barrier.execute(key, write_never, scope=SCOPE, on_conflict=on_conflict)
        await cleanup.rollback()
    assert replayed == first
    assert await pg_db.payments(key) == 1

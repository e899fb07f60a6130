"""Replays from memory: a finished record read here answers its replays without the database, as its copy would.

A COMPLETED or FAILED record with its response cannot change before its ``response_expires_at``, so the
barrier keeps the ones its lookups read (`idembarrier._memory`) and answers a replay from them, without a
connection, until shortly before that instant by the database's clock. Whatever the state, the answer must be
the one the database gives; a record that could still change (IN_PROGRESS, UNKNOWN, compact) is never kept,
and nothing is answered past its response's expiry.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import column, delete, event, table

from idembarrier import Barrier, FingerprintMismatchError, KeyInProgressError, ResponseExpiredError, Retention
from idembarrier._config import DEFAULT_TABLE
from idembarrier._memory import FINISHED_KEYS, MARGIN, REMEMBERED_BYTES, Memory
from idembarrier._record import Record, Status
from tests.helpers import new_key
from tests.test_cli_operations import SCOPE
from tests.test_lookup_first import EXPECTED, STATES, call, completed
from tests.test_retention import GONE

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import Database

HOUR = Retention(response=timedelta(hours=1), record=timedelta(days=1))


@contextmanager
def checkouts(db: Database) -> Iterator[list[object]]:
    """The connections checked out of ``db``'s pool inside the block, one entry each."""
    seen: list[object] = []

    def count(dbapi_connection: object, *_: object) -> None:
        seen.append(dbapi_connection)

    event.listen(db.engine.sync_engine, "checkout", count)
    try:
        yield seen
    finally:
        event.remove(db.engine.sync_engine, "checkout", count)


async def test_a_replay_read_here_is_answered_from_memory_without_a_connection(db: Database) -> None:
    """The lookup of a replay keeps its finished record; the next replays of the key need no connection."""
    barrier = Barrier(db.sessionmaker)
    key = await completed(db, barrier)
    assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})  # read, and kept
    assert barrier.runtime.memory.records == 1
    with checkouts(db) as used:
        for _ in range(3):
            assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})
    assert used == []


@pytest.mark.parametrize("state", list(STATES))
async def test_a_replay_from_memory_ends_as_the_database_says_in_every_state(db: Database, state: str) -> None:
    """COMPLETED and FAILED replay from memory with their responses; compact, UNKNOWN and a stale lease are
    never kept, so they end as the database says, every time."""
    barrier = Barrier(db.sessionmaker)
    key = await STATES[state](db, barrier)
    by_claim = await call(barrier, key, lookup_first=False)
    by_lookup = await call(barrier, key, lookup_first=True)
    with checkouts(db) as used:
        again = await call(barrier, key, lookup_first=True)
    assert again == by_lookup == by_claim == EXPECTED[state]
    kept = state in ("completed", "failed")
    assert (used == []) is kept
    assert barrier.runtime.memory.records == int(kept)


async def test_a_live_lease_is_never_kept(db: Database) -> None:
    """A held lease's IN_PROGRESS record may change at any moment: each duplicate asks the database."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE, lease=timedelta(minutes=5)) as lease:
        for _ in range(2):
            assert await call(barrier, key, lookup_first=True) == ("raised", KeyInProgressError)
        assert barrier.runtime.memory.records == 0
        async with lease.finish() as uow:
            uow.complete({"charge": "ch_1"})
    assert await call(barrier, key, lookup_first=True) == ("response", {"charge": "ch_1"})


async def test_another_fingerprint_is_refused_from_memory_as_by_the_database(db: Database) -> None:
    barrier = Barrier(db.sessionmaker)
    key = await completed(db, barrier, fingerprint=1)
    assert await call(barrier, key, lookup_first=True, fingerprint=1) == ("response", {"paid": 1})
    with checkouts(db) as used:
        assert await call(barrier, key, lookup_first=True, fingerprint=2) == ("raised", FingerprintMismatchError)
    assert used == []
    assert await call(barrier, key, lookup_first=False, fingerprint=2) == ("raised", FingerprintMismatchError)


async def test_the_lookup_reads_the_time_the_response_has_left_by_the_databases_clock(db: Database) -> None:
    """Every dialect and driver reads ``response_expires_in``: just under the response's retention."""
    barrier, key = Barrier(db.sessionmaker, retention=HOUR), new_key()
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        uow.complete({"paid": 1})
    record = await barrier.runtime.atomically(lambda storage: storage.lookup(SCOPE, key))
    assert record is not None
    assert record.response_expires_in is not None
    assert 3600 - 60 < record.response_expires_in <= 3600


async def test_a_kept_record_is_given_up_before_its_response_expires(db: Database) -> None:
    """Kept until MARGIN before its response's expiry, counted from before the lookup: then the database."""
    barrier, key = Barrier(db.sessionmaker, retention=HOUR), new_key()
    now = [1000.0]
    barrier.runtime.memory.clock = lambda: now[0]
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        uow.complete({"paid": 1})
    assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})
    now[0] += 3600 - 60 - MARGIN  # within the hour, less what the record's age can be
    with checkouts(db) as used:
        assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})
    assert used == []
    now[0] += 60  # past the hour, less the margin, counted from before the lookup
    with checkouts(db) as used:
        assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})
    assert len(used) == 1  # asked the database, and kept what it read again (its clock has not moved)


async def test_a_late_replay_is_never_answered_from_memory(db: Database) -> None:
    """A response already expired when read is not kept: once cleanup compacts it, the late replay is refused."""
    barrier = Barrier(db.sessionmaker)
    key = new_key()
    async with barrier.unit_of_work(key, scope=SCOPE, retention=GONE) as uow:
        uow.complete({"paid": 1})
    assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})  # not compacted yet
    assert barrier.runtime.memory.records == 0
    assert (await barrier.purge()).compacted >= 1
    assert await call(barrier, key, lookup_first=True) == ("raised", ResponseExpiredError)


async def test_an_execution_here_forgets_what_was_kept_of_its_key(db: Database) -> None:
    """A record deleted by hand and its key run again here: the new outcome is replayed, not the kept one."""
    barrier = Barrier(db.sessionmaker)
    key = await completed(db, barrier)
    assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})
    records = table(DEFAULT_TABLE, column("scope"), column("key"))
    async with db.engine.begin() as conn:
        await conn.execute(delete(records).where(records.c.scope == SCOPE, records.c.key == key))
    assert await call(barrier, key, lookup_first=False) == ("ran", None)
    assert barrier.runtime.memory.records == 0
    assert await call(barrier, key, lookup_first=True) == ("response", "ran")


async def test_without_replay_from_memory_every_replay_asks_the_database(db: Database) -> None:
    barrier = Barrier(db.sessionmaker, replay_from_memory=False)
    key = await completed(db, barrier)
    with checkouts(db) as used:
        for _ in range(3):
            assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})
    assert len(used) == 3
    assert barrier.runtime.memory.records == 0


class CountedMemory(Memory):
    """A memory that counts how often it was asked."""

    recalled = 0

    def recall(self, scope: str, key: str) -> Record | None:
        self.recalled += 1
        return super().recall(scope, key)


async def test_a_replay_in_the_callers_session_is_never_answered_from_memory(db: Database) -> None:
    """With the caller's session a replay keeps its savepoint until the block ends: the database answers."""
    barrier = Barrier(db.sessionmaker)
    memory = barrier.runtime.memory = CountedMemory()
    key = await completed(db, barrier)
    assert await call(barrier, key, lookup_first=True) == ("response", {"paid": 1})
    asked = memory.recalled
    async with db.sessionmaker() as session, barrier.unit_of_work(key, scope=SCOPE, session=session) as uow:
        assert uow.replayed
        assert uow.response == {"paid": 1}
    assert memory.recalled == asked


def finished_record(key: str, response: bytes, *, left: float = 3600.0) -> Record:
    return Record(
        scope="s",
        key=key,
        status=Status.COMPLETED,
        fingerprint=None,
        response=response,
        token=uuid.uuid4(),
        attempt=1,
        created_at=None,
        completed_at=None,
        expires_at=None,
        response_expires_in=left,
    )


def test_the_memory_keeps_at_most_finished_keys_records() -> None:
    memory = Memory(clock=lambda: 0.0)
    for i in range(FINISHED_KEYS + 1):
        memory.remember(finished_record(f"k{i}", b"1"), read_at=0.0)
    assert memory.records == FINISHED_KEYS
    assert memory.recall("s", "k0") is None
    assert memory.recall("s", f"k{FINISHED_KEYS}") is not None


def test_the_memory_keeps_at_most_remembered_bytes_of_responses() -> None:
    """Past the byte budget the least recently used record goes; a response over it is never kept."""
    memory = Memory(clock=lambda: 0.0)
    half = b"x" * (REMEMBERED_BYTES // 2)
    memory.remember(finished_record("a", half), read_at=0.0)
    memory.remember(finished_record("b", half), read_at=0.0)
    assert memory.recall("s", "a") is not None  # a is now the most recently used
    memory.remember(finished_record("c", b"y"), read_at=0.0)
    assert memory.recall("s", "b") is None
    assert memory.recall("s", "a") is not None
    memory.remember(finished_record("huge", b"z" * (REMEMBERED_BYTES + 1)), read_at=0.0)
    assert memory.recall("s", "huge") is None


@pytest.mark.parametrize("left", [None, 0.0, MARGIN, -5.0])
def test_a_record_without_time_left_is_not_kept(left: float | None) -> None:
    memory = Memory(clock=lambda: 0.0)
    memory.remember(replace(finished_record("k", b"1"), response_expires_in=left), read_at=0.0)
    assert memory.records == 0

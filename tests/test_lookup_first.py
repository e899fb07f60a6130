"""Lookup-first: a read outside any transaction before the claim replays exactly what the claim would.

``lookup_first=True`` only changes the order of statements; in every state a record can be in, the call must
end the same way as with ``lookup_first=False``: the same response, or the same exception. And a key that
finished in this process looks itself up first by default (`Runtime.finished_here`), so a retry landing where
its first request ran replays at the cost of one read.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from idembarrier import (
    Barrier,
    ExpiredReplay,
    FingerprintMismatchError,
    KeyInProgressError,
    OnConflict,
    ReconciliationRequiredError,
    ResponseExpiredError,
)
from idembarrier._memory import FINISHED_KEYS
from tests.helpers import new_key
from tests.test_cli_operations import SCOPE, stale_lease, unknown
from tests.test_retention import GONE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tests.conftest import Database

Outcome = tuple[str, object]
"""How a call ended: ("response", value) or ("raised", exception type)."""


async def call(barrier: Barrier, key: str, *, lookup_first: bool, fingerprint: object = None) -> Outcome:
    """One unit of work on ``key`` that writes nothing itself: its replay, or the exception it raised."""
    try:
        async with barrier.unit_of_work(
            key, scope=SCOPE, fingerprint=fingerprint, on_conflict=OnConflict.FAIL, lookup_first=lookup_first
        ) as uow:
            if uow.replayed:
                return ("response", uow.response)
            uow.complete("ran")
            return ("ran", None)
    except Exception as exc:  # the outcome compared, whatever it is
        return ("raised", type(exc))


async def completed(db: Database, barrier: Barrier, fingerprint: object = None) -> str:
    key = new_key()
    async with barrier.unit_of_work(key, scope=SCOPE, fingerprint=fingerprint) as uow:
        uow.complete({"paid": 1})
    return key


async def failed(db: Database, barrier: Barrier) -> str:
    key = new_key()
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        uow.fail({"declined": True})
    return key


async def compact(db: Database, barrier: Barrier) -> str:
    """A key whose response cleanup dropped: only its compact record remains."""
    key = new_key()
    async with barrier.unit_of_work(key, scope=SCOPE, retention=GONE) as uow:
        uow.complete({"paid": 1})
    assert (await barrier.purge()).compacted >= 1
    return key


async def unknown_key(db: Database, barrier: Barrier) -> str:
    key = new_key()
    await unknown(db, barrier, key)
    return key


async def stale(db: Database, barrier: Barrier) -> str:
    key = new_key()
    await stale_lease(db, barrier, key)
    return key


STATES: dict[str, Callable[[Database, Barrier], Awaitable[str]]] = {
    "completed": completed,
    "failed": failed,
    "compact": compact,
    "unknown": unknown_key,
    "stale lease": stale,
}
EXPECTED: dict[str, Outcome] = {
    "completed": ("response", {"paid": 1}),
    "failed": ("response", {"declined": True}),
    "compact": ("raised", ResponseExpiredError),
    "unknown": ("raised", ReconciliationRequiredError),
    "stale lease": ("raised", KeyInProgressError),
}


@pytest.mark.parametrize("state", list(STATES))
async def test_a_lookup_first_ends_as_the_claim_does_in_every_state(db: Database, state: str) -> None:
    """COMPLETED, FAILED, compact, UNKNOWN, a stale lease: the same answer by lookup and by claim."""
    barrier = Barrier(db.sessionmaker)
    key = await STATES[state](db, barrier)
    by_claim = await call(barrier, key, lookup_first=False)
    by_lookup = await call(barrier, key, lookup_first=True)
    assert by_lookup == by_claim == EXPECTED[state]


async def test_a_live_lease_is_in_progress_by_lookup_as_by_claim(db: Database) -> None:
    """A lease held (its IN_PROGRESS record committed, its lease running): KeyInProgressError either way."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE, lease=timedelta(minutes=5)) as lease:
        by_claim = await call(barrier, key, lookup_first=False)
        by_lookup = await call(barrier, key, lookup_first=True)
        async with lease.finish() as uow:
            uow.complete({"charge": "ch_1"})
    assert by_lookup == by_claim == ("raised", KeyInProgressError)


async def test_a_mismatched_fingerprint_is_refused_by_lookup_as_by_claim(db: Database) -> None:
    barrier = Barrier(db.sessionmaker)
    key = await completed(db, barrier, fingerprint=1)
    for lookup_first in (False, True):
        assert await call(barrier, key, lookup_first=lookup_first, fingerprint=2) == (
            "raised",
            FingerprintMismatchError,
        )


async def test_a_new_key_runs_once_whichever_comes_first(db: Database) -> None:
    """Nothing to find: the lookup goes on to the claim, which runs the body; then both paths replay it."""
    barrier = Barrier(db.sessionmaker)
    key = new_key()
    assert await call(barrier, key, lookup_first=True) == ("ran", None)
    assert await call(barrier, key, lookup_first=True) == ("response", "ran")
    assert await call(barrier, key, lookup_first=False) == ("response", "ran")


async def test_allow_reruns_a_compact_record_after_a_lookup_too(db: Database) -> None:
    """Under ExpiredReplay.ALLOW the lookup finds the compact record and lets the claim retake it."""
    barrier = Barrier(db.sessionmaker, on_expired_replay=ExpiredReplay.ALLOW)
    key = await compact(db, barrier)
    assert await call(barrier, key, lookup_first=True) == ("ran", None)


async def test_a_key_that_finished_here_is_looked_up_first(db: Database) -> None:
    """After a commit or a replay in this process the key is remembered; other keys and processes are not."""
    barrier = Barrier(db.sessionmaker)
    key = await completed(db, barrier)
    assert barrier.runtime.finished_here(SCOPE, key)
    assert not barrier.runtime.finished_here(SCOPE, new_key())
    assert not Barrier(db.sessionmaker).runtime.finished_here(SCOPE, key)  # another runtime, as another process
    other = Barrier(db.sessionmaker)
    assert await call(other, key, lookup_first=False) == ("response", {"paid": 1})
    assert other.runtime.finished_here(SCOPE, key)  # replayed here: the next retry reads first


async def test_a_failed_body_is_not_remembered(db: Database) -> None:
    """A body that raised committed nothing: its key is not noted as finished."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(RuntimeError):
        async with barrier.unit_of_work(key, scope=SCOPE):
            raise RuntimeError("declined by the body")
    assert not barrier.runtime.finished_here(SCOPE, key)


async def test_the_memory_of_finished_keys_is_bounded(sqlite_db: Database) -> None:
    """Past FINISHED_KEYS the least recently finished key is forgotten first."""
    runtime = Barrier(sqlite_db.sessionmaker).runtime
    for i in range(FINISHED_KEYS + 1):
        runtime.finished("s", f"k{i}", executed=True)
    assert not runtime.finished_here("s", "k0")
    assert runtime.finished_here("s", "k1")
    assert runtime.finished_here("s", f"k{FINISHED_KEYS}")

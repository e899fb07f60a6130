"""Retention that never reopens the window: responses expire, compact records remain, late replays are seen."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
import pytest

from idembarrier import (
    Barrier,
    ConfigurationError,
    ExpiredReplay,
    FingerprintMismatchError,
    OnConflict,
    Outcome,
    ResponseExpiredError,
    Retention,
    Status,
)
from tests.helpers import new_key
from tests.models import Payment

if TYPE_CHECKING:
    from tests.conftest import Database

SCOPE = "late"
GONE = Retention(response=timedelta(0), record=timedelta(days=30))
"""The response expires at completion; the compact record stays a month."""


async def pay(barrier: Barrier, key: str, *, retention: Retention | None = None, fingerprint: object = 1) -> bool:
    """Run the body unless the key replays; return whether it ran."""
    async with barrier.unit_of_work(key, scope=SCOPE, fingerprint=fingerprint, retention=retention) as uow:
        if uow.replayed:
            return False
        uow.session.add(Payment(key=key, amount=1))
        uow.complete({"paid": key})
    return True


async def expired(db: Database, barrier: Barrier) -> str:
    """A key paid once whose response cleanup has dropped: only its compact record remains."""
    key = new_key()
    assert await pay(barrier, key, retention=GONE)
    done = await barrier.purge()
    assert done.compacted >= 1
    record = await barrier.inspect(key, scope=SCOPE)
    assert record is not None
    assert (record.status, record.response) == (Status.COMPLETED, None)
    return key


async def test_late_replay_is_rejected_by_default(db: Database) -> None:
    """A replay past the response retention raises ResponseExpiredError, runs nothing, and is counted."""
    barrier = Barrier(db.sessionmaker)
    key = await expired(db, barrier)
    with pytest.raises(ResponseExpiredError) as caught:
        await pay(barrier, key)
    assert caught.value.record is not None
    assert caught.value.record.status is Status.COMPLETED
    assert await db.payments(key) == 1
    assert (await barrier.stats()).outcomes[Outcome.LATE_REPLAY] == 1


async def test_compact_record_still_checks_the_fingerprint(db: Database) -> None:
    """A different request on a compact record raises FingerprintMismatchError, whatever the policy."""
    barrier = Barrier(db.sessionmaker, on_expired_replay=ExpiredReplay.ALLOW)
    key = await expired(db, barrier)
    with pytest.raises(FingerprintMismatchError):
        await pay(barrier, key, fingerprint=2)


async def test_allow_runs_a_late_request_once_even_when_concurrent(db: Database) -> None:
    """Under ALLOW, concurrent late duplicates take the compact record over once: one more execution."""
    barrier = Barrier(db.sessionmaker, on_expired_replay=ExpiredReplay.ALLOW)
    key = await expired(db, barrier)
    ran: list[bool] = []

    async def late() -> None:
        ran.append(await pay(barrier, key))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(late)
    assert sorted(ran) == [False] * 9 + [True]
    assert await db.payments(key) == 2
    record = await barrier.inspect(key, scope=SCOPE)
    assert record is not None
    assert (record.status, record.attempt, record.response) == (
        Status.COMPLETED,
        2,
        b'{"paid":"' + key.encode() + b'"}',
    )


async def test_alert_runs_again_and_counts(db: Database) -> None:
    """Under ALERT a late request runs again and counts as a late replay."""
    barrier = Barrier(db.sessionmaker, on_expired_replay=ExpiredReplay.ALERT)
    key = await expired(db, barrier)
    assert await pay(barrier, key)
    assert (await barrier.stats()).outcomes[Outcome.LATE_REPLAY] == 1
    assert await db.payments(key) == 2


async def test_a_failing_late_request_leaves_the_compact_record(db: Database) -> None:
    """A late request whose body raises rolls the takeover back: the compact record is as it was."""
    barrier = Barrier(db.sessionmaker, on_expired_replay=ExpiredReplay.ALLOW)
    key = await expired(db, barrier)
    with pytest.raises(RuntimeError):
        async with barrier.unit_of_work(key, scope=SCOPE, fingerprint=1):
            raise RuntimeError("declined by the bank's fraud check")
    record = await barrier.inspect(key, scope=SCOPE)
    assert record is not None
    assert (record.status, record.response, record.attempt) == (Status.COMPLETED, None, 1)


async def test_purge_keeps_live_responses_and_compact_records(db: Database) -> None:
    """Cleanup drops only expired responses and deletes only expired records."""
    barrier = Barrier(db.sessionmaker)
    live, compact = new_key(), await expired(db, barrier)
    await pay(barrier, live)
    done = await barrier.purge()
    assert (done.compacted, done.deleted) == (0, 0)
    assert await pay(barrier, live) is False  # still replays its response
    assert (await barrier.inspect(compact, scope=SCOPE)) is not None


async def test_leases_refuse_a_compact_record(db: Database) -> None:
    """A lease meeting a compact record raises ResponseExpiredError instead of replaying nothing."""
    barrier = Barrier(db.sessionmaker, on_expired_replay=ExpiredReplay.ALLOW)
    key = await expired(db, barrier)
    with pytest.raises(ResponseExpiredError):
        async with barrier.leased(key, scope=SCOPE, fingerprint=1):
            pass


async def test_replay_window_longer_than_record_retention_is_refused(db: Database) -> None:
    """A declared replay window beyond a record retention is refused when the barrier is built, saying why."""
    with pytest.raises(ConfigurationError, match="maximum replay window"):
        Barrier(db.sessionmaker, max_replay_window=timedelta(days=45))
    with pytest.raises(ConfigurationError, match="payments"):
        Barrier(
            db.sessionmaker,
            retention=Retention(response=timedelta(days=7), record=timedelta(days=60)),
            retention_by_scope={"payments": Retention(response=timedelta(days=1), record=timedelta(days=10))},
            max_replay_window=timedelta(days=45),
        )
    Barrier(db.sessionmaker, retention=Retention(record=timedelta(days=60)), max_replay_window=timedelta(days=45))


def test_retention_must_keep_the_record_at_least_as_long_as_the_response() -> None:
    """A record retention shorter than the response retention, or a negative one, is refused."""
    with pytest.raises(ConfigurationError, match="shorter"):
        Retention(response=timedelta(days=7), record=timedelta(days=1))
    with pytest.raises(ConfigurationError, match="non-negative"):
        Retention(response=timedelta(days=-1))


async def test_retention_by_scope_applies_to_its_scope(db: Database) -> None:
    """A scope's own retention sets its records' horizons; other scopes keep the barrier's."""
    barrier = Barrier(db.sessionmaker, retention_by_scope={SCOPE: GONE})
    key = new_key()
    assert await pay(barrier, key)
    assert (await barrier.purge()).compacted == 1
    async with barrier.unit_of_work(new_key(), scope="other") as uow:
        uow.complete(None)
    assert (await barrier.purge()).compacted == 0


async def test_a_per_call_retention_inside_the_replay_window_is_refused(db: Database) -> None:
    """A call whose record retention is shorter than the declared replay window raises ConfigurationError."""
    barrier = Barrier(db.sessionmaker, max_replay_window=timedelta(days=14))
    with pytest.raises(ConfigurationError, match="replay window"):
        barrier.unit_of_work(
            new_key(), scope=SCOPE, retention=Retention(record=timedelta(days=2), response=timedelta(0))
        )


async def test_allow_takes_over_failing_fast_too(db: Database) -> None:
    """Under ALLOW a fail-fast late request takes the compact record over and runs once more."""
    barrier = Barrier(db.sessionmaker, on_expired_replay=ExpiredReplay.ALLOW, on_conflict=OnConflict.FAIL)
    key = await expired(db, barrier)
    assert await pay(barrier, key)
    assert await db.payments(key) == 2


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
async def test_purge_refuses_a_share_outside_zero_to_one(db: Database, share: float) -> None:
    """purge(max_share=) outside (0, 1] raises ConfigurationError before touching a record."""
    barrier = Barrier(db.sessionmaker)
    key = new_key()
    assert await pay(barrier, key, retention=GONE)
    with pytest.raises(ConfigurationError, match="max_share"):
        await barrier.purge(max_share=share)
    record = await barrier.inspect(key, scope=SCOPE)
    assert record is not None
    assert record.response is not None


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delay of every `anyio.sleep` from here on; each still sleeps."""
    delays: list[float] = []
    real_sleep = anyio.sleep

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(anyio, "sleep", sleep)
    return delays


async def test_paced_purge_pauses_after_each_full_batch(db: Database, pauses: list[float]) -> None:
    """With max_share=0.25 a purge pauses after each full batch (and only then), and still does all its work."""
    barrier = Barrier(db.sessionmaker)
    for _ in range(7):
        assert await pay(barrier, new_key(), retention=GONE)
    begun = time.perf_counter()
    done = await barrier.purge(batch_size=2, max_share=0.25)
    took = time.perf_counter() - begun
    assert done.compacted == 7
    assert len(pauses) == 3  # compaction's batches of 2, 2, 2 (then 1); deletion has nothing due
    assert all(p > 0 for p in pauses)
    assert took >= sum(pauses)


async def test_unpaced_purge_never_pauses(db: Database, pauses: list[float]) -> None:
    """By default (max_share=1) a purge runs its batches back to back."""
    barrier = Barrier(db.sessionmaker)
    for _ in range(3):
        assert await pay(barrier, new_key(), retention=GONE)
    assert (await barrier.purge(batch_size=1)).compacted == 3
    assert pauses == []

"""Operations: outcome counters, the status distribution, and the cleanup that never touches live records."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import text

from idembarrier import (
    Barrier,
    ConfigurationError,
    FingerprintMismatchError,
    KeyInProgressError,
    OnConflict,
    Outcome,
    Status,
)
from tests.helpers import new_key
from tests.models import Payment

if TYPE_CHECKING:
    from tests.conftest import Database

SCOPE = "ops"


async def run(barrier: Barrier, key: str, *, fingerprint: object = None, retention: timedelta | None = None) -> None:
    async with barrier.unit_of_work(key, scope=SCOPE, fingerprint=fingerprint, retention=retention) as uow:
        if not uow.replayed:
            uow.session.add(Payment(key=key, amount=1))
            uow.complete(None)


async def test_stats_count_outcomes_and_read_the_status_distribution(db: Database) -> None:
    """stats() counts executions, replays, conflicts and mismatches, and reads statuses from the table."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    await run(barrier, key, fingerprint=1)
    await run(barrier, key, fingerprint=1)
    await run(barrier, key, fingerprint=1)
    with pytest.raises(FingerprintMismatchError):
        await run(barrier, key, fingerprint=2)
    async with barrier.leased(new_key(), scope=SCOPE) as lease:
        with pytest.raises(KeyInProgressError):
            async with barrier.leased(lease.key, scope=SCOPE, on_conflict=OnConflict.FAIL):
                pass
        stats = await barrier.stats()
        await lease.release()
    assert stats.outcomes == {
        Outcome.EXECUTED: 2,
        Outcome.REPLAYED: 2,
        Outcome.FINGERPRINT_MISMATCH: 1,
        Outcome.IN_PROGRESS: 1,
    }
    assert stats.hit_rate == 0.5
    assert stats.statuses == {Status.COMPLETED: 1, Status.IN_PROGRESS: 1}
    assert stats.oldest_in_progress is not None
    assert stats.oldest_in_progress >= timedelta(0)


async def test_stats_of_an_empty_table(db: Database) -> None:
    """An unused barrier has no hit rate, no statuses and no IN_PROGRESS age."""
    stats = await Barrier(db.sessionmaker).stats()
    assert (stats.hit_rate, stats.statuses, stats.oldest_in_progress) == (None, {}, None)


async def left_behind(db: Database, scope: str, key: str, status: str) -> None:
    """Insert a record whose lease and expiry ran out long ago, as a dead holder would leave it."""
    token = "gen_random_uuid()" if db.dialect == "postgresql" else "lower(hex(randomblob(16)))"
    sql = f"""INSERT INTO idempotency_keys (scope, key, status, token, expires_at, locked_until)
              VALUES (:scope, :key, :status, {token}, '2000-01-01 00:00:00', '2000-01-01 00:00:00')"""
    async with db.engine.begin() as conn:
        await conn.execute(text(sql), {"scope": scope, "key": key, "status": status})


async def test_stale_reclaims_are_counted(db: Database) -> None:
    """Each stale lease taken over counts once under STALE_RECLAIM."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    await left_behind(db, SCOPE, key, "IN_PROGRESS")
    async with barrier.leased(key, scope=SCOPE) as lease:
        assert lease.attempt == 2
        await lease.release()
    assert (await barrier.stats()).outcomes[Outcome.STALE_RECLAIM] == 1


async def expire(db: Database, keys: int) -> None:
    """Insert ``keys`` finished records whose expiry has passed, as a long-running system would have."""
    if db.dialect == "postgresql":
        sql = """INSERT INTO idempotency_keys
                   (scope, key, status, token, response, completed_at, expires_at, cleanup_at)
                 SELECT 'old', 'k' || g, 'COMPLETED', gen_random_uuid(), '\\x6e756c6c', now() - interval '9 days',
                        now() - interval '2 days', now() - interval '2 days'
                 FROM generate_series(1, :n) AS g"""
    else:
        sql = """WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n)
                 INSERT INTO idempotency_keys (scope, key, status, token, response, completed_at, expires_at)
                 SELECT 'old', 'k' || i, 'COMPLETED', lower(hex(randomblob(16))), X'6e756c6c',
                        datetime('now', '-9 days'), datetime('now', '-2 days') FROM g"""
    async with db.engine.begin() as conn:
        await conn.execute(text(sql), {"n": keys})


async def test_purge_deletes_only_expired_finished_records(db: Database) -> None:
    """purge() deletes finished records past expires_at, never live, unexpired, IN_PROGRESS or UNKNOWN ones."""
    barrier = Barrier(db.sessionmaker)
    await expire(db, 2_500)
    fresh = new_key()
    await run(barrier, fresh)  # finished, expires in 7 days
    await left_behind(db, "old", "unknown", "UNKNOWN")
    await left_behind(db, "old", "stale", "IN_PROGRESS")
    batches: list[tuple[str, int]] = []
    done = await barrier.purge(batch_size=1000, on_batch=lambda kind, count: batches.append((kind, count)))
    assert done.deleted == 2_500
    assert [count for kind, count in batches if kind == "deleted"] == [1000, 1000, 500]
    assert sorted(await db.records()) == [
        ("old", "stale", "IN_PROGRESS"),
        ("old", "unknown", "UNKNOWN"),
        (SCOPE, fresh, "COMPLETED"),
    ]
    assert (await barrier.purge()).deleted == 0


async def test_purge_under_live_traffic_from_several_purgers(pg_db: Database) -> None:
    """Three purgers clear 100,000 expired records while claims keep succeeding and live records stay."""
    barrier = Barrier(pg_db.sessionmaker)
    await expire(pg_db, 100_000)
    purged: list[int] = []
    claimed: list[str] = []
    done = anyio.Event()

    async def purger() -> None:
        purged.append((await barrier.purge(batch_size=2_000)).deleted)

    async def traffic() -> None:
        while not done.is_set():
            key = new_key()
            await run(barrier, key)
            claimed.append(key)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            async with anyio.create_task_group() as purgers:
                for _ in range(3):
                    purgers.start_soon(purger)
            done.set()
    assert sum(purged) == 100_000
    assert claimed
    assert await pg_db.payments() == len(claimed)
    assert sorted(r[1] for r in await pg_db.records()) == sorted(claimed)


async def test_purge_refuses_a_useless_batch_size(db: Database) -> None:
    """A batch size below 1 raises ValueError."""
    with pytest.raises(ConfigurationError, match="batch_size"):
        await Barrier(db.sessionmaker).purge(batch_size=0)


async def test_observers_see_every_counted_outcome_with_its_scope(db: Database) -> None:
    """observe() receives each outcome as it is counted, with the call's scope."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    seen: list[tuple[Outcome, str]] = []
    barrier.observe(lambda outcome, scope: seen.append((outcome, scope)))
    await run(barrier, key)
    await run(barrier, key)
    assert seen == [(Outcome.EXECUTED, SCOPE), (Outcome.REPLAYED, SCOPE)]

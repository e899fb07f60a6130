"""Leased work, in one process, on PostgreSQL and SQLite: claim, finish, reclaim, fencing, reconciliation."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import text

from idembarrier import (
    JSON,
    Barrier,
    ConfigurationError,
    FingerprintMismatchError,
    KeyInProgressError,
    LeaseLostError,
    OnConflict,
    ReconciliationRequiredError,
    Record,
    Status,
    UnitOfWorkError,
    downstream_key,
)
from tests.helpers import new_key
from tests.models import Payment

if TYPE_CHECKING:
    from idembarrier import Lease
    from tests.conftest import Database

SCOPE = "charges"
SHORT = timedelta(milliseconds=300)


async def finish(lease: Lease[JSON], key: str, response: JSON) -> None:
    """Write the business row and the outcome, fenced by the lease."""
    async with lease.finish() as uow:
        uow.session.add(Payment(key=key, amount=100))
        uow.complete(response)


_NOW = {"postgresql": "now()", "mysql": "UTC_TIMESTAMP(6)"}  # the database's clock (MariaDB: UTC, as written)


def _where_key(db: Database) -> str:
    """The condition on the key column, quoted where the dialect reserves the word (MariaDB)."""
    return f"{db.engine.dialect.identifier_preparer.quote('key')} = :key"


async def until_stale(db: Database, key: str) -> None:
    """Return once the key's lease has run out by the database's clock (lease lengths are a few 100 ms)."""
    now = _NOW.get(db.dialect, "strftime('%Y-%m-%d %H:%M:%f', 'now')")
    sql = f"SELECT count(*) FROM idempotency_keys WHERE {_where_key(db)} AND locked_until <= {now}"
    with anyio.fail_after(10):
        while True:
            async with db.engine.connect() as conn:
                if (await conn.execute(text(sql), {"key": key})).scalar_one():
                    return
            await anyio.sleep(0.05)  # waiting for a clock, not ordering tasks


async def until_past_first_lease(db: Database, key: str) -> None:
    """Return once the database's clock has passed the key's first lease (as it stood on entry)."""
    now = _NOW.get(db.dialect, "strftime('%Y-%m-%d %H:%M:%f', 'now')")
    async with db.engine.connect() as conn:
        first = (
            await conn.execute(text(f"SELECT locked_until FROM idempotency_keys WHERE {_where_key(db)}"), {"key": key})
        ).scalar_one()
    sql = text(f"SELECT count(*) FROM idempotency_keys WHERE {_where_key(db)} AND {now} > :first")
    with anyio.fail_after(10):
        while True:
            async with db.engine.connect() as conn:
                if (await conn.execute(sql, {"key": key, "first": first})).scalar_one():
                    return
            await anyio.sleep(0.05)  # waiting for a clock, not ordering tasks


async def test_lease_commits_its_claim_then_finishes_atomically(db: Database) -> None:
    """The claim is committed IN_PROGRESS before the body; finish() commits the row and COMPLETED together."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease:
        assert not lease.replayed
        assert lease.attempt == 1
        assert lease.downstream_key == downstream_key(SCOPE, key)
        assert await db.records(key) == [(SCOPE, key, "IN_PROGRESS")]  # visible to everyone already
        await finish(lease, key, {"charge": "ch_1"})
    assert await db.records(key) == [(SCOPE, key, "COMPLETED")]
    assert await db.payments(key) == 1
    async with barrier.leased(key, scope=SCOPE) as again:
        assert again.replayed
        assert again.response == {"charge": "ch_1"}


@pytest.mark.parametrize(
    ("scope", "key", "expected"),
    [
        ("a", "k", "idb-bd9f7074e4e546f588808afd9e71f104"),
        ("b", "k", "idb-2c634db008e7a4b5b0c6fcc91d7391bf"),
        ("charges", "charge-1", "idb-aaa259c31a46438ecd8b40b829a44d85"),
    ],
)
def test_downstream_key_is_pinned_per_scope_and_key(scope: str, key: str, expected: str) -> None:
    """The downstream key of (scope, key) is a fixed value, the same in every process and every release.

    External systems deduplicate retries by it, so a change to its derivation must fail here.
    """
    assert downstream_key(scope, key) == expected


async def test_live_lease_refuses_a_fail_fast_duplicate_and_a_waiting_one_replays(db: Database) -> None:
    """While the lease lives a fail-fast duplicate gets KeyInProgressError; a waiting one replays the outcome."""
    barrier, key = Barrier(db.sessionmaker, wait_timeout=10), new_key()
    outcome: list[object] = []

    async def waiting() -> None:
        async with barrier.leased(key, scope=SCOPE) as dup:
            outcome.append(dup.response if dup.replayed else "ran")

    async with barrier.leased(key, scope=SCOPE) as lease:
        with pytest.raises(KeyInProgressError):
            async with barrier.leased(key, scope=SCOPE, on_conflict=OnConflict.FAIL):
                pass
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await finish(lease, key, {"charge": "ch_2"})
    assert outcome == [{"charge": "ch_2"}]
    assert await db.payments(key) == 1


async def test_waiting_duplicate_gives_up_after_wait_timeout(db: Database) -> None:
    """A duplicate waiting on a live lease raises KeyInProgressError once wait_timeout has passed."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease:
        with pytest.raises(KeyInProgressError) as caught:
            async with barrier.leased(key, scope=SCOPE, wait_timeout=0.2):
                pass
        assert caught.value.waited >= 0.2
        await lease.release()


async def test_stale_lease_is_reclaimed_with_its_checkpoint_and_reported(db: Database) -> None:
    """After expiry a caller takes the key over: new token, attempt 2, same downstream key, last checkpoint."""
    reclaims: list[Record] = []
    barrier, key = Barrier(db.sessionmaker, on_reclaim=reclaims.append), new_key()
    first = barrier.leased(key, scope=SCOPE, lease=SHORT)
    with pytest.raises(LeaseLostError):  # the first holder comes back: its fenced write is refused
        async with first:
            await first.checkpoint("charged", {"charge_id": "ch_3"})
            await until_stale(db, key)
            async with barrier.leased(key, scope=SCOPE) as second:
                assert not second.replayed
                assert second.attempt == 2
                assert second.token != first.token
                assert second.downstream_key == first.downstream_key
                assert second.checkpoint_name == "charged"
                assert second.checkpoint_data == {"charge_id": "ch_3"}
                await finish(second, key, {"charge": "ch_3"})
            await first.checkpoint("late")
    assert [r.attempt for r in reclaims] == [2]
    assert await db.payments(key) == 1
    assert await db.records(key) == [(SCOPE, key, "COMPLETED")]
    async with barrier.leased(key, scope=SCOPE) as replay:
        assert replay.record is not None
        assert replay.record.checkpoint == "charged"  # the late checkpoint wrote nothing


async def test_zombie_finish_is_fenced_off(db: Database) -> None:
    """A holder whose lease was reclaimed and finished by another cannot finish: LeaseLostError, no write."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    zombie = barrier.leased(key, scope=SCOPE, lease=SHORT)
    with pytest.raises(LeaseLostError):
        async with zombie:
            await until_stale(db, key)
            async with barrier.leased(key, scope=SCOPE) as taker:
                await finish(taker, key, {"by": "taker"})
            await finish(zombie, key, {"by": "zombie"})
    assert await db.payments(key) == 1
    async with barrier.leased(key, scope=SCOPE) as replay:
        assert replay.response == {"by": "taker"}


async def test_renew_reports_a_lost_lease(db: Database) -> None:
    """renew() raises LeaseLostError once someone else reclaimed the lease."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    holder = barrier.leased(key, scope=SCOPE, lease=SHORT)
    with pytest.raises(LeaseLostError):
        async with holder:
            await until_stale(db, key)
            async with barrier.leased(key, scope=SCOPE) as taker:
                await finish(taker, key, None)
            await holder.renew()


async def test_heartbeat_keeps_a_long_body_leased(db: Database) -> None:
    """With a heartbeat, a body that outlives its lease length still holds the key and finishes."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    # A 1 s lease renewed every 50 ms: a renewal would have to stall for 20 beats for the claim below to
    # find the lease stale, so a loaded machine cannot make this test pass or fail by timing.
    async with barrier.leased(key, scope=SCOPE, lease=timedelta(seconds=1), heartbeat=0.05) as lease:
        await until_past_first_lease(db, key)  # the body's own long work outlives the lease it was given
        with pytest.raises(KeyInProgressError):
            async with barrier.leased(key, scope=SCOPE, on_conflict=OnConflict.FAIL):
                pass
        assert not lease.lost
        await finish(lease, key, {"ok": True})
    assert await db.payments(key) == 1


async def test_heartbeat_that_finds_the_lease_gone_marks_it_lost(db: Database) -> None:
    """A heartbeat whose renewal fails marks the lease lost; the next fenced write raises LeaseLostError."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(LeaseLostError):
        async with barrier.leased(key, scope=SCOPE, lease=timedelta(seconds=30), heartbeat=0.05) as lease:
            async with db.engine.begin() as conn:  # an operator deletes the record under the holder
                await conn.execute(text(f"DELETE FROM idempotency_keys WHERE {_where_key(db)}"), {"key": key})
            with anyio.fail_after(5):
                while not lease.lost:  # noqa: ASYNC110 - a flag set by the heartbeat task; bounded above
                    await anyio.sleep(0.02)
            await lease.checkpoint("after")


async def test_key_turns_unknown_after_max_reclaims_and_is_resolved_by_an_operator(db: Database) -> None:
    """Past max_reclaims the key is UNKNOWN: refused to retries, listed as unresolved, resolved by hand."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    for _ in range(2):  # the original holder, then one reclaimer, both die (leave without finishing)
        with pytest.raises(UnitOfWorkError):
            async with barrier.leased(key, scope=SCOPE, lease=SHORT, max_reclaims=1):
                await until_stale(db, key)
    with pytest.raises(ReconciliationRequiredError) as caught:
        async with barrier.leased(key, scope=SCOPE, lease=SHORT, max_reclaims=1):
            pass
    assert caught.value.record is not None
    assert caught.value.record.status is Status.UNKNOWN
    with pytest.raises(ReconciliationRequiredError):
        async with barrier.unit_of_work(key, scope=SCOPE):
            pass
    unresolved = await barrier.unresolved()
    assert [(u.record.key, u.record.status) for u in unresolved] == [(key, Status.UNKNOWN)]
    assert unresolved[0].age > timedelta(0)
    await barrier.resolve(key, scope=SCOPE, status=Status.FAILED, response={"error": "refunded by hand"})
    async with barrier.leased(key, scope=SCOPE) as replay:
        assert replay.record is not None
        assert replay.record.status is Status.FAILED
        assert replay.response == {"error": "refunded by hand"}
    assert await barrier.unresolved() == []


async def test_resolve_refuses_a_live_lease(db: Database) -> None:
    """An operator cannot resolve a key whose lease is still live: KeyInProgressError."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease:
        with pytest.raises(KeyInProgressError):
            await barrier.resolve(key, scope=SCOPE, status=Status.COMPLETED, response=None)
        await lease.release()


async def test_stale_lease_is_listed_as_unresolved(db: Database) -> None:
    """A lease that ran out without being reclaimed is listed among the unresolved keys."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(UnitOfWorkError):
        async with barrier.leased(key, scope=SCOPE, lease=SHORT):
            await until_stale(db, key)
    assert [(u.record.key, u.record.status) for u in await barrier.unresolved()] == [(key, Status.IN_PROGRESS)]


async def test_reclaim_checks_the_fingerprint(db: Database) -> None:
    """A different request meeting a stale lease raises FingerprintMismatchError instead of reclaiming it."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(UnitOfWorkError):
        async with barrier.leased(key, scope=SCOPE, fingerprint={"amount": 1}, lease=SHORT):
            await until_stale(db, key)
    with pytest.raises(FingerprintMismatchError):
        async with barrier.leased(key, scope=SCOPE, fingerprint={"amount": 2}):
            pass
    async with barrier.leased(key, scope=SCOPE, fingerprint={"amount": 1}) as same:
        assert same.attempt == 2
        await same.release()


async def test_release_lets_a_retry_run_at_once(db: Database) -> None:
    """release() deletes the claim, so the next call runs immediately as attempt 1."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease:
        await lease.release()
    assert await db.records(key) == []
    async with barrier.leased(key, scope=SCOPE, on_conflict=OnConflict.FAIL) as retry:
        assert retry.attempt == 1
        await finish(retry, key, None)


async def test_body_exception_keeps_the_lease(db: Database) -> None:
    """An exception in the body leaves the lease in place (the external call may have happened)."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(RuntimeError):
        async with barrier.leased(key, scope=SCOPE):
            raise RuntimeError("gateway timed out")
    assert await db.records(key) == [(SCOPE, key, "IN_PROGRESS")]
    with pytest.raises(KeyInProgressError):
        async with barrier.leased(key, scope=SCOPE, on_conflict=OnConflict.FAIL):
            pass


async def test_lease_operations_belong_to_the_holder(db: Database) -> None:
    """A replayed lease may not checkpoint, renew, release or finish."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease:
        await finish(lease, key, 1)
    async with barrier.leased(key, scope=SCOPE) as replay:
        with pytest.raises(UnitOfWorkError):
            await replay.checkpoint("x")
        with pytest.raises(UnitOfWorkError):
            replay.finish()


async def test_lease_arguments_are_checked(db: Database) -> None:
    """A non-positive lease, a bad heartbeat or a negative max_reclaims raise ConfigurationError before any SQL."""
    barrier = Barrier(db.sessionmaker)
    with pytest.raises(ConfigurationError, match="lease"):
        barrier.leased(new_key(), scope=SCOPE, lease=timedelta(0))
    with pytest.raises(ConfigurationError, match="wait_timeout"):
        barrier.leased(new_key(), scope=SCOPE, heartbeat=-1)
    with pytest.raises(ConfigurationError, match="max_reclaims"):
        barrier.leased(new_key(), scope=SCOPE, max_reclaims=-1)


async def test_inspect_calls_only_a_lease_stale(db: Database) -> None:
    """`Barrier.inspect` says stale for an IN_PROGRESS record whose lease ran out, never for a finished one."""
    barrier, left, done = Barrier(db.sessionmaker), new_key(), new_key()
    with pytest.raises(UnitOfWorkError):
        async with barrier.leased(left, scope=SCOPE, lease=SHORT):
            await until_stale(db, left)  # and the holder leaves without finishing
    async with barrier.leased(done, scope=SCOPE, lease=SHORT) as lease:
        await finish(lease, done, {"ok": True})
    await until_stale(db, left)
    stale, finished = await barrier.inspect(left, scope=SCOPE), await barrier.inspect(done, scope=SCOPE)
    assert stale is not None
    assert (stale.status, stale.stale) == (Status.IN_PROGRESS, True)
    assert finished is not None
    assert (finished.status, finished.stale) == (Status.COMPLETED, False)

"""What a unit of work does for one caller at a time, on PostgreSQL and on SQLite."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel
from sqlalchemy import insert, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from idembarrier import (
    JSON,
    Barrier,
    DataclassCodec,
    FingerprintMismatchError,
    InvalidFingerprintError,
    InvalidKeyError,
    OnConflict,
    PydanticCodec,
    RecordedFailureError,
    ResponseEncodingError,
    SchemaError,
    Status,
    UnitOfWorkError,
)
from tests.helpers import Boom, new_key, pay
from tests.models import Payment

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from tests.conftest import Database


async def test_first_call_commits_business_row_and_completed_record(db: Database) -> None:
    """A first call runs the body; the business row and the COMPLETED record commit together."""
    key = new_key()
    response = await pay(Barrier(db.sessionmaker), key)
    assert response == {"payment_id": 1, "amount": 100}
    assert await db.payments(key) == 1
    assert await db.records(key) == [("payments", key, "COMPLETED")]


async def test_replay_returns_stored_response_without_running_body(db: Database) -> None:
    """A second call with the same key replays the first response and writes nothing."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    first = await pay(barrier, key, amount=100)
    async with barrier.unit_of_work(key, scope="payments") as uow:
        assert uow.replayed
        assert uow.status is Status.COMPLETED
        assert uow.record is not None
        assert uow.record.key == key
        replayed = uow.response
    assert replayed == first
    assert await db.payments(key) == 1


async def test_same_key_in_two_scopes_is_two_records(db: Database) -> None:
    """Scopes partition keys: the same key runs once in each scope."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    for scope in ("tenant-a", "tenant-b"):
        async with barrier.unit_of_work(key, scope=scope) as uow:
            assert not uow.replayed
            uow.session.add(Payment(key=key, amount=1))
            uow.complete(scope)
    assert await db.payments(key) == 2
    assert await db.records(key) == [("tenant-a", key, "COMPLETED"), ("tenant-b", key, "COMPLETED")]


async def test_body_exception_rolls_back_everything_and_propagates_unchanged(db: Database) -> None:
    """An exception from the body leaves neither business rows nor a record, and a retry runs."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    boom = Boom("card service said no")
    with pytest.raises(Boom) as caught:
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=100))
            await uow.session.flush()
            raise boom
    assert caught.value is boom
    assert await db.payments(key) == 0
    assert await db.records(key) == []
    retried = await pay(barrier, key)
    assert isinstance(retried, dict)
    assert retried["amount"] == 100
    assert await db.payments(key) == 1


async def test_fail_records_failed_with_the_body_writes_and_replays_as_failed(db: Database) -> None:
    """fail() commits FAILED atomically with the body's writes; its replay says FAILED, not COMPLETED."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.unit_of_work(key, scope="payments") as uow:
        uow.session.add(Payment(key=key, amount=0))
        uow.fail({"error": "card_declined"})
        assert uow.status is Status.FAILED
    assert await db.records(key) == [("payments", key, "FAILED")]
    assert await db.payments(key) == 1
    async with barrier.unit_of_work(key, scope="payments") as again:
        assert again.replayed
        assert again.status is Status.FAILED
        assert again.response == {"error": "card_declined"}


async def test_execute_runs_handler_once_and_replays(db: Database) -> None:
    """execute() calls the handler on the first call only and returns the same response each time."""
    barrier, key, calls = Barrier(db.sessionmaker), new_key(), []

    async def handler(session: AsyncSession) -> JSON:
        calls.append(key)
        session.add(Payment(key=key, amount=5))
        return {"ok": True}

    assert await barrier.execute(key, handler, scope="payments") == {"ok": True}
    assert await barrier.execute(key, handler, scope="payments") == {"ok": True}
    assert calls == [key]
    assert await db.payments(key) == 1


async def test_execute_raises_recorded_failure_for_a_failed_record(db: Database) -> None:
    """execute() tells a replayed FAILED outcome apart by raising RecordedFailureError with its response."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.unit_of_work(key, scope="payments") as uow:
        uow.fail({"error": "insufficient_funds"})

    async def handler(session: AsyncSession) -> JSON:
        raise AssertionError("a replay must not run the handler")

    with pytest.raises(RecordedFailureError) as caught:
        await barrier.execute(key, handler, scope="payments")
    assert caught.value.response == {"error": "insufficient_funds"}
    assert caught.value.record.status is Status.FAILED


async def test_fingerprint_mismatch_on_replay(db: Database) -> None:
    """The same key with a different request raises FingerprintMismatchError and writes nothing."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    await pay(barrier, key, fingerprint={"amount": 100, "currency": "EUR"})
    with pytest.raises(FingerprintMismatchError) as caught:
        await pay(barrier, key, fingerprint={"amount": 999, "currency": "EUR"})
    assert caught.value.key == key
    assert caught.value.record is not None
    assert caught.value.record.status is Status.COMPLETED
    assert await db.payments(key) == 1


async def test_fingerprint_is_canonical_json(db: Database) -> None:
    """Key order and whitespace do not change a JSON fingerprint, so the retry replays."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    first = await pay(barrier, key, fingerprint={"amount": 100, "currency": "EUR"})
    assert await pay(barrier, key, fingerprint={"currency": "EUR", "amount": 100}) == first
    assert await db.payments(key) == 1


async def test_bytes_fingerprint_replays_for_the_same_bytes(db: Database) -> None:
    """A bytes fingerprint is hashed as given: the same bytes, as a bytearray too, replay the first response."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    first = await pay(barrier, key, fingerprint=b"raw body")
    assert await pay(barrier, key, fingerprint=bytearray(b"raw body")) == first
    assert await db.payments(key) == 1


@pytest.mark.parametrize(("recorded", "given"), [(b"raw body", None), (None, b"raw body")])
async def test_fingerprint_bytes_and_missing_fingerprint_differ(db: Database, recorded: object, given: object) -> None:
    """A record made without a fingerprint does not replay for a call that gives one, and vice versa."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    await pay(barrier, key, fingerprint=recorded)
    with pytest.raises(FingerprintMismatchError):
        await pay(barrier, key, fingerprint=given)
    assert await db.payments(key) == 1


async def test_body_without_outcome_is_rolled_back_with_an_error(db: Database) -> None:
    """Leaving the block without complete() or fail() raises UnitOfWorkError and commits nothing."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(UnitOfWorkError, match="without complete"):
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=1))
    assert await db.payments(key) == 0
    assert await db.records(key) == []


async def test_outcome_is_set_once(db: Database) -> None:
    """A second complete() or fail() raises, and nothing commits."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(UnitOfWorkError, match="already set"):
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.complete(1)
            uow.fail(2)
    assert await db.records(key) == []


async def test_replayed_unit_of_work_refuses_an_outcome_and_writes(db: Database) -> None:
    """In a replay, complete() raises, and objects added to the session raise at exit instead of committing."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    await pay(barrier, key)
    async with barrier.unit_of_work(key, scope="payments") as uow:
        with pytest.raises(UnitOfWorkError, match="replayed"):
            uow.complete({"again": True})
    with pytest.raises(UnitOfWorkError, match="replayed"):
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=1))
    assert await db.payments(key) == 1


async def test_unit_of_work_is_entered_once(db: Database) -> None:
    """Entering the same unit of work twice raises UnitOfWorkError."""
    barrier = Barrier(db.sessionmaker)
    uow = barrier.unit_of_work(new_key(), scope="payments")
    async with uow:
        uow.complete(None)
    with pytest.raises(UnitOfWorkError, match="entered once"):
        async with uow:
            pass


async def test_session_and_outcome_need_the_block(db: Database) -> None:
    """session, complete() and response are refused outside `async with`."""
    uow = Barrier(db.sessionmaker).unit_of_work(new_key(), scope="payments")
    with pytest.raises(UnitOfWorkError):
        _ = uow.session
    with pytest.raises(UnitOfWorkError):
        uow.complete(None)
    with pytest.raises(UnitOfWorkError, match="no response yet"):
        _ = uow.response


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("k" * 256, "256 characters"),
        ("k" * 10_000, "10000 characters"),
        ("line\nbreak", "control character"),
        ("nul\x00", "control character"),
        ("del\x7f", "control character"),
    ],
)
async def test_invalid_keys_are_refused_before_any_sql(db: Database, key: str, reason: str) -> None:
    """Empty, over-long and control-character keys raise InvalidKeyError; no record is written."""
    with pytest.raises(InvalidKeyError, match=reason):
        Barrier(db.sessionmaker).unit_of_work(key, scope="payments")
    assert await db.records() == []


async def test_longest_and_unicode_keys_are_accepted(db: Database) -> None:
    """A 255-character key and a non-ASCII key are valid keys."""
    barrier = Barrier(db.sessionmaker)
    for key in ("k" * 255, "commande-été-🧾"):
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.complete(key)
    assert len(await db.records()) == 2


async def test_invalid_scope_and_fingerprint_are_refused(db: Database) -> None:
    """An empty scope raises InvalidKeyError; a fingerprint that is not JSON raises InvalidFingerprintError."""
    barrier = Barrier(db.sessionmaker)
    with pytest.raises(InvalidKeyError, match="scope is empty"):
        barrier.unit_of_work(new_key(), scope="")
    with pytest.raises(InvalidFingerprintError):
        barrier.unit_of_work(new_key(), scope="payments", fingerprint={"when": object()})
    with pytest.raises(InvalidFingerprintError):
        barrier.unit_of_work(new_key(), scope="payments", fingerprint=float("nan"))


async def test_response_the_codec_cannot_encode_raises_before_commit(db: Database) -> None:
    """A non-JSON response raises ResponseEncodingError inside the body; nothing is recorded or written."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(ResponseEncodingError):
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=1))
            uow.complete({"at": object()})  # type: ignore[dict-item]
    assert await db.payments(key) == 0
    assert await db.records(key) == []


@dataclasses.dataclass
class Receipt:
    payment_id: int
    currency: str


class ReceiptModel(BaseModel):
    payment_id: int
    tags: list[str]


async def test_dataclass_and_pydantic_responses_round_trip(db: Database) -> None:
    """DataclassCodec and PydanticCodec replay an equal object of the same type."""
    dc_barrier = Barrier(db.sessionmaker, codec=DataclassCodec(Receipt))
    pd_barrier = Barrier(db.sessionmaker, codec=PydanticCodec(ReceiptModel))
    dc_key, pd_key = new_key(), new_key()
    async with dc_barrier.unit_of_work(dc_key, scope="payments") as uow:
        uow.complete(Receipt(7, "EUR"))
    async with pd_barrier.unit_of_work(pd_key, scope="payments") as uow:
        uow.complete(ReceiptModel(payment_id=8, tags=["a"]))
    async with dc_barrier.unit_of_work(dc_key, scope="payments") as uow:
        assert uow.response == Receipt(7, "EUR")
    async with pd_barrier.unit_of_work(pd_key, scope="payments") as uow:
        assert uow.response == ReceiptModel(payment_id=8, tags=["a"])


async def test_stored_response_that_does_not_decode_raises(db: Database) -> None:
    """A replay whose stored bytes the codec rejects raises ResponseEncodingError, not the codec's error."""
    key = new_key()
    async with Barrier(db.sessionmaker).unit_of_work(key, scope="payments") as uow:
        uow.complete({"payment_id": "not-an-int"})
    async with Barrier(db.sessionmaker, codec=PydanticCodec(ReceiptModel)).unit_of_work(key, scope="payments") as uow:
        with pytest.raises(ResponseEncodingError):
            _ = uow.response


async def test_business_integrity_error_propagates_unchanged(db: Database) -> None:
    """A constraint violation in the business tables is the caller's IntegrityError, and nothing commits."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    await pay(barrier, key)
    other = new_key()
    with pytest.raises(IntegrityError):
        async with barrier.unit_of_work(other, scope="payments") as uow:
            uow.session.add(Payment(id=1, key=other, amount=1))  # id 1 is taken
            uow.complete(None)
    assert await db.records(other) == []


async def test_retention_sets_both_horizons_after_completion(db: Database) -> None:
    """The response horizon (7 days, or the call's) and the record horizon (30 days) count from completion."""
    barrier, key, short = Barrier(db.sessionmaker), new_key(), new_key()
    await pay(barrier, key)
    async with barrier.unit_of_work(short, scope="payments", retention=timedelta(hours=1)) as uow:
        uow.complete(None)
    if db.dialect == "postgresql":
        sql = """SELECT key, extract(epoch FROM response_expires_at - completed_at),
                        extract(epoch FROM expires_at - completed_at) FROM idempotency_keys"""
    elif db.dialect == "mysql":
        sql = """SELECT `key`, TIMESTAMPDIFF(SECOND, completed_at, response_expires_at),
                        TIMESTAMPDIFF(SECOND, completed_at, expires_at) FROM idempotency_keys"""
    else:
        sql = """SELECT key, (julianday(response_expires_at) - julianday(completed_at)) * 86400,
                        (julianday(expires_at) - julianday(completed_at)) * 86400 FROM idempotency_keys"""
    async with db.engine.connect() as conn:
        result: list[Any] = list(await conn.exec_driver_sql(sql))
    horizons = {str(row[0]): (round(float(row[1])), round(float(row[2]))) for row in result}
    assert horizons == {key: (7 * 86400, 30 * 86400), short: (3600, 30 * 86400)}


async def test_caller_session_commit_is_the_callers(db: Database) -> None:
    """With session=, the barrier never commits: the caller's commit makes the record and rows durable."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with db.sessionmaker() as session:
        session.add(Payment(key="before", amount=1))
        async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
            uow.session.add(Payment(key=key, amount=2))
            uow.complete({"ok": 1})
        assert uow.session is session
        assert await db.records(key) == []  # not committed yet
        await session.commit()
    assert await db.payments(key) == 1
    assert await db.payments("before") == 1
    assert await db.records(key) == [("payments", key, "COMPLETED")]


async def test_caller_session_rollback_undoes_record_and_rows(db: Database) -> None:
    """With session=, the caller's rollback removes the record with the rows, so a retry runs again."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with db.sessionmaker() as session:
        async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
            uow.session.add(Payment(key=key, amount=2))
            uow.complete({"ok": 1})
        await session.rollback()
    assert await db.records(key) == []
    assert await pay(barrier, key) is not None
    assert await db.payments(key) == 1


async def test_caller_session_survives_a_failing_body(db: Database) -> None:
    """A body exception undoes only the unit of work's part; the caller's earlier writes still commit."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with db.sessionmaker() as session:
        session.add(Payment(key="caller", amount=1))
        await session.flush()
        with pytest.raises(Boom):
            async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
                uow.session.add(Payment(key=key, amount=2))
                await uow.session.flush()
                raise Boom
        await session.commit()
    assert await db.payments("caller") == 1
    assert await db.payments(key) == 0
    assert await db.records(key) == []


async def test_caller_session_replay(db: Database) -> None:
    """With session=, a finished key replays inside the caller's transaction."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    first = await pay(barrier, key)
    async with (
        db.sessionmaker() as session,
        session.begin(),
        barrier.unit_of_work(key, scope="payments", session=session) as uow,
    ):
        assert uow.replayed
        assert uow.response == first


async def test_session_in_failed_state_is_refused(db: Database) -> None:
    """A caller session whose transaction failed raises UnitOfWorkError, not SQLAlchemy's error."""
    barrier = Barrier(db.sessionmaker)
    async with db.sessionmaker() as session:
        session.add(Payment(id=5, key="a", amount=1))
        session.add(Payment(id=5, key="b", amount=1))
        with pytest.raises(IntegrityError):
            await session.flush()
        with pytest.raises(UnitOfWorkError, match="session cannot run"):
            async with barrier.unit_of_work(new_key(), scope="payments", session=session):
                pass


async def test_lock_timeout_of_the_body_is_the_callers(pg_db: Database) -> None:
    """The claim's bounded wait does not leak: the body's statements run with the caller's lock_timeout."""
    barrier = Barrier(pg_db.sessionmaker, wait_timeout=3)
    async with barrier.unit_of_work(new_key(), scope="payments") as uow:
        seen = (await uow.session.execute(text("SHOW lock_timeout"))).scalar_one()
        uow.complete(None)
    async with pg_db.sessionmaker() as session:
        default = (await session.execute(text("SHOW lock_timeout"))).scalar_one()
    assert seen == default == "0"


async def test_callers_own_connection_error_propagates_unchanged(db: Database) -> None:
    """An OS connection error raised by the body itself (a card gateway refusing) is the caller's, unchanged."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    refused = ConnectionRefusedError("the card gateway refused the connection")
    with pytest.raises(ConnectionRefusedError) as caught:
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=1))
            raise refused
    assert caught.value is refused
    assert await db.records(key) == []


async def test_autocommit_engine_is_refused(pg_db: Database) -> None:
    """On an AUTOCOMMIT engine the claim could not share a transaction: UnitOfWorkError, nothing written."""
    engine = create_async_engine(pg_db.url, isolation_level="AUTOCOMMIT")
    try:
        barrier, key = Barrier(async_sessionmaker(engine)), new_key()
        with pytest.raises(UnitOfWorkError, match="AUTOCOMMIT"):
            async with barrier.unit_of_work(key, scope="payments") as uow:
                uow.complete(None)
    finally:
        await engine.dispose()
    assert await pg_db.records(key) == []


async def test_body_that_commits_the_session_is_reported(db: Database) -> None:
    """A body that commits its unit of work's session gets UnitOfWorkError; the stuck key is listed."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(UnitOfWorkError, match="ended inside its body"):
        async with barrier.unit_of_work(key, scope="payments") as uow:
            uow.session.add(Payment(key=key, amount=1))
            await uow.session.commit()
            uow.complete(None)
    assert [u.record.key for u in await barrier.unresolved()] == [key]


async def test_caller_session_replay_writes_nothing(db: Database) -> None:
    """In a replay with the caller's session, whatever the body writes is rolled back with the savepoint."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    await pay(barrier, key)
    async with db.sessionmaker() as session:
        async with barrier.unit_of_work(key, scope="payments", session=session) as uow:
            assert uow.replayed
            await uow.session.execute(insert(Payment).values(key=key, amount=7))
        await session.commit()
    assert await db.payments(key) == 1


async def test_callers_pending_integrity_error_propagates_unchanged(db: Database) -> None:
    """The caller's own pending writes are flushed first; their IntegrityError is the caller's, unchanged."""
    barrier = Barrier(db.sessionmaker)
    await pay(barrier, new_key())  # payment id 1 exists
    async with db.sessionmaker() as session:
        session.add(Payment(id=1, key="dup", amount=1))
        with pytest.raises(IntegrityError):
            async with barrier.unit_of_work(new_key(), scope="payments", session=session):
                pass


async def test_missing_schema_leaves_the_callers_transaction_usable(pg_db: Database) -> None:
    """With the caller's session, a missing schema raises SchemaError and the caller can still commit."""
    async with pg_db.engine.begin() as conn:
        await conn.execute(text("DROP TABLE idembarrier_alembic_version"))
    barrier = Barrier(pg_db.sessionmaker)
    async with pg_db.sessionmaker() as session:
        session.add(Payment(key="caller", amount=1))
        await session.flush()
        with pytest.raises(SchemaError):
            async with barrier.unit_of_work(new_key(), scope="payments", session=session):
                pass
        await session.commit()
    assert await pg_db.payments("caller") == 1


async def test_fail_fast_claim_leaves_the_callers_lock_timeout(pg_db: Database) -> None:
    """A fail-fast claim's 1 ms lock_timeout is its own: the body runs with the caller's setting."""
    barrier = Barrier(pg_db.sessionmaker, on_conflict=OnConflict.FAIL)
    async with barrier.unit_of_work(new_key(), scope="payments") as uow:
        seen = (await uow.session.execute(text("SHOW lock_timeout"))).scalar_one()
        uow.complete(None)
    assert seen == "0"

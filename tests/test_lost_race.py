"""A serialization failure after the body ran, with no duplicate that won: it stays a `SerializationError`.

On one PostgreSQL primary no duplicate can commit the key while the holder runs, so a 40001 raised inside the
body (a SERIALIZABLE conflict of the body's own statements, here raised by the server itself) is not a lost
race: the unit of work looks for a winner once, finds none, and raises the `SerializationError`, with the
claim rolled back so that a retry executes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text

import idembarrier
from idembarrier import SerializationError, Status
from tests.models import Payment

if TYPE_CHECKING:
    from tests.conftest import Database

RAISE_40001 = "DO $$ BEGIN RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001'; END $$"


async def test_a_serialization_failure_without_a_winner_stays_one_and_the_retry_executes(pg_db: Database) -> None:
    """The body's 40001 raises `SerializationError` (no `KeyInProgressError`: no other record of the key),
    nothing of the attempt stays, and the retry runs the body once."""
    barrier = idembarrier.Barrier(pg_db.sessionmaker)
    with pytest.raises(SerializationError) as caught:
        async with barrier.unit_of_work("k-40001", scope="payments") as uow:
            uow.session.add(Payment(key="k-40001", amount=1))
            await uow.session.flush()
            await uow.session.execute(text(RAISE_40001))
    assert caught.value.sqlstate == "40001"
    assert await pg_db.payments("k-40001") == 0
    assert await barrier.inspect("k-40001", scope="payments") is None

    async with barrier.unit_of_work("k-40001", scope="payments") as uow:
        assert not uow.replayed
        uow.session.add(Payment(key="k-40001", amount=1))
        uow.complete({"ok": True})
    record = await barrier.inspect("k-40001", scope="payments")
    assert record is not None
    assert record.status is Status.COMPLETED
    assert await pg_db.payments("k-40001") == 1

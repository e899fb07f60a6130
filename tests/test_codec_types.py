"""JSONCodec with payments-shaped responses: Decimal, UUID, datetimes, enums, dataclasses, Pydantic models.

What comes back is JSON: a `~decimal.Decimal` is its text (``"10.50"``, exactly as ``str()`` writes it, never
a float), a UUID its text, a datetime its ISO 8601 text as given. The first caller gets what a replay gets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import uuid
import zoneinfo
from typing import TYPE_CHECKING

import pytest
from pydantic import BaseModel

from idembarrier import JSON, Barrier, JSONCodec, ResponseEncodingError
from idembarrier._codec import encode_response
from tests.helpers import new_key
from tests.models import Payment

if TYPE_CHECKING:
    from tests.conftest import Database


class Method(enum.Enum):
    CARD = "card"


@dataclasses.dataclass
class Fee:
    amount: decimal.Decimal
    method: Method


class Receipt(BaseModel):
    amount: decimal.Decimal
    at: dt.datetime


PAYMENT = uuid.UUID("0b0e2f4c-7a9d-4c1e-9f3a-2b5d6e7f8a91")
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
RESPONSE: dict[str, object] = {
    "amount": decimal.Decimal("10.50"),
    "payment": PAYMENT,
    "at": dt.datetime(2025, 3, 1, 13, 30, tzinfo=PARIS),
    "local": dt.datetime(2025, 3, 1, 13, 30),
    "on": dt.date(2025, 3, 1),
    "cutoff": dt.time(17, 0),
    "method": Method.CARD,
    "fee": Fee(decimal.Decimal("0.30"), Method.CARD),
    "receipt": Receipt(amount=decimal.Decimal("1E+1"), at=dt.datetime(2025, 3, 1, 12, 30, tzinfo=dt.UTC)),
}
# What JSONCodec stores and gives back for RESPONSE, first answer and replays alike.
STORED: JSON = {
    "amount": "10.50",
    "payment": "0b0e2f4c-7a9d-4c1e-9f3a-2b5d6e7f8a91",
    "at": "2025-03-01T13:30:00+01:00",
    "local": "2025-03-01T13:30:00",
    "on": "2025-03-01",
    "cutoff": "17:00:00",
    "method": "card",
    "fee": {"amount": "0.30", "method": "card"},
    "receipt": {"amount": "1E+1", "at": "2025-03-01T12:30:00Z"},
}


def test_json_codec_writes_typed_values_as_their_documented_json() -> None:
    """Decimal as its str() text, UUID as text, datetimes as ISO 8601 as given, enums by value, objects by field."""
    codec = JSONCodec()
    assert codec.decode(codec.encode(RESPONSE)) == STORED


async def test_a_typed_response_replays_as_the_first_caller_saw_it(db: Database) -> None:
    """On each engine, the first answer and every replay are the same JSON; no Decimal turns into a float."""
    barrier: Barrier[object] = Barrier(db.sessionmaker, codec=JSONCodec())
    key = new_key()
    async with barrier.unit_of_work(key, scope="payments") as uow:
        uow.session.add(Payment(key=key, amount=1050))
        uow.complete(RESPONSE)
    assert uow.response == STORED
    async with barrier.unit_of_work(key, scope="payments") as uow:
        assert uow.replayed
        assert uow.response == STORED
    assert await db.payments(key) == 1


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        pytest.param({"amount": decimal.Decimal("NaN")}, "Decimal NaN is not a number", id="decimal-nan"),
        pytest.param({"amount": decimal.Decimal("Infinity")}, "not a number", id="decimal-infinity"),
        pytest.param({"tags": {"a"}}, "give a sorted list", id="set"),
        pytest.param({"at": object()}, "not JSON serializable", id="not-json"),
    ],
)
def test_a_response_json_cannot_hold_is_refused_before_anything_is_stored(response: object, reason: str) -> None:
    """A NaN or infinite Decimal, a set or an unknown object raises ResponseEncodingError, naming why."""
    with pytest.raises(ResponseEncodingError, match=reason):
        encode_response(JSONCodec(), response)

"""The first answer is the replay's: what ``complete()`` or ``fail()`` hands the first caller is what every
retry receives, because the first caller gets the response as the codec will give it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from idembarrier import JSON, Barrier, DataclassCodec, ResponseEncodingError, Status
from tests.helpers import new_key

if TYPE_CHECKING:
    from tests.conftest import Database


async def first_and_replay(
    db: Database, response: object, *, status: Status = Status.COMPLETED
) -> tuple[object, object]:
    """Record ``response`` for a new key and return (what the first caller got, what a retry gets)."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(db.engine))
    key = new_key()
    async with barrier.unit_of_work(key, scope="answers") as first:
        (first.complete if status is Status.COMPLETED else first.fail)(response)  # type: ignore[arg-type]
    async with barrier.unit_of_work(key, scope="answers") as again:
        assert again.replayed
    return first.response, again.response


@pytest.mark.parametrize(
    ("response", "stored"),
    [
        pytest.param({1: "a", None: "b"}, {"1": "a", "null": "b"}, id="non-string-keys"),
        pytest.param((1, (2, 3)), [1, [2, 3]], id="tuples"),
        pytest.param({"n": 1.0, "big": 10**20}, {"n": 1.0, "big": 10**20}, id="numbers"),
    ],
)
async def test_first_caller_gets_what_the_replay_gets(db: Database, response: object, stored: JSON) -> None:
    """A response the codec stores differently (int keys, tuples) reaches the first caller as stored."""
    first, replayed = await first_and_replay(db, response)
    assert first == replayed == stored
    assert type(first) is type(replayed)


async def test_recorded_failure_reaches_the_first_caller_as_stored(db: Database) -> None:
    """fail() hands its first caller the stored form too."""
    first, replayed = await first_and_replay(db, {402: ("declined",)}, status=Status.FAILED)
    assert first == replayed == {"402": ["declined"]}


async def test_response_mutated_after_complete_is_not_the_first_answer(pg_db: Database) -> None:
    """Changing the object after complete() changes neither what the first caller gets nor the record."""
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(pg_db.engine))
    key, response = new_key(), {"items": [1]}
    async with barrier.unit_of_work(key, scope="answers") as first:
        first.complete(response)  # type: ignore[arg-type]
        response["items"].append(2)
    response["items"].append(3)
    async with barrier.unit_of_work(key, scope="answers") as again:
        pass
    assert first.response == again.response == {"items": [1]}


@dataclass
class Inner:
    n: int


@dataclass
class Receipt:
    inner: Inner


async def test_dataclass_codec_first_answer_is_the_decoded_one(pg_db: Database) -> None:
    """With DataclassCodec the first caller gets the instance a replay decodes (nested ones as dicts)."""
    barrier = Barrier(async_sessionmaker(pg_db.engine), codec=DataclassCodec(Receipt))
    key, response = new_key(), Receipt(Inner(1))
    async with barrier.unit_of_work(key, scope="answers") as first:
        first.complete(response)
        response.inner.n = 2
    async with barrier.unit_of_work(key, scope="answers") as again:
        pass
    assert first.response == again.response == Receipt({"n": 1})  # type: ignore[arg-type]
    assert first.response is not response


class WriteOnly:
    """A codec that encodes, and cannot read back what it wrote."""

    def encode(self, value: JSON, /) -> bytes:
        return b"\xff"

    def decode(self, data: bytes, /) -> JSON:
        return data.decode()


async def test_response_that_does_not_round_trip_is_refused_at_complete(pg_db: Database) -> None:
    """complete() raises ResponseEncodingError when the codec cannot decode what it encoded; nothing commits."""
    barrier = Barrier(async_sessionmaker(pg_db.engine), codec=WriteOnly())
    key = new_key()
    with pytest.raises(ResponseEncodingError, match="never replay"):
        async with barrier.unit_of_work(key, scope="answers") as uow:
            uow.complete("anything")
    assert await pg_db.records(key) == []


async def test_resolution_that_does_not_round_trip_is_refused(pg_db: Database) -> None:
    """An operator's resolve() refuses a response its codec cannot read back; the record stays unresolved."""
    barrier = Barrier(async_sessionmaker(pg_db.engine), codec=WriteOnly())
    key = new_key()
    with pytest.raises(ResponseEncodingError, match="never replay"):
        await barrier.resolve(key, scope="answers", status=Status.COMPLETED, response="by hand")
    assert await pg_db.records(key) == []

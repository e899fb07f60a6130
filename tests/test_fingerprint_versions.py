"""Fingerprints that survive a deploy: each record keeps the version that fingerprinted it.

A rolling deploy changes what is fingerprinted (here the body normaliser: v2 reads amounts as decimals and
ignores the client's ``sent_at``). Old and new processes serve the same keys at once, on each engine: a
retry is compared by the version that made its record, so no in-flight retry meets a false 422.
"""

from __future__ import annotations

import json
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import MetaData, insert
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from idembarrier import (
    Barrier,
    ConfigurationError,
    FingerprintMismatchError,
    FingerprintVersionError,
    FingerprintVersions,
    InvalidFingerprintError,
    create_sqlite_engine,
    upgrade,
)
from idembarrier._keys import fingerprint_digest
from idembarrier._schema import records_table
from idembarrier.asgi import HTTPResponseCodec, IdempotencyMiddleware
from tests.helpers import fresh_database, new_key, pay
from tests.test_migrations import run_command

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine

    from idembarrier.asgi._types import Receive, Scope, Send
    from tests.conftest import Database


def v1(body: object) -> object:
    """The old normaliser: the body as JSON."""
    assert isinstance(body, bytes)
    return json.loads(body)


def v2(body: object) -> object:
    """The new one: amounts as decimals (10 and 10.00 are one), the client's send time left out."""
    assert isinstance(body, bytes)
    document = json.loads(body, parse_float=Decimal, parse_int=Decimal)
    return {name: value for name, value in document.items() if name != "sent_at"}


OLD = FingerprintVersions(current=1, functions={1: v1})
"""The deploy before the change."""
BOTH = FingerprintVersions(current=1, functions={1: v1, 2: v2})
"""Step one of the change: v2 registered everywhere, still fingerprinting with v1."""
NEW = FingerprintVersions(current=2, functions={1: v1, 2: v2})
"""Step two: v2 current, v1 kept for the records it made."""

BODY = b'{"amount": 10.00, "currency": "EUR", "sent_at": "2026-12-02T10:00:00Z"}'
RESENT = b'{"amount": 10.00, "currency": "EUR", "sent_at": "2026-12-02T10:00:05Z"}'
OTHER = b'{"amount": 12.00, "currency": "EUR", "sent_at": "2026-12-02T10:00:00Z"}'


async def test_a_record_keeps_the_version_that_fingerprinted_it(db: Database) -> None:
    """A record stores the current version; a barrier without versions stores none."""
    versioned, plain = new_key(), new_key()
    await pay(Barrier(db.sessionmaker, fingerprint_versions=NEW), versioned, fingerprint=BODY)
    await pay(Barrier(db.sessionmaker), plain, fingerprint={"amount": 10})
    records = [await Barrier(db.sessionmaker).inspect(key, scope="payments") for key in (versioned, plain)]
    assert [None if record is None else record.fingerprint_version for record in records] == [2, None]


async def test_a_rolling_deploy_that_changes_the_normaliser_gives_no_false_422(db: Database) -> None:
    """Retries cross every pair of versions that run side by side and replay; another request is still a 422."""
    old, both, new = (Barrier(db.sessionmaker, fingerprint_versions=v) for v in (OLD, BOTH, NEW))
    before, during, after = new_key(), new_key(), new_key()
    first = await pay(old, before, fingerprint=BODY)  # made by v1 before the deploy
    assert await pay(both, before, fingerprint=BODY) == first  # old and step-one processes side by side
    assert await pay(new, before, fingerprint=BODY) == first  # step two meets a v1 record: compared by v1
    second = await pay(both, during, fingerprint=BODY)
    assert await pay(old, during, fingerprint=BODY) == second
    assert await pay(new, during, fingerprint=BODY) == second
    third = await pay(new, after, fingerprint=BODY)  # made by v2
    assert await pay(both, after, fingerprint=BODY) == third  # step one already knows v2
    assert await pay(new, after, fingerprint=RESENT) == third  # v2 ignores sent_at
    for key in (before, during, after):
        assert await db.payments(key) == 1
    with pytest.raises(FingerprintMismatchError):
        await pay(new, before, fingerprint=OTHER)  # by v1 too, another amount is another request
    with pytest.raises(FingerprintMismatchError):
        await pay(new, before, fingerprint=RESENT)  # v1 made the record, and v1 counted sent_at


async def test_without_versions_the_same_deploy_turns_retries_into_422(db: Database) -> None:
    """The control: a normaliser changed in place fingerprints a retry differently, and it is refused."""
    key = new_key()
    await pay(Barrier(db.sessionmaker), key, fingerprint=v1(BODY))
    with pytest.raises(FingerprintMismatchError):
        await pay(Barrier(db.sessionmaker), key, fingerprint=v2(BODY))


async def test_a_record_of_an_unregistered_version_is_a_precise_error(db: Database) -> None:
    """A process that does not register the record's version (or has no versions) refuses to guess."""
    key = new_key()
    await pay(Barrier(db.sessionmaker, fingerprint_versions=NEW), key, fingerprint=BODY)
    for barrier in (Barrier(db.sessionmaker, fingerprint_versions=OLD), Barrier(db.sessionmaker)):
        with pytest.raises(FingerprintVersionError, match="fingerprinted by version 2") as caught:
            await pay(barrier, key, fingerprint=BODY)
        assert caught.value.record is not None
        assert caught.value.record.fingerprint_version == 2
    assert await db.payments(key) == 1


async def test_records_made_before_versions_compare_as_the_unversioned_version_says(db: Database) -> None:
    """A record without a version is compared by ``unversioned``, or as the request given when it is unset."""
    key = new_key()
    await pay(Barrier(db.sessionmaker), key, fingerprint=v1(BODY))  # the application normalised it itself
    adopted = FingerprintVersions(current=2, functions={1: v1, 2: v2}, unversioned=1)
    first = await pay(Barrier(db.sessionmaker, fingerprint_versions=adopted), key, fingerprint=BODY)
    with pytest.raises(FingerprintMismatchError):  # compared as given: raw bytes against the parsed body
        await pay(Barrier(db.sessionmaker, fingerprint_versions=NEW), key, fingerprint=BODY)
    assert await pay(Barrier(db.sessionmaker), key, fingerprint=v1(BODY)) == first


async def test_a_lease_is_compared_by_its_records_version(db: Database) -> None:
    """Leased work made by v1 replays for a v2 process: the claim's decision is shared."""
    key = new_key()
    old = Barrier(db.sessionmaker, fingerprint_versions=OLD)
    async with old.leased(key, scope="jobs", fingerprint=BODY) as lease, lease.finish() as uow:
        uow.complete({"done": 1})
    async with Barrier(db.sessionmaker, fingerprint_versions=NEW).leased(key, scope="jobs", fingerprint=BODY) as lease:
        assert lease.replayed
        assert lease.response == {"done": 1}


def test_versions_refuse_what_they_cannot_use() -> None:
    """The current and unversioned versions must be registered; versions count from 1."""
    with pytest.raises(ConfigurationError, match="current fingerprint version 3 is not registered"):
        FingerprintVersions(current=3, functions={1: v1})
    with pytest.raises(ConfigurationError, match="unversioned fingerprint version 2"):
        FingerprintVersions(current=1, functions={1: v1}, unversioned=2)
    with pytest.raises(ConfigurationError, match="ints from 1"):
        FingerprintVersions(current=0, functions={0: v1})


def test_a_fingerprint_function_that_raises_is_an_invalid_fingerprint() -> None:
    """The current version's function runs when the unit of work is made; what it raises is chained."""
    barrier = Barrier(async_sessionmaker(), fingerprint_versions=NEW)  # bound to no engine: no SQL can run
    with pytest.raises(InvalidFingerprintError, match="version 2 raised JSONDecodeError") as caught:
        barrier.unit_of_work(new_key(), scope="payments", fingerprint=b"not json")
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def by_body(normalise: Callable[[bytes], object]) -> Callable[[object], object]:
    """A fingerprint version over the middleware's request: ``normalise`` applied to the body it passed on.

    The middleware, given ``normalise_body=bytes.decode``, hands the barrier the body's text; a body that is
    not UTF-8 stands as its digest, untouched.
    """

    def version(request: object) -> object:
        assert isinstance(request, dict)
        body = request["body"]
        if "normalised" not in body:
            return request
        return {**request, "body": normalise(body["normalised"].encode())}

    return version


HTTP_OLD = FingerprintVersions(current=1, functions={1: by_body(v1)})
HTTP_NEW = FingerprintVersions(current=2, functions={1: by_body(v1), 2: by_body(v2)})


async def test_a_rolling_deploy_behind_the_middleware_gives_no_false_422(db: Database) -> None:
    """Old and new apps behind IdempotencyMiddleware: a retry of the old one's request replays on the new one."""
    runs: list[bytes] = []

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        runs.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": f"charge {len(runs)}".encode()})

    def app(versions: FingerprintVersions) -> httpx.AsyncClient:
        barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec(), fingerprint_versions=versions)
        guarded = IdempotencyMiddleware(route, barrier, scope_of=lambda _: "shop", normalise_body=bytes.decode)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://shop")

    key, headers = new_key(), {"content-type": "application/json"}
    async with app(HTTP_OLD) as old, app(HTTP_NEW) as new:
        first = await old.post("/charges", content=BODY, headers={**headers, "Idempotency-Key": key})
        retried = await new.post("/charges", content=BODY, headers={**headers, "Idempotency-Key": key})
        other = await new.post("/charges", content=OTHER, headers={**headers, "Idempotency-Key": key})
    assert (first.status_code, first.text) == (201, "charge 1")
    assert (retried.status_code, retried.text, retried.headers["idempotent-replayed"]) == (201, "charge 1", "true")
    assert other.status_code == 422
    assert runs == [BODY]


@asynccontextmanager
async def at_revision_0005(engine_name: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A new database of the engine, migrated to 0005 only: the schema before fingerprint versions."""
    async with AsyncExitStack() as stack:
        if engine_name == "postgresql":
            url = await stack.enter_async_context(fresh_database("idembarrier_fv"))
            engine = create_async_engine(url)
        else:
            engine = create_sqlite_engine(f"sqlite+aiosqlite:///{tmp_path / 'before-0006.db'}")
        stack.push_async_callback(engine.dispose)
        await run_command(engine, "upgrade", "0005")
        yield engine


@pytest.mark.parametrize("engine_name", ["postgresql", "sqlite"])
async def test_a_record_stored_before_0006_replays_after_the_upgrade(engine_name: str, tmp_path: Path) -> None:
    """Revision 0006 leaves older records without a version; they replay, unversioned, on each engine."""
    async with at_revision_0005(engine_name, tmp_path) as engine:
        key, table = new_key(), records_table(MetaData())
        row = {"scope": "payments", "key": key, "status": "COMPLETED", "token": uuid.uuid4()}
        row |= {"fingerprint": fingerprint_digest(v1(BODY)), "response": b'{"payment_id":7}'}
        async with engine.begin() as conn:
            await conn.execute(insert(table).values(row))
        await upgrade(engine)
        sessions = async_sessionmaker(engine)
        record = await Barrier(sessions).inspect(key, scope="payments")
        assert record is not None
        assert record.fingerprint_version is None
        adopted = FingerprintVersions(current=2, functions={1: v1, 2: v2}, unversioned=1)
        for barrier, fingerprint in (
            (Barrier(sessions), v1(BODY)),
            (Barrier(sessions, fingerprint_versions=adopted), BODY),
        ):
            async with barrier.unit_of_work(key, scope="payments", fingerprint=fingerprint) as uow:
                assert uow.replayed
                assert uow.response == {"payment_id": 7}


async def test_behind_the_middleware_an_unknown_version_is_a_503_to_retry_elsewhere(db: Database) -> None:
    """An old instance meeting a newer deploy's record answers a 503 problem with Retry-After, never a 500."""
    runs: list[bytes] = []

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        runs.append((await receive()).get("body", b""))
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"charged"})

    def app(versions: FingerprintVersions) -> httpx.AsyncClient:
        barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec(), fingerprint_versions=versions)
        guarded = IdempotencyMiddleware(route, barrier, scope_of=lambda _: "shop", normalise_body=bytes.decode)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://shop")

    key, headers = new_key(), {"content-type": "application/json", "Idempotency-Key": ""}
    headers["Idempotency-Key"] = key
    async with app(HTTP_NEW) as new, app(HTTP_OLD) as old:
        assert (await new.post("/charges", content=BODY, headers=headers)).status_code == 201
        refused = await old.post("/charges", content=BODY, headers=headers)
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("/fingerprint-version-unknown")
    assert int(refused.headers["retry-after"]) >= 1
    assert runs == [BODY]

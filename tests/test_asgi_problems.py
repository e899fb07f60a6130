"""The middleware's own answers, configured: statuses, ``type`` URIs, the body's shape, the Stripe profile,
410 for a key past retention, and a ``Retry-After`` on a 409 in progress that says how long the holder may take.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI

from idembarrier import Barrier, ConfigurationError, OnConflict, StorageError, UnitOfWork
from idembarrier.asgi import (
    HTTPResponse,
    HTTPResponseCodec,
    IdempotencyMiddleware,
    Problem,
    ProblemDetails,
    Problems,
    unit_of_work,
)
from tests.asgi_app import running
from tests.helpers import new_key
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping

    from tests.conftest import Database

Work = Annotated[UnitOfWork[HTTPResponse], Depends(unit_of_work)]


# -- the settings -----------------------------------------------------------------------------------------


def test_defaults_are_the_drafts() -> None:
    """Unconfigured, every problem keeps the draft's status and its type under the default base."""
    problems = Problems()
    assert all(problems.status(p) == p.status and problems.type(p) == p.type for p in Problem)
    assert problems.status(Problem.KEY_EXPIRED) == 409
    assert problems.media_type == "application/problem+json"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"statuses": {Problem.KEY_REUSED: 200}}, "4xx or 5xx"),
        ({"statuses": {Problem.KEY_REUSED: 399}}, "4xx or 5xx"),
        ({"statuses": {Problem.KEY_REUSED: 600}}, "4xx or 5xx"),
        ({"statuses": {Problem.KEY_REUSED: True}}, "4xx or 5xx"),
        ({"statuses": {Problem.KEY_REUSED: "400"}}, "4xx or 5xx"),
        ({"statuses": {"KEY_REUSED": 400}}, "per Problem"),
        ({"statuses": {Problem.KEY_EXPIRED: 410}}, "expired_status"),
        ({"expired_status": 404}, "409 or 410"),
        ({"base_uri": "problems/"}, "absolute URI"),
        ({"base_uri": ""}, "absolute URI"),
        ({"base_uri": None}, "absolute URI"),
        ({"shape": "not callable"}, "shape"),
        ({"media_type": "json"}, "media type"),
        ({"media_type": "application/json\r\nx-evil: 1"}, "media type"),
    ],
)
def test_bad_settings_are_refused_at_construction(options: dict[str, Any], match: str) -> None:
    """A status outside 4xx/5xx, a relative base URI, a hook that is not callable… raise ConfigurationError."""
    with pytest.raises(ConfigurationError, match=match):
        Problems(**options)


def test_the_middleware_refuses_what_is_not_problems() -> None:
    """``problems=`` takes a Problems, checked when the middleware is built."""
    barrier = Barrier(None, codec=HTTPResponseCodec())  # type: ignore[arg-type]  # never reaches a database
    with pytest.raises(ConfigurationError, match="Problems"):
        IdempotencyMiddleware(FastAPI(), barrier, scope_of=lambda r: "s", problems={"base_uri": "x"})  # type: ignore[arg-type]


def test_statuses_are_frozen() -> None:
    """The settings keep their own copy of the statuses, read-only."""
    statuses = {Problem.KEY_REUSED: 409}
    problems = Problems(statuses=statuses)
    statuses[Problem.KEY_REUSED] = 400
    assert problems.status(Problem.KEY_REUSED) == 409
    with pytest.raises(TypeError):
        problems.statuses[Problem.KEY_REUSED] = 400  # type: ignore[index]


# -- through the middleware -------------------------------------------------------------------------------


class Shop:
    """A one-route app behind the middleware on the test's database; its route can be held open."""

    def __init__(self, db: Database, **options: Any) -> None:
        self.entered, self.release = anyio.Event(), anyio.Event()
        self.hold = False
        self.barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec(), wait_timeout=options.pop("wait", 10))
        app = FastAPI()
        app.add_middleware(IdempotencyMiddleware, barrier=self.barrier, scope_of=lambda request: "shop", **options)

        @app.post("/payments", status_code=201)
        async def pay(uow: Work, body: dict[str, int]) -> dict[str, object]:
            uow.session.add(Payment(key=uow.key, amount=body["amount"]))
            if self.hold:
                self.entered.set()
                await self.release.wait()
            return {"paid": body["amount"]}

        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop")

    async def pay(self, key: str, amount: int = 1) -> httpx.Response:
        return await self.client.post("/payments", json={"amount": amount}, headers={"Idempotency-Key": f'"{key}"'})

    async def while_held(self, key: str) -> httpx.Response:
        """Send a duplicate of ``key`` while its first request is inside the route; return the duplicate's answer."""
        self.hold = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.pay, key)
            with anyio.fail_after(20):
                await self.entered.wait()
            duplicate = await self.pay(key)
            self.release.set()
        return duplicate


@pytest.fixture
async def shop_of(db: Database) -> AsyncIterator[Callable[..., Shop]]:
    shops: list[Shop] = []

    def make(**options: Any) -> Shop:
        shops.append(Shop(db, **options))
        return shops[-1]

    yield make
    for shop in shops:
        await shop.client.aclose()


def problem_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, Any] = response.json()
    return document


async def test_a_chosen_status_and_base_uri_answer_the_problem(shop_of: Callable[..., Shop]) -> None:
    """``statuses`` and ``base_uri`` change the answer's status, the document's status and its type URI."""
    problems = Problems(base_uri="https://api.example.com/errors/", statuses={Problem.KEY_REUSED: 409})
    shop, key = shop_of(problems=problems), new_key()
    assert (await shop.pay(key, 1)).status_code == 201
    reused = await shop.pay(key, 2)
    assert reused.status_code == 409
    assert problem_of(reused) == {
        "type": "https://api.example.com/errors/key-reused",
        "title": Problem.KEY_REUSED.title,
        "status": 409,
        "detail": "this key was already used for a different request; use a new key for a new request",
    }


async def test_a_shape_hook_writes_the_body(shop_of: Callable[..., Shop]) -> None:
    """The hook is given the configured details and its document is the body, still problem+json."""
    seen: list[ProblemDetails] = []

    def shape(details: ProblemDetails) -> Mapping[str, object]:
        seen.append(details)
        return {**details.document(), "code": details.problem.name.lower()}

    shop = shop_of(problems=Problems(shape=shape))
    missing = await shop.client.post("/payments", json={"amount": 1})
    assert missing.status_code == 400
    assert problem_of(missing)["code"] == "key_missing"
    assert [(d.problem, d.status, d.type) for d in seen] == [(Problem.KEY_MISSING, 400, Problem.KEY_MISSING.type)]


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(lambda details: 1 / 0, id="raises"),
        pytest.param(lambda details: ["not", "an", "object"], id="not-an-object"),
        pytest.param(lambda details: {"n": float("nan")}, id="not-json"),
    ],
)
async def test_a_failing_shape_hook_is_a_500_problem(
    shop_of: Callable[..., Shop], shape: Callable[[ProblemDetails], Mapping[str, object]], caplog: Any
) -> None:
    """A hook that raises or returns what is no JSON object: a 500 internal-error problem, logged; never a bare 500."""
    shop = shop_of(problems=Problems(shape=shape, media_type="application/json"))
    with caplog.at_level(logging.ERROR, logger="idembarrier.asgi"):
        missing = await shop.client.post("/payments", json={"amount": 1})
    assert missing.status_code == 500
    document = problem_of(missing)
    assert (document["type"], document["status"]) == (Problem.INTERNAL_ERROR.type, 500)
    assert "shape hook failed for key-missing" in caplog.text


async def test_stripe_profile_answers_a_reused_key_400_idempotency_error(shop_of: Callable[..., Shop]) -> None:
    """Problems.stripe(): a reused key is a 400 JSON error object of type idempotency_error; the first replays."""
    shop, key = shop_of(problems=Problems.stripe()), new_key()
    first = await shop.pay(key, 1)
    reused = await shop.pay(key, 2)
    again = await shop.pay(key, 1)
    assert reused.status_code == 400
    assert reused.headers["content-type"] == "application/json"
    assert reused.json() == {
        "error": {
            "type": "idempotency_error",
            "message": "this key was already used for a different request; use a new key for a new request",
        }
    }
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content


async def test_stripe_profile_answers_a_key_in_progress_409(pg_db: Database) -> None:
    """Problems.stripe(): a duplicate while the first runs is a 409 JSON error, with Retry-After."""
    shop = Shop(pg_db, problems=Problems.stripe(), on_conflict=OnConflict.FAIL)
    async with shop.client:
        duplicate = await shop.while_held(new_key())
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["type"] == "invalid_request_error"
    assert duplicate.headers["retry-after"] == "10"


@pytest.mark.parametrize(("wait", "expected"), [(3, "3"), (0.2, "1"), (2.5, "3")])
async def test_retry_after_of_a_unit_of_work_in_progress_is_the_wait_budget(
    pg_db: Database, wait: float, expected: str
) -> None:
    """A unit of work holds its key for as long as its transaction: Retry-After is the wait budget, rounded up."""
    shop = Shop(pg_db, on_conflict=OnConflict.FAIL, wait=wait, retry_after=7)
    async with shop.client:
        duplicate = await shop.while_held(new_key())
    assert duplicate.status_code == 409
    assert problem_of(duplicate)["type"] == Problem.KEY_IN_PROGRESS.type
    assert duplicate.headers["retry-after"] == expected


async def insert_record(db: Database, key: str, status: str, lease: str | None = None) -> None:
    locked_until = "NULL" if lease is None else f"now() + interval '{lease}'"
    async with db.engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO idempotency_keys (scope, key, status, token, locked_until)"
            f" VALUES ('shop', $1, $2, $3, {locked_until})",
            (key, status, uuid.uuid4()),
        )


@pytest.mark.parametrize(("lease", "low", "high"), [("90 seconds", 88, 90), ("-5 seconds", 1, 1)])
async def test_retry_after_of_a_lease_in_progress_is_what_is_left_of_it(
    pg_db: Database, lease: str, low: int, high: int
) -> None:
    """A lease says how long it holds the key: Retry-After is its locked_until less now (at least 1 second)."""
    shop, key = Shop(pg_db, fingerprint=()), new_key()
    await insert_record(pg_db, key, "IN_PROGRESS", lease)
    async with shop.client:
        held = await shop.pay(key)
    assert held.status_code == 409
    assert low <= int(held.headers["retry-after"]) <= high


@pytest.mark.parametrize(("expired_status", "status"), [(None, 409), (410, 410), (409, 409)])
async def test_a_key_past_retention_answers_409_or_410_by_choice(
    pg_db: Database, expired_status: int | None, status: int
) -> None:
    """A compact record (its response gone) answers key-expired: 409 by default, 410 when chosen; nothing runs."""
    problems = Problems() if expired_status is None else Problems(expired_status=expired_status)  # type: ignore[arg-type]
    shop, key = Shop(pg_db, problems=problems, fingerprint=()), new_key()
    await insert_record(pg_db, key, "COMPLETED")
    async with shop.client:
        expired = await shop.pay(key)
    assert expired.status_code == status
    assert problem_of(expired)["type"] == Problem.KEY_EXPIRED.type
    assert problem_of(expired)["status"] == status
    assert await pg_db.payments(key) == 0


async def test_stripe_profile_end_to_end_over_uvicorn(db: Database) -> None:
    """Over a real server, the Stripe profile's answers are JSON error objects with Stripe's statuses."""
    key = new_key()
    async with running(db, problems=Problems.stripe()) as site:
        first = await site.client.post("/payments", json={"amount": 1}, headers={"Idempotency-Key": key})
        reused = await site.client.post("/payments", json={"amount": 2}, headers={"Idempotency-Key": key})
        missing = await site.client.post("/payments", json={"amount": 1})
    assert first.status_code == 201
    assert (reused.status_code, reused.json()["error"]["type"]) == (400, "idempotency_error")
    assert (missing.status_code, missing.json()["error"]["type"]) == (400, "invalid_request_error")
    assert json.loads(missing.content)["error"]["message"].startswith("POST requests must carry")
    assert await db.payments(key) == 1


@pytest.mark.parametrize(
    ("problem", "status", "kind"),
    [
        (Problem.KEY_REUSED, 400, "idempotency_error"),
        (Problem.KEY_IN_PROGRESS, 409, "invalid_request_error"),
        (Problem.KEY_EXPIRED, 409, "invalid_request_error"),
        (Problem.STORAGE_FAILED, 503, "api_error"),
        (Problem.INTERNAL_ERROR, 500, "api_error"),
    ],
)
def test_stripe_profile_types_each_problem(problem: Problem, status: int, kind: str) -> None:
    """Stripe's documented type for a reused key; its general ones, by status class, for the rest."""
    answered, media_type, body = Problems.stripe().render(problem, "why")
    assert (answered, media_type) == (status, "application/json")
    assert json.loads(body) == {"error": {"type": kind, "message": "why"}}


class UnreadableBarrier(Barrier[HTTPResponse]):
    """A barrier whose records cannot be read back: `inspect` fails as a lost database would."""

    async def inspect(self, key: str, *, scope: str) -> None:
        raise StorageError("the database went away")


async def test_a_holder_that_cannot_be_read_leaves_the_wait_budget(pg_db: Database, caplog: Any) -> None:
    """If the holder's lease cannot be read, the 409 still stands, with the wait budget, and a warning."""
    key = new_key()
    await insert_record(pg_db, key, "IN_PROGRESS", "90 seconds")
    barrier = UnreadableBarrier(pg_db.sessionmaker, codec=HTTPResponseCodec(), wait_timeout=4)
    app = IdempotencyMiddleware(FastAPI(), barrier, scope_of=lambda request: "shop", fingerprint=())
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.WARNING, logger="idembarrier.asgi"):
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            held = await client.post("/payments", json={}, headers={"Idempotency-Key": key})
    assert held.status_code == 409
    assert held.headers["retry-after"] == "4"
    assert "reading the holder of a key for Retry-After failed" in caplog.text

"""Webhook guards: each sender's event id is the key, in its own scope, and a redelivery replays.

Payloads in each provider's format, signed as each provider signs (verified by a dependency of the
route, which runs before the key is claimed); in process, on PostgreSQL and SQLite.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncSession

from idembarrier import Barrier
from idembarrier.asgi import (
    GITHUB_RETENTION,
    STANDARD_WEBHOOKS_RETENTION,
    STRIPE_RETENTION,
    HTTPResponse,
    HTTPResponseCodec,
    RouteGuard,
    github_webhooks,
    standard_webhooks,
    stripe_webhooks,
    unit_of_work_session,
)
from tests.models import Payment

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.conftest import Database

Session = Annotated[AsyncSession, Depends(unit_of_work_session)]
SECRET = b"whsec-test-secret"


async def verified_stripe(request: Request) -> None:
    """Stripe's scheme: ``Stripe-Signature: t=<time>,v1=<hex HMAC-SHA256 of "<time>.<body>">``."""
    parts = dict(item.split("=", 1) for item in request.headers.get("stripe-signature", "").split(",") if "=" in item)
    expected = hmac.new(SECRET, f"{parts.get('t')}.".encode() + await request.body(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(parts.get("v1", ""), expected):
        raise HTTPException(status_code=400, detail="bad signature")


async def verified_github(request: Request) -> None:
    """GitHub's scheme: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``."""
    expected = "sha256=" + hmac.new(SECRET, await request.body(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(request.headers.get("x-hub-signature-256", ""), expected):
        raise HTTPException(status_code=401, detail="bad signature")


async def verified_standard(request: Request) -> None:
    """Standard Webhooks: ``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``."""
    signed = f"{request.headers.get('webhook-id')}.{request.headers.get('webhook-timestamp')}.".encode()
    expected = (
        "v1," + base64.b64encode(hmac.new(SECRET, signed + await request.body(), hashlib.sha256).digest()).decode()
    )
    if not hmac.compare_digest(request.headers.get("webhook-signature", ""), expected):
        raise HTTPException(status_code=401, detail="bad signature")


def webhook_app(guard: RouteGuard, verify: Callable[[Request], object]) -> FastAPI:
    """An app whose one webhook endpoint records one payment per event it handles."""
    router = APIRouter(route_class=guard.route, dependencies=[Depends(verify)])

    @router.post("/hook")
    async def hook(request: Request, session: Session) -> dict[str, object]:
        event = json.loads(await request.body())
        session.add(Payment(key=str(event.get("id", "event")), amount=1))
        return {"received": True}

    app = FastAPI()
    app.include_router(router)
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://receiver")


def barrier_of(db: Database) -> Barrier[HTTPResponse]:
    return Barrier(db.sessionmaker, codec=HTTPResponseCodec())


def stripe_delivery(event: dict[str, object], at: int) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event).encode()
    signature = hmac.new(SECRET, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return body, {"Stripe-Signature": f"t={at},v1={signature}", "Content-Type": "application/json"}


def stripe_event() -> dict[str, object]:
    """A Stripe event as Stripe sends it (trimmed): its id names it across every delivery."""
    return {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1718000000,
        "type": "payment_intent.succeeded",
        "livemode": False,
        "pending_webhooks": 1,
        "data": {"object": {"id": "pi_3PQ", "object": "payment_intent", "amount": 2000, "currency": "usd"}},
    }


async def test_a_redelivered_stripe_event_has_one_effect(db: Database) -> None:
    """Stripe retries an event (a new signature each time): the redelivery replays, one payment, its own scope."""
    event = stripe_event()
    async with client(webhook_app(stripe_webhooks(barrier_of(db)), verified_stripe)) as http:
        answers = []
        for at in (int(time.time()), int(time.time()) + 60):
            body, headers = stripe_delivery(event, at)
            answers.append(await http.post("/hook", content=body, headers=headers))
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[1].headers["idempotent-replayed"] == "true"
    assert await db.payments(str(event["id"])) == 1
    assert await db.records() == [("webhooks:stripe", str(event["id"]), "COMPLETED")]


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (json.dumps({"object": "event", "type": "charge.succeeded"}).encode(), "key-missing"),
        (json.dumps({"id": 42, "object": "event"}).encode(), "key-invalid"),
        (json.dumps({"id": "", "object": "event"}).encode(), "key-invalid"),
        (json.dumps(["evt_1"]).encode(), "key-invalid"),
        (b"id=evt_1", "key-invalid"),
    ],
)
async def test_a_stripe_event_without_a_usable_id_is_a_problem(db: Database, payload: bytes, problem: str) -> None:
    """A missing id is a 400 key-missing; one that is no string, or a body that is no JSON object, key-invalid."""
    at = int(time.time())
    signature = hmac.new(SECRET, f"{at}.".encode() + payload, hashlib.sha256).hexdigest()
    headers = {"Stripe-Signature": f"t={at},v1={signature}", "Content-Type": "application/json"}
    async with client(webhook_app(stripe_webhooks(barrier_of(db)), verified_stripe)) as http:
        answer = await http.post("/hook", content=payload, headers=headers)
    assert answer.status_code == 400
    assert answer.json()["type"].endswith(f"/{problem}")
    assert await db.payments() == 0
    assert await db.records() == []


async def test_a_forged_event_is_refused_before_its_id_is_claimed(db: Database) -> None:
    """A bad signature is the verifier's 400: no record, so the genuine delivery of that id runs."""
    event = stripe_event()
    body, headers = stripe_delivery(event, int(time.time()))
    async with client(webhook_app(stripe_webhooks(barrier_of(db)), verified_stripe)) as http:
        forged = await http.post("/hook", content=body, headers={**headers, "Stripe-Signature": "t=1,v1=00"})
        assert await db.records() == []
        genuine = await http.post("/hook", content=body, headers=headers)
    assert (forged.status_code, genuine.status_code) == (400, 200)
    assert await db.payments(str(event["id"])) == 1


def github_delivery(delivery: str, payload: dict[str, object]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    return body, {
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Event": "push",
        "X-GitHub-Hook-ID": "292430182",
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest(),
        "Content-Type": "application/json",
    }


async def test_a_redelivered_github_delivery_has_one_effect(db: Database) -> None:
    """A redelivery keeps its X-GitHub-Delivery GUID: one effect; another delivery is another key."""
    first, other = str(uuid.uuid4()), str(uuid.uuid4())
    payload: dict[str, object] = {"id": "push", "ref": "refs/heads/main", "repository": {"full_name": "o/r"}}
    async with client(webhook_app(github_webhooks(barrier_of(db)), verified_github)) as http:
        answers = [
            await http.post("/hook", content=body, headers=headers)
            for body, headers in (
                github_delivery(first, payload),
                github_delivery(first, payload),
                github_delivery(other, payload),
            )
        ]
        body, headers = github_delivery(first, payload)
        del headers["X-GitHub-Delivery"]
        missing = await http.post("/hook", content=body, headers=headers)
        malformed = await http.post("/hook", content=body, headers={**headers, "X-GitHub-Delivery": "a b"})
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers.get("idempotent-replayed") for a in answers] == [None, "true", None]
    assert await db.payments("push") == 2
    assert sorted(r[1] for r in await db.records()) == sorted([first, other])
    assert {r[0] for r in await db.records()} == {"webhooks:github"}
    assert (missing.status_code, missing.json()["type"].rsplit("/", 1)[1]) == (400, "key-missing")
    assert (malformed.status_code, malformed.json()["type"].rsplit("/", 1)[1]) == (400, "key-invalid")


def standard_delivery(message: str, payload: dict[str, object], at: int) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    signed = f"{message}.{at}.".encode() + body
    signature = base64.b64encode(hmac.new(SECRET, signed, hashlib.sha256).digest()).decode()
    return body, {
        "webhook-id": message,
        "webhook-timestamp": str(at),
        "webhook-signature": f"v1,{signature}",
        "Content-Type": "application/json",
    }


async def test_a_retried_standard_webhook_has_one_effect(db: Database) -> None:
    """A retry keeps its webhook-id (a new timestamp, a new signature): one effect; no webhook-id is a 400."""
    message = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
    payload: dict[str, object] = {"type": "invoice.paid", "timestamp": "2024-06-10T12:00:00Z", "data": {"id": "in_1"}}
    async with client(webhook_app(standard_webhooks(barrier_of(db)), verified_standard)) as http:
        answers = []
        for at in (1718020800, 1718020805):
            body, headers = standard_delivery(message, payload, at)
            answers.append(await http.post("/hook", content=body, headers=headers))
        body, headers = standard_delivery(message, payload, 1718020900)
        del headers["webhook-id"]
        missing = await http.post("/hook", content=body, headers=headers)
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[1].headers["idempotent-replayed"] == "true"
    assert await db.payments("event") == 1
    assert await db.records() == [("webhooks:standard", message, "COMPLETED")]
    assert missing.status_code == 400


async def kept_for(db: Database) -> dict[str, timedelta]:
    """How long each scope's records replay their response: from completion to the response's horizon."""
    sql = "SELECT scope, completed_at, response_expires_at FROM idempotency_keys"
    async with db.engine.connect() as conn:
        rows: list[Any] = list((await conn.exec_driver_sql(sql)).all())

    def moment(value: object) -> datetime:
        return datetime.fromisoformat(value) if isinstance(value, str) else value  # type: ignore[return-value]

    return {str(row[0]): moment(row[2]) - moment(row[1]) for row in rows}


async def test_each_sender_keeps_its_responses_past_its_retry_window(db: Database) -> None:
    """Stripe's records replay for 30 days (3 days of retries, 30 of manual resends), GitHub's for 14 (a hand
    redelivery within 7 days), Standard Webhooks' for 7 (a schedule of about 28 hours)."""
    barrier = barrier_of(db)
    stripe_body, stripe_headers = stripe_delivery(stripe_event(), int(time.time()))
    github_body, github_headers = github_delivery(str(uuid.uuid4()), {"id": "push"})
    standard_body, standard_headers = standard_delivery("msg_1", {"type": "ping"}, 1718020800)
    for guard, verify, body, headers in (
        (stripe_webhooks(barrier), verified_stripe, stripe_body, stripe_headers),
        (github_webhooks(barrier), verified_github, github_body, github_headers),
        (standard_webhooks(barrier), verified_standard, standard_body, standard_headers),
    ):
        async with client(webhook_app(guard, verify)) as http:
            assert (await http.post("/hook", content=body, headers=headers)).status_code == 200
    kept = await kept_for(db)
    assert kept.keys() == {"webhooks:stripe", "webhooks:github", "webhooks:standard"}
    for scope, retention in (
        ("webhooks:stripe", timedelta(days=30)),
        ("webhooks:github", timedelta(days=14)),
        ("webhooks:standard", timedelta(days=7)),
    ):
        assert abs(kept[scope] - retention) < timedelta(minutes=1), scope
    assert {scope: round(kept[scope] / timedelta(days=1)) for scope in kept} == {
        "webhooks:stripe": STRIPE_RETENTION.days,
        "webhooks:github": GITHUB_RETENTION.days,
        "webhooks:standard": STANDARD_WEBHOOKS_RETENTION.days,
    }

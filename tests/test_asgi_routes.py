"""Per-route guards (`RouteGuard`): a route class that claims the key in the scope FastAPI's dependencies resolve.

In process, through httpx's ASGI transport, on a real database (PostgreSQL and SQLite).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import anyio
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware

from idembarrier import Barrier, ConfigurationError, JSONCodec, OnConflict
from idembarrier.asgi import (
    HTTPResponse,
    HTTPResponseCodec,
    IdempotencyMiddleware,
    RouteGuard,
    exempt,
    header,
    json_field,
    unit_of_work_session,
)
from tests.helpers import Boom, lock_waiters, new_key
from tests.models import Payment

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from idembarrier.asgi._types import Message, Receive, Scope, Send
    from tests.conftest import Database

Session = Annotated[AsyncSession, Depends(unit_of_work_session)]
USERS = {"token-alice": "alice", "token-bob": "bob"}


def current_user(authorization: Annotated[str | None, Header()] = None) -> str:
    """The authenticated principal, as an application's own FastAPI dependency resolves it."""
    if authorization not in USERS:
        raise HTTPException(status_code=401, detail="not authenticated")
    return USERS[authorization]


def tenant_of(user: Annotated[str, Depends(current_user)]) -> str:
    """The key's scope: the principal's tenant, from the dependency above."""
    return f"tenant:{user}"


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://shop")


def payments_router(guard: RouteGuard, crashes: list[str] | None = None) -> APIRouter:
    """A router of guarded routes: one that pays, one that fails while a crash is queued, one exempt."""
    router = APIRouter(route_class=guard.route)

    @router.post("/payments", status_code=201)
    async def pay(session: Session) -> dict[str, object]:
        payment = Payment(key="route", amount=1)
        session.add(payment)
        await session.flush()
        return {"id": payment.id}

    @router.post("/crash", status_code=201)
    async def crash(session: Session) -> dict[str, object]:
        session.add(Payment(key="crash", amount=1))
        await session.flush()
        if crashes:
            raise Boom(crashes.pop())
        return {"ok": True}

    @router.post("/search")
    @exempt
    async def search() -> dict[str, object]:
        return {"results": []}

    @router.get("/payments")
    async def listing() -> dict[str, object]:
        return {"payments": []}

    return router


def app_with(guard: RouteGuard, crashes: list[str] | None = None) -> FastAPI:
    app = FastAPI()
    app.include_router(payments_router(guard, crashes))
    return app


def alice(key: str) -> dict[str, str]:
    return {"Authorization": "token-alice", "Idempotency-Key": key}


async def test_a_guarded_route_replays(db: Database) -> None:
    """A retry with the key replays the route's response; the route wrote once."""
    guard = RouteGuard(Barrier(db.sessionmaker, codec=HTTPResponseCodec()), scope=tenant_of)
    key = new_key()
    async with client(app_with(guard)) as http:
        first = await http.post("/payments", headers=alice(key), json={})
        again = await http.post("/payments", headers=alice(key), json={})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.content == first.content
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert await db.payments("route") == 1
    assert await db.records(key) == [("tenant:alice", key, "COMPLETED")]


async def test_the_scope_comes_from_the_authenticated_principal(db: Database) -> None:
    """Two principals sending one key make two records, each in its principal's scope, and two payments."""
    guard = RouteGuard(Barrier(db.sessionmaker, codec=HTTPResponseCodec()), scope=Depends(tenant_of))
    key = new_key()
    async with client(app_with(guard)) as http:
        for token in ("token-alice", "token-bob", "token-alice"):
            answer = await http.post("/payments", headers={"Authorization": token, "Idempotency-Key": key}, json={})
            assert answer.status_code == 201
    assert await db.records(key) == [("tenant:alice", key, "COMPLETED"), ("tenant:bob", key, "COMPLETED")]
    assert await db.payments("route") == 2


async def test_an_unauthenticated_request_is_refused_before_any_claim(db: Database) -> None:
    """The scope's dependency refuses (401): the route did not run and no key was claimed."""
    guard = RouteGuard(Barrier(db.sessionmaker, codec=HTTPResponseCodec()), scope=tenant_of)
    key = new_key()
    async with client(app_with(guard)) as http:
        answer = await http.post("/payments", headers={"Idempotency-Key": key}, json={})
    assert answer.status_code == 401
    assert await db.records() == []
    assert await db.payments() == 0


async def test_a_guarded_route_without_the_key_is_a_problem(db: Database) -> None:
    """The key is required by default: 400 key-missing; an unusable one, 400 key-invalid; nothing runs."""
    guard = RouteGuard(Barrier(db.sessionmaker, codec=HTTPResponseCodec()), scope=tenant_of)
    async with client(app_with(guard)) as http:
        missing = await http.post("/payments", headers={"Authorization": "token-alice"}, json={})
        invalid = await http.post("/payments", headers=alice('"open'), json={})
    assert (missing.status_code, invalid.status_code) == (400, 400)
    assert missing.json()["type"].endswith("/key-missing")
    assert invalid.json()["type"].endswith("/key-invalid")
    assert missing.headers["content-type"] == "application/problem+json"
    assert await db.payments() == 0


async def test_exempt_and_unguarded_methods_pass_through(db: Database) -> None:
    """An exempt route and a GET of the guard's router run without a key, and leave no record."""
    guard = RouteGuard(Barrier(db.sessionmaker, codec=HTTPResponseCodec()), scope=tenant_of)
    async with client(app_with(guard)) as http:
        searched = await http.post("/search", json={})
        listed = await http.get("/payments")
    assert (searched.status_code, listed.status_code) == (200, 200)
    assert await db.records() == []


async def test_a_keyless_request_passes_when_the_key_is_optional(db: Database) -> None:
    """required=False: without a key the route runs unguarded; one that asks for the unit of work is a 400."""
    guard = RouteGuard(Barrier(db.sessionmaker, codec=HTTPResponseCodec()), scope=tenant_of, required=False)
    router = APIRouter(route_class=guard.route)

    @router.post("/notes")
    async def note() -> dict[str, object]:
        return {"noted": True}

    router.include_router(payments_router(guard))
    app = FastAPI()
    app.include_router(router)
    async with client(app) as http:
        noted = await http.post("/notes", headers={"Authorization": "token-alice"}, json={})
        needs = await http.post("/payments", headers={"Authorization": "token-alice"}, json={})
        keyed = await http.post("/payments", headers=alice(key := new_key()), json={})
    assert noted.status_code == 200
    assert needs.status_code == 400
    assert needs.json()["type"].endswith("/key-missing")
    assert needs.headers["idempotency-stored"] == "false"
    assert keyed.status_code == 201
    assert await db.records() == [("tenant:alice", key, "COMPLETED")]


async def test_a_failing_route_records_nothing_and_its_retry_runs(db: Database) -> None:
    """The route raises: its writes roll back, a 500 problem marked not stored; the retry runs and is recorded."""
    guard = RouteGuard(Barrier(db.sessionmaker, codec=HTTPResponseCodec()), scope=tenant_of)
    key = new_key()
    async with client(app_with(guard, crashes=["first try"])) as http:
        failed = await http.post("/crash", headers=alice(key), json={})
        retried = await http.post("/crash", headers=alice(key), json={})
    assert failed.status_code == 500
    assert failed.json()["type"].endswith("/application-error")
    assert failed.headers["idempotency-stored"] == "false"
    assert retried.status_code == 201
    assert await db.payments("crash") == 1
    assert await db.records(key) == [("tenant:alice", key, "COMPLETED")]


async def test_another_header_carries_the_key(db: Database) -> None:
    """key=header("X-Request-Id"): that header is the key; the Idempotency-Key header means nothing here."""
    barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    guard = RouteGuard(barrier, scope=tenant_of, key=header("X-Request-Id"))
    key = new_key()
    async with client(app_with(guard)) as http:
        plain = await http.post("/payments", headers=alice(key), json={})
        first = await http.post("/payments", headers={"Authorization": "token-alice", "X-Request-Id": key}, json={})
        again = await http.post("/payments", headers={"Authorization": "token-alice", "X-Request-Id": key}, json={})
    assert plain.status_code == 400
    assert (first.status_code, again.headers["idempotent-replayed"]) == (201, "true")
    assert await db.payments("route") == 1


async def test_the_middleware_leaves_exempt_and_route_guarded_routes_alone(db: Database) -> None:
    """Under IdempotencyMiddleware, an exempt route needs no key, and a route its guard guards is claimed once."""
    barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    guard = RouteGuard(barrier, scope=tenant_of)
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, barrier=barrier, scope_of=lambda request: "middleware")

    @app.post("/export")
    @exempt
    async def export() -> dict[str, object]:
        return {"exported": True}

    @app.post("/orders", status_code=201)
    async def order(session: Session) -> dict[str, object]:
        session.add(Payment(key="order", amount=1))
        return {"ordered": True}

    app.include_router(payments_router(guard), prefix="/v1")
    key = new_key()
    async with client(app) as http:
        exported = await http.post("/export", json={})
        guarded = [await http.post("/v1/payments", headers=alice(key), json={}) for _ in range(2)]
        ordered = await http.post("/orders", headers={"Idempotency-Key": key}, json={})
        unkeyed = await http.post("/orders", json={})
    assert exported.status_code == 200
    assert [a.status_code for a in guarded] == [201, 201]
    assert guarded[1].headers["idempotent-replayed"] == "true"
    assert ordered.status_code == 201
    assert unkeyed.status_code == 400  # the middleware still guards its other routes
    assert await db.records(key) == [("middleware", key, "COMPLETED"), ("tenant:alice", key, "COMPLETED")]
    assert await db.payments("route") == 1


def offline_barrier() -> Barrier[HTTPResponse]:
    """A barrier that never connects: building a guard runs no SQL."""
    return Barrier(async_sessionmaker(create_async_engine("sqlite+aiosqlite://")), codec=HTTPResponseCodec())


def test_a_guard_needs_a_barrier_of_http_responses() -> None:
    """A barrier with another codec is refused when the guard is built, not on a request."""
    barrier = Barrier(async_sessionmaker(create_async_engine("sqlite+aiosqlite://")), codec=JSONCodec())
    with pytest.raises(ConfigurationError, match="HTTPResponseCodec"):
        RouteGuard(barrier, scope="shop")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scope": 42}, "scope must be"),
        ({"scope": "shop", "key": "Idempotency-Key"}, "key extractor"),
        ({"scope": "shop", "store_statuses": {500}}, "only 4xx"),
        ({"scope": "shop", "fingerprint": ("headers",)}, "unknown fingerprint parts"),
    ],
)
def test_a_guard_refuses_unusable_options(options: dict[str, object], message: str) -> None:
    """Each option is checked when the guard is built, with an error naming it."""
    with pytest.raises(ConfigurationError, match=message):
        RouteGuard(offline_barrier(), **options)  # type: ignore[arg-type]


def test_header_needs_a_name() -> None:
    """header() refuses an empty or non-ASCII name."""
    with pytest.raises(ConfigurationError, match="header"):
        header("Clé")


def held_app(guard: RouteGuard, entered: anyio.Event, release: anyio.Event) -> FastAPI:
    """A guarded route that holds its request inside its body, its write uncommitted, until ``release``."""
    router = APIRouter(route_class=guard.route)

    @router.post("/held", status_code=201)
    async def held(session: Session) -> dict[str, object]:
        session.add(Payment(key="held", amount=1))
        await session.flush()
        entered.set()
        await release.wait()
        return {"held": True}

    app = FastAPI()
    app.include_router(router)
    return app


@pytest.mark.parametrize("on_conflict", [OnConflict.WAIT, OnConflict.FAIL])
async def test_a_concurrent_duplicate_waits_or_is_told_to_retry(pg_db: Database, on_conflict: OnConflict) -> None:
    """A duplicate sent while the first request runs: WAIT replays the first's response once it commits,
    FAIL answers 409 key-in-progress with Retry-After at once; the route ran once either way."""
    barrier = Barrier(pg_db.sessionmaker, codec=HTTPResponseCodec())
    guard = RouteGuard(barrier, scope=tenant_of, on_conflict=on_conflict)
    entered, release = anyio.Event(), anyio.Event()
    key = new_key()
    answers: dict[str, httpx.Response] = {}
    async with client(held_app(guard, entered, release)) as http:

        async def send(name: str) -> None:
            answers[name] = await http.post("/held", headers=alice(key), json={})

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send, "first")
            await entered.wait()
            if on_conflict is OnConflict.FAIL:
                await send("duplicate")  # answered while the first still holds the key
                release.set()
            else:
                tasks.start_soon(send, "duplicate")
                await lock_waiters(pg_db)  # the duplicate waits on the first's claim, inside PostgreSQL
                release.set()
    assert answers["first"].status_code == 201
    duplicate = answers["duplicate"]
    if on_conflict is OnConflict.FAIL:
        assert duplicate.status_code == 409
        assert duplicate.json()["type"].endswith("/key-in-progress")
        assert int(duplicate.headers["retry-after"]) >= 1
    else:
        assert (duplicate.status_code, duplicate.content) == (201, answers["first"].content)
        assert duplicate.headers["idempotent-replayed"] == "true"
    assert await pg_db.payments("held") == 1


async def test_the_middleware_wrapped_around_the_app_still_leaves_route_guards_alone(db: Database) -> None:
    """IdempotencyMiddleware(app) from outside (no scope["app"] yet): it finds the routes through the app."""
    barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    inner = app_with(RouteGuard(barrier, scope=tenant_of))
    outer = IdempotencyMiddleware(inner, barrier, scope_of=lambda request: "middleware")
    key = new_key()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://shop") as http:
        searched = await http.post("/search", json={})
        answers = [await http.post("/payments", headers=alice(key), json={}) for _ in range(2)]
    assert searched.status_code == 200
    assert [a.status_code for a in answers] == [201, 201]
    assert await db.records(key) == [("tenant:alice", key, "COMPLETED")]


async def test_two_guards_on_one_request_are_a_problem_not_a_double_claim(db: Database) -> None:
    """A middleware that cannot see the routes (behind an opaque wrapper) and a route guard: a 500 problem
    naming neither key twice; nothing ran, nothing recorded but the middleware's claim rolled back."""
    barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    inner = app_with(RouteGuard(barrier, scope=tenant_of))

    async def opaque(scope: Scope, receive: Receive, send: Send) -> None:
        await inner(scope, receive, send)

    outer = IdempotencyMiddleware(opaque, barrier, scope_of=lambda request: "middleware")
    transport = httpx.ASGITransport(app=outer, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
        answer = await http.post("/payments", headers=alice(new_key()), json={})
    assert answer.status_code == 500
    assert answer.json()["type"].endswith("/internal-error")
    assert await db.records() == []
    assert await db.payments() == 0


async def test_the_middleware_honours_exempt_inside_a_mounted_app(db: Database) -> None:
    """A route marked exempt in a mounted sub-application needs no key under the outer app's middleware."""
    barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    sub = FastAPI()

    @sub.post("/export")
    @exempt
    async def export() -> dict[str, object]:
        return {"exported": True}

    @sub.post("/guarded")
    async def guarded() -> dict[str, object]:
        return {"guarded": True}

    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, barrier=barrier, scope_of=lambda request: "shop")
    app.mount("/sub", sub)
    async with client(app) as http:
        exported = await http.post("/sub/export", json={})
        refused = await http.post("/sub/guarded", json={})
    assert (exported.status_code, refused.status_code) == (200, 400)


def test_a_route_mixing_guarded_and_unguarded_methods_is_refused_at_start_up() -> None:
    """A GET-and-POST route on a guard's router: ConfigurationError when the route is declared, not a 401 on GET."""
    guard = RouteGuard(offline_barrier(), scope=tenant_of)
    router = APIRouter(route_class=guard.route)

    async def both() -> dict[str, object]:
        return {"ok": True}

    with pytest.raises(ConfigurationError, match="mixes guarded and unguarded methods"):
        router.add_api_route("/both", both, methods=["GET", "POST"])
    router.add_api_route("/both", exempt(both), methods=["GET", "POST"])  # exempt: one route, unguarded


async def test_a_body_over_the_limit_is_a_413_and_a_vanished_client_gets_nothing(db: Database) -> None:
    """max_body_bytes: a larger body is a 413 problem; a client gone before its body was read is not answered."""
    guard = RouteGuard(Barrier(db.sessionmaker, codec=HTTPResponseCodec()), scope=tenant_of, max_body_bytes=8)
    app = app_with(guard)
    async with client(app) as http:
        large = await http.post("/payments", headers=alice(new_key()), json={"amount": 1234567})
    assert large.status_code == 413
    assert large.json()["type"].endswith("/request-too-large")
    sent: list[Message] = []

    async def gone() -> Message:
        return {"type": "http.disconnect"}

    async def record(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/payments",
        "raw_path": b"/payments",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"idempotency-key", b"k-1"), (b"authorization", b"token-alice")],
        "server": ("shop", 80),
        "client": ("127.0.0.1", 1),
    }
    await app(scope, gone, record)
    assert sent == []
    assert await db.records() == []


def test_json_field_needs_a_path() -> None:
    """json_field() refuses an empty path or an empty member name."""
    for path in ((), ("data", "")):
        with pytest.raises(ConfigurationError, match="json_field"):
            json_field(*path)


class TokenBackend(AuthenticationBackend):
    """Starlette's authentication: the Authorization header names the user."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        user = USERS.get(conn.headers.get("authorization", ""))
        return None if user is None else (AuthCredentials(["authenticated"]), SimpleUser(user))


def principal(request: Request) -> str:
    """The scope from what Starlette's AuthenticationMiddleware left on the request."""
    if not request.user.is_authenticated:
        raise HTTPException(status_code=401, detail="not authenticated")
    return f"user:{request.user.display_name}"


async def test_the_middleware_order_cannot_hide_the_principal_from_a_route_guard(db: Database) -> None:
    """IdempotencyMiddleware added after AuthenticationMiddleware runs first (Starlette's reverse order), so its
    scope_of could not read the user; a route guard's scope is a dependency, resolved after every middleware."""
    barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    app = app_with(RouteGuard(barrier, scope=principal))
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    app.add_middleware(IdempotencyMiddleware, barrier=barrier, scope_of=lambda request: str(request.scope["user"]))
    key = new_key()
    async with client(app) as http:
        answers = [await http.post("/payments", headers=alice(key), json={}) for _ in range(2)]
    assert [a.status_code for a in answers] == [201, 201]
    assert answers[1].headers["idempotent-replayed"] == "true"
    assert await db.records(key) == [("user:alice", key, "COMPLETED")]

"""The HTTP integration's parts: the response codec, options, and ASGI edge cases (the header: test_asgi_header).

The edge cases call the middleware in process, as an ASGI server would, on a real database: they are
about messages no well-behaved server or client produces (and so no HTTP client can send), not about
concurrency, which `test_asgi` covers over real sockets.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from starlette.requests import Request

import idembarrier.asgi
from idembarrier import Barrier, ConfigurationError, UnitOfWorkError
from idembarrier.asgi import (
    HTTPResponse,
    HTTPResponseCodec,
    IdempotencyMiddleware,
    Problem,
    RequestHead,
    unit_of_work,
)
from idembarrier.asgi._request import request_fingerprint
from tests.models import Payment

if TYPE_CHECKING:
    from idembarrier.asgi._types import Message, Receive, Scope, Send
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent

# -- the stored response ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        HTTPResponse(status=201, headers=(("content-type", "application/json"),), body=b'{"a":\n1}'),
        HTTPResponse(status=402, body=bytes(range(256))),
        HTTPResponse(status=200, headers=(("location", "/x"),), body_stored=False),
        HTTPResponse(status=204, headers=(("etag", '"ä\\n"'),)),
    ],
)
def test_codec_round_trips_a_response(response: HTTPResponse) -> None:
    """The codec gives back status, headers, body (newlines and binary included) and the stored flag."""
    codec = HTTPResponseCodec()
    assert codec.decode(codec.encode(response)) == response


def test_codec_keeps_a_json_body_readable() -> None:
    """The record holds the body as sent, after one line of JSON: no base64."""
    data = HTTPResponseCodec().encode(HTTPResponse(status=201, body=b'{"id":1}'))
    assert data == b'{"v":1,"status":201,"headers":[],"body_stored":true}\n{"id":1}'


@pytest.mark.parametrize("data", [b'{"v":1,"status":201}', b'{"v":2,"status":201,"headers":[]}\n', b"[1]\n"])
def test_codec_refuses_what_it_did_not_write(data: bytes) -> None:
    """Bytes that are not the codec's own format raise ValueError."""
    with pytest.raises(ValueError, match="not an HTTP response"):
        HTTPResponseCodec().decode(data)


def test_codec_refuses_other_values() -> None:
    """Only an HTTPResponse is encoded."""
    with pytest.raises(TypeError, match="expected HTTPResponse"):
        HTTPResponseCodec().encode({"status": 200})  # type: ignore[arg-type]


# -- options and request parts ----------------------------------------------------------------------------


async def inner_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("not called")


def public(request: RequestHead) -> str:
    return "public"


def offline_barrier() -> Barrier[HTTPResponse]:
    """A barrier that never connects: building a middleware runs no SQL."""
    return Barrier(async_sessionmaker(create_async_engine("sqlite+aiosqlite://")), codec=HTTPResponseCodec())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stored_headers": {"Content-Type", "Set-Cookie"}}, "never stored: set-cookie"),
        ({"fingerprint": ("method", "headers")}, "unknown fingerprint parts"),
        ({"store_statuses": {402, 500}}, r"store_statuses lists \[500\]"),
        ({"store_statuses": {201}}, "only 4xx"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"max_response_bytes": 1.5}, "max_response_bytes"),
        ({"retry_after": -1}, "retry_after"),
        ({"header": ""}, "header"),
        ({"header": "Clé"}, "header"),
    ],
)
def test_middleware_refuses_unusable_options(options: dict[str, object], message: str) -> None:
    """Each option is checked when the middleware is built, with an error naming it."""
    barrier = offline_barrier()
    with pytest.raises(ConfigurationError, match=message):
        IdempotencyMiddleware(inner_app, barrier, scope_of=public, **options)  # type: ignore[arg-type]


def test_middleware_needs_a_callable_scope() -> None:
    """scope_of must be a callable of the request."""
    barrier = offline_barrier()
    with pytest.raises(ConfigurationError, match="scope_of"):
        IdempotencyMiddleware(inner_app, barrier, scope_of="tenant")  # type: ignore[arg-type]


def test_middleware_is_an_asgi_app_that_wraps_one() -> None:
    """The middleware is itself an ASGI application, and so can wrap (or be wrapped by) any other."""
    from idembarrier.asgi import _types

    inner: _types.ASGIApp = inner_app
    outer: _types.ASGIApp = IdempotencyMiddleware(inner, offline_barrier(), scope_of=public)
    assert IdempotencyMiddleware(outer, offline_barrier(), scope_of=public).app is outer


def test_middleware_normalises_its_options() -> None:
    """Methods are upper-cased and stored headers lower-cased."""
    barrier = offline_barrier()
    middleware = IdempotencyMiddleware(
        inner_app, barrier, scope_of=public, methods=["post", "put"], stored_headers=["Location"]
    )
    assert middleware.settings.methods == {"POST", "PUT"}
    assert middleware.settings.stored_headers == {"location"}


def head_of(**scope: object) -> RequestHead:
    base: dict[str, object] = {"type": "http", "method": "post", "path": "/p", "query_string": b"a=1", "headers": []}
    return RequestHead.from_scope({**base, **scope})


def test_request_head_joins_repeated_headers() -> None:
    """Header names are lower-cased and a repeated header's values joined, as HTTP combines them."""
    head = head_of(headers=[(b"X-Tenant", b"a"), (b"x-tenant", b"b"), (b"Accept", b"*/*")])
    assert head.method == "POST"
    assert head.query == "a=1"
    assert head.headers == {"x-tenant": "a, b", "accept": "*/*"}


def test_fingerprint_takes_only_the_chosen_parts() -> None:
    """No part chosen means no fingerprint; each chosen part appears in the fingerprinted document."""
    head = head_of()
    assert request_fingerprint(head, b"x", frozenset(), None) is None
    document = request_fingerprint(head, b"x", frozenset({"method", "query"}), None)
    assert document == {"method": "POST", "query": "a=1"}


def test_fingerprint_normaliser_may_return_bytes_or_fail() -> None:
    """Normalised bytes stand for the body; a ValueError leaves the raw body standing for itself."""
    head, parts = head_of(), frozenset({"body"})

    def fail(body: bytes) -> object:
        raise ValueError("not JSON")

    raw = request_fingerprint(head, b"abc", parts, None)
    assert request_fingerprint(head, b"abc", parts, fail) == raw
    assert request_fingerprint(head, b"ABC", parts, lambda body: body.lower()) == raw


def test_problem_types_are_distinct_and_stable() -> None:
    """Each problem has its own type URI under idembarrier.dev, and the status the draft prescribes."""
    assert len({p.type for p in Problem}) == len(Problem)
    assert all(p.type.startswith("https://idembarrier.dev/problems/") for p in Problem)
    statuses = {p.name: p.status for p in Problem}
    assert statuses == {
        "KEY_MISSING": 400,
        "KEY_INVALID": 400,
        "KEY_REUSED": 422,
        "KEY_IN_PROGRESS": 409,
        "KEY_UNRESOLVED": 409,
        "KEY_EXPIRED": 409,
        "REQUEST_TOO_LARGE": 413,
        "BODY_INVALID": 400,
        "NOT_AUTHENTICATED": 401,
        "FORBIDDEN": 403,
        "OUTCOME_UNKNOWN": 503,
        "CONNECTION_LOST": 503,
        "TRANSACTION_ABORTED": 503,
        "STORAGE_FAILED": 503,
        "FINGERPRINT_VERSION_UNKNOWN": 503,
        "INTERNAL_ERROR": 500,
        "APPLICATION_ERROR": 500,
    }


def test_dependency_without_a_guarded_request_raises() -> None:
    """The FastAPI dependency raises UnitOfWorkError when the middleware opened no unit of work."""
    request = Request({"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""})
    with pytest.raises(UnitOfWorkError, match="not guarded"):
        unit_of_work(request)


# -- the public namespace and its imports -----------------------------------------------------------------


def test_asgi_exports_are_documented() -> None:
    """Each class and function in `idembarrier.asgi.__all__` carries a docstring (the names: test_exported_members)."""
    for name in idembarrier.asgi.__all__:
        member = getattr(idembarrier.asgi, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert (member.__doc__ or "").strip(), name


def test_constants_are_documented() -> None:
    """Each exported constant is followed by a docstring in its module."""
    documented = set()
    for module in ("_response", "_state", "_request"):
        body = ast.parse((ROOT / "idembarrier" / "asgi" / f"{module}.py").read_text()).body
        for statement, following in itertools.pairwise(body):
            if isinstance(statement, ast.Assign | ast.AnnAssign) and isinstance(following, ast.Expr):
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                documented |= {t.id for t in targets if isinstance(t, ast.Name)}
    assert {"DEFAULT_STORED_HEADERS", "NEVER_STORED_HEADERS", "STATE_KEY", "FingerprintPart"} <= documented


@pytest.mark.parametrize(
    ("module", "absent"),
    [("idembarrier", ("starlette", "fastapi", "httpx", "uvicorn")), ("idembarrier.asgi", ("fastapi", "uvicorn"))],
)
def test_imports_stay_optional(module: str, absent: tuple[str, ...]) -> None:
    """`idembarrier` imports no web framework, and `idembarrier.asgi` needs Starlette but not FastAPI."""
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(ast.literal_eval(done.stdout))
    assert not loaded & set(absent)


# -- ASGI edge cases, in process --------------------------------------------------------------------------


class Exchange:
    """One request as an ASGI server hands it over: ``messages`` in, ``sent`` out."""

    def __init__(self, *messages: Message, key: bytes | None = b'"k-1"', method: str = "POST") -> None:
        headers = [] if key is None else [(b"idempotency-key", key)]
        self.scope: Scope = {"type": "http", "method": method, "path": "/p", "query_string": b"", "headers": headers}
        self.incoming = list(messages) or [{"type": "http.request", "body": b"{}"}]
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        return self.incoming.pop(0) if self.incoming else {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def through(self, middleware: IdempotencyMiddleware) -> None:
        await middleware(self.scope, self.receive, self.send)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])


def guard(db: Database, app: object, **options: object) -> IdempotencyMiddleware:
    barrier = Barrier(async_sessionmaker(db.engine, expire_on_commit=False), codec=HTTPResponseCodec())
    return IdempotencyMiddleware(app, barrier, scope_of=public, **options)  # type: ignore[arg-type]


async def test_other_connections_pass_through(pg_db: Database) -> None:
    """Websocket and lifespan connections reach the app untouched."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = guard(pg_db, app)
    for kind in ("websocket", "lifespan"):
        await middleware({"type": kind}, Exchange().receive, Exchange().send)
    assert seen == ["websocket", "lifespan"]


async def test_async_scope_and_custom_header_are_honoured(pg_db: Database) -> None:
    """scope_of may be a coroutine function, and the key may travel in another header."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def tenant(request: RequestHead) -> str:
        return "async-tenant"

    barrier = Barrier(async_sessionmaker(pg_db.engine), codec=HTTPResponseCodec())
    middleware = IdempotencyMiddleware(app, barrier, scope_of=tenant, header="X-Request-Key")
    exchange = Exchange(key=None)
    exchange.scope["headers"] = [(b"x-request-key", b"k-2")]
    await exchange.through(middleware)
    assert exchange.status == 200
    assert await pg_db.records() == [("async-tenant", "k-2", "COMPLETED")]


async def test_client_gone_before_its_body_runs_nothing(pg_db: Database) -> None:
    """A client that disconnects while its body is read gets no answer, and the app is not called."""
    exchange = Exchange({"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"})
    await exchange.through(guard(pg_db, inner_app))
    assert exchange.sent == []
    assert await pg_db.records() == []


async def test_app_sending_a_body_before_its_start_rolls_back(pg_db: Database) -> None:
    """A body sent before the response's start is the app's error: it propagates and nothing is recorded."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.body", "body": b"x"})

    with pytest.raises(RuntimeError, match=r"expected 'http\.response\.start'"):
        await Exchange().through(guard(pg_db, app))
    assert await pg_db.records() == []


async def test_app_reads_the_body_once_then_hears_the_client(pg_db: Database) -> None:
    """The app receives the body the middleware read, then the client's own messages."""
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        received.extend([await receive(), await receive()])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    exchange = Exchange(
        {"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"c"}
    )
    await exchange.through(guard(pg_db, app))
    assert received == [{"type": "http.request", "body": b"abc", "more_body": False}, {"type": "http.disconnect"}]
    assert exchange.status == 201


async def test_key_held_by_leased_work_or_unresolved_is_409(pg_db: Database) -> None:
    """A committed IN_PROGRESS record (leased work) is a 409 in progress whose Retry-After is what is left of
    the lease; an UNKNOWN one a 409 unresolved."""
    async with pg_db.engine.begin() as conn:
        for key, status in (("held", "IN_PROGRESS"), ("lost", "UNKNOWN")):
            await conn.exec_driver_sql(
                "INSERT INTO idempotency_keys (scope, key, status, token, locked_until)"
                " VALUES ($1, $2, $3, $4, now() + interval '30 seconds')",
                ("public", key, status, uuid.uuid4()),
            )
    middleware = guard(pg_db, inner_app, fingerprint=())
    held, lost = Exchange(key=b"held"), Exchange(key=b"lost")
    await held.through(middleware)
    await lost.through(middleware)
    assert (held.status, lost.status) == (409, 409)
    assert 28 <= int(held.headers[b"retry-after"]) <= 30
    assert Problem.KEY_UNRESOLVED.type.encode() in lost.sent[1]["body"]
    assert b"retry-after" not in lost.headers


async def test_key_whose_response_expired_is_409_expired(pg_db: Database) -> None:
    """A compact record (its response past retention) answers 409 key-expired and runs nothing."""
    async with pg_db.engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO idempotency_keys (scope, key, status, token) VALUES ($1, $2, 'COMPLETED', $3)",
            ("public", "old", uuid.uuid4()),
        )
    exchange = Exchange(key=b"old")
    await exchange.through(guard(pg_db, inner_app, fingerprint=()))
    assert exchange.status == 409
    assert Problem.KEY_EXPIRED.type.encode() in exchange.sent[1]["body"]


async def test_app_swallowing_a_failed_commit_still_fails(pg_db: Database) -> None:
    """When recording the outcome fails inside send, the error surfaces even if the app swallows it."""
    attempts: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        uow = scope["state"][idembarrier.asgi.STATE_KEY]
        uow.session.add(Payment(id=1, key="a", amount=1))
        uow.session.add(Payment(id=1, key="b", amount=1))  # the same primary key twice: refused at commit
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(2):
            try:
                await send({"type": "http.response.body", "body": b"ok"})
            except Exception as exc:
                attempts.append(exc)

    exchange = Exchange()
    with pytest.raises(IntegrityError):
        await exchange.through(guard(pg_db, app))
    assert [type(e) for e in attempts] == [IntegrityError, UnitOfWorkError]
    assert exchange.status == 500  # the route's writes failed: the application's failure, not ours
    assert Problem.APPLICATION_ERROR.type.encode() in exchange.sent[1]["body"]
    assert await pg_db.records() == []

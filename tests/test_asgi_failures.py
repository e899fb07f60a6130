"""What a client is told when a guarded request fails: always a problem, never a bare 500.

In process, as an ASGI server calls the middleware, on a real database (through `tests.faultproxy` where the
network must fail at a chosen moment). `test_asgi_faults` drives the same failures through uvicorn.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

import idembarrier.asgi
from idembarrier import (
    Barrier,
    ConfigurationError,
    ConnectionLostError,
    FingerprintMismatchError,
    IdembarrierError,
    ResponseEncodingError,
    SchemaError,
    SerializationError,
    StorageError,
    UnitOfWorkError,
)
from idembarrier.asgi import HTTPResponseCodec, IdempotencyMiddleware, Problem, RequestHead, ScopeRefusedError
from idembarrier.asgi._failures import answer_for
from tests.faultproxy import CommitCut, FaultProxy
from tests.helpers import Boom
from tests.models import Payment
from tests.test_asgi_units import Exchange, guard, public

if TYPE_CHECKING:
    from idembarrier.asgi._types import Receive, Scope, Send
    from tests.conftest import Database


def problem_of(exchange: Exchange) -> dict[str, object]:
    """The problem document the exchange was answered with, after checking it is one."""
    assert exchange.headers[b"content-type"] == b"application/problem+json"
    document: dict[str, object] = json.loads(exchange.sent[1]["body"])
    assert document["status"] == exchange.status
    return document


async def paying(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that writes a payment under the request's key and answers 201."""
    uow = scope["state"][idembarrier.asgi.STATE_KEY]
    uow.session.add(Payment(key=uow.key, amount=1))
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"paid"})


# -- the mapping, by exception type -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "problem", "retry_after", "stored_false", "reraise"),
    [
        (ConnectionLostError("x", outcome_unknown=True), Problem.OUTCOME_UNKNOWN, 7, False, False),
        (ConnectionLostError("x"), Problem.CONNECTION_LOST, 7, True, False),
        (SerializationError("x", sqlstate="40001"), Problem.TRANSACTION_ABORTED, 7, True, False),
        (StorageError("x", sqlstate="53300"), Problem.STORAGE_FAILED, 7, True, False),
        (UnitOfWorkError("x"), Problem.INTERNAL_ERROR, None, True, True),
        (SchemaError("x"), Problem.INTERNAL_ERROR, None, True, True),
        (FingerprintMismatchError(scope="s", key="k", record=None), Problem.INTERNAL_ERROR, None, True, True),
        (ScopeRefusedError("who?", status=401), Problem.NOT_AUTHENTICATED, None, True, False),
        (ScopeRefusedError("no"), Problem.FORBIDDEN, None, True, False),
        (Boom(), Problem.APPLICATION_ERROR, None, True, True),
    ],
)
def test_each_failure_has_its_answer(
    exc: Exception, problem: Problem, retry_after: int | None, stored_false: bool, reraise: bool
) -> None:
    """Storage failures are 503s with Retry-After, the others 500s that go on to the server; all but an
    unknown outcome say nothing was stored."""
    answer = answer_for(exc, 7)
    assert (answer.problem, answer.retry_after, answer.stored_false, answer.reraise) == (
        problem,
        retry_after,
        stored_false,
        reraise,
    )


def test_outcome_unknown_tells_the_client_to_retry_with_the_same_key() -> None:
    """The unknown-outcome problem says the request may have taken effect, and to keep the key."""
    detail = answer_for(ConnectionLostError("x", outcome_unknown=True), 1).detail
    assert "may or may not have taken effect" in detail
    assert "Retry with the same Idempotency-Key" in detail


def test_scope_refusal_is_401_or_403() -> None:
    """ScopeRefusedError takes no other status; it is one of ours."""
    with pytest.raises(ConfigurationError, match="401 or 403"):
        ScopeRefusedError("no", status=404)  # type: ignore[arg-type]
    assert issubclass(ScopeRefusedError, IdembarrierError)


# -- the database fails -----------------------------------------------------------------------------------


async def test_database_failure_at_the_claim_is_a_503_with_retry_after(pg_db: Database) -> None:
    """A database that refuses the claim (here: it does not exist) answers 503 storage-failed, app not called."""
    engine = create_async_engine(pg_db.url.rsplit("/", 1)[0] + "/no_such_database_for_idembarrier")
    try:
        barrier = Barrier(async_sessionmaker(engine), codec=HTTPResponseCodec())
        exchange = Exchange()
        await exchange.through(IdempotencyMiddleware(paying, barrier, scope_of=public, retry_after=3))
    finally:
        await engine.dispose()
    assert exchange.status == 503
    assert problem_of(exchange)["type"] == Problem.STORAGE_FAILED.type
    assert exchange.headers[b"retry-after"] == b"3"
    assert exchange.headers[b"idempotency-stored"] == b"false"


def through(engine: AsyncEngine, app: object = paying) -> IdempotencyMiddleware:
    barrier = Barrier(async_sessionmaker(engine, expire_on_commit=False), codec=HTTPResponseCodec())
    return IdempotencyMiddleware(app, barrier, scope_of=public)  # type: ignore[arg-type]


async def test_refused_connection_is_a_503_connection_lost(proxy: FaultProxy, proxied: AsyncEngine) -> None:
    """A database that cannot be reached answers 503 connection-lost, with Retry-After."""
    proxy.refuse()
    exchange = Exchange()
    await exchange.through(through(proxied))
    assert exchange.status == 503
    assert problem_of(exchange)["type"] == Problem.CONNECTION_LOST.type
    assert exchange.headers[b"retry-after"] == b"1"


async def test_connection_cut_in_the_route_is_a_503_and_nothing_stays(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine
) -> None:
    """A connection lost under the route's own statements answers 503 connection-lost; nothing committed."""

    async def cutting(scope: Scope, receive: Receive, send: Send) -> None:
        uow = scope["state"][idembarrier.asgi.STATE_KEY]
        proxy.cut_all()
        uow.session.add(Payment(key=uow.key, amount=1))
        await uow.session.flush()

    exchange = Exchange()
    await exchange.through(through(proxied, cutting))
    assert exchange.status == 503
    assert problem_of(exchange)["type"] == Problem.CONNECTION_LOST.type
    assert await pg_db.payments() == 0


@pytest.mark.parametrize(("how", "committed"), [(CommitCut.DROP, 0), (CommitCut.BEFORE_REPLY, 1)])
async def test_lost_commit_reply_is_503_outcome_unknown_and_the_same_key_settles_it(
    pg_db: Database, proxy: FaultProxy, proxied: AsyncEngine, how: CommitCut, committed: int
) -> None:
    """A COMMIT whose reply is lost answers 503 outcome-unknown (not marked unstored); the retry with the
    same key replays the 201 if it committed, or runs it if it did not: one payment either way."""
    middleware = through(proxied)
    proxy.cut_at_commit(how)
    lost = Exchange()
    await lost.through(middleware)
    assert lost.status == 503
    assert problem_of(lost)["type"] == Problem.OUTCOME_UNKNOWN.type
    assert b"idempotency-stored" not in lost.headers
    assert lost.headers[b"retry-after"] == b"1"
    assert await pg_db.payments() == committed
    retry = Exchange()
    await retry.through(middleware)
    assert retry.status == 201
    assert (b"idempotent-replayed" in retry.headers) is bool(committed)
    assert await pg_db.payments() == 1


# -- the application fails --------------------------------------------------------------------------------


async def test_route_exception_is_a_500_problem_and_still_reaches_the_server(pg_db: Database) -> None:
    """A route that raises gets a 500 application-error marked not stored, and its exception propagates."""

    async def crashing(scope: Scope, receive: Receive, send: Send) -> None:
        uow = scope["state"][idembarrier.asgi.STATE_KEY]
        uow.session.add(Payment(key=uow.key, amount=1))
        await uow.session.flush()
        raise Boom

    exchange = Exchange()
    with pytest.raises(Boom):
        await exchange.through(guard(pg_db, crashing))
    assert exchange.status == 500
    assert problem_of(exchange)["type"] == Problem.APPLICATION_ERROR.type
    assert exchange.headers[b"idempotency-stored"] == b"false"
    assert await pg_db.payments() == 0
    assert await pg_db.records() == []


async def test_exception_after_the_response_began_only_propagates(pg_db: Database) -> None:
    """Once a streamed response has begun, a route's exception propagates and nothing else is sent."""

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise Boom

    exchange = Exchange()
    with pytest.raises(Boom):
        await exchange.through(guard(pg_db, streaming))
    assert [m["type"] for m in exchange.sent] == ["http.response.start", "http.response.body"]
    assert exchange.status == 200


@pytest.mark.parametrize(("status", "problem"), [(401, Problem.NOT_AUTHENTICATED), (403, Problem.FORBIDDEN)])
async def test_scope_of_refusing_answers_the_status_it_chose(pg_db: Database, status: int, problem: Problem) -> None:
    """A scope_of raising ScopeRefusedError answers its 401 or 403 problem, with its challenge; nothing runs."""

    def refusing(request: RequestHead) -> str:
        raise ScopeRefusedError("no such token", status=status, challenge='Bearer realm="api"')  # type: ignore[arg-type]

    barrier = Barrier(async_sessionmaker(pg_db.engine), codec=HTTPResponseCodec())
    exchange = Exchange()
    await exchange.through(IdempotencyMiddleware(paying, barrier, scope_of=refusing))
    assert exchange.status == status
    document = problem_of(exchange)
    assert (document["type"], document["detail"]) == (problem.type, "no such token")
    assert exchange.headers[b"www-authenticate"] == b'Bearer realm="api"'
    assert await pg_db.records() == []


async def test_scope_of_that_raises_is_a_500_problem_and_propagates(pg_db: Database) -> None:
    """Any other exception from scope_of answers 500 application-error, and goes on to the server."""

    def broken(request: RequestHead) -> str:
        raise Boom

    barrier = Barrier(async_sessionmaker(pg_db.engine), codec=HTTPResponseCodec())
    exchange = Exchange()
    with pytest.raises(Boom):
        await exchange.through(IdempotencyMiddleware(paying, barrier, scope_of=broken))
    assert exchange.status == 500
    assert problem_of(exchange)["type"] == Problem.APPLICATION_ERROR.type


async def test_unusable_scope_is_a_500_internal_error(pg_db: Database) -> None:
    """A scope_of returning what is no scope (None) answers 500 internal-error; the InvalidKeyError propagates."""
    barrier = Barrier(async_sessionmaker(pg_db.engine), codec=HTTPResponseCodec())
    exchange = Exchange()
    with pytest.raises(IdembarrierError, match="scope"):
        await exchange.through(IdempotencyMiddleware(paying, barrier, scope_of=lambda request: None))  # type: ignore[arg-type, return-value]
    assert exchange.status == 500
    assert problem_of(exchange)["type"] == Problem.INTERNAL_ERROR.type


@pytest.mark.parametrize("body", [b"NaN", b'{"a": Infinity}', b"[1e999]", b"[" * 100_000 + b"]" * 100_000])
async def test_body_without_a_canonical_form_is_a_400(pg_db: Database, body: bytes) -> None:
    """With normalise_body=json.loads, a body of non-finite numbers or nested too deeply answers 400."""
    exchange = Exchange({"type": "http.request", "body": body})
    await exchange.through(guard(pg_db, paying, normalise_body=json.loads))
    assert exchange.status == 400
    assert problem_of(exchange)["type"] == Problem.BODY_INVALID.type
    assert await pg_db.records() == []


async def test_app_returning_without_a_response_is_a_500_internal_error(pg_db: Database) -> None:
    """An app that returns without completing its response gets a 500 problem; the UnitOfWorkError propagates."""

    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        uow = scope["state"][idembarrier.asgi.STATE_KEY]
        uow.session.add(Payment(key=uow.key, amount=1))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    exchange = Exchange()
    with pytest.raises(UnitOfWorkError, match="without completing its response"):
        await exchange.through(guard(pg_db, silent))
    assert exchange.status == 500
    assert problem_of(exchange)["type"] == Problem.INTERNAL_ERROR.type
    assert await pg_db.payments() == 0


async def test_record_the_codec_cannot_read_is_a_500_internal_error(pg_db: Database) -> None:
    """A stored response HTTPResponseCodec did not write answers 500 internal-error; the ResponseEncodingError
    goes on to the server, and the app does not run."""
    async with pg_db.engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO idempotency_keys (scope, key, status, token, response) VALUES ($1, $2, 'COMPLETED', $3, $4)",
            ("public", "foreign", uuid.uuid4(), b"written by someone else"),
        )
    exchange = Exchange(key=b"foreign")
    with pytest.raises(ResponseEncodingError):
        await exchange.through(guard(pg_db, paying, fingerprint=()))
    assert exchange.status == 500
    assert problem_of(exchange)["type"] == Problem.INTERNAL_ERROR.type
    assert await pg_db.payments() == 0

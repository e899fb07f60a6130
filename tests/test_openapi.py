"""The idempotency contract in OpenAPI: what `document_idempotency` writes, and Schemathesis against the example."""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
import schemathesis
from fastapi import APIRouter, FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from examples.payments_api import create_app
from examples.retry_session import serve_api
from idembarrier import Barrier, ConfigurationError, OnConflict
from idembarrier.asgi import (
    HTTPResponse,
    HTTPResponseCodec,
    IdempotencyMiddleware,
    Problem,
    Problems,
    RequestHead,
    RouteGuard,
    document_idempotency,
    exempt,
    json_field,
    parse_key_header,
)
from idembarrier.asgi._openapi import KEY_PATTERN, PROBLEM_SCHEMA_NAME, _added_middleware, describe_idempotency
from tests.helpers import new_key

if TYPE_CHECKING:
    from pathlib import Path

    from schemathesis import Case

    from tests.conftest import Database

PROBLEM = {"$ref": f"#/components/schemas/{PROBLEM_SCHEMA_NAME}"}
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    not_a_server_error,
]
"""Undocumented statuses, media types and headers, bodies off their schema, and any 5xx."""


def tenant(_request: RequestHead) -> str:
    return "t"


def barrier() -> Barrier[HTTPResponse]:
    """A barrier on an in-memory SQLite database it never connects to: the schema needs no database."""
    return Barrier(async_sessionmaker(create_async_engine("sqlite+aiosqlite://")), codec=HTTPResponseCodec())


def api(**options: Any) -> FastAPI:
    """An app with a guarded POST and PATCH, an unguarded GET, and the middleware added with ``options``."""
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, barrier=barrier(), scope_of=tenant, **options)

    @app.post("/orders", status_code=201, responses={402: {"description": "declined"}})
    async def create() -> dict[str, str]:
        return {}

    @app.patch("/orders/{order_id}")
    async def change(order_id: int) -> dict[str, int]:
        return {"order_id": order_id}

    @app.get("/orders")
    async def read() -> list[str]:
        return []

    document_idempotency(app)
    return app


def header_of(operation: dict[str, Any], name: str = "Idempotency-Key") -> dict[str, Any] | None:
    return next((p for p in operation.get("parameters", []) if p["in"] == "header" and p["name"] == name), None)


def test_guarded_operations_take_the_key_header_and_others_do_not() -> None:
    """POST and PATCH document a required Idempotency-Key header; GET does not."""
    paths = api().openapi()["paths"]
    for operation in (paths["/orders"]["post"], paths["/orders/{order_id}"]["patch"]):
        header = header_of(operation)
        assert header is not None
        assert header["required"] is True
        assert header["schema"] == {"type": "string", "pattern": KEY_PATTERN}
    assert header_of(paths["/orders"]["get"]) is None


def test_the_header_follows_the_middlewares_settings() -> None:
    """The guarded methods, the header's name and whether it is required come from the middleware."""
    paths = api(methods=["GET"], require_key=False, header="Request-Id").openapi()["paths"]
    header = header_of(paths["/orders"]["get"], "Request-Id")
    assert header is not None
    assert header["required"] is False
    assert "without it the request runs unguarded" in header["description"]
    assert header_of(paths["/orders"]["post"], "Request-Id") is None
    assert "409" not in paths["/orders"]["post"]["responses"]


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', True),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", True),
        ('"a key with spaces and \\" \\\\"', True),
        ("x" * 255, True),
        ("x" * 256, False),
        ('""', False),
        ("a,b", False),
        ('"k";v=1', False),  # parsed, but not what a client is told to send
        ("two words", False),
    ],
)
def test_the_key_pattern_admits_what_the_parser_accepts(value: str, accepted: bool) -> None:
    """The header's documented pattern describes keys `parse_key_header` reads."""
    assert (re.fullmatch(KEY_PATTERN, value) is not None) is accepted
    if accepted:
        assert parse_key_header(value)


def test_every_problem_is_documented_under_its_status() -> None:
    """Each problem's type URI is in the description of its status, whose body is the problem schema."""
    schema = api(normalise_body=bytes.decode).openapi()
    responses = schema["paths"]["/orders"]["post"]["responses"]
    for problem in Problem:
        response = responses[str(problem.status)]
        assert problem.type in response["description"], problem
        assert response["content"]["application/problem+json"]["schema"] == PROBLEM
    properties = schema["components"]["schemas"][PROBLEM_SCHEMA_NAME]["properties"]
    assert set(properties) == {"type", "title", "status", "detail"}


def test_an_application_response_keeps_its_own_content() -> None:
    """FastAPI's 422 validation error stays, in application/json, beside the key-reused problem."""
    responses = api().openapi()["paths"]["/orders/{order_id}"]["patch"]["responses"]
    content = responses["422"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/HTTPValidationError"}
    assert content["application/problem+json"]["schema"] == PROBLEM
    assert responses["422"]["description"].startswith("Validation Error")


def test_a_status_the_application_answers_in_the_same_media_type_takes_either_schema() -> None:
    """A route's own 409 in application/problem+json keeps its schema, beside the problem's (anyOf)."""
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, barrier=barrier(), scope_of=tenant)
    own = {"type": "object", "properties": {"conflict": {"type": "string"}}}
    document_idempotency(app)

    @app.post(
        "/orders",
        responses={409: {"description": "Sold out", "content": {"application/problem+json": {"schema": own}}}},
    )
    async def create() -> None:
        return None

    conflict = app.openapi()["paths"]["/orders"]["post"]["responses"]["409"]
    assert conflict["content"]["application/problem+json"]["schema"] == {"anyOf": [own, PROBLEM]}
    assert conflict["description"].startswith("Sold out\n\nIdempotency problems: ")
    before = copy.deepcopy(app.openapi())
    assert describe_idempotency(app.openapi(), _added_middleware(app).settings) == before  # no anyOf in an anyOf


def test_problems_that_cannot_happen_are_left_out() -> None:
    """Without a fingerprint no key is reused (no 422 problem); without normalise_body no body is invalid."""
    responses = api(fingerprint=()).openapi()["paths"]["/orders"]["post"]["responses"]
    assert "422" not in responses
    assert Problem.BODY_INVALID.type not in responses["400"]["description"]
    assert Problem.KEY_INVALID.type in responses["400"]["description"]


def test_retry_after_is_required_where_every_problem_sends_it() -> None:
    """503 always carries Retry-After; 409 only when in progress (not unresolved or expired)."""
    responses = api().openapi()["paths"]["/orders"]["post"]["responses"]
    assert responses["503"]["headers"]["Retry-After"]["required"] is True
    assert responses["409"]["headers"]["Retry-After"]["required"] is False
    assert "Retry-After" not in responses["413"]["headers"]
    assert responses["500"]["headers"]["Idempotency-Stored"]["schema"] == {"type": "string", "enum": ["false"]}
    assert "WWW-Authenticate" in responses["401"]["headers"]


def test_replayable_responses_carry_the_replay_headers() -> None:
    """2xx and a stored 4xx (402 here) document Idempotent-Replayed and Idempotency-Stored; a problem does not."""
    responses = api(store_statuses={402}).openapi()["paths"]["/orders"]["post"]["responses"]
    for status in ("201", "402"):
        headers = responses[status]["headers"]
        assert headers["Idempotent-Replayed"]["schema"] == {"type": "string", "enum": ["true"]}
        assert headers["Idempotency-Stored"]["required"] is False
    assert "Idempotent-Replayed" not in responses["409"]["headers"]
    unstored = api().openapi()["paths"]["/orders"]["post"]["responses"]
    assert "headers" not in unstored["402"]


def test_configured_statuses_are_the_documented_ones() -> None:
    """Problems' statuses move the documentation with them: 410 for an expired key, 400 for a reused one."""
    problems = Problems(expired_status=410, statuses={Problem.KEY_REUSED: 400})
    responses = api(problems=problems).openapi()["paths"]["/orders"]["post"]["responses"]
    assert Problem.KEY_EXPIRED.type in responses["410"]["description"]
    assert Problem.KEY_EXPIRED.type not in responses["409"]["description"]
    assert Problem.KEY_REUSED.type in responses["400"]["description"]
    assert "422" not in responses  # this route validates nothing: FastAPI documents no 422 either


def test_the_stripe_profile_documents_stripes_error_object() -> None:
    """Problems.stripe(): application/json bodies of Stripe's shape, and RFC 9457 for a failing hook's 500."""
    schema = api(problems=Problems.stripe()).openapi()
    responses = schema["paths"]["/orders"]["post"]["responses"]
    assert responses["409"]["content"] == {"application/json": {"schema": PROBLEM}}
    assert set(responses["500"]["content"]) == {"application/json", "application/problem+json"}
    assert schema["components"]["schemas"][PROBLEM_SCHEMA_NAME]["required"] == ["error"]


def test_a_custom_shape_is_documented_as_an_object() -> None:
    """A shape hook's body has no schema known here: documented as a JSON object, in its media type."""
    problems = Problems(shape=lambda details: {"code": details.status}, media_type="application/vnd.err+json")
    schema = api(problems=problems).openapi()
    assert schema["components"]["schemas"][PROBLEM_SCHEMA_NAME]["type"] == "object"
    content = schema["paths"]["/orders"]["post"]["responses"]["409"]["content"]
    assert content == {"application/vnd.err+json": {"schema": PROBLEM}}


def test_describing_twice_changes_nothing() -> None:
    """The edit is idempotent: documenting an app twice (or an already edited schema) adds nothing."""
    app = api()
    once = copy.deepcopy(app.openapi())
    assert describe_idempotency(app.openapi(), _added_middleware(app).settings) == once
    document_idempotency(app)
    assert app.openapi() == once


def test_a_middleware_added_outside_fastapi_is_named() -> None:
    """An app wrapped as ``IdempotencyMiddleware(app, …)`` is documented with ``middleware=``."""
    app = FastAPI()

    @app.put("/items/{item_id}")
    async def put(item_id: int) -> int:
        return item_id

    wrapped = IdempotencyMiddleware(app, barrier(), scope_of=tenant, methods=["PUT"])
    document_idempotency(app, middleware=wrapped)
    assert header_of(app.openapi()["paths"]["/items/{item_id}"]["put"]) is not None


def test_exempt_routes_and_route_guards_are_told_apart() -> None:
    """An exempt route is left alone; a RouteGuard's routes are documented by the guard, not the middleware."""
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, barrier=barrier(), scope_of=tenant)
    document_idempotency(app)

    @app.post("/search")
    @exempt
    async def search() -> list[str]:
        return []

    guard = RouteGuard(barrier(), scope="stripe", key=json_field("id"), problems=Problems(expired_status=410))
    router = APIRouter(prefix="/hooks", route_class=guard.route)

    @router.post("/stripe")
    async def stripe() -> dict[str, str]:
        return {}

    app.include_router(router)
    paths = app.openapi()["paths"]
    assert paths["/search"]["post"]["responses"].keys() == {"200"}
    assert header_of(paths["/search"]["post"]) is None
    hook = paths["/hooks/stripe"]["post"]
    assert header_of(hook) is None  # the key is the event's id, in the body
    assert Problem.KEY_EXPIRED.type in hook["responses"]["410"]["description"]
    assert "Idempotent-Replayed" in hook["responses"]["200"]["headers"]


def test_an_app_without_the_middleware_is_refused() -> None:
    """Documenting what no middleware enforces is a ConfigurationError that names the fix."""
    with pytest.raises(ConfigurationError, match=r"no IdempotencyMiddleware: add one with app.add_middleware"):
        document_idempotency(FastAPI())


def test_a_schema_cached_before_is_regenerated() -> None:
    """A schema FastAPI had cached before the call is dropped, so the served one is documented."""
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, barrier=barrier(), scope_of=tenant)

    @app.post("/x")
    async def x() -> None:
        return None

    assert header_of(app.openapi()["paths"]["/x"]["post"]) is None
    document_idempotency(app)
    assert header_of(app.openapi()["paths"]["/x"]["post"]) is not None


def test_the_example_documents_its_contract(tmp_path: Path) -> None:
    """The example's POST /payments documents the key, its problems and its stored 402."""
    operation = create_app(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}").openapi()["paths"]["/payments"]["post"]
    assert header_of(operation) is not None
    assert {"201", "400", "401", "402", "403", "409", "413", "422", "500", "503"} <= set(operation["responses"])
    assert "Idempotent-Replayed" in operation["responses"]["402"]["headers"]


def conforms(url: str, max_examples: int) -> None:
    """Run Schemathesis against the API served at ``url``; raise its first failure.

    Every operation gets requests that fit the schema; the guarded ones also get requests that do not (a bad
    key, a body that is not JSON), which the middleware or the application must refuse as documented.
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # the served schema does not load
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() in ("POST", "PATCH"):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def check(case: Case[Any]) -> None:
                case.call_and_validate(checks=CHECKS, timeout=30)

            check()


async def test_schemathesis_finds_nothing_undocumented_in_the_example(db: Database) -> None:
    """Generated requests (valid and not, keys fresh and reused) get documented statuses, media types, headers."""
    with serve_api(db.url) as url:
        await anyio.to_thread.run_sync(conforms, url, 30)


async def test_the_answers_schemathesis_cannot_provoke_conform_too(db: Database) -> None:
    """A concurrent duplicate's 409 (with Retry-After), the replay and a reused key's 422 match the schema."""
    entered, release = anyio.Event(), anyio.Event()
    app = FastAPI()
    guarded = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    app.add_middleware(IdempotencyMiddleware, barrier=guarded, scope_of=tenant, on_conflict=OnConflict.FAIL)
    document_idempotency(app)

    @app.post("/orders", status_code=201)
    async def create() -> dict[str, str]:
        entered.set()
        await release.wait()
        return {"order": "1"}

    operation = schemathesis.openapi.from_dict(app.openapi())["/orders"]["POST"]
    key = new_key()

    def conform(response: httpx.Response, status: int, headers: dict[str, str]) -> None:
        assert response.status_code == status, response.text
        operation.Case(headers=headers).validate_response(response, checks=CHECKS)

    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as client,
        anyio.create_task_group() as tg,
    ):
        first: list[httpx.Response] = []

        async def send_first() -> None:
            first.append(await client.post("/orders", headers={"Idempotency-Key": key}, content=b"{}"))

        tg.start_soon(send_first)
        await entered.wait()
        duplicate = await client.post("/orders", headers={"Idempotency-Key": key}, content=b"{}")
        conform(duplicate, 409, {"Idempotency-Key": key})
        assert duplicate.headers["retry-after"].isdigit()
        release.set()
    conform(first[0], 201, {"Idempotency-Key": key})
    replay = await client_post(app, key, b"{}")
    conform(replay, 201, {"Idempotency-Key": key})
    assert replay.headers["idempotent-replayed"] == "true"
    conform(await client_post(app, key, b'{"other": 1}'), 422, {"Idempotency-Key": key})


async def client_post(app: FastAPI, key: str, body: bytes) -> httpx.Response:
    """POST ``body`` to the app's ``/orders`` under ``key``, in process."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as client:
        return await client.post("/orders", headers={"Idempotency-Key": key}, content=body)

"""The example payments API answers no generated request with a 500: a schema-driven fuzz over its inputs.

Bodies come from the API's own OpenAPI schema (read by `from_schema` below), pushed past its edges (amounts
beyond the column's range, long and control-character strings, lone surrogates, non-JSON, NaN, deep
nesting), with generated Idempotency-Key and X-Tenant headers. Requests go through httpx's ASGI transport to
the app, whose lifespan installed its schema, on each engine. Hypothesis runs in a worker thread; each
request hops back to the test's event loop, where the app's engine lives.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.payments_api import create_app

if TYPE_CHECKING:
    from tests.conftest import Database

EXAMPLES = 800
"""Generated requests per engine."""

INT4_MAX = 2**31 - 1

_EDGE_TEXT = st.one_of(
    st.text(max_size=20),
    st.text(min_size=250, max_size=300),
    st.sampled_from(["", "\x00", "order\x00", "\ud800", "tab\there", "\x7f"]),
    st.sampled_from([256, 255]).map(lambda n: "é" * n),
)
_EDGE_INT = st.one_of(
    st.integers(min_value=-5, max_value=5),
    st.sampled_from([INT4_MAX, INT4_MAX + 1, 2**63, 2**64, -(2**31) - 1, 10**30]),
    st.integers(),
)
_JSON = st.recursive(
    st.none() | st.booleans() | _EDGE_INT | st.floats() | _EDGE_TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_EDGE_TEXT, children, max_size=3),
    max_leaves=8,
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[object]:
    """Values valid for ``schema``: the JSON Schema subset FastAPI emits for the example's request body."""
    kind = schema.get("type")
    if kind == "object":
        properties = {name: from_schema(sub) for name, sub in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: v for k, v in properties.items() if k in required},
            optional={k: v for k, v in properties.items() if k not in required},
        )
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**63)) + ("exclusiveMinimum" in schema))
        high = schema.get("maximum", schema.get("exclusiveMaximum", 2**63) - ("exclusiveMaximum" in schema))
        return st.integers(min_value=int(low), max_value=int(high))
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True).filter(
                lambda text: schema.get("minLength", 0) <= len(text) <= schema.get("maxLength", 10**6)
            )
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 300))
    raise AssertionError(f"a schema this test does not read: {schema}")  # pragma: no cover


def _payment_schema() -> dict[str, Any]:
    """The request body's JSON Schema, from the app's OpenAPI document."""
    document: dict[str, Any] = create_app("sqlite+aiosqlite:///unused.db").openapi()
    schema: dict[str, Any] = document["components"]["schemas"]["PaymentIn"]
    return schema


def _encode(value: object) -> bytes:
    """JSON as a client sends it; lone surrogates become ``\\ud800`` escapes (``ensure_ascii``)."""
    return json.dumps(value).encode()


def _bodies() -> st.SearchStrategy[bytes]:
    schema_valid = from_schema(_payment_schema()).map(_encode)
    edged = st.fixed_dictionaries(
        {"order_id": _EDGE_TEXT, "amount": _EDGE_INT},
        optional={"card": st.one_of(_EDGE_TEXT, st.sampled_from(["4000000000000002", "4242424242424242"]))},
    ).map(_encode)
    raw = st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"", b"{", b'{"order_id": "a", "amount": NaN}', b'{"amount": 1e999}']),
        st.sampled_from([5000, 100_000]).map(lambda depth: b"[" * depth + b"]" * depth),
        _JSON.map(_encode),
    )
    return st.one_of(schema_valid, edged, raw)


_VALID_KEYS = st.one_of(
    st.builds(lambda: str(uuid.uuid4())),  # fresh each time (Hypothesis's own uuids repeat the simplest)
    st.sampled_from(["same-key-1", "same-key-2"]),  # replays, and reused keys with other bodies
)
_KEYS = st.one_of(
    _VALID_KEYS,  # first, and so drawn most: a request must get past the header to reach the database
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
    st.sampled_from(['"quoted"', '"bad', "", "a\x01b", "\t"]),
)
_TENANTS = st.one_of(
    st.sampled_from(["acme", "globex"]),
    st.none(),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
    st.sampled_from(["", "a\x01b", "a\tb"]),
    st.just(256).map(lambda n: "x" * n),
)


async def test_no_generated_request_gets_a_500(db: Database) -> None:
    """On each engine, every generated POST /payments answers below 500; statuses are counted."""
    app = create_app(db.url, processor_latency=0)
    statuses: Counter[int] = Counter()
    problems: Counter[str] = Counter()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://payments.test") as client:

            async def post(body: bytes, key: str | None, tenant: str | None) -> httpx.Response:
                headers = {"content-type": "application/json"}
                if key is not None:
                    headers["idempotency-key"] = key
                if tenant is not None:
                    headers["x-tenant"] = tenant
                return await client.post("/payments", content=body, headers=headers)

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.data_too_large,
                    HealthCheck.large_base_example,
                ],
            )
            @given(body=_bodies(), key=st.one_of(_KEYS, st.none()), tenant=_TENANTS)
            def fuzz(body: bytes, key: str | None, tenant: str | None) -> None:
                response = anyio.from_thread.run(post, body, key, tenant)
                statuses[response.status_code] += 1
                if response.headers.get("content-type") == "application/problem+json":
                    problems[str(response.json().get("type"))] += 1
                assert response.status_code < 500, (response.status_code, response.text[:500])

            await anyio.to_thread.run_sync(fuzz)
    print(f"{db.dialect}: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, {problems}")
    assert statuses[201] > 0  # the fuzz reached the route, not only the validation

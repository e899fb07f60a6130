"""HTTP: the ``Idempotency-Key`` header for ASGI applications (FastAPI, Starlette…); ``idembarrier[asgi]``.

`IdempotencyMiddleware` follows draft-ietf-httpapi-idempotency-key-header. For each guarded request (POST
and PATCH by default) it claims the key in the request's scope and lets the route write through the unit
of work's session (`unit_of_work_session`, a FastAPI dependency); the route's response is recorded in the
same transaction as its writes, and sent to the client only after that transaction has committed. A retry
replays the recorded status, body and safe headers with ``Idempotent-Replayed: true``.

What is recorded:

- 2xx and 3xx: COMPLETED, replayed. 4xx listed in ``store_statuses`` (a declined card): FAILED, with the
  route's writes, replayed. Any other 4xx, every 5xx, and any exception: the writes roll back, nothing is
  recorded, and a retry runs again.
- Failures are problems, never a bare 500: the database's are 503s with ``Retry-After`` (``outcome-unknown``
  when the COMMIT was in flight: retry with the same key); the route's own exception, and any other of
  idembarrier's, a 500 marked ``Idempotency-Stored: false``, the exception then going on to the server's
  error handling. A ``scope_of`` refuses a request by raising `ScopeRefusedError` (401 or 403). A route
  that asks for the unit of work of a request sent without its optional key is answered a 400
  ``key-missing`` problem (`UnguardedRequestError`).
- A response that is streamed (a body in more than one message) or larger than ``max_response_bytes``
  cannot be held back whole. Its outcome is still recorded, without the body, and committed with the
  route's writes before its first byte is sent; it goes out marked ``Idempotency-Stored: false``. A retry
  then replays the original status and its ``Location``/``Link`` headers with an empty body, marked the
  same way. Why not roll back, or replay a 409/422? Rolling back would undo writes the stream may already
  report; and a 4xx replay would tell the client that its payment failed, inviting it to pay again under a
  new key. The original status is the truth the record can keep.

Scope: keys are chosen by clients, so a key alone must never select a record. ``scope_of`` maps each
request to its tenant or principal; the same key from two tenants is two records, and one tenant can
never obtain the response stored for another (the draft's security considerations).

Per route, in FastAPI: `RouteGuard` guards the routes of a router (``APIRouter(route_class=guard.route)``)
with the scope a FastAPI dependency resolves (the authenticated principal), after the route's own
dependencies, so no middleware order can hide it; the key comes from a `KeyExtractor` (`header`,
`json_field`); `exempt` marks a route that neither guards. `stripe_webhooks`, `github_webhooks` and
`standard_webhooks` take each sender's event id as the key, in its own scope, kept past its retries.

`document_idempotency` writes this contract into a FastAPI app's OpenAPI schema, from the middleware's own
settings: the key's header on each guarded operation, its problem responses, and the replay headers.

Its own answers are RFC 9457 problems with the draft's statuses; `Problems` chooses other statuses, the
``type`` URIs' base, 409 or 410 for a key past retention, and the body's shape (`Problems.stripe`).

The middleware is plain ASGI; only the FastAPI dependencies need Starlette's ``Request``, and FastAPI
itself is optional.
"""

from __future__ import annotations

from ._dependencies import unit_of_work, unit_of_work_session
from ._extractors import KeyExtractor, header, json_field
from ._failures import ScopeRefusedError
from ._header import parse_key_header
from ._marks import exempt
from ._middleware import IdempotencyMiddleware
from ._openapi import document_idempotency
from ._problems import Problem, ProblemDetails, Problems
from ._request import FingerprintPart, RequestHead
from ._response import DEFAULT_STORED_HEADERS, NEVER_STORED_HEADERS, HTTPResponse, HTTPResponseCodec
from ._route import RouteGuard
from ._state import STATE_KEY, UnguardedRequestError
from ._webhooks import (
    GITHUB_RETENTION,
    STANDARD_WEBHOOKS_RETENTION,
    STRIPE_RETENTION,
    github_webhooks,
    standard_webhooks,
    stripe_webhooks,
)

__all__ = [
    "DEFAULT_STORED_HEADERS",
    "GITHUB_RETENTION",
    "NEVER_STORED_HEADERS",
    "STANDARD_WEBHOOKS_RETENTION",
    "STATE_KEY",
    "STRIPE_RETENTION",
    "FingerprintPart",
    "HTTPResponse",
    "HTTPResponseCodec",
    "IdempotencyMiddleware",
    "KeyExtractor",
    "Problem",
    "ProblemDetails",
    "Problems",
    "RequestHead",
    "RouteGuard",
    "ScopeRefusedError",
    "UnguardedRequestError",
    "document_idempotency",
    "exempt",
    "github_webhooks",
    "header",
    "json_field",
    "parse_key_header",
    "standard_webhooks",
    "stripe_webhooks",
    "unit_of_work",
    "unit_of_work_session",
]

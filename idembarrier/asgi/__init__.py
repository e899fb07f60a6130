"""HTTP: the ``Idempotency-Key`` header for ASGI applications (FastAPI, Starlette…); ``idembarrier[asgi]``.

`IdempotencyMiddleware` follows draft-ietf-httpapi-idempotency-key-header and records each response in
the same transaction as the route's writes. The middleware is plain ASGI; the FastAPI dependencies
`unit_of_work` and `unit_of_work_session` need Starlette's ``Request`` (FastAPI itself is optional).
"""

from __future__ import annotations

from ._dependencies import unit_of_work, unit_of_work_session
from ._header import parse_key_header
from ._middleware import IdempotencyMiddleware
from ._problems import Problem
from ._request import FingerprintPart, RequestHead
from ._response import DEFAULT_STORED_HEADERS, NEVER_STORED_HEADERS, HTTPResponse, HTTPResponseCodec
from ._state import STATE_KEY

__all__ = [
    "DEFAULT_STORED_HEADERS",
    "NEVER_STORED_HEADERS",
    "STATE_KEY",
    "FingerprintPart",
    "HTTPResponse",
    "HTTPResponseCodec",
    "IdempotencyMiddleware",
    "Problem",
    "RequestHead",
    "parse_key_header",
    "unit_of_work",
    "unit_of_work_session",
]

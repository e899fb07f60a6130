"""The idempotency contract in a FastAPI app's OpenAPI schema, read from the middleware's own settings.

`document_idempotency` wraps ``app.openapi`` (FastAPI's way to customise the schema): the schema FastAPI
generates is edited once, then cached as usual. Each operation whose method `IdempotencyMiddleware` guards
gets the key's header parameter (required or not, with its syntax), the problem responses the middleware may
answer (under the statuses and media type its `Problems` choose, each with its ``Retry-After``,
``Idempotency-Stored`` and ``WWW-Authenticate`` headers), and the replay headers on the responses a record
may replay (2xx, 3xx, and the documented ``store_statuses``). The methods, the header's name, whether the key
is required, and the problems' statuses all come from the middleware's `Settings`, so the schema and the
answers cannot disagree.
"""

from __future__ import annotations

from copy import deepcopy
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigurationError
from .._keys import MAX_KEY_LENGTH
from ._marks import GUARDED_BY_ROUTE, is_exempt
from ._middleware import IdempotencyMiddleware
from ._problems import Problem, _stripe_error

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fastapi import FastAPI

    from ._settings import Settings

__all__ = ["PROBLEM_SCHEMA_NAME", "describe_idempotency", "document_idempotency"]

PROBLEM_SCHEMA_NAME = "IdempotencyProblem"
"""The name of the problem body's schema under ``components/schemas``."""

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
"""The operations of an OpenAPI path item (version 3.0 and 3.1)."""

_BARE = r"[!#-+\--:<-\[\]-~]"
"""A character of an unquoted key: visible ASCII but ``"``, ``\\``, ``,`` and ``;`` (see `parse_key_header`)."""
_QUOTED = r'(?:[ !#-\[\]-~]|\\["\\])'
"""A character of an RFC 9651 sf-string: printable ASCII, ``"`` and ``\\`` escaped."""
KEY_PATTERN = f'^(?:"{_QUOTED}{{1,{MAX_KEY_LENGTH}}}"|{_BARE}{{1,{MAX_KEY_LENGTH}}})$'
"""What the key's header holds: an sf-string, or a bare token (a UUID, most often), of 1-255 characters."""

_RETRY_AFTER = frozenset(
    {
        Problem.KEY_IN_PROGRESS,
        Problem.FINGERPRINT_VERSION_UNKNOWN,
        Problem.OUTCOME_UNKNOWN,
        Problem.CONNECTION_LOST,
        Problem.TRANSACTION_ABORTED,
        Problem.STORAGE_FAILED,
    }
)
"""The problems the middleware answers with ``Retry-After``."""
_NOT_STORED = frozenset(
    {
        Problem.KEY_MISSING,  # a route that needs the unit of work of a request without its optional key
        Problem.BODY_INVALID,
        Problem.NOT_AUTHENTICATED,
        Problem.FORBIDDEN,
        Problem.CONNECTION_LOST,
        Problem.TRANSACTION_ABORTED,
        Problem.STORAGE_FAILED,
        Problem.INTERNAL_ERROR,
        Problem.APPLICATION_ERROR,
    }
)
"""The problems that may carry ``Idempotency-Stored: false``."""

_RFC_9457 = {
    "type": "object",
    "description": "An RFC 9457 problem: the idempotency layer's answer, with a stable `type` URI to match on.",
    "properties": {
        "type": {"type": "string", "format": "uri", "description": "The problem's stable type URI."},
        "title": {"type": "string", "description": "The fixed summary of the problem type."},
        "status": {"type": "integer", "description": "The HTTP status code."},
        "detail": {"type": "string", "description": "What happened in this instance."},
    },
    "required": ["type", "title", "status", "detail"],
}
_STRIPE = {
    "type": "object",
    "description": "Stripe's error object (`Problems.stripe`).",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["idempotency_error", "invalid_request_error", "api_error"]},
                "message": {"type": "string"},
            },
            "required": ["type", "message"],
        }
    },
    "required": ["error"],
}


def document_idempotency(app: FastAPI, *, middleware: IdempotencyMiddleware | None = None) -> None:
    """Document the idempotency contract of ``app``'s guarded operations in its OpenAPI schema.

    Call it once the middleware is added (``app.add_middleware(IdempotencyMiddleware, …)``): its settings
    are read from ``app.user_middleware`` and checked now, as the middleware will check them.

    Args:
        app: The FastAPI application; its ``openapi`` is wrapped, and a schema it cached already is dropped.
        middleware: The middleware whose settings to document, for an app wrapped outside FastAPI
            (``IdempotencyMiddleware(app, …)``); default: the one added to ``app``.

    Raises:
        ConfigurationError: ``middleware`` is not given and ``app`` has no `IdempotencyMiddleware`, or
            has several; or the middleware's settings are invalid.
    """
    settings = (middleware or _added_middleware(app)).settings
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe_idempotency(generate(), settings, routes=_routes(app))
        return app.openapi_schema

    app.openapi_schema = None
    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def _added_middleware(app: FastAPI) -> IdempotencyMiddleware:
    """The `IdempotencyMiddleware` added to ``app``, built from its arguments as Starlette will build it."""
    added = [m for m in app.user_middleware if isinstance(m.cls, type) and issubclass(m.cls, IdempotencyMiddleware)]
    if len(added) != 1:
        found = "no IdempotencyMiddleware" if not added else f"{len(added)} IdempotencyMiddleware"
        raise ConfigurationError(
            f"the app has {found}: add one with app.add_middleware(IdempotencyMiddleware, …) before "
            "document_idempotency(app), or pass the one to document as middleware="
        )
    entry = added[0]
    built = entry.cls(app, *entry.args, **entry.kwargs)
    assert isinstance(built, IdempotencyMiddleware)
    return built


def _routes(app: FastAPI) -> dict[tuple[str, str], object]:
    """The route behind each operation of ``app``'s schema, by its path and (lower-case) method."""
    from fastapi import routing  # here: FastAPI is optional for idembarrier.asgi

    # FastAPI 0.12x+ keeps included routers whole; iter_route_contexts yields their routes as included.
    contexts = getattr(routing, "iter_route_contexts", None)
    found: dict[tuple[str, str], object] = {}
    for route in contexts(app.routes) if callable(contexts) else app.routes:
        original = getattr(route, "original_route", route)
        if isinstance(original, routing.APIRoute):
            for method in getattr(route, "methods", None) or ():
                found[(getattr(route, "path_format", original.path_format), method.lower())] = original
    return found


def describe_idempotency(
    schema: dict[str, Any], settings: Settings, *, routes: Mapping[tuple[str, str], object] | None = None
) -> dict[str, Any]:
    """Add the idempotency contract of ``settings`` to the OpenAPI ``schema`` (edited in place; returned).

    ``routes`` maps an operation's path and lower-case method to its route: an `exempt` route's operation is
    left alone, and one that a `RouteGuard` guards is documented by the guard's settings (its problems and
    replay headers; its key, read by an extractor, is not described). Editing a schema twice changes nothing.
    """
    routes = routes or {}
    problems = _problem_body(settings)
    schema.setdefault("components", {}).setdefault("schemas", {})[PROBLEM_SCHEMA_NAME] = deepcopy(problems)
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            route = routes.get((path, method))
            if operation is None or is_exempt(getattr(route, "endpoint", None)):
                continue
            guard = getattr(route, GUARDED_BY_ROUTE, None)
            own = settings if guard is None else guard.settings
            if method.upper() in own.methods:
                _describe_operation(operation, own, key_header=guard is None)
    return schema


def _problem_body(settings: Settings) -> dict[str, Any]:
    """The JSON schema of a problem's body, as the settings' `Problems` shape it."""
    shape = settings.problems.shape
    if shape is None:
        return _RFC_9457
    if shape is _stripe_error:
        return _STRIPE
    return {"type": "object", "description": "A problem, as the application's Problems shape hook writes it."}


def _describe_operation(operation: dict[str, Any], settings: Settings, *, key_header: bool) -> None:
    parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
    if key_header and not any(
        p.get("in") == "header" and p.get("name", "").lower() == settings.header.lower() for p in parameters
    ):
        parameters.append(_key_parameter(settings))
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for code, response in responses.items():
        if _replayable(code, settings):
            headers = response.setdefault("headers", {})
            headers.setdefault("Idempotent-Replayed", deepcopy(_REPLAYED))
            headers.setdefault("Idempotency-Stored", deepcopy(_STORED))
    by_status: dict[int, list[Problem]] = {}
    for problem in _answered(settings):
        by_status.setdefault(settings.problems.status(problem), []).append(problem)
    for status, answered in sorted(by_status.items()):
        _describe_problems(responses.setdefault(str(status), {}), answered, settings)


def _key_parameter(settings: Settings) -> dict[str, Any]:
    presence = "Required" if settings.require_key else "Optional: without it the request runs unguarded"
    return {
        "name": settings.header,
        "in": "header",
        "required": settings.require_key,
        "description": (
            "The client's unique key for this request (draft-ietf-httpapi-idempotency-key-header): a retry "
            "with the same key replays the first response instead of running again; a new request needs a "
            'new key. An RFC 9651 string (`"8e03978e-40d5-43e8-bc93-6894a57f9324"`) or a bare token, '
            f"1-{MAX_KEY_LENGTH} printable ASCII characters. {presence}."
        ),
        "schema": {"type": "string", "pattern": KEY_PATTERN},
    }


def _replayable(status: str, settings: Settings) -> bool:
    """Whether a documented response ``status`` (``"201"``, ``"2XX"``, ``"default"``) may be a replay."""
    if status[:1] in ("2", "3"):
        return True
    return status.isdigit() and int(status) in settings.store_statuses


def _answered(settings: Settings) -> list[Problem]:
    """The problems a guarded operation may be answered, under these settings."""
    answered = list(Problem)
    if not settings.fingerprint:  # the key alone names the request: it cannot be reused for another
        answered.remove(Problem.KEY_REUSED)
    if settings.normalise_body is None or "body" not in settings.fingerprint:  # raw bytes always fingerprint
        answered.remove(Problem.BODY_INVALID)
    return answered


def _describe_problems(response: dict[str, Any], answered: list[Problem], settings: Settings) -> None:
    """Document ``answered``, the problems of one status, in ``response`` (perhaps the application's own)."""
    problems = settings.problems
    lines = [f"`{problems.type(p)}`: {p.title}" for p in answered]
    description = "Idempotency problems: " + "; ".join(lines) + "."
    existing = response.get("description")
    if not existing:
        response["description"] = description
    elif description not in existing:
        response["description"] = f"{existing}\n\n{description}"
    content = response.setdefault("content", {})
    ours = {"$ref": f"#/components/schemas/{PROBLEM_SCHEMA_NAME}"}
    media_types = [problems.media_type]
    if problems.shape is not None and any(p is Problem.INTERNAL_ERROR for p in answered):
        media_types.append("application/problem+json")  # a failing shape hook falls back to RFC 9457's form
    for media_type in media_types:
        schema = ours if media_type == problems.media_type else deepcopy(_RFC_9457)
        entry = content.setdefault(media_type, {})
        current = entry.get("schema")
        if current is None:
            entry["schema"] = schema
        elif current != schema and schema not in current.get("anyOf", ()):
            entry["schema"] = {"anyOf": [current, schema]}  # the application answers this status too
    headers = response.setdefault("headers", {})
    if any(p in _RETRY_AFTER for p in answered):
        required = all(p in _RETRY_AFTER for p in answered)
        headers.setdefault("Retry-After", {**deepcopy(_RETRY_AFTER_HEADER), "required": required})
    if any(p in _NOT_STORED for p in answered):
        headers.setdefault("Idempotency-Stored", deepcopy(_STORED))
    if Problem.NOT_AUTHENTICATED in answered:
        headers.setdefault("WWW-Authenticate", deepcopy(_CHALLENGE))


_REPLAYED = {
    "description": "`true` when this is the recorded response of an earlier request with the same key, replayed.",
    "required": False,
    "schema": {"type": "string", "enum": ["true"]},
}
_STORED = {
    "description": (
        "`false` when the response was not recorded whole (streamed, too large, or a failure): a replay of it "
        "has an empty body, and a failure leaves the key free to retry."
    ),
    "required": False,
    "schema": {"type": "string", "enum": ["false"]},
}
_RETRY_AFTER_HEADER = {
    "description": "Seconds to wait before retrying with the same key.",
    "schema": {"type": "integer", "minimum": 0},
}
_CHALLENGE = {
    "description": "The authentication challenge, when the scope's principal is missing.",
    "required": False,
    "schema": {"type": "string"},
}

"""The ASGI middleware: the ``Idempotency-Key`` semantics of draft-ietf-httpapi-idempotency-key-header.

For a guarded request (POST and PATCH by default) the middleware reads the key, reads the body (to
fingerprint it), and opens a unit of work for the key in the request's scope. A finished record answers at
once (a replay, marked ``Idempotent-Replayed: true``) without calling the application. Otherwise the
application runs with the unit of work in ``scope["state"]["idembarrier"]`` and writes through its
session; its response is recorded in the same transaction and sent only once that transaction has
committed (see `idembarrier.asgi._execution` for what is recorded when).

Every other request (other methods, websockets, lifespan) passes through untouched.
"""

from __future__ import annotations

import inspect
import logging
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .._exceptions import (
    FingerprintMismatchError,
    FingerprintVersionError,
    InvalidFingerprintError,
    InvalidKeyError,
    KeyInProgressError,
    ReconciliationRequiredError,
    ResponseExpiredError,
)
from ._execution import Execution
from ._failures import NOT_STORED, answer_failure
from ._header import parse_key_header
from ._marks import route_leaves_middleware
from ._problems import DEFAULT_PROBLEMS, Problem, Problems, send_problem
from ._request import RequestHead, request_fingerprint
from ._response import DEFAULT_STORED_HEADERS
from ._settings import DEFAULT_MAX_BYTES, Settings
from ._state import STATE_KEY, UnguardedRequestError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection
    from datetime import timedelta

    from .._barrier import Barrier
    from .._config import OnConflict, Retention
    from .._record import Record
    from .._uow import UnitOfWork
    from ._request import FingerprintPart
    from ._response import HTTPResponse
    from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["IdempotencyMiddleware", "open_claim"]

_log = logging.getLogger("idembarrier.asgi")


class IdempotencyMiddleware:
    """Makes unsafe HTTP requests idempotent by their ``Idempotency-Key``, storing each response in the
    same transaction as the route's writes.

    Args:
        app: The ASGI application to guard.
        barrier: A barrier whose codec stores `HTTPResponse` (``Barrier(sm, codec=HTTPResponseCodec())``).
        scope_of: Returns the scope of a request's key (sync or async): the tenant or principal, so that
            one client's key can never replay another client's response. To refuse the request, raise
            `ScopeRefusedError` (a 401 or 403 problem); any other exception is a 500 ``application-error``.
        methods: The guarded methods; the others pass through untouched.
        require_key: Answer 400 to a guarded request without the key (else it runs unguarded).
        fingerprint: The parts of the request whose change makes a reused key a 422: any of
            ``"method"``, ``"path"``, ``"query"``, ``"body"``. Empty: the key alone names the request.
        normalise_body: Maps the body to what is fingerprinted (bytes or a JSON value), e.g. ``json.loads``
            so that reordered JSON keys are the same request. A `ValueError` keeps the raw body.
        max_body_bytes: The largest request body read and fingerprinted; a larger one is a 413.
        max_response_bytes: The largest response body recorded; a larger one is sent but not stored.
        on_conflict: While the first request with the key is in progress, wait for it and replay
            (``OnConflict.WAIT``), or answer 409 at once (``OnConflict.FAIL``); default: the barrier's.
        retry_after: The ``Retry-After`` seconds sent with a 503 (a 409 in progress sends how long its holder
            may still take, below).
        store_statuses: The 4xx statuses that are deterministic business failures: recorded as FAILED
            with the route's writes, and replayed. Other 4xx, and all 5xx, roll back and are not stored.
        stored_headers: The response headers a record keeps (never ``Set-Cookie``, ``Authorization``…).
        header: The name of the key's header.
        problems: How the middleware's own answers look (`Problems`: statuses, ``type`` URIs, the body's
            shape, 409 or 410 for a key past retention); default: the draft's, as RFC 9457 documents.

    A 409 ``key-in-progress`` carries a ``Retry-After`` of how long the holder may still take: what is left of
    its lease (the record's ``locked_until``), else the barrier's ``wait_timeout``, the wait budget.
    """

    def __init__(
        self,
        app: ASGIApp,
        barrier: Barrier[HTTPResponse],
        *,
        scope_of: Callable[[RequestHead], str | Awaitable[str]],
        methods: Collection[str] = ("POST", "PATCH"),
        require_key: bool = True,
        fingerprint: Collection[FingerprintPart] = ("method", "path", "query", "body"),
        normalise_body: Callable[[bytes], object] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BYTES,
        max_response_bytes: int = DEFAULT_MAX_BYTES,
        on_conflict: OnConflict | None = None,
        retry_after: int = 1,
        store_statuses: Collection[int] = (),
        stored_headers: Collection[str] = DEFAULT_STORED_HEADERS,
        header: str = "Idempotency-Key",
        problems: Problems = DEFAULT_PROBLEMS,
    ) -> None:
        self.app = app
        self.barrier = barrier
        self.settings = Settings(
            scope_of=scope_of,
            methods=frozenset(methods),
            require_key=require_key,
            fingerprint=frozenset(fingerprint),
            normalise_body=normalise_body,
            max_body_bytes=max_body_bytes,
            max_response_bytes=max_response_bytes,
            on_conflict=on_conflict,
            retry_after=retry_after,
            store_statuses=frozenset(store_statuses),
            stored_headers=frozenset(stored_headers),
            header=header,
            problems=problems,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection: guard it if it is a guarded HTTP request, else pass it on."""
        if scope["type"] != "http" or str(scope["method"]).upper() not in self.settings.methods:
            await self._pass(scope, receive, send, key_absent=False)
            return
        if route_leaves_middleware(scope, self.app):  # `exempt`, or a route its own RouteGuard guards
            await self.app(scope, receive, send)
            return
        settings = self.settings
        values = [value for name, value in scope.get("headers", ()) if name.lower() == settings.header_name]
        if not values:
            if settings.require_key:
                detail = f"{scope['method']} requests must carry an {settings.header} header"
                await send_problem(send, Problem.KEY_MISSING, detail, problems=settings.problems)
            else:
                await self._pass(scope, receive, send, key_absent=True)
            return
        try:
            if len(values) > 1:
                raise InvalidKeyError(", ".join(v.decode("latin-1") for v in values), "the header is sent twice")
            key = parse_key_header(values[0])
        except InvalidKeyError as exc:
            await send_problem(
                send, Problem.KEY_INVALID, f"{settings.header}: {exc.reason}", problems=settings.problems
            )
            return
        try:
            body = await _read_body(scope, receive, settings.max_body_bytes)
        except _ClientGone:
            return  # nothing ran, and there is no one to answer
        if body is None:
            detail = f"the request body exceeds {settings.max_body_bytes} bytes"
            await send_problem(send, Problem.REQUEST_TOO_LARGE, detail, problems=settings.problems)
            return
        await self._guard(key, body, scope, receive, send)

    async def _pass(self, scope: Scope, receive: Receive, send: Send, *, key_absent: bool) -> None:
        """Hand an unguarded request on; answer a route that asked for its (absent) unit of work."""
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except UnguardedRequestError as exc:
            if started:
                raise
            if key_absent:  # the client can fix this one: the route needs the optional key
                detail = f"this route needs an {self.settings.header} header"
                await send_problem(
                    send, Problem.KEY_MISSING, detail, problems=self.settings.problems, headers=[NOT_STORED]
                )
                return
            if await answer_failure(send, exc, self.settings.retry_after, self.settings.problems):
                raise

    async def _guard(self, key: str, body: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.settings
        head = RequestHead.from_scope(scope)
        try:
            named = settings.scope_of(head)
            key_scope: str = await named if inspect.isawaitable(named) else named
        except Exception as exc:  # a refusal (401/403), or the application's failure (500)
            if await answer_failure(send, exc, settings.retry_after, settings.problems):
                raise
            return
        uow = await open_claim(self.barrier, settings, key, key_scope, head, body, send)
        if uow is None:
            return
        scope.setdefault("state", {})[STATE_KEY] = uow
        await Execution(uow, settings, send).run(self.app, scope, _replaying(body, receive))


async def open_claim(
    barrier: Barrier[HTTPResponse],
    settings: Settings,
    key: str,
    key_scope: str,
    head: RequestHead,
    body: bytes,
    send: Send,
    *,
    retention: timedelta | Retention | None = None,
) -> UnitOfWork[HTTPResponse] | None:
    """Claim ``key`` in ``key_scope`` for the request; return its unit of work, started, to run the request in.

    Return ``None`` when the request has been answered already: a replay of the key's recorded response, or
    a problem (a reused key, one in progress, past retention, the database's failure…) sent on ``send``.
    """
    try:
        fingerprint = request_fingerprint(head, body, settings.fingerprint, settings.normalise_body)
        uow = barrier.unit_of_work(
            key,
            scope=key_scope,
            fingerprint=fingerprint,
            on_conflict=settings.on_conflict,
            retention=retention,
        )
    except InvalidFingerprintError:
        detail = "the request body, as normalised, has no canonical form (NaN, infinity, deep nesting…)"
        await send_problem(send, Problem.BODY_INVALID, detail, problems=settings.problems, headers=[NOT_STORED])
        return None
    except InvalidKeyError as exc:
        if exc.key == key:
            await send_problem(
                send, Problem.KEY_INVALID, f"{settings.header}: {exc.reason}", problems=settings.problems
            )
            return None
        # The header's key was validated already: scope_of returned an unusable scope, the app's bug.
        if await answer_failure(send, exc, settings.retry_after, settings.problems):
            raise
        return None
    except Exception as exc:  # the application's normalise_body failed
        if await answer_failure(send, exc, settings.retry_after, settings.problems):
            raise
        return None
    try:
        await uow.start()
    except KeyInProgressError as exc:
        detail = "the first request with this key has not finished; retry with the same key later"
        wait = holder_may_take(await _holder(barrier, exc, key, key_scope), barrier.options.wait_timeout)
        await send_problem(send, Problem.KEY_IN_PROGRESS, detail, problems=settings.problems, retry_after=wait)
        return None
    except FingerprintMismatchError:
        detail = "this key was already used for a different request; use a new key for a new request"
        await send_problem(send, Problem.KEY_REUSED, detail, problems=settings.problems)
        return None
    except FingerprintVersionError:  # before ConflictError's other kinds: a rolling deploy, not a misuse
        detail = "another deploy recorded this key; retry with the same key (nothing ran here)"
        await send_problem(
            send,
            Problem.FINGERPRINT_VERSION_UNKNOWN,
            detail,
            problems=settings.problems,
            retry_after=settings.retry_after,
        )
        return None
    except ReconciliationRequiredError:
        detail = "the earlier work for this key may or may not have happened; an operator must resolve it"
        await send_problem(send, Problem.KEY_UNRESOLVED, detail, problems=settings.problems)
        return None
    except ResponseExpiredError:
        detail = "this key was used already and its response is past retention; nothing was run again"
        await send_problem(send, Problem.KEY_EXPIRED, detail, problems=settings.problems)
        return None
    except Exception as exc:  # the database, or the barrier's configuration
        if await answer_failure(send, exc, settings.retry_after, settings.problems):
            raise
        return None
    if uow.replayed:
        await _replay(uow, send, settings)
        return None
    return uow


async def _holder(barrier: Barrier[HTTPResponse], exc: KeyInProgressError, key: str, scope: str) -> Record | None:
    """The record of the key's holder, with its lease's end: a unit of work's claim reads it without."""
    record = exc.record
    if record is None or record.locked_until is not None:
        return record  # no committed record (a unit of work holds the key), or one read whole
    try:
        return await barrier.inspect(key, scope=scope) or record  # the caller's key (keyed_hash)
    except Exception:  # only an estimate for Retry-After: the 409 stands without it
        _log.warning("reading the holder of a key for Retry-After failed", exc_info=True)
        return record


def holder_may_take(record: Record | None, wait_timeout: float) -> int:
    """Return the whole seconds the holder of a key may still take, for ``Retry-After``.

    A lease says how long it is held (its record's ``locked_until``, by the database's clock, read against
    ours); a unit of work holds its key in a transaction of unknown length, so the duplicate is told the
    wait budget it would have been given. Never less than 1: a retry at once would only meet the holder again.
    """
    if record is not None and record.locked_until is not None:
        until = record.locked_until
        if until.tzinfo is None:  # SQLite keeps naive UTC
            until = until.replace(tzinfo=UTC)
        left = (until - datetime.now(UTC)).total_seconds()
    else:
        left = wait_timeout
    return max(1, math.ceil(left))


class _ClientGone(Exception):
    """The client disconnected before its request body was read."""


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """Read the whole request body, or return ``None`` as soon as it is known to exceed ``limit``."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the application the body already read, then listens to the client."""
    pending = [body]

    async def replayed() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replayed


async def _replay(uow: UnitOfWork[HTTPResponse], send: Send, settings: Settings) -> None:
    """Send the recorded response of ``uow``, a replay, and give its session back."""
    try:
        response = uow.response
    except Exception as exc:  # the codec cannot read the record
        await uow.rollback(exc)
        if await answer_failure(send, exc, settings.retry_after, settings.problems):
            raise
        return
    try:
        await uow.commit()  # a replay wrote nothing: this only gives back the session
    except Exception:
        # The response is in hand and true; a failed rollback of a read-only transaction changes nothing
        # the client must know.
        _log.warning("replaying key %r: giving back the session failed", uow.key, exc_info=True)
    await _send_replay(send, response)


async def _send_replay(send: Send, response: HTTPResponse) -> None:
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers]
    if response.status >= 200 and response.status not in (204, 304):
        headers.append((b"content-length", str(len(response.body)).encode()))
    headers.append((b"idempotent-replayed", b"true"))
    if not response.body_stored:
        headers.append((b"idempotency-stored", b"false"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})

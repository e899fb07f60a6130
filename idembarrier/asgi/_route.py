"""Per-route guards for FastAPI: a route class that claims the key after FastAPI has resolved the route's scope.

`IdempotencyMiddleware` runs before routing, so its ``scope_of`` sees only the raw request. A `RouteGuard`
guards the routes built by its route class (``APIRouter(route_class=guard.route)``), and takes the scope
from a FastAPI dependency (``scope=current_tenant``, which may itself depend on ``current_user``): what the
application's own authentication resolved, in whatever order its middleware was added.

For a guarded request the route class reads the body and the key (`KeyExtractor`) before FastAPI runs;
the guard's dependency, added after the route's other dependencies, claims the key in the scope they
resolved. A replay or a problem is sent at once and the endpoint never runs; otherwise the endpoint runs
in the unit of work and its response goes through `Execution`, the middleware's own machinery: recorded in
the same transaction as the route's writes, and sent after the commit.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigurationError, InvalidKeyError
from ._execution import Execution
from ._extractors import header
from ._failures import NOT_STORED, answer_failure
from ._marks import GUARDED_BY_ROUTE, is_exempt
from ._middleware import _ClientGone, _read_body, _replaying, open_claim
from ._problems import DEFAULT_PROBLEMS, Problem, send_problem
from ._request import RequestHead
from ._response import DEFAULT_STORED_HEADERS, HTTPResponseCodec
from ._settings import DEFAULT_MAX_BYTES, Settings
from ._state import STATE_KEY, UnguardedRequestError, find_unit_of_work
from ._types import Send  # a dataclass field's annotation: ruff keeps it at run time

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection
    from datetime import timedelta

    from fastapi import params
    from fastapi.routing import APIRoute

    from .._barrier import Barrier
    from .._config import OnConflict, Retention
    from ._extractors import KeyExtractor
    from ._problems import Problems
    from ._request import FingerprintPart
    from ._response import HTTPResponse
    from ._types import ASGIApp, Message, Receive, Scope

__all__ = ["RouteGuard"]

_PENDING = "idembarrier.route"
"""The ASGI scope's entry where the route class leaves the request's key and body for the guard's dependency."""


class _Answered(Exception):
    """Raised by the guard's dependency once it has answered the request itself (a replay, a problem)."""


@dataclass(eq=False)
class _Pending:
    """A guarded request on its way through FastAPI: what the route class read, and its execution once claimed."""

    guard: RouteGuard
    key: str | None
    head: RequestHead
    body: bytes
    downstream: Send
    execution: Execution | None = None
    started: bool = field(default=False)
    failure: Exception | None = None  # the guard's own, raised from its dependency: answered as a problem

    async def send(self, message: Message) -> None:
        self.started = True
        if self.execution is not None:
            await self.execution.send(message)
        else:
            await self.downstream(message)


def _no_scope_of(request: RequestHead) -> str:  # pragma: no cover - a route guard's scope is a dependency
    raise AssertionError("a route guard takes its scope from its dependency")


class RouteGuard:
    """Guards FastAPI routes one router at a time, with the scope a FastAPI dependency resolves.

    ``router = APIRouter(route_class=guard.route)``: each route of the router whose method is guarded claims
    its key in the scope ``scope`` resolves, unless its endpoint is marked `exempt`; the route's writes go
    through ``Depends(unit_of_work_session)`` as under the middleware. A route that `IdempotencyMiddleware`
    would also guard is left to its guard.

    Args:
        barrier: A barrier whose codec stores `HTTPResponse` (``Barrier(sm, codec=HTTPResponseCodec())``).
        scope: The scope of the key: a string (one scope for every request, as for a webhook sender's
            events), or a FastAPI dependency returning it (a callable, or ``Depends(callable)``), which may
            depend on the authenticated principal (``Depends(current_user)``). It runs after the route's
            own dependencies, so an authentication failure (401) answers before any key is claimed.
        key: Where the key is read (a `KeyExtractor`): the ``Idempotency-Key`` header by default,
            `header` for another, `json_field` for one in the body.
        required: Answer 400 ``key-missing`` to a guarded request without a key; else it runs unguarded.
        methods: The guarded methods; the router's other routes pass through.
        retention: The retention of the records this guard makes; default: the barrier's for the scope.
        fingerprint: As `IdempotencyMiddleware`'s.
        normalise_body: As `IdempotencyMiddleware`'s.
        max_body_bytes: As `IdempotencyMiddleware`'s.
        max_response_bytes: As `IdempotencyMiddleware`'s.
        on_conflict: As `IdempotencyMiddleware`'s.
        retry_after: As `IdempotencyMiddleware`'s.
        store_statuses: As `IdempotencyMiddleware`'s.
        stored_headers: As `IdempotencyMiddleware`'s.
        problems: As `IdempotencyMiddleware`'s.

    Raises:
        ConfigurationError: An option is unusable, or the barrier's codec is not an `HTTPResponseCodec`: at
            start-up, never on a request.
    """

    def __init__(
        self,
        barrier: Barrier[HTTPResponse],
        *,
        scope: str | Callable[..., str | Awaitable[str]] | params.Depends,
        key: KeyExtractor | None = None,
        required: bool = True,
        methods: Collection[str] = ("POST", "PATCH"),
        retention: timedelta | Retention | None = None,
        fingerprint: Collection[FingerprintPart] = ("method", "path", "query", "body"),
        normalise_body: Callable[[bytes], object] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BYTES,
        max_response_bytes: int = DEFAULT_MAX_BYTES,
        on_conflict: OnConflict | None = None,
        retry_after: int = 1,
        store_statuses: Collection[int] = (),
        stored_headers: Collection[str] = DEFAULT_STORED_HEADERS,
        problems: Problems = DEFAULT_PROBLEMS,
    ) -> None:
        if not isinstance(getattr(barrier, "codec", None), HTTPResponseCodec):
            raise ConfigurationError("a route guard's barrier must store HTTP responses: codec=HTTPResponseCodec()")
        if key is not None and not callable(key):
            raise ConfigurationError(f"key must be a key extractor (header(…), json_field(…)), not {key!r}")
        self.barrier = barrier
        self.key: KeyExtractor = header() if key is None else key
        self.retention = retention
        self.settings = Settings(
            scope_of=_no_scope_of,
            methods=frozenset(methods),
            require_key=required,
            fingerprint=frozenset(fingerprint),
            normalise_body=normalise_body,
            max_body_bytes=max_body_bytes,
            max_response_bytes=max_response_bytes,
            on_conflict=on_conflict,
            retry_after=retry_after,
            store_statuses=frozenset(store_statuses),
            stored_headers=frozenset(stored_headers),
            problems=problems,
        )
        if retention is not None:
            barrier._checked(retention)  # a retention shorter than the declared replay window, refused now
        self._scope = _scope_dependency(scope)
        self._route: type[APIRoute] | None = None

    @property
    def route(self) -> type[APIRoute]:
        """The FastAPI route class whose routes this guard guards: ``APIRouter(route_class=guard.route)``."""
        if self._route is None:
            self._route = _route_class(self)
        return self._route

    def _dependency(self) -> Callable[..., Awaitable[None]]:
        """The dependency that claims the key, in the scope ``scope`` resolved, for the route's request."""
        from fastapi import Request  # here: FastAPI is optional for idembarrier.asgi

        async def claim(request: Request, key_scope: str) -> None:
            await self._claim(request.scope, key_scope)

        claim.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # what FastAPI reads
            [
                inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
                inspect.Parameter(
                    "key_scope", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=self._scope, annotation=str
                ),
            ]
        )
        return claim

    async def _claim(self, scope: Scope, key_scope: str) -> None:
        pending = scope.get(_PENDING)
        if not isinstance(pending, _Pending) or pending.guard is not self:
            raise ConfigurationError("a RouteGuard's dependency ran on a route not built by guard.route")
        if pending.key is None:
            return  # an optional key, absent: the request runs unguarded
        if find_unit_of_work(scope) is not None:
            pending.failure = ConfigurationError(
                "this request already has a unit of work: two guards for one route (IdempotencyMiddleware "
                "wrapped so that it cannot see the app's routes, or two route guards)"
            )
            raise pending.failure
        uow = await open_claim(
            self.barrier,
            self.settings,
            pending.key,
            key_scope,
            pending.head,
            pending.body,
            pending.downstream,
            retention=self.retention,
        )
        if uow is None:
            raise _Answered
        scope.setdefault("state", {})[STATE_KEY] = uow
        pending.execution = Execution(uow, self.settings, pending.downstream)

    async def serve(self, call: ASGIApp, endpoint: object, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the route's ASGI ``call`` for a request, guarded if its method is (the route class's ``handle``)."""
        settings = self.settings
        if scope["type"] != "http" or is_exempt(endpoint) or str(scope["method"]).upper() not in settings.methods:
            await call(scope, receive, send)
            return
        try:
            body = await _read_body(scope, receive, settings.max_body_bytes)
        except _ClientGone:
            return  # nothing ran, and there is no one to answer
        if body is None:
            detail = f"the request body exceeds {settings.max_body_bytes} bytes"
            await send_problem(send, Problem.REQUEST_TOO_LARGE, detail, problems=settings.problems)
            return
        head = RequestHead.from_scope(scope)
        try:
            key = self.key(head, body)
        except InvalidKeyError as exc:
            await send_problem(
                send, Problem.KEY_INVALID, f"{_where(self.key)}: {exc.reason}", problems=settings.problems
            )
            return
        if key is None and settings.require_key:
            detail = f"{head.method} requests to this route must carry an idempotency key ({_where(self.key)})"
            await send_problem(send, Problem.KEY_MISSING, detail, problems=settings.problems)
            return
        pending = _Pending(self, key, head, body, send)
        scope[_PENDING] = pending
        try:
            await call(scope, _replaying(body, receive), pending.send)
        except BaseException as exc:
            if pending.execution is not None:
                await pending.execution.finish(exc)
            elif isinstance(exc, _Answered):
                pass
            elif exc is pending.failure and not pending.started:
                if await answer_failure(send, exc, settings.retry_after, settings.problems):
                    raise
            elif isinstance(exc, UnguardedRequestError) and key is None and not pending.started:
                detail = f"this route needs an idempotency key ({_where(self.key)})"
                await send_problem(send, Problem.KEY_MISSING, detail, problems=settings.problems, headers=[NOT_STORED])
            else:
                raise
            return
        if pending.execution is not None:
            await pending.execution.finish(None)


def _where(extractor: KeyExtractor) -> str:
    """Where ``extractor`` reads the key, for a problem's detail: its docstring's words."""
    doc = (extractor.__doc__ or "The key from the request.").strip().rstrip(".")
    return doc[0].lower() + doc[1:]


def _scope_dependency(scope: object) -> Any:
    """``scope`` as a FastAPI ``Depends``: a fixed string, a callable, or a ``Depends`` as given."""
    from fastapi import Depends  # here: FastAPI is optional for idembarrier.asgi
    from fastapi.params import Depends as DependsMarker

    if isinstance(scope, DependsMarker):
        return scope
    if isinstance(scope, str):
        fixed = scope

        def fixed_scope() -> str:
            return fixed

        return Depends(fixed_scope)
    if callable(scope):
        return Depends(scope)
    raise ConfigurationError(f"scope must be a string, a FastAPI dependency or Depends(…), not {scope!r}")


def _route_class(guard: RouteGuard) -> type[APIRoute]:
    """Build the route class of ``guard``: an `APIRoute` whose requests go through `RouteGuard.serve`."""
    from fastapi.params import Depends  # here: FastAPI is optional for idembarrier.asgi
    from fastapi.routing import APIRoute

    claim = Depends(guard._dependency())

    class GuardedRoute(APIRoute):
        """A route guarded by a `RouteGuard` (unless its endpoint is `exempt`)."""

        def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
            methods = {str(method).upper() for method in options.get("methods") or ("GET",)}
            guarded = not is_exempt(endpoint) and bool(methods & guard.settings.methods)
            if guarded and not methods <= guard.settings.methods:
                # The guard's dependency (its scope, the principal) would run for every method of the route.
                raise ConfigurationError(
                    f"route {path!r} mixes guarded and unguarded methods ({sorted(methods)}): split it into "
                    "one route per kind, or mark it exempt"
                )
            if guarded:
                # Last of the route's dependencies, before the endpoint's own: authentication first.
                options["dependencies"] = [*(options.get("dependencies") or ()), claim]
            super().__init__(path, endpoint, **options)
            if guarded:
                setattr(self, GUARDED_BY_ROUTE, guard)

        async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
            await guard.serve(super().handle, self.endpoint, scope, receive, send)

    return GuardedRoute

"""Which route a request reaches, as the middleware asks before routing: exempt, or guarded by its route.

`IdempotencyMiddleware` runs before the router, so to honour `exempt` (and to leave alone a route that a
`RouteGuard` guards itself, which would otherwise be claimed twice) it matches the request against the
application's routes as the router will: each route's own ``matches``, into mounts (``routes``) and into
FastAPI's included routers (``effective_route_contexts``), without running anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from ._types import Scope

__all__ = ["GUARDED_BY_ROUTE", "exempt", "is_exempt", "route_leaves_middleware"]

_EXEMPT = "__idembarrier_exempt__"
GUARDED_BY_ROUTE = "__idembarrier_route_guard__"
"""The attribute a route guarded by a `RouteGuard` carries: the middleware leaves such a route to it."""

Endpoint = TypeVar("Endpoint", bound=Callable[..., object])


def exempt(endpoint: Endpoint) -> Endpoint:
    """Mark a route's endpoint as never guarded: neither the middleware nor a route guard claims a key for it.

    Put it under the route's decorator (``@app.post("/search")`` then ``@exempt``): the endpoint is
    returned unchanged, only marked.
    """
    setattr(endpoint, _EXEMPT, True)
    return endpoint


def is_exempt(endpoint: object) -> bool:
    """Return whether ``endpoint`` was marked with `exempt`."""
    return getattr(endpoint, _EXEMPT, False) is True


def route_leaves_middleware(scope: Scope, app: object) -> bool:
    """Return whether the route that ``scope`` reaches is exempt, or guarded by its own `RouteGuard`.

    The routes are the application's: ``scope["app"]`` (Starlette sets it before its middleware runs), else
    the first of ``app`` and the applications it wraps (``.app``) that has a router, for a middleware
    wrapped around the application from outside.
    """
    route = _find(getattr(_router(scope.get("app")) or _router(app), "routes", ()), scope)
    if route is None:
        return False
    return getattr(route, GUARDED_BY_ROUTE, None) is not None or is_exempt(getattr(route, "endpoint", None))


def _router(app: object) -> object | None:
    """The router of ``app`` (or ``app`` itself, a router), or of the first application it wraps that has one."""
    for _ in range(16):  # a middleware stack is short; a cycle of .app must not hang a request
        if app is None:
            return None
        router: object | None = getattr(app, "router", None)
        if router is not None:
            return router
        if hasattr(app, "routes"):  # the router itself, the innermost of Starlette's own stack
            return app
        app = getattr(app, "app", None)
    return None


def _find(routes: Iterable[object], scope: Scope) -> object | None:
    """The route of ``routes`` that fully matches ``scope``, looking into mounts and included routers."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):  # FastAPI's included router: each route as included (prefix, dependencies)
            for context in contexts():
                if _full(context, scope) is not None:
                    original: object = getattr(context, "original_route", context)
                    return original
            continue
        child = _full(route, scope)
        if child is None:
            continue
        inner = getattr(route, "routes", None)
        if inner and not hasattr(route, "endpoint"):  # a mount: match the rest of the path inside it
            return _find(inner, {**scope, **child})
        return route
    return None


def _full(route: object, scope: Scope) -> Mapping[str, object] | None:
    matches = getattr(route, "matches", None)
    if not callable(matches):
        return None
    try:
        match, child = matches(scope)
    except Exception:  # a route that cannot read this scope is not the one it reaches
        return None
    return child if getattr(match, "name", None) == "FULL" else None

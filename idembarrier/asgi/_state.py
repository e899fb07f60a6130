"""Where a guarded request's unit of work waits for the application: the ASGI scope's ``state``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .._exceptions import UnitOfWorkError
from .._uow import UnitOfWork

if TYPE_CHECKING:
    from ._response import HTTPResponse

__all__ = ["STATE_KEY", "UnguardedRequestError", "find_unit_of_work"]

STATE_KEY = "idembarrier"
"""The key of ``scope["state"]`` (Starlette's ``request.state.idembarrier``) that holds the unit of work."""


class UnguardedRequestError(UnitOfWorkError):
    """A route asked for the unit of work of a request that `IdempotencyMiddleware` does not guard.

    Where the middleware is installed, it answers this for the route: a 400 ``key-missing`` problem when the
    request's method is guarded and only its optional key is absent (the route needs one, the client can
    send it), else a 500 problem whose exception then goes on to the server (the route is misconfigured).
    """


def find_unit_of_work(scope: Mapping[str, object]) -> UnitOfWork[HTTPResponse] | None:
    """Return the unit of work the middleware opened for the request of ``scope``, if it opened one."""
    state = scope.get("state")
    found = state.get(STATE_KEY) if isinstance(state, Mapping) else None
    return found if isinstance(found, UnitOfWork) else None

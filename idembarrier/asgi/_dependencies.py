"""FastAPI dependencies (plain functions of a Starlette ``Request``) that hand a route its unit of work.

Declare a route's database session as ``session: AsyncSession = Depends(unit_of_work_session)`` and
write through it: the writes commit with the recorded response, or not at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# FastAPI reads a dependency's parameter annotations at run time to know what to inject.
from starlette.requests import Request  # noqa: TC002

from ._state import UnguardedRequestError, find_unit_of_work

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from .._uow import UnitOfWork
    from ._response import HTTPResponse

__all__ = ["unit_of_work", "unit_of_work_session"]


def unit_of_work(request: Request) -> UnitOfWork[HTTPResponse]:
    """Return the unit of work `IdempotencyMiddleware` opened for ``request`` (a FastAPI dependency).

    The route writes through its ``session`` and returns its response as usual: the middleware records
    that response. The route must not call ``complete()`` or ``fail()`` itself.

    Raises:
        UnguardedRequestError: The request is not guarded: its method is not, it came without a key that was
            optional, or the middleware is not installed.
    """
    uow = find_unit_of_work(request.scope)
    if uow is None:
        raise UnguardedRequestError(
            f"no unit of work for {request.method} {request.url.path}: the request is not guarded by "
            "IdempotencyMiddleware (method not guarded, optional key absent, or middleware not installed)"
        )
    return uow


def unit_of_work_session(request: Request) -> AsyncSession:
    """Return the session of the request's unit of work (a FastAPI dependency); see `unit_of_work`."""
    return unit_of_work(request).session

"""The ASGI interface, typed just enough for the middleware (no framework needed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send"]

# ASGI messages and scopes are dicts of heterogeneous values; `Any` is what every ASGI framework uses here,
# and it keeps `IdempotencyMiddleware` interchangeable with Starlette's and FastAPI's own app types.
Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

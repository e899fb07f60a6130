"""The middleware's configuration: checked once, frozen."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .._config import OnConflict
from .._exceptions import ConfigurationError
from ._problems import DEFAULT_PROBLEMS, Problems
from ._request import FINGERPRINT_PARTS, RequestHead
from ._response import DEFAULT_STORED_HEADERS, check_stored_headers

DEFAULT_MAX_BYTES = 1 << 20
"""The largest request body read, and the largest response held back whole, by default: 1 MiB."""

__all__ = ["DEFAULT_MAX_BYTES", "Settings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """What an `IdempotencyMiddleware` was told; see its docstring for each field."""

    scope_of: Callable[[RequestHead], str | Awaitable[str]]
    methods: frozenset[str] = frozenset({"POST", "PATCH"})
    require_key: bool = True
    fingerprint: frozenset[str] = FINGERPRINT_PARTS
    normalise_body: Callable[[bytes], object] | None = None
    max_body_bytes: int = DEFAULT_MAX_BYTES
    max_response_bytes: int = DEFAULT_MAX_BYTES
    on_conflict: OnConflict | None = None
    retry_after: int = 1
    store_statuses: frozenset[int] = frozenset()
    stored_headers: frozenset[str] = DEFAULT_STORED_HEADERS
    header: str = "Idempotency-Key"
    problems: Problems = DEFAULT_PROBLEMS

    def __post_init__(self) -> None:
        if not callable(self.scope_of):
            raise ConfigurationError("scope_of must be a callable of the request that returns its scope")
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        if unknown := sorted(self.fingerprint - FINGERPRINT_PARTS):
            raise ConfigurationError(f"unknown fingerprint parts {unknown}; choose from {sorted(FINGERPRINT_PARTS)}")
        for name in ("max_body_bytes", "max_response_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be a non-negative number of bytes, not {value!r}")
        if not isinstance(self.retry_after, int) or self.retry_after < 0:
            raise ConfigurationError(f"retry_after must be a non-negative number of seconds, not {self.retry_after!r}")
        if outside := sorted(s for s in self.store_statuses if not 400 <= s <= 499):
            raise ConfigurationError(
                f"store_statuses lists {outside}: only 4xx may be chosen (2xx and 3xx are always stored, 5xx never are)"
            )
        object.__setattr__(self, "stored_headers", check_stored_headers(self.stored_headers))
        if not self.header or not self.header.isascii():
            raise ConfigurationError(f"the key's header must be a non-empty ASCII name, not {self.header!r}")
        if not isinstance(self.problems, Problems):
            raise ConfigurationError(f"problems must be a Problems, not {type(self.problems).__name__}")
        if self.on_conflict is not None:
            object.__setattr__(self, "on_conflict", OnConflict(self.on_conflict))

    @property
    def header_name(self) -> bytes:
        """The key's header name as ASGI spells it: lower-case bytes."""
        return self.header.lower().encode("ascii")

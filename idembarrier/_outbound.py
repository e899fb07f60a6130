"""Outbound calls that keep their key: the key of each logical call, the retry policy, ``Retry-After``.

Nothing here imports an HTTP client: `idembarrier.httpx` puts these to work on httpx, and another client
could too. The key of a call is *derived*, not drawn at random: a function of the lease's downstream key
and the call's name, so every attempt, a restarted process and a reclaimer compute the very same key with
no write and no read (a random key would have to be checkpointed before the first attempt, and a crash
between the two would lose it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from ._exceptions import ConfigurationError

__all__ = ["RETRY_STATUSES", "Retries", "call_key", "retry_after"]

RETRY_STATUSES = frozenset({409, 429, 503})
"""The answers worth the same request again: in progress elsewhere (409), slow down (429), unavailable (503)."""


def call_key(downstream_key: str, call: str | None = None) -> str:
    """The idempotency key of one logical call made under a lease.

    Without a call name it is the lease's downstream key itself; with one, ``idb-`` and the first 32 hex
    digits of SHA-256 over the downstream key, a unit separator and the name. Either way it is the same on
    every attempt, in every process and for every reclaimer, and two names never share a key.
    """
    if call is None:
        return downstream_key
    if not call:
        raise ConfigurationError("a call's name is a non-empty string (or None for the lease's downstream key)")
    return "idb-" + hashlib.sha256(f"{downstream_key}\x1f{call}".encode()).hexdigest()[:32]


@dataclass(frozen=True, kw_only=True)
class Retries:
    """How an outbound call is retried: how often, for how long, and after which answers.

    Attributes:
        attempts: Attempts in all, the first one included (1: never retry).
        deadline: Seconds from the first attempt after which no attempt starts and a running one is cancelled.
        initial: The first backoff's ceiling, in seconds; each later ceiling doubles, up to ``maximum``.
        maximum: The largest backoff ceiling, in seconds. A ``Retry-After`` answer may ask for longer.
        statuses: The HTTP statuses that are retried; any other answer is returned at once.
    """

    attempts: int = 5
    deadline: float = 30.0
    initial: float = 0.2
    maximum: float = 5.0
    statuses: frozenset[int] = field(default=RETRY_STATUSES)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(f"attempts must be at least 1, not {self.attempts}")
        if not self.deadline > 0:
            raise ConfigurationError(f"deadline must be a positive number of seconds, not {self.deadline}")
        if not 0 < self.initial <= self.maximum:
            raise ConfigurationError(
                f"backoff needs 0 < initial <= maximum, not initial={self.initial}, maximum={self.maximum}"
            )
        if any(not 100 <= status <= 599 for status in self.statuses):
            raise ConfigurationError(f"statuses are HTTP statuses (100-599): {sorted(self.statuses)}")


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """The seconds a ``Retry-After`` value asks to wait (RFC 9110 §10.2.3), or None if it says nothing usable.

    Either delay-seconds (digits only) or an HTTP-date; a date in the past asks for no wait at all.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" in the date: RFC 5322's unknown zone; HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())

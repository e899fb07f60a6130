"""The probe's side of HTTP: one budgeted, rate-limited sender, and the answers it collects.

Every request the probe makes goes through `Sender`, which refuses a request past the budget and spaces
requests out to the rate limit (a burst of concurrent duplicates takes its tokens at once, so it stays a
burst). Redirects are never followed: the probe talks to the URL it was given and to nothing else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import httpx

Headers = list[tuple[str, str | bytes]]
"""Request headers in order; a value given as bytes is sent as it is (a malformed key, for instance)."""

__all__ = ["Answer", "BudgetExhaustedError", "Sender", "TargetUnreachableError"]

REPLAY_MARKERS = ("idempotent-replayed", "idempotency-replayed", "x-idempotent-replayed", "x-idempotency-replayed")
"""Response headers that APIs use to mark a replay (Stripe's first), looked for when none is named."""


class BudgetExhaustedError(Exception):
    """Raised when a request would go past the probe's request budget."""


class TargetUnreachableError(Exception):
    """Raised when the target refuses the connection, times out, or breaks off an answer it should give."""


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as the probe saw it."""

    status: int
    headers: Mapping[str, str]
    """Lower-case names."""
    body: bytes

    def document(self) -> object:
        """The body parsed as JSON, or ``None`` when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def same_as(self, other: Answer) -> bool:
        """Whether ``other`` carries the same status and the same body (compared as JSON where both are)."""
        if self.status != other.status:
            return False
        mine, theirs = self.document(), other.document()
        return mine == theirs if mine is not None and theirs is not None else self.body == other.body

    def marker(self, name: str | None) -> tuple[str, str] | None:
        """The replay marker (header, value): the header ``name``, else the first of the usual names present."""
        names = (name.lower(),) if name else REPLAY_MARKERS
        return next(((n, self.headers[n]) for n in names if n in self.headers), None)

    def short(self) -> str:
        """The status and the start of the body, for a clause's detail."""
        text = " ".join(self.body.decode(errors="replace").split())
        return f"{self.status} {text[:60]}{'…' if len(text) > 60 else ''}".rstrip()


class Sender:
    """Sends the probe's requests, within a budget and a rate limit."""

    def __init__(self, client: httpx.AsyncClient, *, budget: int, rate: float, burst: int) -> None:
        self._client = client
        self.remaining = budget
        self._rate = rate
        self._capacity = max(1, burst)
        self._tokens = float(self._capacity)
        self._refilled = time.monotonic()
        self._lock = anyio.Lock()

    def affords(self, count: int) -> bool:
        """Whether ``count`` more requests fit in the budget."""
        return count <= self.remaining

    async def _take(self, count: int) -> None:
        if count > self.remaining:
            raise BudgetExhaustedError(count)
        self.remaining -= count
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self._capacity, self._tokens + (now - self._refilled) * self._rate)
                self._refilled = now
                if self._tokens >= count:
                    self._tokens -= count
                    return
                await anyio.sleep((count - self._tokens) / self._rate)

    async def send(self, method: str, url: str, *, headers: Headers, body: bytes | None = None) -> Answer:
        """Send one request and return its answer."""
        await self._take(1)
        return await self._send(method, url, headers, body)

    async def send_lost(self, method: str, url: str, *, headers: Headers, body: bytes) -> Answer | None:
        """Send one request whose answer may never arrive; ``None`` when the connection closed without one."""
        await self._take(1)
        try:
            return await self._send(method, url, headers, body)
        except TargetUnreachableError as exc:
            if isinstance(exc.__cause__, httpx.RemoteProtocolError):
                return None
            raise

    async def burst(self, count: int, method: str, url: str, *, headers: Headers, body: bytes) -> list[Answer]:
        """Send ``count`` copies of one request at the same moment; return their answers in order."""
        await self._take(count)
        answers: list[Answer | None] = [None] * count

        async def one(index: int) -> None:
            answers[index] = await self._send(method, url, headers, body)

        async with anyio.create_task_group() as group:  # every copy starts in the same turn of the loop
            for index in range(count):
                group.start_soon(one, index)
        return [answer for answer in answers if answer is not None]

    async def _send(self, method: str, url: str, headers: Headers, body: bytes | None) -> Answer:
        try:
            raw = [(n.encode("ascii"), v if isinstance(v, bytes) else v.encode("latin-1")) for n, v in headers]
            response = await self._client.request(method, url, headers=raw, content=body)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise TargetUnreachableError(f"{method} {url}: {_reason(exc)}") from exc
        return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)


def _reason(exc: Exception) -> str:
    """The OS's or the protocol's reason, without httpx's wrapping."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause) or str(exc) or type(exc).__name__
    return text if not isinstance(exc, httpx.TimeoutException) else f"no answer in time ({text})"

"""Outbound calls that keep their key: an httpx transport for the calls a lease's holder makes.

`KeyedTransport` wraps another `httpx.AsyncBaseTransport`. Every unsafe request (not GET, HEAD, OPTIONS or
TRACE) it sends carries an ``Idempotency-Key``: the lease's downstream key, or the key derived from it for
a named call (``extensions=call("refund")``, see `call_key`). It retries lost connections, timeouts and
409/429/503 answers with jittered exponential backoff that honours ``Retry-After``, bounded by `Retries`'s
attempts and total deadline, and sends the same key (and the same bytes) on every attempt. A restarted
process and a reclaimer derive the same key again, so the other side deduplicates their retries too.

Errors at the end: `DownstreamError` (attempts spent) and `DownstreamDeadlineError` (deadline passed),
chained to the last httpx error; `LeaseLostError` when the lease was found lost (nothing more is sent);
`UnitOfWorkError` when one call name is used for two different requests. httpx errors that are the
caller's own (``UnsupportedProtocol``, ``LocalProtocolError``, ``ProxyError``) propagate unchanged.

Needs the ``httpx`` extra.
"""

from __future__ import annotations

import typing

import anyio
import httpx

from . import _exceptions
from ._backoff import Backoff as _Backoff
from ._exceptions import DownstreamDeadlineError, DownstreamError
from ._outbound import RETRY_STATUSES, Retries, call_key, retry_after

__all__ = [
    "CALL_EXTENSION",
    "KEY_HEADER",
    "RETRY_STATUSES",
    "DownstreamDeadlineError",
    "DownstreamError",
    "HeldLease",
    "KeyedTransport",
    "Retries",
    "call",
    "call_key",
    "retry_after",
]

KEY_HEADER = "Idempotency-Key"
"""The header that carries the key (draft-ietf-httpapi-idempotency-key-header); Stripe's and most APIs' name."""
CALL_EXTENSION = "idembarrier.call"
"""The httpx request extension that names a logical call: its value is the name `call_key` derives from."""

_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.1: nothing to deduplicate
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # nothing left this process
_RETRIED = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


class HeldLease(typing.Protocol):
    """What the transport reads of a lease (`idembarrier.Lease`): its key, scope, downstream key, and loss."""

    @property
    def key(self) -> str:
        """The lease's own idempotency key."""

    @property
    def scope(self) -> str:
        """The lease's scope."""

    @property
    def downstream_key(self) -> str:
        """The key to hand to external systems for the lease's (scope, key)."""

    @property
    def lost(self) -> bool:
        """Whether a heartbeat found the lease gone."""


def call(name: str) -> dict[str, str]:
    """The request extensions that name a logical call: ``client.post(url, extensions=call("refund"))``.

    Each logical call made under one lease needs its own name; attempts, restarts and reclaimers of the
    same call use the same name and so send the same key.
    """
    call_key("-", name)  # refuses an empty name here, where the mistake is made
    return {CALL_EXTENSION: name}


class KeyedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each logical call of a lease under one stable key, retrying it.

    Args:
        lease: The lease whose holder makes the calls (`Barrier.leased`).
        transport: The transport that sends each attempt (default: a new `httpx.AsyncHTTPTransport`).
        retries: How often and how long to retry.
        header: The request header that carries the key.

    A request that already has the header keeps the caller's key. The key of every unsafe request is
    derived from ``lease.downstream_key`` and the request's call name (no name: the downstream key itself);
    the transport refuses one name for requests to two different methods or URLs.
    """

    def __init__(
        self,
        lease: HeldLease,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: Retries | None = None,
        header: str = KEY_HEADER,
    ) -> None:
        self._lease = lease
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._retries = retries if retries is not None else Retries()
        self._header = header
        self._calls: dict[str | None, tuple[str, str]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` under its key until a final answer, the attempts or the deadline run out."""
        key = self._key(request)
        await request.aread()  # every attempt sends the same bytes, even of a streamed body
        retries = self._retries
        deadline = anyio.current_time() + retries.deadline
        backoff = _Backoff(retries.initial, retries.maximum)
        outcome_unknown = False
        for attempt in range(1, retries.attempts + 1):
            if self._lease.lost:  # a reclaimer holds the key now: its calls, not ours
                raise _exceptions.LeaseLostError(scope=self._lease.scope, key=self._lease.key)
            failure: httpx.TransportError | None = None
            status: int | None = None
            wait: float | None = None
            with anyio.move_on_after(deadline - anyio.current_time()) as attempt_scope:
                try:
                    response = await self._inner.handle_async_request(request)
                except _RETRIED as exc:
                    failure = exc
                    outcome_unknown = outcome_unknown or not isinstance(exc, _UNSENT)
                else:
                    if response.status_code not in retries.statuses:
                        return response
                    status = response.status_code
                    outcome_unknown = outcome_unknown or status == 409  # the other side is running it
                    wait = retry_after(response.headers.get("retry-after"))
                    await response.aread()
                    await response.aclose()
            if attempt_scope.cancelled_caught:
                raise DownstreamDeadlineError(
                    f"{request.method} {request.url}: no answer within the {retries.deadline:g} s deadline "
                    f"(attempt {attempt}, key {key!r})",
                    key=key,
                    attempts=attempt,
                    status=None,
                    outcome_unknown=True,
                )
            what = f"answered {status}" if failure is None else f"failed: {type(failure).__name__}"
            if attempt == retries.attempts:
                raise DownstreamError(
                    f"{request.method} {request.url} {what} on all {attempt} attempts (key {key!r})",
                    key=key,
                    attempts=attempt,
                    status=status,
                    outcome_unknown=outcome_unknown,
                ) from failure
            delay = backoff.next() if wait is None else max(wait, backoff.next())
            if anyio.current_time() + delay > deadline:
                raise DownstreamDeadlineError(
                    f"{request.method} {request.url} {what}; the next attempt, in {delay:.3g} s, would start after "
                    f"the {retries.deadline:g} s deadline (attempt {attempt}, key {key!r})",
                    key=key,
                    attempts=attempt,
                    status=status,
                    outcome_unknown=outcome_unknown,
                ) from failure
            await anyio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _key(self, request: httpx.Request) -> str | None:
        """Put the request's key in its header, and return it (None for a safe method: no key)."""
        if self._header in request.headers:
            return request.headers[self._header]
        if request.method in _SAFE:
            return None
        name = request.extensions.get(CALL_EXTENSION)
        if name is not None and not isinstance(name, str):
            raise _exceptions.UnitOfWorkError(f"the {CALL_EXTENSION!r} extension names a call by a string: {name!r}")
        target = (request.method, str(request.url))
        first = self._calls.setdefault(name, target)
        if first != target:
            label = "the unnamed call" if name is None else f"call {name!r}"
            raise _exceptions.UnitOfWorkError(
                f"{label} was {first[0]} {first[1]} and is now {target[0]} {target[1]}: one key would cover two "
                'different requests; name each call (extensions=call("…"))'
            )
        key = call_key(self._lease.downstream_key, name)
        request.headers[self._header] = key
        return key

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self._inner.aclose()

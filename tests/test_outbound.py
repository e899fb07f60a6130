"""Outbound calls that keep their key (`idembarrier.httpx`), against real HTTP servers on loopback.

The other side is `Downstream`, a tiny ASGI payments API on uvicorn that deduplicates charges by their
``Idempotency-Key`` (as Stripe does) and answers its first requests from a script (503, 429, 409, a slow
answer); `LossyProxy` sits in front of it when a test needs an answer lost after the charge was made.
Where a lease is involved the test runs on PostgreSQL and SQLite.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from idembarrier import JSON, Barrier, ConfigurationError, LeaseLostError, UnitOfWorkError, downstream_key
from idembarrier.httpx import (
    KEY_HEADER,
    DownstreamDeadlineError,
    DownstreamError,
    KeyedTransport,
    Retries,
    call,
    call_key,
    retry_after,
)
from tests.helpers import new_key
from tests.models import Payment
from tests.probe_apps import idembarrier_app, serving
from tests.test_lease import until_stale

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import SocketStream

    from idembarrier import Lease
    from idembarrier.asgi._types import Receive, Scope, Send
    from tests.conftest import Database

SCOPE = "charges"
FAST = Retries(attempts=5, deadline=20, initial=0.01, maximum=0.05)
"""Retries whose own backoff is short: a wait of a second or more can only be a ``Retry-After``'s."""


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a status, and a ``Retry-After`` value (or a function making it at answer time)."""

    status: int
    retry_after: str | Callable[[], str] | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class Arrival:
    """A request as the server saw it: its key and when it came (monotonic and wall clock)."""

    key: str | None
    path: str
    at: float
    wall: float
    body: bytes


@dataclass
class Downstream:
    """A payments API deduplicating by key: ``POST /charges`` makes one charge per key, answered 201 each time.

    Its first requests get the scripted `Reply` answers instead, before any effect.
    """

    script: list[Reply] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    charges: dict[str, str] = field(default_factory=dict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        key = headers.get(KEY_HEADER.lower())
        self.arrivals.append(Arrival(key, scope["path"], time.monotonic(), time.time(), body))
        if self.script:
            reply = self.script.pop(0)
            await anyio.sleep(reply.delay)
            extra = reply.retry_after() if callable(reply.retry_after) else reply.retry_after
            await self._answer(send, reply.status, {"error": reply.status}, extra)
            return
        if key is None:
            await self._answer(send, 400, {"error": "an Idempotency-Key is required"})
            return
        charge = self.charges.setdefault(key, f"ch_{len(self.charges) + 1}")
        await self._answer(send, 201, {"charge": charge, "path": scope["path"]})

    @staticmethod
    async def _answer(send: Send, status: int, body: JSON, retry: str | None = None) -> None:
        headers = [(b"content-type", b"application/json")]
        if retry is not None:
            headers.append((b"retry-after", retry.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    @property
    def keys(self) -> list[str | None]:
        """The key of every request, in order of arrival."""
        return [arrival.key for arrival in self.arrivals]


class LossyProxy:
    """A TCP proxy that forwards its first ``lose`` connections' requests, waits for the answer, and drops it.

    The client sees the server close without answering; the server has done the work.
    """

    def __init__(self, port: int, *, lose: int) -> None:
        self._port = port
        self.lose = lose
        self.lost = 0

    async def handle(self, client: SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self._port) as server:
            losing = self.lost < self.lose
            self.lost += losing
            async with anyio.create_task_group() as pumps:

                async def pump(source: SocketStream, target: SocketStream) -> None:
                    try:
                        async for chunk in source:
                            await target.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    pumps.cancel_scope.cancel()

                pumps.start_soon(pump, client, server)
                if losing:
                    await server.receive()  # the answer came: the charge is made; the client never sees it
                    pumps.cancel_scope.cancel()
                else:
                    pumps.start_soon(pump, server, client)


@asynccontextmanager
async def lossy(base: str, *, lose: int) -> AsyncIterator[str]:
    """Serve a `LossyProxy` in front of ``base`` on a free loopback port; yield its base URL."""
    proxy = LossyProxy(httpx.URL(base).port or 80, lose=lose)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy.handle)
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


@asynccontextmanager
async def client_for(lease: Lease[JSON], base: str, retries: Retries = FAST) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that sends through a `KeyedTransport` of ``lease``."""
    async with httpx.AsyncClient(base_url=base, transport=KeyedTransport(lease, retries=retries)) as client:
        yield client


async def finish(lease: Lease[JSON], key: str, response: JSON) -> None:
    async with lease.finish() as uow:
        uow.session.add(Payment(key=key, amount=100))
        uow.complete(response)


def gaps(downstream: Downstream) -> list[float]:
    """Seconds between consecutive arrivals at the server."""
    times = [arrival.at for arrival in downstream.arrivals]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


# -- retried answers --------------------------------------------------------------------------------------


async def test_503_with_retry_after_twice_then_201_is_one_charge_under_one_key(db: Database) -> None:
    """Two 503s with ``Retry-After: 1`` then a 201: one charge, the same key three times, a second between."""
    downstream = Downstream([Reply(503, "1"), Reply(503, "1")])
    barrier, key = Barrier(db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease, client_for(lease, base) as client:
            answer = await client.post("/charges", json={"amount": 100})
            await finish(lease, key, answer.json())
    assert (answer.status_code, answer.json()["charge"]) == (201, "ch_1")
    assert downstream.keys == [downstream_key(SCOPE, key)] * 3
    assert len(downstream.charges) == 1
    assert all(gap >= 1.0 for gap in gaps(downstream)), gaps(downstream)


async def test_429_with_an_http_date_waits_until_that_date(db: Database) -> None:
    """A 429 whose ``Retry-After`` is an HTTP-date: the retry arrives no earlier than that date."""
    dates: list[float] = []

    def next_second_but_one() -> str:
        dates.append(math.ceil(time.time()) + 1)
        return format_datetime(datetime.fromtimestamp(dates[-1], UTC), usegmt=True)

    downstream = Downstream([Reply(429, next_second_but_one)])
    barrier, key = Barrier(db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease, client_for(lease, base) as client:
            answer = await client.post("/charges", json={"amount": 100})
            await lease.release()
    assert answer.status_code == 201
    assert len(downstream.arrivals) == 2
    assert downstream.arrivals[1].wall >= dates[0]
    assert downstream.keys[0] == downstream.keys[1] == downstream_key(SCOPE, key)


async def test_409_in_progress_then_the_answer(pg_db: Database) -> None:
    """A 409 (the other side still runs the key) is retried under the same key until it answers."""
    downstream = Downstream([Reply(409), Reply(409)])
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease, client_for(lease, base) as client:
            answer = await client.post("/charges", json={"amount": 100})
            await lease.release()
    assert answer.status_code == 201
    assert downstream.keys == [lease.downstream_key] * 3


async def test_a_streamed_body_is_sent_whole_on_every_attempt(pg_db: Database) -> None:
    """A request body from an async generator (readable once) is sent again, the same bytes, on the retry."""

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b'{"amount": ', b"100}"):
            yield chunk

    downstream = Downstream([Reply(503)])
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease, client_for(lease, base) as client:
            answer = await client.post("/charges", content=chunks())
            await lease.release()
    assert answer.status_code == 201
    assert [arrival.body for arrival in downstream.arrivals] == [b'{"amount": 100}'] * 2


async def test_other_answers_are_returned_at_once(pg_db: Database) -> None:
    """A 4xx that is not retried (400, 422) and a 500 come back as the answer, after one attempt."""
    downstream = Downstream([Reply(400), Reply(422), Reply(500)])
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease, client_for(lease, base) as client:
            statuses = [(await client.post("/charges", json={})).status_code for _ in range(3)]
            await lease.release()
    assert statuses == [400, 422, 500]
    assert len(downstream.arrivals) == 3


async def test_attempts_run_out_with_a_precise_error(pg_db: Database) -> None:
    """A server that answers 503 on every attempt: DownstreamError with the key, attempts and last status."""
    downstream = Downstream([Reply(503)] * 3)
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease:
            async with client_for(lease, base, Retries(attempts=3, initial=0.01, maximum=0.01)) as client:
                with pytest.raises(DownstreamError) as caught:
                    await client.post("/charges", json={})
            await lease.release()
    assert type(caught.value) is DownstreamError
    error = caught.value
    assert (error.key, error.attempts, error.status, error.outcome_unknown) == (lease.downstream_key, 3, 503, False)
    assert len(downstream.arrivals) == 3


async def test_a_retry_after_past_the_deadline_fails_at_once(pg_db: Database) -> None:
    """A ``Retry-After`` longer than what is left of the deadline: DownstreamDeadlineError, without waiting."""
    downstream = Downstream([Reply(503, "30")])
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease:
            async with client_for(lease, base, Retries(deadline=5)) as client:
                started = anyio.current_time()
                with pytest.raises(DownstreamDeadlineError) as caught:
                    await client.post("/charges", json={})
                elapsed = anyio.current_time() - started
            await lease.release()
    assert elapsed < 5
    assert (caught.value.attempts, caught.value.status) == (1, 503)
    assert len(downstream.arrivals) == 1


async def test_an_attempt_running_past_the_deadline_is_cancelled(pg_db: Database) -> None:
    """An answer slower than the deadline: the attempt is cancelled at the deadline, outcome unknown."""
    downstream = Downstream([Reply(201, delay=3)])
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease:
            async with client_for(lease, base, Retries(deadline=0.5)) as client:
                started = anyio.current_time()
                with pytest.raises(DownstreamDeadlineError) as caught:
                    await client.post("/charges", json={})
                elapsed = anyio.current_time() - started
            await lease.release()
    assert 0.5 <= elapsed < 3
    assert caught.value.outcome_unknown
    assert caught.value.key == lease.downstream_key


async def test_a_refused_connection_is_retried_and_reported_as_not_sent(pg_db: Database) -> None:
    """Nothing listens: every attempt fails to connect; DownstreamError says the call never left."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # the port is free now: connects are refused
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease:
        async with client_for(lease, f"http://127.0.0.1:{port}", Retries(attempts=2, initial=0.01)) as client:
            with pytest.raises(DownstreamError) as caught:
                await client.post("/charges", json={})
        await lease.release()
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert (caught.value.attempts, caught.value.status, caught.value.outcome_unknown) == (2, None, False)


# -- lost answers ---------------------------------------------------------------------------------------


async def test_a_cut_connection_is_retried_under_the_same_key(pg_db: Database) -> None:
    """The server charges, the connection closes before the answer: the retry gets the same charge."""
    downstream = Downstream()
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with lossy(base, lose=1) as via, barrier.leased(key, scope=SCOPE) as lease:
            async with client_for(lease, via) as client:
                answer = await client.post("/charges", json={"amount": 100})
            await finish(lease, key, answer.json())
    assert (answer.status_code, answer.json()["charge"]) == (201, "ch_1")
    assert downstream.keys == [lease.downstream_key] * 2
    assert len(downstream.charges) == 1


async def test_a_reclaimer_sends_the_abandoned_holders_key(db: Database) -> None:
    """The first holder's answer is lost and it gives up; a reclaimer (another barrier) sends the same key.

    The server sees two requests and one distinct key, and makes one charge.
    """
    downstream = Downstream()
    key = new_key()
    with serving(downstream) as base:
        async with lossy(base, lose=1) as via:
            first = Barrier(db.sessionmaker)
            with pytest.raises(DownstreamError) as caught:
                async with (
                    first.leased(key, scope=SCOPE, lease=timedelta(milliseconds=300)) as lease,
                    client_for(lease, via, Retries(attempts=1)) as client,
                ):
                    await client.post("/charges", json={"amount": 100}, extensions=call("charge"))
            assert caught.value.outcome_unknown
            await until_stale(db, key)
            restarted = Barrier(db.sessionmaker)  # a new process: nothing in memory but the database
            async with restarted.leased(key, scope=SCOPE) as again:
                assert (again.attempt, again.checkpoint_name) == (2, None)
                async with client_for(again, via) as client:
                    answer = await client.post("/charges", json={"amount": 100}, extensions=call("charge"))
                await finish(again, key, answer.json())
    assert Counter(downstream.keys) == {call_key(downstream_key(SCOPE, key), "charge"): 2}
    assert len(downstream.charges) == 1
    assert answer.json()["charge"] == "ch_1"
    assert await db.payments(key) == 1


async def test_idembarriers_own_middleware_replays_a_lost_answer(pg_db: Database) -> None:
    """Through idembarrier's middleware on uvicorn behind the lossy proxy: one order, its answer replayed."""
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(idembarrier_app(pg_db.url)) as base:
        async with lossy(base, lose=1) as via, barrier.leased(key, scope=SCOPE) as lease:
            async with client_for(lease, via) as client:
                answer = await client.post("/orders", json={"amount": 7}, headers={"authorization": "Bearer a"})
                count = (await client.get("/orders/count")).json()
            await lease.release()
    assert answer.status_code == 201
    assert answer.headers["idempotent-replayed"] == "true"
    assert count == {"count": 1}


async def test_a_lost_lease_sends_nothing(db: Database) -> None:
    """A holder whose lease was reclaimed (its renewal says so) may not call out: LeaseLostError, no request."""
    downstream = Downstream()
    barrier, key = Barrier(db.sessionmaker), new_key()
    with serving(downstream) as base:
        zombie = barrier.leased(key, scope=SCOPE, lease=timedelta(milliseconds=300))
        with pytest.raises(LeaseLostError):
            async with zombie:
                await until_stale(db, key)
                async with barrier.leased(key, scope=SCOPE) as taker:
                    with pytest.raises(LeaseLostError):
                        await zombie.renew()
                    async with client_for(zombie, base) as client:
                        with pytest.raises(LeaseLostError):
                            await client.post("/charges", json={})
                    await taker.release()
    assert downstream.arrivals == []


# -- keys -----------------------------------------------------------------------------------------------


async def test_each_named_call_has_its_own_key_and_safe_methods_none(pg_db: Database) -> None:
    """Two named calls, an unnamed one, a caller's own key and a GET: the keys the server sees."""
    downstream = Downstream()
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease, client_for(lease, base) as client:
            await client.post("/charges", json={})
            await client.post("/refunds", extensions=call("refund"))
            await client.post("/captures", extensions=call("capture"))
            await client.post("/charges", extensions=call("refund"), headers={KEY_HEADER: "mine"})
            await client.get("/charges")
            await lease.release()
    root = downstream_key(SCOPE, key)
    assert downstream.keys == [root, call_key(root, "refund"), call_key(root, "capture"), "mine", None]
    assert len(set(downstream.keys)) == 5


async def test_one_name_for_two_requests_is_refused(pg_db: Database) -> None:
    """One call name (or none) for two different URLs would share a key: UnitOfWorkError, nothing sent."""
    downstream = Downstream()
    barrier, key = Barrier(pg_db.sessionmaker), new_key()
    with serving(downstream) as base:
        async with barrier.leased(key, scope=SCOPE) as lease, client_for(lease, base) as client:
            await client.post("/charges", json={})
            with pytest.raises(UnitOfWorkError, match="name each call"):
                await client.post("/refunds", json={})
            with pytest.raises(UnitOfWorkError, match="string"):
                await client.post("/refunds", extensions={"idembarrier.call": 3})
            await client.post("/charges", json={})  # the same call again: allowed, the same key
            await lease.release()
    assert downstream.keys == [lease.downstream_key] * 2


@pytest.mark.parametrize(
    ("call_name", "expected"),
    [
        (None, "idb-aaa259c31a46438ecd8b40b829a44d85"),
        ("charge", "idb-baa3f7dd649e113c960f9298f81f8a03"),
        ("refund", "idb-e757e064c00fbad3ecd9fdf563a3d957"),
    ],
)
def test_call_keys_are_pinned(call_name: str | None, expected: str) -> None:
    """The key of a call is a fixed value: a change to its derivation must fail here (others deduplicate by it)."""
    assert call_key(downstream_key("charges", "charge-1"), call_name) == expected


def test_an_empty_call_name_is_refused() -> None:
    """An empty name is refused where it is written: ConfigurationError."""
    with pytest.raises(ConfigurationError):
        call("")


def test_the_transport_needs_httpx_alone() -> None:
    """`idembarrier.httpx` imports httpx and no web framework or server; `idembarrier` itself does not import it."""
    code = "import sys, idembarrier.httpx; print(sorted({m.split('.')[0] for m in sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(ast.literal_eval(done.stdout))
    assert "httpx" in loaded
    assert not loaded & {"starlette", "fastapi", "uvicorn"}


# -- Retry-After and the policy ---------------------------------------------------------------------------


NOW = datetime(2026, 12, 2, 5, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Wed, 02 Dec 2026 05:00:07 GMT", 7.0),
        ("Wed, 02 Dec 2026 04:59:00 GMT", 0.0),  # in the past: no wait
        ("Wed, 02 Dec 2026 05:00:03 -0000", 3.0),  # RFC 5322's unknown zone: read as GMT
        (None, None),
        ("soon", None),
        ("-1", None),
        ("1.5", None),  # delay-seconds are digits only
        ("١٢", None),  # non-ASCII digits are not delay-seconds
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: str | None, expected: float | None) -> None:
    """``Retry-After`` is delay-seconds or an HTTP-date; anything else says nothing."""
    assert retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    "options",
    [
        {"attempts": 0},
        {"deadline": 0},
        {"initial": 0},
        {"initial": 2, "maximum": 1},
        {"statuses": frozenset({99})},
    ],
)
def test_retries_refuse_unusable_settings(options: dict[str, object]) -> None:
    """Unusable retry settings are refused when built: ConfigurationError."""
    with pytest.raises(ConfigurationError):
        Retries(**options)  # type: ignore[arg-type]

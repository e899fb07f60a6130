"""A scripted retry session against the payments API, step by step as the Idempotency-Key draft prescribes.

    python -m examples.retry_session                        # serves the API itself (temporary SQLite)
    python -m examples.retry_session --url http://127.0.0.1:8000

1. a first request runs: 201;
2. its retry (same key, same body) replays: 201, ``Idempotent-Replayed: true``, the same body;
3. the key reused for another body: 422 problem;
4. a request without a key: 400 problem;
5. five concurrent copies of a new request: one runs; the others get 409 with ``Retry-After`` (or, if they
   come late, the replay), wait as told, retry with the same key and get the replay;
6. a declined card: 402, and its retry replays the 402: the card is never charged twice.

Prints the exchanges and exits non-zero if the API answered anything else.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
import uvicorn

from examples.payments_api import DECLINED_CARD, create_app

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


class Unexpected(Exception):
    """The API answered something the draft does not prescribe."""


def show(step: str, response: httpx.Response) -> None:
    """Print one exchange: the step, the status, the start of the body and the idempotency headers."""
    marks = [f"{h}: {response.headers[h]}" for h in ("idempotent-replayed", "retry-after") if h in response.headers]
    print(f"{step:<36} → {response.status_code} {response.text[:100]}  {' '.join(marks)}".rstrip())


def expect(response: httpx.Response, status: int, *, replayed: bool | None = None, problem: str | None = None) -> None:
    """Raise `Unexpected` unless ``response`` has ``status`` (and, when given, the replay mark or problem)."""
    if response.status_code != status:
        raise Unexpected(f"expected {status}, got {response.status_code}: {response.text}")
    if replayed is not None and (response.headers.get("idempotent-replayed") == "true") != replayed:
        raise Unexpected(f"expected replayed={replayed}: {dict(response.headers)}")
    if problem is not None and not response.json().get("type", "").endswith(f"/problems/{problem}"):
        raise Unexpected(f"expected the {problem} problem: {response.text}")


async def run_session(base_url: str) -> None:
    """Run the session against the API at ``base_url``; raise `Unexpected` at the first wrong answer."""
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers={"x-tenant": tenant}) as client:

        async def pay(key: str | None, body: dict[str, object]) -> httpx.Response:
            headers = {} if key is None else {"Idempotency-Key": f'"{key}"'}
            return await client.post("/payments", json=body, headers=headers)

        order = {"order_id": "order-1", "amount": 4200}
        key = str(uuid.uuid4())
        first = await pay(key, order)
        show("1. first request", first)
        expect(first, 201, replayed=False)

        retry = await pay(key, order)
        show("2. retry, same key and body", retry)
        expect(retry, 201, replayed=True)
        if retry.content != first.content:
            raise Unexpected("the replay differs from the first response")

        reused = await pay(key, {**order, "amount": 9900})
        show("3. same key, another amount", reused)
        expect(reused, 422, problem="key-reused")

        keyless = await pay(None, order)
        show("4. no key", keyless)
        expect(keyless, 400, problem="key-missing")

        burst_key, burst_order = str(uuid.uuid4()), {"order_id": "order-2", "amount": 1500}
        answers: list[httpx.Response] = []

        async def copy() -> None:
            response = await pay(burst_key, burst_order)
            answers.append(response)
            if response.status_code == 409:
                await anyio.sleep(float(response.headers["retry-after"]))  # as the server asks
                answers.append(await pay(burst_key, burst_order))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(copy)
        for response in answers:
            show("5. concurrent copy (then its retry)", response)
        finals = [r for r in answers if r.status_code != 409]
        if len(finals) != 5 or {r.status_code for r in finals} != {201} or len({r.content for r in finals}) != 1:
            raise Unexpected("the concurrent copies did not end in one response")
        if sum(r.headers.get("idempotent-replayed") != "true" for r in finals) != 1:
            raise Unexpected("the concurrent copies ran more than once")
        for conflict in (r for r in answers if r.status_code == 409):
            expect(conflict, 409, problem="key-in-progress")

        declined_key, declined = str(uuid.uuid4()), {"order_id": "order-3", "amount": 700, "card": DECLINED_CARD}
        refusal = await pay(declined_key, declined)
        show("6. declined card", refusal)
        expect(refusal, 402, replayed=False)
        again = await pay(declined_key, declined)
        show("6. its retry", again)
        expect(again, 402, replayed=True)

        payments = [p for p in (await client.get("/payments")).json() if p["tenant"] == tenant]
        print(f"payments made for {tenant}: {[(p['order_id'], p['status']) for p in payments]}")
        if sorted(p["order_id"] for p in payments) != ["order-1", "order-2", "order-3"]:
            raise Unexpected("an order was charged twice, or not at all")


@contextmanager
def serve_api(database_url: str) -> Iterator[str]:
    """Serve the payments API on a free loopback port, in a thread; yield its URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(database_url), log_config=None, ws="none", http="h11"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the session; return 0 if every answer was the prescribed one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", help="a running payments API (default: serve one on a temporary SQLite file)")
    args = parser.parse_args(argv)
    try:
        if args.url:
            anyio.run(run_session, args.url)
        else:
            with tempfile.TemporaryDirectory() as tmp, serve_api(f"sqlite+aiosqlite:///{Path(tmp) / 'api.db'}") as url:
                anyio.run(run_session, url)
    except Unexpected as exc:
        print(f"FAILED: {exc}")
        return 1
    print("OK: every answer was the one the draft prescribes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP integration under database faults: uvicorn on loopback, its database behind `tests.faultproxy`.

Each key's first request meets one fault (none, a COMMIT dropped, a COMMIT reply swallowed, a connection cut
just after the COMMIT reply, every connection cut while idle, or while the route runs); the client then
retries with the same key until it gets its 201. What must hold: no answer is a bare 500 (a failure is a 503
problem), a lost COMMIT reply is the outcome-unknown problem, and every key ends with exactly one payment.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

import anyio

from idembarrier.asgi import Problem
from tests.asgi_app import running
from tests.faultproxy import CommitCut, FaultProxy
from tests.helpers import new_key

if TYPE_CHECKING:
    import httpx

    from tests.asgi_app import Site
    from tests.conftest import Database

KEYS_PER_FAULT = 6
# In this order, "cut-idle" follows "cut-after-commit-reply": the pooled connection it meets died idle, either
# way. The pool's other connections are cut too, if any.
FAULTS = ("none", "commit-dropped", "commit-reply-swallowed", "cut-after-commit-reply", "cut-idle", "cut-in-route")
STORAGE_PROBLEMS = {p.type for p in (Problem.OUTCOME_UNKNOWN, Problem.CONNECTION_LOST, Problem.STORAGE_FAILED)}


def kind_of(response: httpx.Response) -> str:
    """What an answer was: its status, and for a problem its type's last segment."""
    if response.headers.get("content-type") == "application/problem+json":
        return f"{response.status_code} {str(response.json()['type']).rsplit('/', 1)[1]}"
    replayed = " replayed" if response.headers.get("idempotent-replayed") == "true" else ""
    return f"{response.status_code}{replayed}"


async def first_request(site: Site, proxy: FaultProxy, fault: str, key: str) -> httpx.Response:
    """Send the key's first request with ``fault`` injected."""
    headers = {"Idempotency-Key": f'"{key}"'}
    if fault == "cut-in-route":
        site.gate.entered.clear()
        site.gate.release.clear()
        async with anyio.create_task_group() as tg:
            responses: list[httpx.Response] = []

            async def send() -> None:
                responses.append(await site.client.post("/payments/held", json={"amount": 1}, headers=headers))

            tg.start_soon(send)
            await site.gate.wait_entered()  # the route has flushed its payment, uncommitted
            proxy.cut_all()
            site.gate.release.set()
        return responses[0]
    if fault == "cut-idle":
        proxy.cut_all()  # the pool's idle connections are dead: the next checkout meets one
    elif fault != "none":
        how = {
            "commit-dropped": CommitCut.DROP,
            "commit-reply-swallowed": CommitCut.BEFORE_REPLY,
            "cut-after-commit-reply": CommitCut.AFTER_REPLY,
        }[fault]
        proxy.cut_at_commit(how)
    return await site.client.post("/payments", json={"amount": 1}, headers=headers)


async def test_database_faults_answer_503_problems_and_the_same_key_settles_each(pg_db: Database) -> None:
    """Under every fault the answer is the route's 201 or a 503 problem, a lost COMMIT reply says the outcome
    is unknown, and retries with the same key leave exactly one payment per key."""
    firsts: dict[str, Counter[str]] = {fault: Counter() for fault in FAULTS}
    retries: Counter[str] = Counter()
    keys: list[str] = []
    async with FaultProxy.for_url(pg_db.url) as proxy:
        behind = dataclasses.replace(pg_db, url=proxy.url(pg_db.url))
        async with running(behind) as site:
            for fault in FAULTS * KEYS_PER_FAULT:
                key = new_key()
                keys.append(key)
                response = await first_request(site, proxy, fault, key)
                firsts[fault][kind_of(response)] += 1
                attempts = 0
                while response.status_code != 201:
                    assert response.status_code == 503, kind_of(response)
                    assert response.json()["type"] in STORAGE_PROBLEMS
                    assert response.headers["retry-after"] == "1"
                    attempts += 1
                    assert attempts <= 3, f"{fault}: key {key} never settled"
                    response = await site.client.post("/payments", json={"amount": 1}, headers={"Idempotency-Key": key})
                    retries[kind_of(response)] += 1
            errors = site.errors
        faults = dict(proxy.faults)
    print(f"\nfirst answers by fault: { {f: dict(c) for f, c in firsts.items()} }")
    print(f"retries: {dict(retries)}; faults injected: {faults}")
    assert errors == []  # answered for good: nothing went on to the server's error handling
    assert firsts["none"] == Counter({"201": KEYS_PER_FAULT})
    for fault in ("commit-dropped", "commit-reply-swallowed"):
        assert firsts[fault] == Counter({"503 outcome-unknown": KEYS_PER_FAULT})
    assert firsts["cut-after-commit-reply"] == Counter({"201": KEYS_PER_FAULT})
    assert set(firsts["cut-in-route"]) == {"503 connection-lost"}
    assert faults["commit_dropped"] == faults["commit_reply_swallowed"] == KEYS_PER_FAULT
    assert all(kind.startswith(("201", "503")) for counter in firsts.values() for kind in counter)
    assert retries["201 replayed"] >= KEYS_PER_FAULT  # the swallowed replies: each committed, each replays
    assert await pg_db.payments() == len(keys)
    for key in keys:
        assert await pg_db.payments(key) == 1

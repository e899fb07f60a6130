"""The HTTP integration end to end: a real uvicorn on loopback, an httpx client, a real database.

Each test starts the payments app of `tests.asgi_app` on its own database and counts the business rows
that the requests left behind: the one effect that idempotency is about.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import anyio
import pytest

from idembarrier import OnConflict, UnitOfWorkError
from idembarrier.asgi import Problem, UnguardedRequestError
from tests.asgi_app import running
from tests.helpers import Boom, lock_waiters, new_key

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpx

    from tests.conftest import Database

PROBLEM_JSON = "application/problem+json"


def keyed(key: str, **headers: str) -> dict[str, str]:
    """The headers of a request with ``key``, sent as the draft's structured-field string."""
    return {"Idempotency-Key": f'"{key}"', **headers}


def assert_problem(response: httpx.Response, problem: Problem) -> dict[str, object]:
    """Check ``response`` is ``problem`` as RFC 9457 problem details; return the document."""
    assert response.status_code == problem.status
    assert response.headers["content-type"] == PROBLEM_JSON
    document: dict[str, object] = response.json()
    assert document["type"] == problem.type
    assert document["status"] == problem.status
    assert document["title"] == problem.title
    assert document["detail"]
    return document


# -- first request, replay, storms ------------------------------------------------------------------------


async def test_first_request_runs_and_its_retry_replays(db: Database) -> None:
    """A first request runs the route; its retry answers the same status, body and safe headers, replayed."""
    key = new_key()
    async with running(db) as site:
        first = await site.client.post("/payments", json={"amount": 100}, headers=keyed(key))
        again = await site.client.post("/payments", json={"amount": 100}, headers=keyed(key))
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert "idempotency-stored" not in first.headers
    assert first.json() == {"id": 1, "amount": 100, "tenant": "public", "key": key}
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["content-type"] == "application/json"
    assert again.headers["location"] == first.headers["location"] == "/payments/1"
    assert await db.payments(key) == 1
    assert await db.records(key) == [("public", key, "COMPLETED")]


async def test_replay_never_carries_cookies_or_unlisted_headers(pg_db: Database) -> None:
    """The first response's Set-Cookie and custom headers go to its client only; a replay has neither."""
    key = new_key()
    async with running(pg_db) as site:
        first = await site.client.post("/payments", json={"amount": 1}, headers=keyed(key))
        again = await site.client.post("/payments", json={"amount": 1}, headers=keyed(key))
    assert "set-cookie" in first.headers
    assert first.headers["x-trace"] == "trace-1"
    assert "set-cookie" not in again.headers
    assert "x-trace" not in again.headers


async def test_listed_headers_are_stored_on_request(pg_db: Database) -> None:
    """A header named in stored_headers is replayed too."""
    key = new_key()
    async with running(pg_db, stored_headers={"content-type", "x-trace"}) as site:
        await site.client.post("/payments", json={"amount": 1}, headers=keyed(key))
        again = await site.client.post("/payments", json={"amount": 1}, headers=keyed(key))
    assert again.headers["x-trace"] == "trace-1"
    assert "location" not in again.headers


async def test_storm_of_identical_requests_has_one_effect(db: Database) -> None:
    """Concurrent identical requests run the route once; each gets the first one's status and body."""
    callers, key = 30, new_key()
    responses: list[httpx.Response] = []
    async with running(db, on_conflict=OnConflict.WAIT) as site:

        async def call() -> None:
            responses.append(await site.client.post("/payments/held", json={"amount": 7}, headers=keyed(key)))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await site.gate.wait_entered()  # the first request holds the key, its payment uncommitted
                for _ in range(callers - 1):
                    tg.start_soon(call)
                if db.dialect == "postgresql":
                    await lock_waiters(db, callers - 1)  # every duplicate waits on the held claim
                site.gate.release.set()
    assert [r.status_code for r in responses] == [201] * callers
    assert len({r.content for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert await db.payments(key) == 1
    assert await db.records(key) == [("public", key, "COMPLETED")]


async def test_storm_of_distinct_keys_runs_each_once(pg_db: Database) -> None:
    """A burst of many keys, each sent three times at once, leaves one payment per key."""
    keys = [new_key() for _ in range(15)]
    statuses: list[int] = []
    async with running(pg_db) as site:

        async def call(key: str) -> None:
            statuses.append((await site.client.post("/payments", json={"amount": 3}, headers=keyed(key))).status_code)

        async with anyio.create_task_group() as tg:
            for key in keys * 3:
                tg.start_soon(call, key)
    assert statuses == [201] * 45
    assert await pg_db.payments() == 15
    for key in keys:
        assert await pg_db.payments(key) == 1


async def test_patch_is_guarded_too(pg_db: Database) -> None:
    """PATCH is guarded by default: its retry replays."""
    key = new_key()
    async with running(pg_db) as site:
        first = await site.client.patch("/payments/9", json={"amount": 5}, headers=keyed(key))
        again = await site.client.patch("/payments/9", json={"amount": 5}, headers=keyed(key))
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["idempotent-replayed"] == "true"
    assert await pg_db.payments(key) == 1


async def test_body_less_status_replays_without_content_length(pg_db: Database) -> None:
    """A 204 is stored and replayed as a 204."""
    key = new_key()
    async with running(pg_db) as site:
        first = await site.client.post("/payments/empty", json={"amount": 5}, headers=keyed(key))
        again = await site.client.post("/payments/empty", json={"amount": 5}, headers=keyed(key))
    assert (first.status_code, again.status_code) == (204, 204)
    assert again.headers["idempotent-replayed"] == "true"
    assert "content-length" not in again.headers
    assert await pg_db.payments(key) == 1


# -- conflicts: in flight, reused -------------------------------------------------------------------------


async def test_duplicate_of_a_request_in_flight_is_409_with_retry_after(db: Database) -> None:
    """With OnConflict.FAIL a duplicate of a held request is a 409 whose Retry-After is the wait budget (the
    barrier's wait_timeout, 10 s), not retry_after (that of the 503s); a later retry replays."""
    key = new_key()
    async with running(db, on_conflict=OnConflict.FAIL, retry_after=2) as site:
        first: list[httpx.Response] = []

        async def hold() -> None:
            first.append(await site.client.post("/payments/held", json={"amount": 1}, headers=keyed(key)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await site.gate.wait_entered()
            duplicate = await site.client.post("/payments/held", json={"amount": 1}, headers=keyed(key))
            site.gate.release.set()
        later = await site.client.post("/payments/held", json={"amount": 1}, headers=keyed(key))
    assert_problem(duplicate, Problem.KEY_IN_PROGRESS)
    assert duplicate.headers["retry-after"] == "10"
    assert first[0].status_code == 201
    assert later.headers["idempotent-replayed"] == "true"
    assert later.content == first[0].content
    assert await db.payments(key) == 1


@pytest.mark.parametrize(
    ("path", "query", "body"),
    [
        pytest.param("/payments", "", {"amount": 2}, id="body"),
        pytest.param("/payments", "?currency=eur", {"amount": 1}, id="query"),
        pytest.param("/payments/held", "", {"amount": 1}, id="path"),
    ],
)
async def test_key_reused_for_a_different_request_is_422(
    pg_db: Database, path: str, query: str, body: dict[str, int]
) -> None:
    """The same key with another body, query or path is refused with 422, and nothing runs."""
    key = new_key()
    async with running(pg_db) as site:
        site.gate.release.set()
        await site.client.post("/payments", json={"amount": 1}, headers=keyed(key))
        reused = await site.client.post(path + query, json=body, headers=keyed(key))
    assert_problem(reused, Problem.KEY_REUSED)
    assert await pg_db.payments(key) == 1


async def test_fingerprint_without_the_body_replays_another_body(pg_db: Database) -> None:
    """With the body left out of the fingerprint, a retry with another body replays the first response."""
    key = new_key()
    async with running(pg_db, fingerprint=("method", "path")) as site:
        first = await site.client.post("/payments", json={"amount": 1}, headers=keyed(key))
        again = await site.client.post("/payments?x=1", json={"amount": 2}, headers=keyed(key))
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content


async def test_body_normaliser_makes_equivalent_json_one_request(pg_db: Database) -> None:
    """With json.loads as the normaliser, reordered keys and whitespace are the same request."""
    key = new_key()
    headers = keyed(key, **{"content-type": "application/json"})
    async with running(pg_db, normalise_body=json.loads) as site:
        first = await site.client.post("/payments", content=b'{"amount": 4, "note": "a"}', headers=headers)
        again = await site.client.post("/payments", content=b'{"note":"a","amount":4}', headers=headers)
        other = await site.client.post("/payments", content=b'{"note":"b","amount":4}', headers=headers)
    assert first.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert_problem(other, Problem.KEY_REUSED)


# -- the key header ---------------------------------------------------------------------------------------


async def test_missing_key_is_400_when_required(pg_db: Database) -> None:
    """A guarded request without the key is a 400 problem, and the route does not run."""
    async with running(pg_db) as site:
        response = await site.client.post("/payments", json={"amount": 1})
    assert_problem(response, Problem.KEY_MISSING)
    assert await pg_db.payments() == 0
    assert await pg_db.records() == []


async def test_missing_key_runs_unguarded_when_optional(pg_db: Database) -> None:
    """With require_key=False a request without the key runs unguarded; one with it is guarded."""
    async with running(pg_db, require_key=False) as site:
        bare = await site.client.post("/unguarded-ok", content=b"hello")
        guarded = await site.client.post("/unguarded-ok", content=b"hello", headers=keyed("k-1"))
    assert bare.json() == {"guarded": False, "body": "hello"}
    assert guarded.json() == {"guarded": True, "body": "hello"}
    assert await pg_db.records() == [("public", "k-1", "COMPLETED")]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param(b'"plain-key"', "plain-key", id="quoted"),
        pytest.param(b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324", id="bare"),
        pytest.param(b'"with \\"quotes\\" and \\\\"', 'with "quotes" and \\', id="escapes"),
        pytest.param(b'"inner spaces"', "inner spaces", id="spaces"),
        pytest.param(b'"' + b"k" * 255 + b'"', "k" * 255, id="longest"),
        pytest.param(b'"plain-key"; p=1', "plain-key", id="parameters-ignored"),  # RFC 9651, section 2.3
    ],
)
async def test_key_header_forms_are_accepted(pg_db: Database, raw: bytes, key: str) -> None:
    """Quoted sf-strings (with their escapes) and bare tokens are keys; the record holds the parsed key."""
    async with running(pg_db) as site:
        response = await site.client.post("/payments", json={"amount": 1}, headers={b"Idempotency-Key": raw})
    assert response.status_code == 201
    assert response.json()["key"] == key
    assert await pg_db.records() == [("public", key, "COMPLETED")]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"Idempotency-Key", b"")], id="empty"),
        pytest.param([(b"Idempotency-Key", b'""')], id="empty-string"),
        pytest.param([(b"Idempotency-Key", b'"' + b"k" * 256 + b'"')], id="oversized"),
        pytest.param([(b"Idempotency-Key", '"clé"'.encode())], id="non-ascii-utf8"),
        pytest.param([(b"Idempotency-Key", '"clé"'.encode("latin-1"))], id="non-ascii-latin1"),
        pytest.param([(b"Idempotency-Key", b'"a\\qb"')], id="bad-escape"),
        pytest.param([(b"Idempotency-Key", b'"abc')], id="unterminated"),
        pytest.param([(b"Idempotency-Key", b'"abc" ;p=1')], id="space-before-parameters"),
        pytest.param([(b"Idempotency-Key", b"a b")], id="bare-with-space"),
        pytest.param([(b"Idempotency-Key", b'"a"'), (b"Idempotency-Key", b'"b"')], id="twice"),
    ],
)
async def test_invalid_key_header_is_400(pg_db: Database, headers: list[tuple[bytes, bytes]]) -> None:
    """A header that is no sf-string or bare token, or names an unusable key, is a 400; nothing runs."""
    async with running(pg_db) as site:
        response = await site.client.post("/payments", json={"amount": 1}, headers=headers)
    assert_problem(response, Problem.KEY_INVALID)
    assert await pg_db.payments() == 0
    assert await pg_db.records() == []


# -- request body limit -----------------------------------------------------------------------------------


async def test_oversized_request_body_is_413(pg_db: Database) -> None:
    """A body over max_body_bytes is a 413, whether declared by Content-Length or streamed in chunks."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 512

    async with running(pg_db, max_body_bytes=1024) as site:
        declared = await site.client.post("/unguarded-ok", content=b"x" * 2048, headers=keyed(new_key()))
        chunked = await site.client.post("/unguarded-ok", content=chunks(), headers=keyed(new_key()))
        fits = await site.client.post("/unguarded-ok", content=b"x" * 1024, headers=keyed(new_key()))
    assert_problem(declared, Problem.REQUEST_TOO_LARGE)
    assert_problem(chunked, Problem.REQUEST_TOO_LARGE)
    assert fits.status_code == 200
    assert len(await pg_db.records()) == 1


# -- tenants ----------------------------------------------------------------------------------------------


async def test_one_key_in_two_tenants_runs_twice_and_never_leaks(db: Database) -> None:
    """The same key from two tenants is two executions; each tenant's retry replays its own response."""
    key = new_key()
    async with running(db) as site:
        a = await site.client.post("/payments", json={"amount": 10}, headers=keyed(key, **{"x-tenant": "acme"}))
        b = await site.client.post("/payments", json={"amount": 20}, headers=keyed(key, **{"x-tenant": "globex"}))
        a_again = await site.client.post("/payments", json={"amount": 10}, headers=keyed(key, **{"x-tenant": "acme"}))
        b_again = await site.client.post("/payments", json={"amount": 20}, headers=keyed(key, **{"x-tenant": "globex"}))
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["tenant"] == "acme"
    assert b.json()["tenant"] == "globex"
    assert a.json()["id"] != b.json()["id"]
    assert a_again.content == a.content
    assert b_again.content == b.content
    assert await db.payments(key) == 2
    assert await db.records(key) == [("acme", key, "COMPLETED"), ("globex", key, "COMPLETED")]


# -- failures: exceptions, statuses -----------------------------------------------------------------------


async def test_route_crashing_mid_write_leaves_nothing_and_its_retry_runs_once(db: Database) -> None:
    """A route that raises after writing answers a 500 problem marked not stored, its exception reaches the
    server's error handling, and it leaves no row nor record; the retry runs, once."""
    key = new_key()
    async with running(db) as site:
        site.crashes.append("the processor vanished")
        crashed = await site.client.post("/payments/crash", json={"amount": 1}, headers=keyed(key))
        assert await db.payments(key) == 0
        assert await db.records(key) == []
        retried = await site.client.post("/payments/crash", json={"amount": 1}, headers=keyed(key))
        replayed = await site.client.post("/payments/crash", json={"amount": 1}, headers=keyed(key))
        errors = site.errors
    assert_problem(crashed, Problem.APPLICATION_ERROR)
    assert crashed.headers["idempotency-stored"] == "false"
    assert [type(e) for e in errors] == [Boom]
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    assert replayed.headers["idempotent-replayed"] == "true"
    assert await db.payments(key) == 1


async def test_write_refused_at_commit_is_a_500_never_the_route_s_201(db: Database) -> None:
    """A write the database refuses at commit turns the route's 201, still held back, into a 500."""
    key = new_key()
    async with running(db) as site:
        await site.client.post("/payments", json={"amount": 1}, headers=keyed(new_key()))
        refused = await site.client.post("/payments/clash", json={"amount": 1}, headers=keyed(key))
        errors = site.errors
    assert_problem(refused, Problem.APPLICATION_ERROR)
    assert [type(e).__name__ for e in errors] == ["IntegrityError"]
    assert await db.payments() == 1
    assert await db.records(key) == []


async def test_chosen_4xx_is_stored_with_its_writes_and_replayed(db: Database) -> None:
    """A 4xx listed in store_statuses is recorded as FAILED with the route's writes, and replayed."""
    key = new_key()
    async with running(db, store_statuses={402}) as site:
        first = await site.client.post("/payments/declined", json={"amount": 1}, headers=keyed(key))
        again = await site.client.post("/payments/declined", json={"amount": 1}, headers=keyed(key))
    assert (first.status_code, again.status_code) == (402, 402)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() == {"error": "card declined"}
    assert await db.payments(key) == 1
    assert await db.records(key) == [("public", key, "FAILED")]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("/payments/declined", 402, id="4xx-not-chosen"),
        pytest.param("/payments/refused", 409, id="route-409"),
        pytest.param("/payments/unavailable", 503, id="5xx"),
    ],
)
async def test_unstored_status_rolls_back_and_its_retry_runs_again(pg_db: Database, path: str, status: int) -> None:
    """A 5xx, or a 4xx not chosen for storing, rolls the writes back, records nothing, and retries run."""
    key = new_key()
    async with running(pg_db) as site:
        first = await site.client.post(path, json={"amount": 1}, headers=keyed(key))
        again = await site.client.post(path, json={"amount": 1}, headers=keyed(key))
    for response in (first, again):
        assert response.status_code == status
        assert response.headers["idempotency-stored"] == "false"
        assert "idempotent-replayed" not in response.headers
        assert response.headers["content-type"] == "application/json"  # the route's own answer, not ours
    assert await pg_db.payments(key) == 0
    assert await pg_db.records(key) == []


# -- responses not stored: streams, large bodies ----------------------------------------------------------


async def test_streamed_response_passes_through_and_its_retry_replays_the_status_only(db: Database) -> None:
    """A streamed response reaches the client whole, marked not stored; its writes commit once, and a
    retry replays the status and Location with an empty body."""
    key = new_key()
    async with running(db) as site:
        first = await site.client.post("/payments/stream", json={"amount": 8}, headers=keyed(key))
        again = await site.client.post("/payments/stream", json={"amount": 8}, headers=keyed(key))
    assert first.status_code == 200
    assert first.text == "payment 1\namount 8\ndone\n"
    assert first.headers["idempotency-stored"] == "false"
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["idempotency-stored"] == "false"
    assert again.headers["location"] == "/p/1"
    assert "content-type" not in again.headers
    assert again.content == b""
    assert await db.payments(key) == 1
    assert await db.records(key) == [("public", key, "COMPLETED")]


async def test_response_over_the_cap_is_sent_but_not_stored(pg_db: Database) -> None:
    """A single-message body over max_response_bytes is sent whole but kept without its body."""
    big, small = new_key(), new_key()
    async with running(pg_db, max_response_bytes=1000) as site:
        first = await site.client.post("/payments/large", json={"amount": 5000}, headers=keyed(big))
        again = await site.client.post("/payments/large", json={"amount": 5000}, headers=keyed(big))
        fits = await site.client.post("/payments/large", json={"amount": 1000}, headers=keyed(small))
        fits_again = await site.client.post("/payments/large", json={"amount": 1000}, headers=keyed(small))
    assert first.content == b"x" * 5000
    assert first.headers["idempotency-stored"] == "false"
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == b""
    assert "idempotency-stored" not in fits.headers
    assert fits_again.content == b"x" * 1000
    assert await pg_db.payments() == 2


# -- what is not guarded ----------------------------------------------------------------------------------


async def test_unguarded_methods_pass_through_untouched(pg_db: Database) -> None:
    """A GET, with or without a key (even an invalid one), reaches the app as sent and records nothing."""
    async with running(pg_db) as site:
        plain = await site.client.get("/payments?page=2")
        keyed_get = await site.client.get("/payments?page=2", headers={"Idempotency-Key": '"bad'})
    for response in (plain, keyed_get):
        assert response.status_code == 200
        assert response.json() == {"guarded": False, "query": "page=2"}
        assert not {"idempotent-replayed", "idempotency-stored"} & set(response.headers)
    assert await pg_db.records() == []


async def test_dependency_on_an_unguarded_method_fails_loudly(pg_db: Database) -> None:
    """A route asking for the unit of work on a method that is not guarded: a 500 problem, and the error goes on."""
    async with running(pg_db) as site:
        response = await site.client.get("/payments/session")
        errors = site.errors
    assert_problem(response, Problem.INTERNAL_ERROR)
    assert [type(e) for e in errors] == [UnguardedRequestError]


async def test_dependency_without_the_optional_key_is_asked_for_it(pg_db: Database) -> None:
    """A route needing the unit of work, sent without the optional key: a 400 key-missing problem, nothing runs."""
    async with running(pg_db, require_key=False) as site:
        response = await site.client.post("/payments", json={"amount": 5})
        errors = site.errors
    assert_problem(response, Problem.KEY_MISSING)
    assert response.headers["idempotency-stored"] == "false"
    assert errors == []
    assert await pg_db.payments() == 0


async def test_writes_after_the_response_are_rolled_back_and_reported(pg_db: Database) -> None:
    """A background task writing through the session after the response was recorded is rolled back, loudly."""
    key = new_key()
    async with running(pg_db) as site:
        response = await site.client.post("/payments/late", json={"amount": 1}, headers=keyed(key))
        error = await site.wait_error()
    assert response.status_code == 200
    assert isinstance(error, UnitOfWorkError)
    assert "after its response was recorded" in str(error)
    assert await pg_db.payments(key) == 1

"""The ``Idempotency-Key`` header as the middleware reads it (RFC 9651, through http-sf), and request headers
that only a response may carry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Response

from idembarrier import Barrier, InvalidKeyError, UnitOfWork
from idembarrier.asgi import HTTPResponse, HTTPResponseCodec, IdempotencyMiddleware, parse_key_header, unit_of_work
from tests.helpers import new_key
from tests.models import Payment

if TYPE_CHECKING:
    from tests.conftest import Database

# -- the parser -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ('"abc"', "abc"),
        ("abc", "abc"),
        (b'"abc"', "abc"),
        ('  "abc"\t', "abc"),
        ('"a\\"b"', 'a"b'),
        ('"a\\\\b"', "a\\b"),
        ('"a b"', "a b"),
        ("*tok:en/x", "*tok:en/x"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("123", "123"),
    ],
)
def test_header_values_that_parse(value: str | bytes, key: str) -> None:
    """An sf-string (escapes resolved, surrounding whitespace dropped) or a bare token yields its key."""
    assert parse_key_header(value) == key


@pytest.mark.parametrize(
    ("value", "key"),
    [('"abc";a=1', "abc"), ('"abc";a;b="x"', "abc"), (b'"abc";v=?0', "abc")],
)
def test_parameters_after_the_string_are_ignored(value: str | bytes, key: str) -> None:
    """An Item's parameters parse and are ignored: the draft defines none, and RFC 9651 (section 2.3)
    discourages making an unrecognised parameter an error."""
    assert parse_key_header(value) == key


@pytest.mark.parametrize(
    ("value", "position"),
    [
        ('"abc', 4),  # no closing quote
        ('"ab\\', 4),  # a backslash ends the input
        ('"a\\nb"', 3),  # only \" and \\ are escapes
        ('"abc"x', 5),  # something after the string
        ('"abc" ;a=1', 6),  # whitespace before a parameter
        ('"abc";A=1', 6),  # a parameter key is lower-case
        ('"a", "b"', 3),  # two header lines, joined: a List, not an Item
        ('"a\x7fb"', 2),
        ('"é"', 1),
        ('"a\tb"', 2),
    ],
)
def test_values_that_fail_to_parse_name_rfc_9651_and_the_position(value: str, position: int) -> None:
    """A quoted value the structured-field parser refuses is an InvalidKeyError saying where it failed."""
    with pytest.raises(InvalidKeyError, match=rf"RFC 9651\): .* at position {position}$"):
        parse_key_header(value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ('""', "empty"),
        ('"' + "k" * 256 + '"', "at most 255"),
        ("a,b", "quoted string"),
        ("a;b", "quoted string"),
        ("é", "quoted string"),
        ("a\"b'", "quoted string"),
        ("a b", "quoted string"),
        ('"\u20ac"', "beyond Latin-1"),
    ],
)
def test_header_values_that_are_refused(value: str, reason: str) -> None:
    """An empty value, an unusable key, or a bare value with a separator raises InvalidKeyError with a reason."""
    with pytest.raises(InvalidKeyError, match=reason):
        parse_key_header(value)


# -- response headers sent in a request -------------------------------------------------------------------

SPOOFED = {"Idempotent-Replayed": "true", "Idempotency-Stored": "false"}
"""The headers the middleware sets on its own answers, as a client might forge them on a request."""

Work = Annotated[UnitOfWork[HTTPResponse], Depends(unit_of_work)]


def payments_app(db: Database) -> tuple[FastAPI, Barrier[HTTPResponse]]:
    """A one-route app behind the middleware, on the test's database, and its barrier."""
    barrier = Barrier(db.sessionmaker, codec=HTTPResponseCodec())
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, barrier=barrier, scope_of=lambda request: "shop")

    @app.post("/payments", status_code=201)
    async def pay(uow: Work, response: Response) -> dict[str, object]:
        uow.session.add(Payment(key=uow.key, amount=1))
        response.headers["location"] = "/payments/1"
        return {"paid": 1}

    return app, barrier


def answer(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """What a client is told: status, body and headers (without those of the connection)."""
    headers = sorted((k, v) for k, v in response.headers.items() if k not in ("date", "server"))
    return response.status_code, response.content, headers


async def test_spoofed_response_headers_in_a_request_change_nothing(db: Database) -> None:
    """A request carrying Idempotent-Replayed and Idempotency-Stored gets the same answers, first and replayed,
    and leaves the same record as one without them."""
    app, barrier = payments_app(db)
    plain, spoofed = new_key(), new_key()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as client:
        answers = {}
        for key, extra in ((plain, {}), (spoofed, SPOOFED)):
            headers = {"Idempotency-Key": f'"{key}"', **extra}
            runs = await client.post("/payments", json={"amount": 1}, headers=headers)
            replays = await client.post("/payments", json={"amount": 1}, headers=headers)
            answers[key] = (answer(runs), answer(replays))
    assert answers[spoofed] == answers[plain]
    first, again = answers[plain]
    assert (first[0], again[0]) == (201, 201)
    assert not {"idempotent-replayed", "idempotency-stored"} & {name for name, _ in first[2]}
    assert ("idempotent-replayed", "true") in again[2]
    records = [await barrier.inspect(key, scope="shop") for key in (plain, spoofed)]
    assert all(record is not None for record in records)
    a, b = (r for r in records if r is not None)
    assert (a.status, a.response, a.fingerprint) == (b.status, b.response, b.fingerprint)
    assert await db.payments(plain) == await db.payments(spoofed) == 1

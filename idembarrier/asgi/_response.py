"""What a record keeps of an HTTP response, and the codec that stores it.

Only a safe subset of the headers is kept: those that describe the representation or the created resource
(``Content-Type``, ``Location``, ``ETag``…). Credentials and per-connection headers (``Set-Cookie``,
``Authorization``, ``Connection``…) never are: a replay goes to whoever retries, and a cookie minted for the
first request must not be handed out again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

__all__ = [
    "DEFAULT_STORED_HEADERS",
    "NEVER_STORED_HEADERS",
    "HTTPResponse",
    "HTTPResponseCodec",
    "check_stored_headers",
    "select_headers",
]

DEFAULT_STORED_HEADERS = frozenset(
    {
        "content-type",
        "content-encoding",
        "content-language",
        "content-location",
        "location",
        "etag",
        "last-modified",
        "link",
    }
)
"""The response headers a record keeps unless told otherwise."""

NEVER_STORED_HEADERS = frozenset(
    {
        "set-cookie",
        "set-cookie2",
        "authorization",
        "proxy-authorization",
        "cookie",
        "www-authenticate",
        "proxy-authenticate",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "content-length",
        "date",
        "server",
    }
)
"""Headers a record never keeps: credentials, hop-by-hop headers, and those recomputed for each reply."""

_FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPResponse:
    """An HTTP response as its record keeps it, to be replayed.

    Attributes:
        status: The status code.
        headers: The kept headers as (lower-case name, value) pairs, in the order sent.
        body: The body; empty when it was not stored.
        body_stored: False when the response was streamed or too large: the request ran and its outcome
            committed, but a replay can only repeat the status and headers, with an empty body.
    """

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    body_stored: bool = True


class HTTPResponseCodec:
    """Stores an `HTTPResponse` as one line of JSON (status, headers) followed by the raw body.

    The body is kept as the bytes sent, without base64, so a JSON body stays readable in the record.
    """

    def encode(self, value: HTTPResponse, /) -> bytes:
        """Return the record bytes for ``value``."""
        if not isinstance(value, HTTPResponse):
            raise TypeError(f"expected HTTPResponse, got {type(value).__name__}")
        head = {
            "v": _FORMAT,
            "status": value.status,
            "headers": [list(pair) for pair in value.headers],
            "body_stored": value.body_stored,
        }
        # Compact JSON escapes every newline inside strings, so the first b"\n" ends the head.
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + value.body

    def decode(self, data: bytes, /) -> HTTPResponse:
        """Return the response stored as ``data``."""
        line, separator, body = data.partition(b"\n")
        head = json.loads(line)
        if not separator or not isinstance(head, dict) or head.get("v") != _FORMAT:
            raise ValueError("not an HTTP response stored by HTTPResponseCodec")
        return HTTPResponse(
            status=int(head["status"]),
            headers=tuple((str(name), str(value)) for name, value in head["headers"]),
            body=body,
            body_stored=bool(head["body_stored"]),
        )


def check_stored_headers(names: Collection[str]) -> frozenset[str]:
    """Return ``names`` lower-cased, or raise `ConfigurationError` if one of them must never be stored."""
    lowered = frozenset(name.lower() for name in names)
    if forbidden := sorted(lowered & NEVER_STORED_HEADERS):
        raise ConfigurationError(f"these headers are never stored: {', '.join(forbidden)}")
    return lowered


def select_headers(raw: Iterable[tuple[bytes, bytes]], allowed: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """Return the ASGI headers ``raw`` whose names are ``allowed``, as text pairs."""
    kept = []
    for name, value in raw:
        lowered = name.decode("latin-1").lower()
        if lowered in allowed:
            kept.append((lowered, value.decode("latin-1")))
    return tuple(kept)

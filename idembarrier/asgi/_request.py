"""What the middleware knows of a request before running it, and the fingerprint it derives from it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from .._exceptions import InvalidFingerprintError

if TYPE_CHECKING:
    from .._codec import JSON
    from ._types import Scope

__all__ = ["FINGERPRINT_PARTS", "FingerprintPart", "RequestHead", "request_fingerprint"]

FingerprintPart = Literal["method", "path", "query", "body"]
"""A part of the request that goes into its fingerprint."""

FINGERPRINT_PARTS: frozenset[str] = frozenset(get_args(FingerprintPart))


@dataclass(frozen=True, slots=True)
class RequestHead:
    """The request as ``scope_of`` sees it: its line and headers, and the raw ASGI scope for the rest.

    Attributes:
        method: The request method, upper-case.
        path: The path, percent-decoded (ASGI's ``path``).
        query: The raw query string.
        headers: Header values by lower-case name; a repeated header's values are joined with ``", "``.
        scope: The ASGI scope, where authentication middleware leaves ``user``, ``state``…
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    scope: Mapping[str, object]

    @classmethod
    def from_scope(cls, scope: Scope) -> RequestHead:
        """Read the head of the HTTP request described by ``scope``."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return cls(
            method=str(scope["method"]).upper(),
            path=str(scope["path"]),
            query=bytes(scope.get("query_string", b"")).decode("latin-1"),
            headers=headers,
            scope=scope,
        )


def request_fingerprint(
    head: RequestHead,
    body: bytes,
    parts: frozenset[str],
    normalise_body: Callable[[bytes], object] | None,
) -> JSON:
    """Return the JSON document whose digest is the request's fingerprint, or ``None`` if no part counts.

    A body normaliser (``json.loads``, say) makes equivalent bodies one request: its result, bytes or a
    JSON value, stands for the body. If it raises `ValueError` (the body is not what it parses), the raw
    body stands for itself: such a request can only match a byte-identical one. A `RecursionError` (a body
    nested too deeply to parse) raises `InvalidFingerprintError`.
    """
    if not parts:
        return None
    document: dict[str, JSON] = {}
    if "method" in parts:
        document["method"] = head.method
    if "path" in parts:
        document["path"] = head.path
    if "query" in parts:
        document["query"] = head.query
    if "body" in parts:
        document["body"] = _body_part(body, normalise_body)
    return document


def _body_part(body: bytes, normalise_body: Callable[[bytes], object] | None) -> JSON:
    if normalise_body is not None:
        try:
            value = normalise_body(body)
        except ValueError:
            pass
        except RecursionError as exc:  # json.loads of a body nested thousands deep
            raise InvalidFingerprintError("the request body is nested too deeply to be normalised") from exc
        else:
            if isinstance(value, bytes):
                return {"sha256": hashlib.sha256(value).hexdigest()}
            return {"normalised": value}  # type: ignore[dict-item]  # checked when the digest is taken
    return {"sha256": hashlib.sha256(body).hexdigest()}

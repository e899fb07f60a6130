"""Where a route guard finds a request's key: a header (the ``Idempotency-Key`` by default) or a JSON body field.

A key extractor is a function of the request's head and body that returns the key, ``None`` when the
request carries none (a 400 ``key-missing`` where the key is required, else the request runs unguarded),
or raises `InvalidKeyError` when what it carries is no usable key (a 400 ``key-invalid``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from .._exceptions import ConfigurationError, InvalidKeyError
from .._keys import validate_key
from ._header import parse_key_header

if TYPE_CHECKING:
    from ._request import RequestHead

__all__ = ["KeyExtractor", "header", "json_field"]

KeyExtractor: TypeAlias = Callable[["RequestHead", bytes], "str | None"]
"""Returns the key of a request (its head, its body), ``None`` if it has none; raises `InvalidKeyError`."""


def header(name: str = "Idempotency-Key") -> KeyExtractor:
    """The key from the header ``name``, read as the ``Idempotency-Key`` is (`parse_key_header`).

    An RFC 9651 string or a bare token (a UUID, GitHub's ``X-GitHub-Delivery``, Standard Webhooks'
    ``webhook-id``); a header sent twice is invalid.
    """
    if not name or not name.isascii():
        raise ConfigurationError(f"the key's header must be a non-empty ASCII name, not {name!r}")
    field = name.lower()

    def from_header(head: RequestHead, body: bytes) -> str | None:
        value = head.headers.get(field)
        if value is None:
            return None
        return parse_key_header(value)

    from_header.__doc__ = f"The key from the {name} header."
    return from_header


def json_field(*path: str) -> KeyExtractor:
    """The key from the JSON body, at ``path`` (``json_field("id")``: a Stripe event's ``id``).

    A body that is not a JSON object, or a value at ``path`` that is not a string, is invalid; a body
    without that member has no key.
    """
    if not path or not all(isinstance(part, str) and part for part in path):
        raise ConfigurationError(f"json_field needs the names of the members leading to the key, not {path!r}")
    where = ".".join(path)

    def from_body(head: RequestHead, body: bytes) -> str | None:
        try:
            value: object = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidKeyError(f"<body>.{where}", "the request body is not JSON") from None
        for part in path:
            if not isinstance(value, dict):
                raise InvalidKeyError(f"<body>.{where}", f"the body has no object holding {part!r}")
            if part not in value:
                return None
            value = value[part]
        if not isinstance(value, str):
            raise InvalidKeyError(f"<body>.{where}", f"the body's {where} is a {type(value).__name__}, not a string")
        return validate_key(value)

    from_body.__doc__ = f"The key from the JSON body's {where}."
    return from_body

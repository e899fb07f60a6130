"""The ``Idempotency-Key`` header: an RFC 9651 structured-field string, or a bare token.

The draft defines the field as an Item whose value is a String: ``"`` … ``"``, printable ASCII inside,
where ``\\"`` and ``\\\\`` are the only escapes. A quoted value is read by `http_sf`, a maintained parser of
RFC 9651 (which obsoletes RFC 8941): a value that fails to parse — anything after the string, a second
header line (the lines then join with a comma), non-ASCII bytes, a bad escape — is refused, since RFC 9651
(section 4.2) makes a field that fails to parse invalid as a whole. Parameters after the string
(``"k";v=1``) parse, and are ignored: the draft defines none, and RFC 9651 (section 2.3) discourages field
definitions from making an unrecognised parameter an error.

Many clients send the key unquoted (a UUID, most often), which no structured-field type covers (a UUID
may start with a digit: not a Token). So a bare value of printable ASCII without whitespace, quotes,
backslashes, commas or semicolons is accepted as the key itself: a leniency of ours, beyond RFC 9651.
"""

from __future__ import annotations

import http_sf

from .._exceptions import InvalidKeyError
from .._keys import validate_key

__all__ = ["parse_key_header"]

_BARE_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\", ",", ";"}
"""What a bare key holds: visible ASCII without quotes, backslashes, or the list and parameter separators."""


def parse_key_header(value: bytes | str) -> str:
    """Return the key carried by an ``Idempotency-Key`` field value, validated like any key.

    Args:
        value: The field value as received (text is read as Latin-1, as HTTP does).

    Raises:
        InvalidKeyError: The value is neither an sf-string nor a bare token, or its key is unusable
            (empty, longer than 255 characters).
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    stripped = text.strip(" \t")  # HTTP drops a field value's surrounding whitespace (RFC 9110, section 5.5)
    if not stripped:
        raise InvalidKeyError(text, "the Idempotency-Key header is empty")
    key = _parse_string(stripped) if stripped.startswith('"') else _parse_bare(stripped)
    return validate_key(key)


def _parse_string(text: str) -> str:
    """Parse ``text`` as an RFC 9651 Item whose value is a String, and return that string."""
    try:
        data = text.encode("latin-1")
    except UnicodeEncodeError:  # only a caller's str can hold this: HTTP bytes are Latin-1 by construction
        raise InvalidKeyError(text, "the key holds characters beyond Latin-1: only ASCII is allowed") from None
    try:
        parsed = http_sf.parse(data, tltype="item")
    except http_sf.StructuredFieldError as exc:
        raise InvalidKeyError(text, f"not a structured-field string (RFC 9651): {exc}") from exc
    # An Item parses as (bare item, parameters); the draft defines no parameters. A value that starts
    # with a quote can only be a String.
    assert isinstance(parsed, tuple)
    assert isinstance(parsed[0], str)
    return parsed[0]


def _parse_bare(text: str) -> str:
    """Accept an unquoted key: printable ASCII without whitespace, quotes, backslashes, commas, semicolons."""
    for char in text:
        if char not in _BARE_CHARS:
            raise InvalidKeyError(text, f"an unquoted key may not hold {char!r}; send it as a quoted string")
    return text

"""The ``Idempotency-Key`` header: an RFC 8941 structured-field string, or a bare token.

The draft defines the field as an ``sf-string``: ``"`` … ``"``, printable ASCII inside, where ``\\"`` and
``\\\\`` are the only escapes. Many clients send the key unquoted (a UUID, most often), so a bare value
of printable ASCII without whitespace, quotes, backslashes, commas or semicolons is accepted as the key
itself. Anything else — parameters after the string, a second header line (the lines then join with a
comma), non-ASCII bytes, a bad escape — is refused: RFC 8941 says a field that fails to parse is invalid
as a whole.
"""

from __future__ import annotations

from .._exceptions import InvalidKeyError
from .._keys import validate_key

__all__ = ["parse_key_header"]

_STRING_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\"}
"""What an sf-string holds unescaped: %x20-21 / %x23-5B / %x5D-7E."""
_BARE_CHARS = _STRING_CHARS - {" ", ",", ";"}
"""What a bare key holds: visible ASCII without quotes, backslashes, or the list and parameter separators."""


def parse_key_header(value: bytes | str) -> str:
    """Return the key carried by an ``Idempotency-Key`` field value, validated like any key.

    Args:
        value: The field value as received (bytes are read as Latin-1, as HTTP does).

    Raises:
        InvalidKeyError: The value is neither an sf-string nor a bare token, or its key is unusable
            (empty, longer than 255 characters).
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    stripped = text.strip(" \t")  # RFC 8941 drops leading and trailing spaces; HTTP's OWS adds tabs
    if not stripped:
        raise InvalidKeyError(text, "the Idempotency-Key header is empty")
    key = _parse_string(stripped) if stripped.startswith('"') else _parse_bare(stripped)
    return validate_key(key)


def _parse_string(text: str) -> str:
    """Parse an sf-string (RFC 8941, section 4.2.5) that must span all of ``text``."""
    chars: list[str] = []
    i = 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            following = text[i + 1 : i + 2]
            if following not in ('"', "\\"):
                raise InvalidKeyError(text, 'only \\" and \\\\ may be escaped in a structured-field string')
            chars.append(following)
            i += 2
        elif char == '"':
            if i != len(text) - 1:
                raise InvalidKeyError(text, "nothing may follow the closing quote of the key")
            return "".join(chars)
        elif char in _STRING_CHARS:
            chars.append(char)
            i += 1
        else:
            raise InvalidKeyError(text, f"the key holds {char!r}: only printable ASCII is allowed")
    raise InvalidKeyError(text, "the key's string has no closing quote")


def _parse_bare(text: str) -> str:
    """Accept an unquoted key: printable ASCII without whitespace, quotes, backslashes, commas, semicolons."""
    for char in text:
        if char not in _BARE_CHARS:
            raise InvalidKeyError(text, f"an unquoted key may not hold {char!r}; send it as a quoted string")
    return text

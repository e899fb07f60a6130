"""Key validation and request fingerprints: pure functions that run before any SQL."""

from __future__ import annotations

import hashlib
import json
import re
import reprlib

from ._exceptions import InvalidFingerprintError, InvalidKeyError

__all__ = ["MAX_KEY_LENGTH", "fingerprint_digest", "validate_key"]

MAX_KEY_LENGTH = 255
"""The longest key (and scope) accepted, in characters; Stripe's limit."""

# One scan finds both kinds of character a key may not hold: control characters, and lone surrogates
# (code points that have no UTF-8 encoding, so no driver can send them).
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Built once: json.dumps() with options builds a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def validate_key(key: object, *, what: str = "key") -> str:
    """Return ``key`` when it is a usable key or scope, else raise `InvalidKeyError`."""
    if not isinstance(key, str):
        # reprlib bounds the depth and size, and survives a __repr__ that raises.
        raise InvalidKeyError(reprlib.repr(key), f"the {what} must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError(key, f"the {what} is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(key, f"the {what} has {len(key)} characters; at most {MAX_KEY_LENGTH} are allowed")
    if (refused := _REFUSED.search(key)) is not None:
        kind = "a lone surrogate (it has no UTF-8 encoding)" if refused[0] >= "\ud800" else "a control character"
        raise InvalidKeyError(key, f"the {what} contains {kind}")
    return key


def fingerprint_digest(value: object) -> bytes | None:
    """Hash a request into its fingerprint: SHA-256 of bytes as given, or of canonical JSON.

    Canonical JSON sorts object keys and drops insignificant whitespace, so ``{"a": 1, "b": 2}`` and
    ``{"b": 2, "a": 1}`` are the same request. Bytes and JSON values never collide (they are tagged).
    ``None`` means "no fingerprint": the key alone identifies the request.
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return hashlib.sha256(b"b:" + bytes(value)).digest()
    try:
        canonical = _CANONICAL.encode(value).encode()
    # TypeError: not a JSON type, or unsortable keys; ValueError: NaN or infinity, a circular reference, an
    # int past the str limit, or (UnicodeEncodeError) a lone surrogate; RecursionError: nested too deep.
    # Subclasses of dict, list or str run their own code in the encoder, and it may raise anything: it too
    # means this value has no canonical form.
    except Exception as exc:
        raise InvalidFingerprintError(f"the fingerprint has no canonical JSON form: {_reason(exc)}") from exc
    return hashlib.sha256(b"j:" + canonical).digest()


def _reason(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    if isinstance(exc, UnicodeEncodeError):
        return "it holds text with a lone surrogate (no UTF-8 encoding)"
    return f"{type(exc).__name__}: {exc}"

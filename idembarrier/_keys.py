"""Key validation and request fingerprints: pure functions that run before any SQL."""

from __future__ import annotations

import hashlib
import json
import re

from ._exceptions import InvalidFingerprintError, InvalidKeyError

__all__ = ["MAX_KEY_LENGTH", "fingerprint_digest", "validate_key"]

MAX_KEY_LENGTH = 255
"""The longest key (and scope) accepted, in characters; Stripe's limit."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Built once: json.dumps() with options builds a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def validate_key(key: object, *, what: str = "key") -> str:
    """Return ``key`` when it is a usable key or scope, else raise `InvalidKeyError`."""
    if not isinstance(key, str):
        raise InvalidKeyError(repr(key), f"the {what} must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError(key, f"the {what} is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(key, f"the {what} has {len(key)} characters; at most {MAX_KEY_LENGTH} are allowed")
    if _CONTROL.search(key):
        raise InvalidKeyError(key, f"the {what} contains a control character")
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
        text = _CANONICAL.encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidFingerprintError(f"the fingerprint is neither bytes nor a JSON value: {exc}") from exc
    return hashlib.sha256(b"j:" + text.encode()).digest()

"""Privacy at rest: keys stored as keyed hashes, responses sealed with authenticated encryption.

A record keeps its key and its response for as long as its retention says (days, often). Neither needs to be
readable there: the barrier only compares keys, and only the caller that replays needs the response.

- `KeyedHash` stores ``HMAC-SHA256(secret, scope NUL key)`` instead of the key (``hmac-sha256:`` and 43
  characters of URL-safe base64). Every lookup hashes the same way, so the original key is never written,
  while equal keys still meet in one record and the claim stays one atomic statement. The scope is hashed
  in, so one key in two scopes gives two unrelated digests. Python's own `hmac` does it.
- `SealedCodec` wraps another codec and seals what it writes with Fernet (AES-128-CBC and HMAC-SHA256,
  authenticated; the ``cryptography`` package, ``idembarrier[sealed]``): the first key seals, every key
  unseals, so keys rotate by putting a new one first and keeping the old ones until the records they sealed
  are past retention. A response that no configured key opens (or that was altered) is a
  `ResponseEncodingError` at the replay, never a garbled answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING, Generic, TypeVar

from ._codec import JSONCodec
from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._codec import Codec

__all__ = ["KeyedHash", "SealedCodec"]

T = TypeVar("T")

MIN_SECRET_BYTES = 32
"""The shortest secret `KeyedHash` takes: HMAC-SHA256's block of entropy, as for any MAC key."""
PREFIX = "hmac-sha256:"
"""What a hashed key starts with, so that a stored key says how it was made."""


class KeyedHash:
    """Stores keys as ``HMAC-SHA256(secret, scope NUL key)``; pass it as ``Barrier(keyed_hash=...)``.

    Every process of one application must use the same secret, and the secret cannot change while records
    made with it are kept: a key hashed with another secret is another key (its retry would run again).
    Treat it as a database credential (an environment variable, a secrets manager), never as code.

    Args:
        secret: At least 32 bytes (for instance ``secrets.token_bytes(32)``).
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            raise ConfigurationError(f"a key hash needs a secret of at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def __call__(self, scope: str, key: str) -> str:
        """The key stored for ``key`` in ``scope`` (both already validated)."""
        digest = hmac.new(self._secret, f"{scope}\0{key}".encode(), hashlib.sha256).digest()
        return PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def __repr__(self) -> str:
        return "KeyedHash(<secret>)"  # never the secret


class SealedCodec(Generic[T]):
    """Seals the bytes another codec writes with Fernet; the first key seals, every key unseals.

    Args:
        keys: Fernet keys (``SealedCodec.new_key()``; 32 bytes, URL-safe base64), newest first.
        codec: What writes the response before it is sealed (default: `JSONCodec`).
    """

    def __init__(self, keys: Sequence[bytes | str], codec: Codec[T] | None = None) -> None:
        from cryptography.fernet import Fernet, MultiFernet  # only where responses are sealed

        if isinstance(keys, bytes | str) or not keys:
            raise ConfigurationError("a sealed codec needs a list of one or more Fernet keys, newest first")
        try:
            self._fernet = MultiFernet([Fernet(key) for key in keys])
            self._keys = len(keys)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"a sealed codec's key is not a Fernet key: {exc}") from None
        self._codec: Codec[T] = codec if codec is not None else JSONCodec()  # type: ignore[assignment]

    @staticmethod
    def new_key() -> bytes:
        """A new random Fernet key."""
        from cryptography.fernet import Fernet

        return Fernet.generate_key()

    def encode(self, value: T, /) -> bytes:
        """The inner codec's bytes, sealed with the first key."""
        return self._fernet.encrypt(self._codec.encode(value))

    def decode(self, data: bytes, /) -> T:
        """The response, unsealed with whichever key sealed it; raises if none does or it was altered."""
        return self._codec.decode(self._fernet.decrypt(data))

    def reseal(self, data: bytes, /) -> bytes:
        """``data`` sealed again with the first key (for re-sealing stored responses after a rotation)."""
        return self._fernet.rotate(data)

    def __repr__(self) -> str:
        return f"SealedCodec(<{self._keys} keys>, {self._codec!r})"  # never the keys

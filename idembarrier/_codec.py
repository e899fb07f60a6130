"""Codecs turn responses into the bytes a record stores, and back for a replay."""

from __future__ import annotations

import dataclasses
import json
from typing import Generic, Protocol, TypeVar, cast

from ._exceptions import ResponseEncodingError

__all__ = ["JSON", "Codec", "DataclassCodec", "JSONCodec", "PydanticCodec"]

T = TypeVar("T")

JSON = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
"""A JSON value, the default response type."""


class Codec(Protocol[T]):
    """Encodes a response to bytes for its record, and decodes it for a replay.

    A codec raises any exception it likes; idembarrier turns it into `ResponseEncodingError`.
    """

    def encode(self, value: T, /) -> bytes:
        """Return the bytes stored for ``value``."""
        ...

    def decode(self, data: bytes, /) -> T:
        """Return the response stored as ``data``."""
        ...


# Built once: json.dumps() with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _dumps(value: object) -> bytes:
    return _ENCODER.encode(value).encode()


class JSONCodec:
    """The default codec: JSON values (dicts, lists, strings, numbers, booleans, ``None``).

    NaN and infinities are refused, so what is stored is valid JSON that any consumer can read.
    """

    def encode(self, value: JSON, /) -> bytes:
        """Return ``value`` as compact UTF-8 JSON."""
        return _dumps(value)

    def decode(self, data: bytes, /) -> JSON:
        """Return the JSON value stored as ``data``."""
        return cast("JSON", json.loads(data))


class DataclassCodec(Generic[T]):
    """A codec for one dataclass type whose fields are JSON values (nested dataclasses become dicts)."""

    def __init__(self, cls: type[T]) -> None:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"{cls!r} is not a dataclass type")
        self._cls = cls

    def encode(self, value: T, /) -> bytes:
        """Return the dataclass instance ``value`` as JSON."""
        if not isinstance(value, self._cls):
            raise TypeError(f"expected {self._cls.__name__}, got {type(value).__name__}")
        return _dumps(dataclasses.asdict(value))  # type: ignore[call-overload]

    def decode(self, data: bytes, /) -> T:
        """Return the dataclass instance stored as ``data``."""
        return self._cls(**json.loads(data))


class PydanticCodec(Generic[T]):
    """A codec for any type Pydantic validates: models, dataclasses, lists of them… (needs ``pydantic``)."""

    def __init__(self, tp: type[T]) -> None:
        from pydantic import TypeAdapter

        self._adapter: TypeAdapter[T] = TypeAdapter(tp)

    def encode(self, value: T, /) -> bytes:
        """Return ``value`` as JSON, after checking it is of the codec's type."""
        return self._adapter.dump_json(self._adapter.validate_python(value, strict=True))

    def decode(self, data: bytes, /) -> T:
        """Return the value stored as ``data``, validated into the codec's type."""
        return self._adapter.validate_json(data)


def encode_response(codec: Codec[T], value: T) -> bytes:
    """Encode with ``codec``; any failure becomes `ResponseEncodingError`."""
    try:
        data = codec.encode(value)
    except Exception as exc:
        raise ResponseEncodingError(f"the response cannot be encoded by {type(codec).__name__}: {exc}") from exc
    if not isinstance(data, bytes):
        raise ResponseEncodingError(f"{type(codec).__name__}.encode() returned {type(data).__name__}, not bytes")
    return data


def decode_response(codec: Codec[T], data: bytes) -> T:
    """Decode with ``codec``; any failure becomes `ResponseEncodingError`."""
    try:
        return codec.decode(data)
    except Exception as exc:
        raise ResponseEncodingError(f"the stored response cannot be decoded by {type(codec).__name__}: {exc}") from exc


def round_trip(codec: Codec[T], value: T) -> tuple[bytes, T]:
    """Encode ``value`` with ``codec`` and decode it again: the bytes to store, and the response they replay.

    Raises:
        ResponseEncodingError: The codec cannot encode ``value``, or cannot decode what it encoded (a
            response that would record, then fail every replay).
    """
    data = encode_response(codec, value)
    try:
        return data, codec.decode(data)
    except Exception as exc:
        raise ResponseEncodingError(
            f"the response would never replay: {type(codec).__name__} cannot decode what it encoded: {exc}"
        ) from exc

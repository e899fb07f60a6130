"""Codecs turn responses into the bytes a record stores, and back for a replay."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import sys
import uuid
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


def _json_form(value: object) -> object:
    """The JSON a typed value is written as (the encoder's ``default``: called for what JSON does not hold)."""
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError(f"Decimal {value} is not a number; JSON cannot hold it")
        return str(value)  # exact, scale kept ("10.50"): a float would round it
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()  # as given: offset kept, a naive datetime stays naive
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if (pydantic := sys.modules.get("pydantic")) is not None and isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset):
        raise TypeError("a set has no order; give a sorted list")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Built once: json.dumps() with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_TYPED_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_form)


def _dumps(value: object) -> bytes:
    return _ENCODER.encode(value).encode()


class JSONCodec:
    """The default codec: JSON values, and the typed values payments carry, written as JSON.

    A `~decimal.Decimal` is written as its text, exactly as ``str()`` gives it (``"10.50"``: scale kept,
    never a float); a `~uuid.UUID` as its text; a `~datetime.datetime`, `~datetime.date` or
    `~datetime.time` as ISO 8601, as given (offset kept); an `~enum.Enum` as its value; a dataclass as an
    object of its fields; a Pydantic model as its ``model_dump(mode="json")``. What is decoded, for the
    first caller and every replay alike, is that JSON: strings, not the typed values (`PydanticCodec`
    gives them back typed). NaN, infinities and sets are refused, so what is stored is valid JSON that any
    consumer can read.
    """

    def encode(self, value: object, /) -> bytes:
        """Return ``value`` as compact UTF-8 JSON."""
        return _TYPED_ENCODER.encode(value).encode()

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

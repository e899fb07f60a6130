"""Key validation and request fingerprints: pure functions that run before any SQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import json
import re
import reprlib
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._exceptions import ConfigurationError, FingerprintVersionError, InvalidFingerprintError, InvalidKeyError

if TYPE_CHECKING:
    from ._record import Record

__all__ = [
    "MAX_KEY_LENGTH",
    "NO_FINGERPRINT",
    "Fingerprint",
    "FingerprintVersions",
    "fingerprint_digest",
    "validate_key",
]

MAX_KEY_LENGTH = 255
"""The longest key (and scope) accepted, in characters; Stripe's limit."""

# One scan finds both kinds of character a key may not hold: control characters, and lone surrogates
# (code points that have no UTF-8 encoding, so no driver can send them).
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Built once: json.dumps() with options builds a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# The values a fingerprint holds beyond JSON's, each written as {"$<tag>": "<text>"} in the typed form.
_TYPED = (decimal.Decimal, uuid.UUID, dt.date, dt.time)


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
    """Hash a request into its fingerprint: SHA-256 of bytes as given, or of the value's canonical JSON.

    Canonical JSON sorts object keys and drops insignificant whitespace, so ``{"a": 1, "b": 2}`` and
    ``{"b": 2, "a": 1}`` are the same request. An `~enum.Enum` member is its value, a dataclass the
    object of its compared fields, a Pydantic model its ``model_dump()``. A value that then still holds a
    `~decimal.Decimal`, `~uuid.UUID`, `~datetime.datetime`, `~datetime.date` or `~datetime.time` is hashed
    in its *typed* form, where each is a tagged object (docs/concepts.md gives the forms): numerically
    equal decimals and aware datetimes at the same instant are one fingerprint. Bytes, plain JSON and
    typed values never collide (each kind is tagged). ``None`` means "no fingerprint": the key alone
    identifies the request.
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return hashlib.sha256(b"b:" + bytes(value)).digest()
    try:
        return hashlib.sha256(b"j:" + _CANONICAL.encode(value).encode()).digest()
    except TypeError:
        pass  # not plain JSON: perhaps a typed value (unsortable keys are refused below all the same)
    # ValueError: NaN or infinity, a circular reference, an int past the str limit, or (UnicodeEncodeError)
    # a lone surrogate; RecursionError: nested too deep. Subclasses of dict, list or str run their own code
    # in the encoder, and it may raise anything: it too means this value has no canonical form.
    except Exception as exc:
        raise _invalid(exc) from exc
    try:
        walk = _Walk()
        plain = walk.plain(value)
        if not walk.typed:  # enums, dataclasses or models of JSON values: the same form as JSON itself
            return hashlib.sha256(b"j:" + _CANONICAL.encode(plain).encode()).digest()
        return hashlib.sha256(b"t:" + _CANONICAL.encode(_typed(plain)).encode()).digest()
    except Exception as exc:
        raise _invalid(exc) from exc


class _Walk:
    """Makes a value plain: enums, dataclasses, models and tuples become JSON containers; typed leaves stay."""

    def __init__(self) -> None:
        self.typed = False
        """Whether a typed leaf (a Decimal, a UUID, a date…) was met."""
        self._path: set[int] = set()  # the containers being walked: a circular value is refused, as JSON does

    def plain(self, value: object) -> object:
        """``value`` made plain."""
        if isinstance(value, enum.Enum):
            return self.plain(value.value)
        if value is None or isinstance(value, str | int | float):
            return value
        if isinstance(value, _TYPED):
            self.typed = True
            return value
        if id(value) in self._path:
            raise ValueError("Circular reference detected")
        self._path.add(id(value))
        try:
            return self._container(value)
        finally:
            self._path.discard(id(value))

    def _container(self, value: object) -> object:
        if isinstance(value, dict):
            items = [(_key(key), item) for key, item in value.items()]
            # Keys JSON cannot sort (1 and "a") are refused in both forms alike; sorting them is the check.
            sorted(key for key, _ in items)  # type: ignore[type-var]
            return {key: self.plain(item) for key, item in items}
        if isinstance(value, list | tuple):
            return [self.plain(item) for item in value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            # The fields its == compares: two equal instances are one request.
            names = [field.name for field in dataclasses.fields(value) if field.compare]
            return {name: self.plain(getattr(value, name)) for name in names}
        if (pydantic := sys.modules.get("pydantic")) is not None and isinstance(value, pydantic.BaseModel):
            return self.plain(value.model_dump())
        if isinstance(value, set | frozenset):
            raise TypeError(
                "a set has no order, and its == is not the fingerprint's (1, 1.0 and True are one element); "
                "give a sorted list"
            )
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _key(key: object) -> object:
    if isinstance(key, enum.Enum):
        key = key.value
    if key is None or isinstance(key, str | int | float):
        return key
    raise TypeError(f"keys must be str, int, float, bool or None (or an Enum of one), not {type(key).__name__}")


def _typed(value: object) -> object:
    """The typed form of a plain value (`_Walk`): each typed leaf tagged, object keys starting with ``$`` escaped."""
    if isinstance(value, dict):
        return {_escape(key): _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    if isinstance(value, decimal.Decimal):
        return {"$decimal": _decimal(value)}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, dt.datetime):
        return {"$datetime": _datetime(value)}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        if value.utcoffset() is not None:
            raise ValueError(f"a time of day with an offset is no instant ({value}); give a datetime or a naive time")
        return {"$time": value.isoformat(timespec="microseconds")}
    return value


def _escape(key: object) -> str:
    """An object key of the typed form: JSON's text for the key, with one more ``$`` if it starts with one.

    Tags are ``$`` and a letter, escaped keys start with ``$$``: no object the caller gives reads as a tag.
    """
    if isinstance(key, str):
        return "$" + key if key.startswith("$") else key
    return _CANONICAL.encode(key)  # 1 is "1", True "true", None "null": what JSON makes of such keys


def _decimal(value: decimal.Decimal) -> str:
    """Numerically equal decimals as one text, ``[-]<digits>e<exponent>`` without trailing zeros.

    ``Decimal("10.0")``, ``Decimal("10.00")`` and ``Decimal("1E+1")`` are all ``1e1``. Computed from the
    digits, not by `~decimal.Decimal.normalize`, which rounds to the context's precision.
    """
    if not value.is_finite():
        raise ValueError(f"Decimal {value} is not a number; it has no canonical form")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return "0"  # zero, whatever its sign and exponent: they compare equal
    stripped = text.rstrip("0")
    return f"{'-' if sign else ''}{stripped}e{exponent + len(text) - len(stripped)}"


def _datetime(value: dt.datetime) -> str:
    """An aware datetime as its instant in UTC (``…+00:00``); a naive one as it is, without an offset.

    Both with microseconds. A naive and an aware datetime are never equal, so they never share a form.
    """
    offset = value.utcoffset()
    if offset is None:
        return value.replace(tzinfo=None).isoformat(timespec="microseconds")
    return (value.replace(tzinfo=None) - offset).replace(tzinfo=dt.UTC).isoformat(timespec="microseconds")


def _invalid(exc: Exception) -> InvalidFingerprintError:
    return InvalidFingerprintError(f"the fingerprint has no canonical JSON form: {_reason(exc)}")


def _reason(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    if isinstance(exc, UnicodeEncodeError):
        return "it holds text with a lone surrogate (no UTF-8 encoding)"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class FingerprintVersions:
    """The fingerprint functions a barrier knows, by version, and the one it fingerprints new records with.

    Each function maps the request given as ``fingerprint=`` to the value that is hashed (a body normaliser,
    a projection of the fields that matter). A record stores the version that fingerprinted it; a retry
    whose record was made by another registered version is fingerprinted again with that version, so
    changing what is fingerprinted never turns an in-flight retry into `FingerprintMismatchError`.

    Args:
        current: The version new records are fingerprinted with; one of ``functions``.
        functions: Every version still registered, by number (1 and up). Keep an old version registered
            for as long as its records may be retried (the response retention, say).
        unversioned: The registered version to compare records stored without one (made before versions
            were adopted) with; ``None``: the request as given, as those records were fingerprinted.

    Raises:
        ConfigurationError: ``current`` or ``unversioned`` is not registered, or a version is below 1.
    """

    current: int
    functions: Mapping[int, Callable[[object], object]]
    unversioned: int | None = None

    def __post_init__(self) -> None:
        if any(not isinstance(version, int) or version < 1 for version in self.functions):
            raise ConfigurationError(f"fingerprint versions are ints from 1, not {sorted(map(repr, self.functions))}")
        for name, version in (("current", self.current), ("unversioned", self.unversioned)):
            if version is not None and version not in self.functions:
                raise ConfigurationError(
                    f"{name} fingerprint version {version!r} is not registered (registered: {sorted(self.functions)})"
                )
        object.__setattr__(self, "functions", dict(self.functions))

    def digest(self, request: object, version: int | None) -> bytes | None:
        """The digest of ``request`` by fingerprint ``version`` (``None``: the unversioned records' way).

        Raises:
            InvalidFingerprintError: The version's function raised, or made what has no canonical form.
            KeyError: ``version`` is not registered.
        """
        if version is None and self.unversioned is None:
            return fingerprint_digest(request)
        chosen = self.unversioned if version is None else version
        function = self.functions[chosen]  # type: ignore[index]  # None only with unversioned set
        try:
            value = function(request)
        except Exception as exc:
            raise InvalidFingerprintError(
                f"fingerprint function version {chosen} raised {type(exc).__name__}: {exc}"
            ) from exc
        return fingerprint_digest(value)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A request's fingerprint as a claim stores it (digest and version), able to match older records."""

    digest: bytes | None
    version: int | None = None
    request: object = None
    versions: FingerprintVersions | None = None

    @classmethod
    def of(cls, request: object, versions: FingerprintVersions | None) -> Fingerprint:
        """Fingerprint ``request`` with the current version (before any SQL: refusals raise here)."""
        if request is None:
            return NO_FINGERPRINT
        if versions is None:
            return cls(fingerprint_digest(request))
        return cls(versions.digest(request, versions.current), versions.current, request, versions)

    def matches(self, record: Record) -> bool:
        """Whether ``record`` was made for this request, compared by the version that fingerprinted it.

        Raises:
            FingerprintVersionError: The record's version is not one this barrier registers.
        """
        if self.digest is None or record.fingerprint is None:
            return record.fingerprint == self.digest
        if record.fingerprint_version == self.version:
            return record.fingerprint == self.digest
        versions, version = self.versions, record.fingerprint_version
        if versions is None or (version is not None and version not in versions.functions):
            raise FingerprintVersionError(scope=record.scope, key=record.key, record=record)
        return record.fingerprint == versions.digest(self.request, version)


NO_FINGERPRINT = Fingerprint(None)
"""No request given: the key alone identifies it."""

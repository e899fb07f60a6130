"""Fingerprints: plain JSON values keep the digests records already hold; typed values get a stable form.

Pure-function tests (no database). The pinned digests were computed by the code released before typed
fingerprints existed: a record stored then must still match the same request now.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import hashlib
import json
import uuid
import zoneinfo
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from idembarrier import InvalidFingerprintError
from idembarrier._keys import fingerprint_digest
from idembarrier.asgi._request import FINGERPRINT_PARTS, RequestHead, request_fingerprint

if TYPE_CHECKING:
    from collections.abc import Callable


class Level(enum.IntEnum):
    HIGH = 3


PINNED = [
    pytest.param(
        {"amount": 1000, "currency": "eur", "customer": "cus_1"},
        "e053c463c7a7889f60da037266c146d81652d478e2eb1bbff0a9ca4bc00be7d6",
        id="payment",
    ),
    pytest.param(
        [1, 1.5, True, None, "x"], "9a66228bb1d9c64abc253c16cd40f4e9f4424310f917d28695061d6bd7ca9e20", id="scalars"
    ),
    pytest.param("été 🧾", "6fa14298122de81fad4e80aa19c2bcca04e8989872a06daab79599944cb91a56", id="text"),
    pytest.param(0, "2dd4b1063184a56c846cb113d6285ee58e438405bedd6c2f98194e2df84db4c2", id="zero"),
    pytest.param(-12.25, "6118ef0c9c393dfaf35e05a8d27ceff46cbdb8529af2c083971b742f69a76720", id="float"),
    pytest.param(
        {"b": [1, {"z": None, "a": "q"}], "a": 2},
        "efa540b933f0e7ac0368852a932c53df05eedfdd26b0e4706bbd05e9e7b0491a",
        id="nested-unsorted",
    ),
    pytest.param((1, 2), "cdaeb0359238d2cecd0a0768c00284f574d240530758b3485bacc62a1a2b1a0c", id="tuple"),
    pytest.param({"n": Level.HIGH}, "f045975872fab86a00278aa90e552f9ea409754bdf4c2c26f00f817bcc91ce56", id="int-enum"),
    pytest.param({1: "a"}, "0c308b63588fcc4191c5a9d29ec819aec83342fe075b8224bf0c1f9694127c7a", id="int-key"),
    pytest.param(b"raw-bytes", "ab9060055e2d5bd8ae3e394d727d099ab34a2745a286e75c085933143a921382", id="bytes"),
    pytest.param(
        {"$decimal": "1"}, "c4874905eb9c6ad12ff8a4b2349720c0caf8613c22a5c75105f11d597397c6f7", id="dollar-key"
    ),
    pytest.param(10**30, "04f02f3879ea639c000ded89b6e348c600b78978a4e729ebd9beff71b48631e5", id="big-int"),
    pytest.param([], "891b648ce8bc6a3a173cbf09c76d4a70b3d4ffcd92e8c49de797a22572df1a99", id="empty-list"),
]


@pytest.mark.parametrize(("value", "digest"), PINNED)
def test_a_plain_value_keeps_the_digest_stored_records_hold(value: object, digest: str) -> None:
    """A plain JSON value (or bytes) hashes to the digest the code before typed fingerprints gave it."""
    assert fingerprint_digest(value) == bytes.fromhex(digest)


class Colour(enum.Enum):
    RED = "red"
    SOME = decimal.Decimal("1.50")


@dataclasses.dataclass
class Charge:
    amount: decimal.Decimal
    currency: str
    note: str = dataclasses.field(default="", compare=False)


class ChargeModel(BaseModel):
    amount: decimal.Decimal
    at: dt.datetime


ORDER = uuid.UUID("0b0e2f4c-7a9d-4c1e-9f3a-2b5d6e7f8a91")
PARIS = zoneinfo.ZoneInfo("Europe/Paris")

# The typed form docs/concepts.md shows, byte for byte: what the typed digest is SHA-256 of, after "t:".
DOCUMENTED = (
    {
        "amount": decimal.Decimal("10.50"),
        "order": ORDER,
        "at": dt.datetime(2025, 3, 1, 13, 30, tzinfo=PARIS),
        "on": dt.date(2025, 3, 1),
        "$ref": "x",
    },
    '{"$$ref":"x","amount":{"$decimal":"105e-1"},"at":{"$datetime":"2025-03-01T12:30:00.000000+00:00"},'
    '"on":{"$date":"2025-03-01"},"order":{"$uuid":"0b0e2f4c-7a9d-4c1e-9f3a-2b5d6e7f8a91"}}',
)


def test_the_typed_form_is_the_documented_one() -> None:
    """A typed value hashes to SHA-256 of "t:" and the canonical text the guide shows for it."""
    value, text = DOCUMENTED
    assert fingerprint_digest(value) == hashlib.sha256(b"t:" + text.encode()).digest()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        pytest.param(decimal.Decimal("10.0"), decimal.Decimal("10.00"), id="decimal-scale"),
        pytest.param(decimal.Decimal("10"), decimal.Decimal("1E+1"), id="decimal-exponent"),
        pytest.param(decimal.Decimal("-0.00"), decimal.Decimal("0"), id="decimal-zero-sign"),
        pytest.param(
            dt.datetime(2025, 3, 1, 13, 30, tzinfo=PARIS), dt.datetime(2025, 3, 1, 12, 30, tzinfo=dt.UTC), id="instant"
        ),
        pytest.param(Colour.RED, "red", id="enum-is-its-value"),
        pytest.param(
            Charge(decimal.Decimal("5.0"), "eur", note="a"),
            {"amount": decimal.Decimal("5"), "currency": "eur"},
            id="dataclass-is-its-compared-fields",
        ),
        pytest.param(
            ChargeModel(amount=decimal.Decimal("1.0"), at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC)),
            {"amount": decimal.Decimal("1"), "at": dt.datetime(2025, 1, 1, 1, tzinfo=PARIS)},
            id="model-is-its-dump",
        ),
        pytest.param({"c": Colour.RED, "n": 1}, {"n": 1, "c": "red"}, id="plain-enum-in-the-plain-form"),
    ],
)
def test_equal_typed_values_share_a_fingerprint(one: object, other: object) -> None:
    """Values the guide calls equal (numerically, as instants, an enum and its value…) are one fingerprint."""
    assert fingerprint_digest(one) == fingerprint_digest(other)


def test_an_enum_of_plain_values_keeps_the_plain_digest() -> None:
    """An Enum whose value is JSON hashes as that value: the digest an IntEnum or StrEnum always had."""
    assert fingerprint_digest({"c": Colour.RED}) == fingerprint_digest({"c": "red"})
    assert fingerprint_digest({"c": Colour.RED}) == hashlib.sha256(b'j:{"c":"red"}').digest()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        pytest.param(decimal.Decimal("10"), 10, id="decimal-vs-int"),
        pytest.param(decimal.Decimal("0.1"), 0.1, id="decimal-vs-float"),
        pytest.param(decimal.Decimal("10"), "1e1", id="decimal-vs-its-text"),
        pytest.param(ORDER, str(ORDER), id="uuid-vs-its-text"),
        pytest.param(dt.date(2025, 3, 1), "2025-03-01", id="date-vs-its-text"),
        pytest.param(dt.datetime(2025, 3, 1), dt.datetime(2025, 3, 1, tzinfo=dt.UTC), id="naive-vs-aware"),
        pytest.param(dt.datetime(2025, 3, 1), dt.date(2025, 3, 1), id="datetime-vs-date"),
        pytest.param(decimal.Decimal("10"), {"$decimal": "1e1"}, id="tag-alone"),
        pytest.param([decimal.Decimal("10")], [{"$decimal": "1e1"}], id="tag-in-the-plain-form"),
        pytest.param([ORDER, decimal.Decimal("10")], [ORDER, {"$decimal": "1e1"}], id="tag-in-the-typed-form"),
        pytest.param([ORDER, {"$$decimal": "1e1"}], [ORDER, {"$decimal": "1e1"}], id="escaped-tag"),
        pytest.param(dt.time(12, 30), "12:30:00.000000", id="time-vs-its-text"),
    ],
)
def test_distinct_typed_values_have_distinct_fingerprints(one: object, other: object) -> None:
    """A typed value never shares a fingerprint with its text, another type, or an object that looks like a tag."""
    assert fingerprint_digest(one) != fingerprint_digest(other)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(decimal.Decimal("NaN"), "Decimal NaN is not a number", id="decimal-nan"),
        pytest.param(decimal.Decimal("-Infinity"), "Decimal -Infinity is not a number", id="decimal-infinity"),
        pytest.param({"tags": {"a", "b"}}, "a set has no order", id="set"),
        pytest.param(frozenset({1}), "a set has no order", id="frozenset"),
        pytest.param(dt.time(9, tzinfo=dt.UTC), "a time of day with an offset", id="aware-time"),
        pytest.param({ORDER: 1}, "keys must be str, int, float, bool or None", id="uuid-key"),
        pytest.param(
            dt.datetime.max.replace(tzinfo=dt.timezone(-dt.timedelta(hours=1))), "OverflowError", id="past-year-9999"
        ),
        pytest.param([decimal.Decimal(1), {1: "a", "b": 2}], "not supported between", id="unsortable-keys"),
    ],
)
def test_a_typed_value_without_a_canonical_form_is_invalid(value: object, reason: str) -> None:
    """NaN and infinite decimals, sets, times with offsets, typed keys are InvalidFingerprintError, chained."""
    with pytest.raises(InvalidFingerprintError, match=reason) as caught:
        fingerprint_digest(value)
    assert caught.value.__cause__ is not None


def test_a_circular_typed_value_is_invalid() -> None:
    """A value that holds itself is refused in the typed form too, not walked forever."""
    loop: list[object] = [decimal.Decimal(1)]
    loop.append(loop)
    with pytest.raises(InvalidFingerprintError, match="Circular reference"):
        fingerprint_digest(loop)


# Hypothesis: the fingerprint is injective on the model below and constant on each of its classes. The model
# says, in Python's own terms, which values are one request: decimals and aware datetimes by ==, an enum as
# its value, a dataclass as its compared fields, a tuple as a list; floats by repr (JSON keeps -0.0 apart).
def model(value: object) -> object:
    """What makes two values one request: equal models, equal fingerprints; distinct models, distinct ones."""
    if isinstance(value, enum.Enum):
        return model(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return model({field.name: getattr(value, field.name) for field in dataclasses.fields(value) if field.compare})
    if isinstance(value, BaseModel):
        return model(value.model_dump())
    if isinstance(value, dict):
        return ("object", frozenset((key, model(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return ("array", tuple(model(item) for item in value))
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, dt.datetime):
        if value.utcoffset() is None:
            return ("naive", value)
        # Its instant, not the value: across zones Python's == calls a time in a DST fold or gap unequal to
        # every other (PEP 495), while it has one UTC instant, which is what the fingerprint keeps.
        return ("aware", value.astimezone(dt.UTC))
    return (type(value).__name__, value)  # bool, int, str, None, Decimal, UUID, date, time: by ==


_ZONES = st.sampled_from([dt.UTC, PARIS, zoneinfo.ZoneInfo("America/St_Johns"), dt.timezone(dt.timedelta(hours=-7))])
_INSTANTS = st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2100, 1, 1), timezones=_ZONES)


def _rescaled(draw: st.DrawFn, value: decimal.Decimal) -> decimal.Decimal:
    """``value`` written with more trailing zeros, or in another zone's wall time: the same value."""
    return value.quantize(decimal.Decimal(1).scaleb(value.as_tuple().exponent - draw(st.integers(0, 3))))  # type: ignore[operator]


_DECIMALS = st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-1000, max_value=1000)
# Leaves drawn from small pools, so that near misses are common: 10 and Decimal(10), a UUID and its text, a
# tag's text, "$"-keys, naive and aware datetimes at the same wall time.
_LEAVES: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.sampled_from([0.0, -0.0, 0.1, 10.0, 1.5]),
    st.sampled_from(["", "red", "1e1", "105e-1", str(ORDER), "2025-03-01", "$decimal", "12:30:00.000000"]),
    _DECIMALS,
    st.sampled_from([decimal.Decimal(10), decimal.Decimal("1.50"), decimal.Decimal("-0.0")]),
    st.sampled_from([ORDER, uuid.UUID(int=0)]),
    _INSTANTS,
    _INSTANTS.map(lambda instant: instant.replace(tzinfo=None)),
    st.dates(min_value=dt.date(2025, 1, 1), max_value=dt.date(2025, 1, 3)),
    st.times(),
    st.sampled_from(list(Colour)),
)
_KEYS = st.sampled_from(["a", "b", "amount", "$decimal", "$$decimal", "$uuid", "$", "$$"])
VALUES: st.SearchStrategy[object] = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(_KEYS, children, max_size=3),
        st.builds(Charge, amount=_DECIMALS, currency=st.sampled_from(["eur", "usd"]), note=st.text(max_size=2)),
        st.builds(ChargeModel, amount=_DECIMALS, at=_INSTANTS),
    ),
    max_leaves=8,
)


@st.composite
def twins(draw: st.DrawFn, value: object) -> object:
    """Another writing of ``value``: decimals rescaled, aware datetimes in other zones, keys reordered."""
    if isinstance(value, decimal.Decimal):
        return _rescaled(draw, value)
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(draw(_ZONES))
    if isinstance(value, Colour):
        return draw(st.sampled_from([value, value.value]))
    if isinstance(value, list | tuple):
        return [draw(twins(item)) for item in value]
    if isinstance(value, dict):
        items = draw(st.permutations(list(value.items())))
        return {key: draw(twins(item)) for key, item in items}
    return value


PROPERTIES = settings(max_examples=1500, deadline=None, database=None)


@PROPERTIES
@given(data=st.data(), value=VALUES)
def test_equal_values_have_equal_fingerprints(data: st.DataObject, value: object) -> None:
    """Any other writing of a value (rescaled decimals, other zones, reordered keys…) has its fingerprint."""
    twin = data.draw(twins(value))
    assert model(twin) == model(value)
    assert fingerprint_digest(twin) == fingerprint_digest(value)


@PROPERTIES
@given(one=VALUES, other=VALUES)
def test_distinct_values_have_distinct_fingerprints(one: object, other: object) -> None:
    """Two values the model tells apart never share a fingerprint; two it does not, always do."""
    assert (fingerprint_digest(one) == fingerprint_digest(other)) == (model(one) == model(other))


class ChargeIn(BaseModel):
    amount: decimal.Decimal
    currency: str


def _body_digest(body: bytes, normalise: Callable[[bytes], object]) -> bytes | None:
    head = RequestHead(method="POST", path="/charges", query="", headers={}, scope={})
    return fingerprint_digest(request_fingerprint(head, body, FINGERPRINT_PARTS, normalise))


@pytest.mark.parametrize(
    "normalise",
    [
        pytest.param(functools.partial(json.loads, parse_float=decimal.Decimal, parse_int=decimal.Decimal), id="json"),
        pytest.param(ChargeIn.model_validate_json, id="pydantic"),
    ],
)
def test_a_body_normalised_to_typed_values_is_fingerprinted_by_them(normalise: Callable[[bytes], object]) -> None:
    """The middleware's request fingerprint with a typed normaliser: 10.0 and 10.00 one request, 10.01 another."""
    first = _body_digest(b'{"amount": 10.0, "currency": "EUR"}', normalise)
    assert _body_digest(b'{"currency": "EUR", "amount": 10.00}', normalise) == first
    assert _body_digest(b'{"amount": 10.01, "currency": "EUR"}', normalise) != first


def test_keys_in_the_typed_form_are_what_json_makes_of_them() -> None:
    """An Enum key is its value; an int, bool or None key is its JSON text, as in the plain form."""
    assert fingerprint_digest({Colour.RED: decimal.Decimal("1.0")}) == fingerprint_digest({"red": decimal.Decimal(1)})
    expected = b't:[{"1":{"$decimal":"1e0"},"2":[]},{"null":{"$uuid":"0b0e2f4c-7a9d-4c1e-9f3a-2b5d6e7f8a91"}}]'
    assert fingerprint_digest([{2: [], 1: decimal.Decimal(1)}, {None: ORDER}]) == hashlib.sha256(expected).digest()

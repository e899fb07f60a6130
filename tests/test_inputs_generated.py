"""Generated keys, scopes and fingerprints: each is accepted or refused with our error, never anything else.

Pure-function tests (no database): a unit of work and a lease validate their inputs when they are made, before
any SQL. Together they run 12,000 generated cases (see ``max_examples``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import async_sessionmaker

from idembarrier import MAX_KEY_LENGTH, Barrier, InvalidFingerprintError, InvalidKeyError
from idembarrier._keys import fingerprint_digest, validate_key

if TYPE_CHECKING:
    from collections.abc import Callable


def generated(examples: int) -> settings:
    """Settings for ``examples`` generated cases."""
    return settings(GENERATED, max_examples=examples)


GENERATED = settings(
    deadline=None,  # a fingerprint nested thousands deep takes milliseconds; that is no failure
    database=None,  # leave no example database in the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Characters at the edges of what a key may hold, drawn often: lone surrogates, controls, their neighbours.
_EDGES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x1f", "\x7f", "\x9f", "\xa0", "\U0010ffff"])
_ANY_CHARACTER = st.one_of(st.characters(exclude_categories=()), _EDGES)
_TEXT = st.text(alphabet=_ANY_CHARACTER, max_size=MAX_KEY_LENGTH + 5)

KEYS: st.SearchStrategy[object] = st.one_of(
    _TEXT,
    st.text(min_size=MAX_KEY_LENGTH - 1, max_size=MAX_KEY_LENGTH + 1),
    st.binary(max_size=8),
    st.integers(),
    st.none(),
    st.lists(_TEXT, max_size=2),
)


def _nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def _self_referential(keys: list[str]) -> object:
    loop: dict[str, object] = dict.fromkeys(keys, 1)
    loop["self"] = loop
    return loop


_BELOW_DIGIT_LIMIT = 10**4299


def _big_int(past: bool) -> int:
    """An int either side of the int-to-str digit limit (4,300 digits), made here: Hypothesis cannot print one."""
    return -(10**4300) if past else _BELOW_DIGIT_LIMIT


_SCALARS: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.booleans().map(_big_int),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
    st.binary(max_size=8),
    st.builds(object),
)
_DICT_KEYS: st.SearchStrategy[object] = st.one_of(_TEXT, st.integers(), st.floats(), st.booleans(), st.none())

FINGERPRINTS: st.SearchStrategy[object] = st.one_of(
    st.recursive(
        _SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(_DICT_KEYS, children, max_size=4),
            st.frozensets(st.integers(), max_size=3),
        ),
        max_leaves=12,
    ),
    st.integers(min_value=0, max_value=3000).map(_nested),  # up to past the default recursion limit
    st.lists(st.text(max_size=3), max_size=3).map(_self_referential),
    st.binary(),
)


def _accepted_key(key: object) -> bool:
    """The oracle: a key is usable when a driver can store it as text in a VARCHAR(255) column."""
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        return False
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in key):
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _small_int(value: object) -> bool:
    return isinstance(value, int) and abs(value) <= _BELOW_DIGIT_LIMIT


def _outcome(call: Callable[[], object]) -> BaseException | None:
    """Run ``call``; return what it raised if it is one of ours about the input, else let it escape."""
    try:
        call()
    except (InvalidKeyError, InvalidFingerprintError) as exc:
        return exc
    return None


@generated(4000)
@given(key=KEYS)
def test_a_generated_key_is_valid_exactly_when_a_driver_can_store_it(key: object) -> None:
    """validate_key returns the key exactly when it is storable text, and raises InvalidKeyError otherwise."""
    raised = _outcome(lambda: validate_key(key))
    assert (raised is None) == _accepted_key(key), raised
    assert raised is None or isinstance(raised, InvalidKeyError)


@generated(4000)
@given(fingerprint=FINGERPRINTS)
def test_a_generated_fingerprint_hashes_or_raises_invalid_fingerprint(fingerprint: object) -> None:
    """fingerprint_digest returns a SHA-256 digest (or None for None) or raises InvalidFingerprintError."""
    raised = _outcome(lambda: fingerprint_digest(fingerprint))
    if raised is not None:
        assert isinstance(raised, InvalidFingerprintError)
        assert raised.__cause__ is not None
        assert not isinstance(fingerprint, bytes)
        return
    digest = fingerprint_digest(fingerprint)
    assert (digest is None) == (fingerprint is None)
    assert digest is None or len(digest) == 32


@generated(2000)
@given(key=KEYS, scope=KEYS, fingerprint=FINGERPRINTS)
def test_a_generated_unit_of_work_is_made_or_refused_with_our_error(
    key: object, scope: object, fingerprint: object
) -> None:
    """Barrier.unit_of_work either makes a unit of work or raises InvalidKeyError / InvalidFingerprintError."""
    barrier = Barrier(async_sessionmaker())
    raised = _outcome(lambda: barrier.unit_of_work(key, scope=scope, fingerprint=fingerprint))  # type: ignore[arg-type]
    if not (_accepted_key(key) and _accepted_key(scope)):
        assert isinstance(raised, InvalidKeyError)


@generated(2000)
@given(key=KEYS, scope=KEYS, fingerprint=FINGERPRINTS)
def test_generated_leased_work_is_made_or_refused_with_our_error(
    key: object, scope: object, fingerprint: object
) -> None:
    """Barrier.leased validates the same way: InvalidKeyError / InvalidFingerprintError, or a lease."""
    barrier = Barrier(async_sessionmaker())
    raised = _outcome(lambda: barrier.leased(key, scope=scope, fingerprint=fingerprint))  # type: ignore[arg-type]
    valid_keys = _accepted_key(key) and _accepted_key(scope)
    hashable = fingerprint is None or isinstance(fingerprint, bytes) or _small_int(fingerprint)
    if valid_keys and hashable:
        assert raised is None
    if valid_keys and isinstance(fingerprint, float) and not math.isfinite(fingerprint):
        assert isinstance(raised, InvalidFingerprintError)

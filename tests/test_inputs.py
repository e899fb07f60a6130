"""Keys, scopes and fingerprints that cannot be stored are refused with our errors, before any SQL runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker

from idembarrier import Barrier, InvalidFingerprintError, InvalidKeyError

if TYPE_CHECKING:
    from tests.conftest import Database

LONE_SURROGATE = "order-\ud800"


def nested(depth: int) -> object:
    """A list nested ``depth`` levels deep: deeper than the interpreter's recursion limit when large."""
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


def unbound() -> Barrier:
    """A barrier on a sessionmaker bound to no engine: any attempt to reach a database would fail."""
    return Barrier(async_sessionmaker())


def self_referential() -> object:
    loop: dict[str, object] = {}
    loop["self"] = loop
    return loop


def test_a_key_with_a_lone_surrogate_is_an_invalid_key() -> None:
    """A key that has no UTF-8 encoding (a lone surrogate) raises InvalidKeyError when the unit is made."""
    with pytest.raises(InvalidKeyError, match="surrogate"):
        unbound().unit_of_work(LONE_SURROGATE, scope="shop")


def test_a_scope_with_a_lone_surrogate_is_an_invalid_key() -> None:
    """A scope that has no UTF-8 encoding raises InvalidKeyError naming the scope."""
    with pytest.raises(InvalidKeyError, match="the scope contains a lone surrogate"):
        unbound().unit_of_work("order-1", scope="shop-\udfff")


def test_leased_work_refuses_a_lone_surrogate_too() -> None:
    """`Barrier.leased()` validates its key and scope the same way."""
    with pytest.raises(InvalidKeyError):
        unbound().leased(LONE_SURROGATE, scope="jobs")
    with pytest.raises(InvalidKeyError):
        unbound().leased("job-1", scope="\ud800")


def test_a_key_that_is_not_a_str_is_described_without_calling_its_repr() -> None:
    """A non-str key too deep to repr() still raises InvalidKeyError, not RecursionError."""
    with pytest.raises(InvalidKeyError, match="must be a str, not list"):
        unbound().unit_of_work(nested(100_000), scope="shop")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fingerprint",
    [
        pytest.param(nested(100_000), id="deeper-than-the-recursion-limit"),
        pytest.param(self_referential(), id="self-referential"),
        pytest.param({"card": "4242\ud800"}, id="lone-surrogate-value"),
        pytest.param({"\udfff": 1}, id="lone-surrogate-key"),
        pytest.param("\ud800", id="lone-surrogate-string"),
        pytest.param({"amount": float("nan")}, id="nan"),
        pytest.param([float("inf")], id="infinity"),
        pytest.param({float("-inf"): 1}, id="infinite-key"),
        pytest.param(10**5000, id="int-beyond-the-str-limit"),
        pytest.param({1: "a", "b": 2}, id="unsortable-keys"),
        pytest.param({"when": object()}, id="not-json"),
    ],
)
def test_a_fingerprint_that_cannot_be_canonicalised_is_invalid(fingerprint: object) -> None:
    """Every way canonical JSON can fail raises InvalidFingerprintError, chained to the cause."""
    with pytest.raises(InvalidFingerprintError) as caught:
        unbound().unit_of_work("order-1", scope="shop", fingerprint=fingerprint)
    assert caught.value.__cause__ is not None


def test_leased_work_refuses_the_same_fingerprints() -> None:
    """`Barrier.leased()` canonicalises its fingerprint with the same function, so it fails the same way."""
    for fingerprint in (nested(100_000), {"card": "\ud800"}, float("nan")):
        with pytest.raises(InvalidFingerprintError):
            unbound().leased("job-1", scope="jobs", fingerprint=fingerprint)


class _Exploding(dict[str, object]):
    """A dict whose items() raises: canonical JSON runs the caller's code through such subclasses."""

    def items(self) -> object:  # type: ignore[override]
        raise LookupError("boom")


def test_a_fingerprint_whose_own_code_raises_is_invalid() -> None:
    """Whatever a fingerprint's own methods raise while it is canonicalised becomes InvalidFingerprintError."""
    with pytest.raises(InvalidFingerprintError) as caught:
        unbound().unit_of_work("order-1", scope="shop", fingerprint=_Exploding(a=1))
    assert isinstance(caught.value.__cause__, LookupError)


async def test_an_unencodable_key_never_reaches_the_database(db: Database) -> None:
    """On each engine, a lone-surrogate key raises InvalidKeyError with no statement sent and no record."""
    statements: list[str] = []
    event.listen(db.engine.sync_engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    barrier = Barrier(db.sessionmaker)
    with pytest.raises(InvalidKeyError):
        async with barrier.unit_of_work(LONE_SURROGATE, scope="shop"):
            pass  # pragma: no cover - never entered
    assert statements == []
    assert await db.records() == []

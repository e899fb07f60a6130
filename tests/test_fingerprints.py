"""Fingerprints: plain JSON values keep the digests records already hold; typed values get a stable form.

Pure-function tests (no database). The pinned digests were computed by the code released before typed
fingerprints existed: a record stored then must still match the same request now.
"""

from __future__ import annotations

import enum

import pytest

from idembarrier._keys import fingerprint_digest


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

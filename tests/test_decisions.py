"""The decision log: one `logging` record per call on ``idembarrier.decisions``, its fields in ``extra``."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import anyio
import pytest

from idembarrier import Barrier, FingerprintMismatchError, KeyedHash, KeyInProgressError, OnConflict, key_hash
from idembarrier._observe import DECISION_FIELDS
from tests.helpers import Boom, new_key, pay
from tests.test_concurrency import Winner
from tests.test_operations import left_behind

if TYPE_CHECKING:
    from tests.conftest import Database

SCOPE = "payments"  # pay()'s and Winner's
LOGGER = "idembarrier.decisions"


def decisions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == LOGGER]


def fields(record: logging.LogRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in DECISION_FIELDS}


def everything(record: logging.LogRecord) -> str:
    """All a record carries, message and attributes, as a handler or a formatter could see them."""
    return record.getMessage() + repr(vars(record))


async def test_each_call_logs_one_decision_with_its_fields(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """A first call, a replay and a mismatch log one INFO record each, the fields as record attributes."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    barrier, key = Barrier(db.sessionmaker), new_key()
    await pay(barrier, key, fingerprint=1)
    await pay(barrier, key, fingerprint=1)
    with pytest.raises(FingerprintMismatchError):
        await pay(barrier, key, fingerprint=2)
    first, replay, mismatch = decisions(caplog)
    assert {record.levelno for record in (first, replay, mismatch)} == {logging.INFO}
    digest = key_hash(SCOPE, key)
    common = {"work": "unit_of_work", "scope": SCOPE, "key_hash": digest, "attempt": 1, "reclaimed": False}
    for record, outcome, status, error in [
        (first, "executed", "COMPLETED", None),
        (replay, "replayed", "COMPLETED", None),
        (mismatch, "fingerprint_mismatch", None, "idembarrier.FingerprintMismatchError"),
    ]:
        found = fields(record)
        waited, duration = found.pop("waited"), found.pop("duration")
        assert found == {**common, "outcome": outcome, "status": status, "error": error}
        assert isinstance(waited, float)
        assert isinstance(duration, float)
        assert 0 <= waited <= duration
        assert record.getMessage().startswith(f"unit_of_work {outcome}: scope 'payments', key {digest}, attempt 1")
        assert key not in everything(record)


async def test_the_key_never_reaches_a_record(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """A failing body, a conflict and a reclaimed lease log their decisions by key hash; the key is nowhere."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    barrier, key = Barrier(db.sessionmaker), new_key()
    with pytest.raises(Boom):
        async with barrier.unit_of_work(key, scope=SCOPE):
            raise Boom(f"the body failed on {key}")
    winner = Winner(barrier, key)
    async with anyio.create_task_group() as tg:
        await tg.start(winner.run)
        with pytest.raises(KeyInProgressError):
            await pay(barrier, key, on_conflict=OnConflict.FAIL)
        winner.release.set()
    stale = new_key()
    await left_behind(db, SCOPE, stale, "IN_PROGRESS")
    async with barrier.leased(stale, scope=SCOPE) as lease:
        await lease.release()
    failed, conflict, won, reclaimed = (fields(record) for record in decisions(caplog))
    assert (failed["outcome"], failed["error"], failed["status"]) == ("executed", "tests.helpers.Boom", None)
    assert (conflict["outcome"], conflict["error"]) == ("in_progress", "idembarrier.KeyInProgressError")
    assert (won["outcome"], won["status"]) == ("executed", "COMPLETED")
    assert (reclaimed["work"], reclaimed["attempt"], reclaimed["reclaimed"]) == ("lease", 2, True)
    assert reclaimed["key_hash"] == key_hash(SCOPE, stale)
    for record in decisions(caplog):
        assert key not in everything(record)
        assert stale not in everything(record)


async def test_a_json_formatter_serialises_the_fields_as_they_are(
    sqlite_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The fields are plain strings, numbers, booleans and None: json.dumps takes them unchanged."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    key = new_key()
    await pay(Barrier(sqlite_db.sessionmaker), key)
    (record,) = decisions(caplog)
    document = json.loads(json.dumps(fields(record)))
    assert document["outcome"] == "executed"
    assert document["status"] == "COMPLETED"
    assert document["key_hash"] == key_hash(SCOPE, key)


async def test_a_disabled_decision_log_builds_nothing(
    sqlite_db: Database, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the logger below INFO and no watcher, a call builds no observation and logs nothing."""
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def built(*_: object, **__: object) -> None:
        raise AssertionError("an observation was built with nobody looking")

    monkeypatch.setattr("idembarrier._runtime.observe", built)
    barrier, key = Barrier(sqlite_db.sessionmaker), new_key()
    await pay(barrier, key)
    await pay(barrier, key)
    async with barrier.leased(new_key(), scope=SCOPE) as lease:
        await lease.release()
    assert decisions(caplog) == []


async def test_a_leased_body_that_raises_logs_its_builtin_error_by_name(
    sqlite_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease whose body raises logs one ``lease`` decision, the builtin exception by its bare name."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    barrier, key = Barrier(sqlite_db.sessionmaker), new_key()
    with pytest.raises(RuntimeError):
        async with barrier.leased(key, scope=SCOPE):
            raise RuntimeError(f"the provider timed out on {key}")
    (record,) = decisions(caplog)
    found = fields(record)
    assert (found["work"], found["outcome"], found["status"], found["error"]) == (
        "lease",
        "executed",
        None,
        "RuntimeError",
    )
    assert key not in everything(record)


async def test_with_keyed_hashes_the_log_hashes_the_stored_key(
    sqlite_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A barrier that stores keyed hashes logs key_hash of the stored key: the caller's key appears nowhere."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    keyed = KeyedHash(b"s" * 32)
    key = new_key()
    await pay(Barrier(sqlite_db.sessionmaker, keyed_hash=keyed), key)
    (record,) = decisions(caplog)
    assert fields(record)["key_hash"] == key_hash(SCOPE, keyed(SCOPE, key))
    assert key not in everything(record)

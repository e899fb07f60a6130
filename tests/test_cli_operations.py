"""The operator's commands: list, unresolved, resolve, inspect by state, purge's dry run and progress, and the
outbox's parked messages, run in process against a real database (PostgreSQL and SQLite; a few through
psycopg too), with text and JSON output and their exit statuses."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import text

from idembarrier import Barrier, ConfigurationError, Purged, ReconciliationRequiredError, Status, UnitOfWorkError
from idembarrier.cli._purge import Progress
from idembarrier.kafka import MessageRefusedError, OutboxRelay
from tests._cli import run_async
from tests.helpers import new_key

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from idembarrier.kafka import Message
    from tests.conftest import Database

SCOPE = "ops"
SHORT = timedelta(milliseconds=300)


async def until_stale(db: Database, key: str) -> None:
    """Return once the key's lease has run out by the database's clock."""
    now = {"postgresql": "now()", "mysql": "UTC_TIMESTAMP(6)"}.get(db.dialect, "strftime('%Y-%m-%d %H:%M:%f', 'now')")
    key_column = "`key`" if db.dialect == "mysql" else "key"  # a reserved word on MariaDB
    sql = text(f"SELECT count(*) FROM idempotency_keys WHERE {key_column} = :key AND locked_until <= {now}")
    with anyio.fail_after(10):
        while True:
            async with db.engine.connect() as conn:
                if (await conn.execute(sql, {"key": key})).scalar_one():
                    return
            await anyio.sleep(0.05)  # waiting for a clock, not ordering tasks


async def stale_lease(
    db: Database, barrier: Barrier, key: str, *, checkpoint: str | None = None, stored: str | None = None
) -> None:
    """Leave ``key`` as a holder that died would: IN_PROGRESS, its lease run out (``stored``: the table's key)."""
    with pytest.raises(UnitOfWorkError):
        async with barrier.leased(key, scope=SCOPE, lease=SHORT, max_reclaims=0) as lease:
            if checkpoint is not None:
                await lease.checkpoint(checkpoint)
            await until_stale(db, key if stored is None else stored)


async def unknown(db: Database, barrier: Barrier, key: str) -> None:
    """Leave ``key`` UNKNOWN: its holder died, and with no reclaim allowed the next claim gives it up."""
    await stale_lease(db, barrier, key, checkpoint="charged")
    with pytest.raises(ReconciliationRequiredError):
        async with barrier.leased(key, scope=SCOPE, lease=SHORT, max_reclaims=0):
            pass


async def test_unresolved_exits_0_when_no_key_needs_a_person(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """With nothing unresolved, unresolved exits 0, in text and in JSON."""
    done = await run_async(capfd, "unresolved", "--database-url", db.url)
    assert (done.status, done.out, done.err) == (0, "no unresolved keys\n", "")
    as_json = await run_async(capfd, "unresolved", "--database-url", db.url, "--json")
    assert (as_json.status, json.loads(as_json.out)) == (0, {"unresolved": [], "limit": 100})


async def test_unresolved_lists_unknown_records_and_stale_leases_oldest_first(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """UNKNOWN records and stale leases are listed oldest first with attempt, age and checkpoint; exit 1."""
    barrier, first, second = Barrier(db.sessionmaker), new_key(), new_key()
    await unknown(db, barrier, first)
    await stale_lease(db, barrier, second)
    async with barrier.unit_of_work(new_key(), scope=SCOPE) as uow:  # finished: never listed
        uow.complete(None)
    done = await run_async(capfd, "unresolved", "--database-url", db.url, "--json")
    assert (done.status, done.err) == (1, "")
    listed = json.loads(done.out)
    assert listed["limit"] == 100
    rows = listed["unresolved"]
    assert [(r["key"], r["status"], r["attempt"], r["checkpoint"]) for r in rows] == [
        (first, "UNKNOWN", 1, "charged"),
        (second, "IN_PROGRESS", 1, None),
    ]
    assert all(r["scope"] == SCOPE and r["age_seconds"] > 0 and r["created_at"] for r in rows)
    table = await run_async(capfd, "unresolved", "--database-url", db.url)
    assert table.status == 1
    lines = table.out.splitlines()
    assert lines[0] == "2 keys need a person, oldest first:"
    assert lines[1].split() == ["SCOPE", "KEY", "STATUS", "ATTEMPT", "AGE", "CHECKPOINT"]
    assert lines[2].split()[:4] == [SCOPE, first, "UNKNOWN", "1"]
    assert lines[2].split()[-1] == "charged"
    assert lines[3].split()[:5] == [SCOPE, second, "stale", "lease", "1"]
    limited = await run_async(capfd, "unresolved", "--database-url", db.url, "--limit", "1")
    assert limited.status == 1
    assert limited.out.splitlines()[0] == "1 key needs a person, oldest first:"
    assert first in limited.out
    assert second not in limited.out
    assert "there may be more" in limited.out


async def test_resolve_records_an_operators_outcome(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """resolve finishes an UNKNOWN record and a stale lease; the key then replays what the operator gave."""
    barrier, gone, stale = Barrier(db.sessionmaker), new_key(), new_key()
    await unknown(db, barrier, gone)
    await stale_lease(db, barrier, stale)
    url = ["--database-url", db.url]
    done = await run_async(
        capfd, "resolve", SCOPE, gone, "--status", "FAILED", "--response", '{"error": "refunded"}', *url
    )
    assert (done.status, done.err) == (0, "")
    assert done.out == f"resolved key {gone!r} in scope {SCOPE!r} as FAILED\n"
    as_json = await run_async(
        capfd, "resolve", SCOPE, stale, "--status", "COMPLETED", "--response", "42", *url, "--json"
    )
    assert as_json.status == 0, as_json.err
    assert json.loads(as_json.out) == {"resolved": True, "scope": SCOPE, "key": stale, "status": "COMPLETED"}
    assert await barrier.execute(stale, lambda session: pytest.fail("ran"), scope=SCOPE) == 42
    record = await barrier.inspect(gone, scope=SCOPE)
    assert record is not None
    assert (record.status, record.response) == ("FAILED", b'{"error":"refunded"}')
    assert (await run_async(capfd, "unresolved", *url)).status == 0


async def test_resolve_is_refused_while_a_live_lease_holds_the_key(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """A live lease may still finish by itself: resolve exits 1 with one line saying so, and changes nothing."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease:
        done = await run_async(
            capfd, "resolve", SCOPE, key, "--status", "COMPLETED", "--response", "null", "--database-url", db.url
        )
        assert (done.status, done.out) == (1, "")
        assert "a live lease holds it" in done.line
        assert "may still finish by itself" in done.line
        record = await barrier.inspect(key, scope=SCOPE)
        assert record is not None
        assert record.status == "IN_PROGRESS"
        await lease.release()


async def test_resolve_is_refused_for_a_key_with_no_record_or_a_finished_one(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """A key with no record, or one already finished, is refused: exit 1, one line naming the state."""
    barrier, finished = Barrier(db.sessionmaker), new_key()
    async with barrier.unit_of_work(finished, scope=SCOPE) as uow:
        uow.complete({"paid": True})
    resolve = ["resolve", SCOPE, "--status", "FAILED", "--response", "{}", "--database-url", db.url]
    missing = await run_async(capfd, *resolve[:2], "order-none", *resolve[2:])
    assert (missing.status, missing.out) == (1, "")
    assert missing.line == "idembarrier: cannot resolve: key 'order-none' in scope 'ops' has no record"
    done = await run_async(capfd, *resolve[:2], finished, *resolve[2:], "--json")
    assert (done.status, done.out) == (1, "")
    assert done.line.endswith("is already COMPLETED")
    record = await barrier.inspect(finished, scope=SCOPE)
    assert record is not None
    assert record.response == b'{"paid":true}'


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--status", "COMPLETED", "--response", "{not json"], "not a JSON value"),
        (["--status", "COMPLETED", "--response", "NaN"], "NaN is not JSON"),
        (["--status", "UNKNOWN", "--response", "1"], "invalid choice: 'UNKNOWN'"),
        (["--status", "COMPLETED"], "--response"),
    ],
)
def test_resolve_usage_errors_exit_2_before_connecting(
    args: list[str], says: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A response that is not JSON, a status that is not an outcome, a missing option: exit 2, one line."""
    from tests._cli import run

    done = run(capfd, "resolve", SCOPE, "k", *args, "--database-url", "postgresql+asyncpg://postgres@127.0.0.1:1/none")
    assert (done.status, done.out) == (2, "")
    assert says in done.line


@pytest.mark.parametrize("command", ["unresolved", "parked"])
def test_a_limit_below_1_is_a_usage_error(command: str, capfd: pytest.CaptureFixture[str]) -> None:
    """--limit 0 (or not a number) exits 2 with one line."""
    from tests._cli import run

    for limit in ("0", "ten"):
        done = run(capfd, command, "--limit", limit, "--database-url", "sqlite+aiosqlite:///unused.db")
        assert done.status == 2
        assert "--limit" in done.line


class Refusing:
    """A broker that refuses every message for good."""

    async def publish(self, messages: Sequence[Message]) -> None:
        raise MessageRefusedError(messages[0], "MessageSizeTooLarge:\n  4096 bytes")


async def park(barrier: Barrier, key: str) -> str:
    """Publish one message and have the broker refuse it until it is parked; return its id."""
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        message_id = uow.publish("orders", b"x", key=b"A")
        uow.complete(None)
    assert await OutboxRelay(barrier, Refusing(), max_attempts=1).relay_once() == 0
    return message_id


async def test_parked_messages_are_listed_released_and_dropped(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """parked lists them (exit 1); release-parked and drop-parked act on one (exit 0), then refuse it (exit 1)."""
    barrier, url = Barrier(db.sessionmaker), ["--database-url", db.url]
    empty = await run_async(capfd, "parked", *url)
    assert (empty.status, empty.out) == (0, "no parked messages\n")
    message_id = await park(barrier, new_key())
    listed = await run_async(capfd, "parked", *url, "--json")
    assert (listed.status, listed.err) == (1, "")
    (row,) = json.loads(listed.out)["parked"]
    assert (row["message_id"], row["topic"], row["key"], row["attempts"]) == (message_id, "orders", "A", 1)
    assert row["last_error"] == "MessageSizeTooLarge:\n  4096 bytes"
    assert row["parked_at"]
    table = await run_async(capfd, "parked", *url)
    assert table.status == 1
    assert table.out.splitlines()[0] == "1 parked message (each key's later messages wait behind it):"
    assert "MessageSizeTooLarge: 4096 bytes" in table.out.splitlines()[2]  # its error on one line
    released = await run_async(capfd, "release-parked", message_id, *url, "--json")
    assert (released.status, json.loads(released.out)) == (0, {"released": True, "message_id": message_id})
    assert (await barrier.stats()).outbox_parked == 0
    again = await run_async(capfd, "release-parked", message_id, *url)
    assert (again.status, again.out) == (1, "")
    assert again.line == f"idembarrier: message {message_id!r} is not parked: nothing released"
    await OutboxRelay(barrier, Refusing(), max_attempts=1).relay_once()  # refused again: parked again
    dropped = await run_async(capfd, "drop-parked", message_id, *url)
    assert (dropped.status, dropped.out) == (0, f"dropped message {message_id!r}: it will never be published\n")
    stats = await barrier.stats()
    assert (stats.outbox_pending, stats.outbox_parked) == (0, 0)
    gone = await run_async(capfd, "drop-parked", message_id, *url)
    assert (gone.status, gone.out) == (1, "")
    assert gone.line.endswith("is not parked: nothing dropped")


async def inspected(db: Database, capfd: pytest.CaptureFixture[str], key: str) -> tuple[dict[str, object], str]:
    """inspect's JSON and text for ``key``, both exiting 0."""
    as_json = await run_async(capfd, "inspect", SCOPE, key, "--database-url", db.url, "--json")
    as_text = await run_async(capfd, "inspect", SCOPE, key, "--database-url", db.url)
    assert (as_json.status, as_text.status) == (0, 0), as_json.err + as_text.err
    data: dict[str, object] = json.loads(as_json.out)
    return data, as_text.out


async def test_inspect_shows_a_finished_record_with_its_horizons(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """A finished record shows completed_at, expires_at and its response; no lease, no stale."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        uow.complete({"paid": True})
    data, shown = await inspected(db, capfd, key)
    assert set(data) == {
        *("found", "scope", "key", "status", "attempt", "fingerprint", "created_at"),
        *("completed_at", "response_expires_at", "expires_at", "compact", "response"),
    }
    assert (data["status"], data["compact"], data["response"]) == ("COMPLETED", False, '{"paid":true}')
    completed, response_expires, expires = (
        datetime.fromisoformat(str(data[name])) for name in ("completed_at", "response_expires_at", "expires_at")
    )
    assert completed + timedelta(days=6) < response_expires < completed + timedelta(days=8)  # the default 7 days
    assert completed + timedelta(days=29) < expires < completed + timedelta(days=31)  # and 30 days
    assert "stale" not in shown
    assert "locked_until" not in shown
    assert "response_expires_at" in shown
    assert "\n  expires_at" in shown
    assert "->" not in shown  # nothing for an operator to do


async def test_inspect_never_calls_a_finished_leases_record_stale(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """Leased work that finished is COMPLETED, never stale: no lease words at all, its checkpoint included."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE, lease=SHORT) as lease:
        await lease.checkpoint("packed")
        async with lease.finish() as uow:
            uow.complete({"shipped": True})
    data, shown = await inspected(db, capfd, key)
    assert data["status"] == "COMPLETED"
    assert not {"stale", "locked_until", "checkpoint"} & set(data)
    assert "stale" not in shown
    assert "lease" not in shown


async def test_inspect_says_a_compact_records_response_is_gone(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """After purge drops its response, inspect says the record is compact and its response gone."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        uow.complete({"paid": True})
    past = "now() - interval '1 day'" if db.dialect == "postgresql" else "datetime('now', '-1 day')"
    async with db.engine.begin() as conn:
        cleanup = f", cleanup_at = {past}" if db.dialect == "postgresql" else ""  # PostgreSQL's cleanup horizon
        await conn.exec_driver_sql(f"UPDATE idempotency_keys SET response_expires_at = {past}{cleanup}")
    assert (await barrier.purge()).compacted == 1
    data, shown = await inspected(db, capfd, key)
    assert (data["compact"], data["response"]) == (True, None)
    assert "(gone)" in shown
    assert "its response is gone (compact record" in shown


async def test_inspect_shows_a_leases_state_and_not_a_finished_records(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """A live lease shows locked_until, stale false and its checkpoint; no completed_at or response."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    async with barrier.leased(key, scope=SCOPE) as lease:
        await lease.checkpoint("charged")
        data, shown = await inspected(db, capfd, key)
        await lease.release()
    assert (data["status"], data["stale"], data["checkpoint"]) == ("IN_PROGRESS", False, "charged")
    assert data["locked_until"]
    assert not {"completed_at", "expires_at", "response", "compact"} & set(data)
    assert "a live lease holds it" in shown


async def test_inspect_shows_an_unknown_record_without_stale(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """An UNKNOWN record shows its attempt and last checkpoint, says to resolve it, and has no stale."""
    barrier, key = Barrier(db.sessionmaker), new_key()
    await unknown(db, barrier, key)
    data, shown = await inspected(db, capfd, key)
    assert (data["status"], data["checkpoint"]) == ("UNKNOWN", "charged")
    assert not {"stale", "locked_until", "expires_at", "response_expires_at", "response"} & set(data)
    assert "stale" not in shown
    assert "locked_until" not in shown  # no lease holds an UNKNOWN record
    assert "idembarrier resolve" in shown
    stale_key = new_key()
    await stale_lease(db, barrier, stale_key)
    stale, said = await inspected(db, capfd, stale_key)
    assert stale["stale"] is True
    assert "its lease ran out" in said


NEW_COMMANDS = {
    "list": ["list", "--status", "UNKNOWN", "--older-than", "1d"],
    "purge --dry-run": ["purge", "--dry-run"],
    "unresolved": ["unresolved"],
    "resolve": ["resolve", SCOPE, "k", "--status", "FAILED", "--response", "{}"],
    "parked": ["parked"],
    "release-parked": ["release-parked", "m-1"],
    "drop-parked": ["drop-parked", "m-1"],
}


@pytest.mark.parametrize("command", NEW_COMMANDS)
def test_a_refused_port_exits_3_with_one_line(command: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Each operator command keeps the contract: a database nobody answers at exits 3, one line, no traceback."""
    from tests._cli import run

    with socket.socket() as bound:  # bound, never listening: every connection to it is refused
        bound.bind(("127.0.0.1", 0))
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{bound.getsockname()[1]}/none"
        done = run(capfd, *NEW_COMMANDS[command], "--database-url", url)
    assert (done.status, done.out) == (3, "")
    assert done.line.startswith("idembarrier: database ")


@pytest.mark.parametrize("command", NEW_COMMANDS)
async def test_a_database_without_the_schema_exits_3_naming_migrate(
    command: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Against a database idembarrier was never installed in, each operator command exits 3 and names the fix."""
    done = await run_async(
        capfd, *NEW_COMMANDS[command], "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'new.db'}"
    )
    assert (done.status, done.out) == (3, "")
    assert "idembarrier migrate" in done.line


def test_unresolved_runs_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Smoke test of the real process: migrate, then unresolved exits 0 on an empty table."""
    env = {k: v for k, v in os.environ.items() if k != "IDEMBARRIER_DATABASE_URL"}
    url = f"sqlite+aiosqlite:///{tmp_path / 'smoke.db'}"

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "idembarrier", *args, "--database-url", url],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            env=env,
        )

    assert command("migrate").returncode == 0
    done = command("unresolved", "--json")
    assert (done.returncode, json.loads(done.stdout), done.stderr) == (0, {"unresolved": [], "limit": 100}, "")


# -- list ----------------------------------------------------------------------------------------------


def ago(db: Database, seconds: int) -> str:
    """SQL for the database clock ``seconds`` ago, in the format the dialect stores created_at in."""
    if db.dialect == "postgresql":
        return f"now() - interval '{seconds} seconds'"
    return f"datetime('now', '-{seconds} seconds')"


async def created(db: Database, key: str, seconds_ago: int) -> None:
    """Backdate the record of ``key`` to ``seconds_ago`` by the database's clock."""
    async with db.engine.begin() as conn:
        sql = text(f"UPDATE idempotency_keys SET created_at = {ago(db, seconds_ago)} WHERE key = :key")
        await conn.execute(sql, {"key": key})


async def four_records(db: Database, barrier: Barrier) -> dict[str, str]:
    """A COMPLETED, a FAILED, a stale IN_PROGRESS and an UNKNOWN record, created 3 days, 2 hours,
    10 minutes and 0 seconds ago; the FAILED one in another scope. Returns their keys by status."""
    keys = {name: new_key() for name in ("COMPLETED", "FAILED", "IN_PROGRESS", "UNKNOWN")}
    async with barrier.unit_of_work(keys["COMPLETED"], scope=SCOPE) as uow:
        uow.complete({"paid": True})
    async with barrier.unit_of_work(keys["FAILED"], scope="billing") as uow:
        uow.fail({"declined": True})
    await stale_lease(db, barrier, keys["IN_PROGRESS"], checkpoint="packed")
    await unknown(db, barrier, keys["UNKNOWN"])
    for name, seconds in (("COMPLETED", 3 * 86400), ("FAILED", 2 * 3600), ("IN_PROGRESS", 600), ("UNKNOWN", 0)):
        await created(db, keys[name], seconds)
    return keys


async def listed(db: Database, capfd: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    """``list --json`` with ``args``: its document, the command having exited 0 with nothing on stderr."""
    done = await run_async(capfd, "list", "--database-url", db.url, "--json", *args)
    assert (done.status, done.err) == (0, "")
    document: dict[str, object] = json.loads(done.out)
    return document


def keys_of(document: dict[str, object]) -> list[str]:
    rows = document["records"]
    assert isinstance(rows, list)
    return [row["key"] for row in rows]


async def test_list_shows_records_newest_first_filtered_by_status_scope_and_age(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """list filters by status (repeated or comma-separated), scope and age on the database clock; exit 0."""
    keys = await four_records(db, Barrier(db.sessionmaker))
    newest_first = [keys[s] for s in ("UNKNOWN", "IN_PROGRESS", "FAILED", "COMPLETED")]
    everything = await listed(db, capfd)
    assert keys_of(everything) == newest_first
    assert (everything["limit"], everything["more"]) == (100, False)
    none: dict[str, object] = {"status": None, "scope": None, "older_than_seconds": None, "newer_than_seconds": None}
    assert everything["filters"] == none
    assert keys_of(await listed(db, capfd, "--status", "completed,FAILED")) == newest_first[2:]
    both = await listed(db, capfd, "--status", "UNKNOWN", "--status", "IN_PROGRESS,UNKNOWN")
    assert keys_of(both) == newest_first[:2]
    assert both["filters"] == {**none, "status": ["UNKNOWN", "IN_PROGRESS"]}
    assert keys_of(await listed(db, capfd, "--scope", "billing")) == [keys["FAILED"]]
    assert keys_of(await listed(db, capfd, "--older-than", "1d")) == [keys["COMPLETED"]]
    assert keys_of(await listed(db, capfd, "--newer-than", "1h")) == newest_first[:2]
    window = await listed(db, capfd, "--older-than", "5m", "--newer-than", "2d")
    assert keys_of(window) == [keys["IN_PROGRESS"], keys["FAILED"]]
    assert window["filters"] == {**none, "older_than_seconds": 300.0, "newer_than_seconds": 172800.0}
    assert keys_of(await listed(db, capfd, "--status", "COMPLETED", "--scope", "billing")) == []
    nothing = await run_async(capfd, "list", "--database-url", db.url, "--scope", "nobody")
    assert (nothing.status, nothing.out) == (0, "no records match\n")


async def test_list_gives_every_record_the_same_fields(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """Each record of list --json has one stable set of fields, null where its state has none."""
    keys = await four_records(db, Barrier(db.sessionmaker))
    document = await listed(db, capfd)
    assert isinstance(document["records"], list)
    rows = {row["status"]: row for row in document["records"]}
    fields = {
        *("scope", "key", "status", "stale", "compact", "attempt", "fingerprint", "created_at", "completed_at"),
        *("response_expires_at", "expires_at", "locked_until", "checkpoint"),
    }
    assert all(set(row) == fields for row in rows.values())
    finished, lease, gone = rows["COMPLETED"], rows["IN_PROGRESS"], rows["UNKNOWN"]
    assert finished["key"] == keys["COMPLETED"]
    assert all(finished[name] for name in ("completed_at", "response_expires_at", "expires_at"))
    assert (finished["locked_until"], finished["stale"], finished["compact"]) == (None, False, False)
    assert (lease["stale"], lease["checkpoint"], lease["expires_at"]) == (True, "packed", None)
    assert lease["locked_until"]
    assert (gone["stale"], gone["checkpoint"]) == (False, "charged")
    assert (gone["locked_until"], gone["expires_at"]) == (None, None)
    assert rows["FAILED"]["scope"] == "billing"


async def test_list_prints_a_table_and_says_when_there_are_more(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """The text table has one row per record, stale leases marked; past --limit it says there are more."""
    keys = await four_records(db, Barrier(db.sessionmaker))
    done = await run_async(capfd, "list", "--database-url", db.url)
    assert (done.status, done.err) == (0, "")
    lines = done.out.splitlines()
    assert lines[0] == "4 records, newest first:"
    assert lines[1].split() == ["SCOPE", "KEY", "STATUS", "ATTEMPT", "CREATED_AT", "UNTIL"]
    assert [line.split()[1:3] for line in lines[2:]] == [
        [keys["UNKNOWN"], "UNKNOWN"],
        [keys["IN_PROGRESS"], "IN_PROGRESS(stale)"],
        [keys["FAILED"], "FAILED"],
        [keys["COMPLETED"], "COMPLETED"],
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lines[2].split()[4])
    assert lines[2].split()[5] == "-"  # an UNKNOWN record has no horizon
    limited = await run_async(capfd, "list", "--database-url", db.url, "--limit", "3")
    assert limited.out.splitlines()[0] == "3 records, newest first:"
    assert keys["COMPLETED"] not in limited.out
    assert limited.out.splitlines()[-1].startswith("(the newest 3 shown: there are more;")
    exact = await listed(db, capfd, "--limit", "4")
    assert (len(keys_of(exact)), exact["more"]) == (4, False)
    assert (await listed(db, capfd, "--limit", "3"))["more"] is True


async def test_list_escapes_what_a_terminal_would_act_on(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """A key holding an escape sequence or a bidirectional override is printed escaped; --json has it exactly."""
    barrier = Barrier(db.sessionmaker)
    override = "order-\u202e1-fdp"  # a format character: the barrier accepts it
    async with barrier.unit_of_work(override, scope=SCOPE) as uow:
        uow.complete(None)
    async with barrier.unit_of_work("order-plain", scope=SCOPE) as uow:
        uow.complete(None)
    smuggled = "order-\x1b[2J\n"  # written around the barrier
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE idempotency_keys SET key = :to WHERE key = 'order-plain'"), {"to": smuggled})
    done = await run_async(capfd, "list", "--database-url", db.url)
    assert done.status == 0
    assert "\x1b" not in done.out
    assert "\u202e" not in done.out
    assert "order-\\x1b[2J\\n" in done.out
    assert "order-\\u202e1-fdp" in done.out
    assert len(done.out.splitlines()) == 4  # the header, the columns, two records: no line broken by a key
    assert sorted(keys_of(await listed(db, capfd))) == sorted([override, smuggled])
    one = await run_async(capfd, "inspect", SCOPE, override, "--database-url", db.url)
    assert "\u202e" not in one.out
    assert "order-\\u202e1-fdp" in one.out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--status", "DONE"], "argument --status: not a status"),
        (["--status", "COMPLETED,"], "argument --status: not a status"),
        (["--older-than", "2x"], "argument --older-than: not a duration like 30m, 2h or 7d: '2x'"),
        (["--older-than", "1,5h"], "argument --older-than: not a duration"),
        (["--newer-than", "h"], "argument --newer-than: not a duration"),
        (["--newer-than", "-1d"], "argument --newer-than: expected one argument"),
        (["--older-than", "99999999999d"], "argument --older-than: too long a duration"),
        (["--limit", "0"], "argument --limit: must be at least 1"),
        (["--limit", "10001"], "argument --limit: must be at most 10000"),
        (["--scope", "a\tb"], "argument --scope: invalid idempotency key"),
    ],
)
def test_list_usage_errors_exit_2_before_connecting(
    args: list[str], says: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A status, an age, a limit or a scope list cannot use exits 2 with one line, before any connection."""
    from tests._cli import run

    done = run(capfd, "list", *args, "--database-url", "postgresql+asyncpg://postgres@127.0.0.1:1/none")
    assert (done.status, done.out) == (2, "")
    assert says in done.line


def test_durations_add_up() -> None:
    """A duration is one or more numbers with a unit (ms, s, m, h, d, w); a bare number is seconds."""
    from idembarrier.cli._operator import duration

    assert duration("90s") == duration("90") == duration("1.5m") == timedelta(seconds=90)
    assert duration("250ms") == timedelta(milliseconds=250)
    assert duration("30m") == timedelta(minutes=30)
    assert duration("1w2d3h4m5s") == timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5)
    assert duration("0d") == timedelta(0)


async def test_list_inspect_and_purge_dry_run_through_psycopg(
    psycopg_db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    """psycopg runs the same statements: list's array and interval filters, inspect's horizons, the counts."""
    db = psycopg_db
    keys = await four_records(db, Barrier(db.sessionmaker))
    assert keys_of(await listed(db, capfd, "--status", "COMPLETED,UNKNOWN", "--older-than", "0s")) == [
        keys["UNKNOWN"],
        keys["COMPLETED"],
    ]
    assert keys_of(await listed(db, capfd, "--newer-than", "1h", "--scope", SCOPE)) == [
        keys["UNKNOWN"],
        keys["IN_PROGRESS"],
    ]
    data, _ = await inspected(db, capfd, keys["COMPLETED"])
    assert data["response_expires_at"]
    await expire(db, response=[keys["COMPLETED"]], record=[keys["COMPLETED"]])
    dry = await run_async(capfd, "purge", "--dry-run", "--json", "--database-url", db.url)
    assert json.loads(dry.out) == {"dry_run": True, "compacted": 1, "deleted": 1}


# -- purge: its dry run and its progress ---------------------------------------------------------------


async def expire(db: Database, *, response: Sequence[str] = (), record: Sequence[str] = ()) -> None:
    """Move the response's horizon of the keys ``response``, and the record's of ``record``, a day back."""
    async with db.engine.begin() as conn:
        for column, keys in (("response_expires_at", response), ("expires_at", record)):
            for key in keys:
                cleanup = f", cleanup_at = {ago(db, 86400)}" if db.dialect == "postgresql" else ""  # its horizon too
                sql = f"UPDATE idempotency_keys SET {column} = {ago(db, 86400)}{cleanup} WHERE key = :key"
                await conn.execute(text(sql), {"key": key})


async def finished(barrier: Barrier, count: int) -> list[str]:
    """``count`` COMPLETED records; their keys."""
    keys = [new_key() for _ in range(count)]
    for key in keys:
        async with barrier.unit_of_work(key, scope=SCOPE) as uow:
            uow.complete({"paid": True})
    return keys


async def test_purge_dry_run_counts_what_purge_then_does(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """purge --dry-run counts the responses and records a purge would take, changes nothing, and purge agrees."""
    barrier = Barrier(db.sessionmaker)
    fresh, dropped, deleted = await finished(barrier, 3)
    await stale_lease(db, barrier, new_key())  # never a purge's, however old
    await expire(db, response=[dropped, deleted], record=[deleted])
    url = ["--database-url", db.url]
    dry = await run_async(capfd, "purge", "--dry-run", *url)
    assert (dry.status, dry.err) == (0, "")
    assert dry.out == (
        "would drop 2 expired responses (compact records kept) and delete 1 records; nothing changed (dry run)\n"
    )
    as_json = await run_async(capfd, "purge", "--dry-run", "--json", *url)
    assert json.loads(as_json.out) == {"dry_run": True, "compacted": 2, "deleted": 1}
    for key in (fresh, dropped, deleted):
        record = await barrier.inspect(key, scope=SCOPE)
        assert record is not None
        assert record.response == b'{"paid":true}'
    assert await barrier.purgeable() == Purged(compacted=2, deleted=1)
    done = await run_async(capfd, "purge", "--json", *url)
    assert json.loads(done.out) == {"compacted": 2, "deleted": 1}
    assert json.loads((await run_async(capfd, "purge", "--dry-run", "--json", *url)).out) == {
        "dry_run": True,
        "compacted": 0,
        "deleted": 0,
    }


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    """Seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_on_a_terminal_redraws_one_line_per_kind_up_to_its_total() -> None:
    """On a terminal each kind's line is redrawn in place: bar, done of total, percentage, rate; it ends full."""
    clock, stream = Clock(), Terminal()
    progress = Progress(Purged(compacted=25, deleted=0), batch_size=10, stream=stream, clock=clock)
    for count in (10, 10, 5):
        clock.now += 2.0
        progress("compacted", count)
    progress("deleted", 0)
    progress.close()
    out = stream.getvalue()
    draws = out.split("\r")[1:]
    assert [draw.removesuffix("\x1b[K").removesuffix("\x1b[K\n") for draw in draws] == [
        f"  [{'#' * 12}{'.' * 18}] 10 of 25 responses dropped (40%, 5/s)",
        f"  [{'#' * 24}{'.' * 6}] 20 of 25 responses dropped (80%, 5/s)",
        f"  [{'#' * 30}] 25 of 25 responses dropped (100%, 4/s)",
    ]
    assert out.endswith("\n")
    assert out.count("\n") == 1  # one line per kind that did something; none for the deletes


def test_progress_off_a_terminal_prints_a_line_per_batch() -> None:
    """Off a terminal: one plain line per batch that did something, the total growing if more was found."""
    clock, stream = Clock(), io.StringIO()
    progress = Progress(Purged(compacted=0, deleted=15), batch_size=10, stream=stream, clock=clock)
    progress("compacted", 0)
    for count in (10, 10, 0):
        clock.now += 4.0
        progress("deleted", count)
    assert stream.getvalue().splitlines() == [
        "purge: 10 of 15 records deleted (67%, 2/s)",
        "purge: 20 of 20 records deleted (100%, 2/s)",
    ]


def test_progress_ends_a_line_a_failed_purge_left_open() -> None:
    """A purge that fails midway leaves no half line for the error to be printed on."""
    stream = Terminal()
    progress = Progress(Purged(compacted=0, deleted=100), batch_size=10, stream=stream)
    progress("compacted", 0)
    progress("deleted", 10)
    assert not stream.getvalue().endswith("\n")
    progress.close()
    assert stream.getvalue().endswith("\n")


async def test_purge_shows_its_progress_against_a_real_total(
    db: Database, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """purge counts first: on a terminal its lines reach the total; in a log each batch is a line of it."""
    barrier = Barrier(db.sessionmaker)
    keys = await finished(barrier, 25)
    await expire(db, response=keys, record=keys[:12])
    done = await run_async(capfd, "purge", "--database-url", db.url, "--batch-size", "10")
    assert (done.status, done.out) == (0, "dropped 25 expired responses (compact records kept), deleted 12 records\n")
    assert [re.sub(r", [\d,]+/s\)$", ")", line) for line in done.err.splitlines()] == [
        "purge: 10 of 25 responses dropped (40%)",
        "purge: 20 of 25 responses dropped (80%)",
        "purge: 25 of 25 responses dropped (100%)",
        "purge: 10 of 12 records deleted (83%)",
        "purge: 12 of 12 records deleted (100%)",
    ]
    more = await finished(barrier, 12)
    await expire(db, response=more, record=more)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    live = await run_async(capfd, "purge", "--database-url", db.url, "--batch-size", "5")
    monkeypatch.undo()
    assert (live.status, live.err) == (0, "")
    lines = terminal.getvalue().split("\n")
    assert lines[-1] == ""
    compacting, deleting = (line.split("\r")[-1] for line in lines[:-1])
    assert re.fullmatch(r"  \[#{30}\] 12 of 12 responses dropped \(100%, [\d,]+/s\)\x1b\[K", compacting)
    assert re.fullmatch(r"  \[#{30}\] 12 of 12 records deleted \(100%, [\d,]+/s\)\x1b\[K", deleting)
    assert " 5 of 12 responses dropped (42%, " in lines[0].split("\r")[1]  # drawn first: against the total


@pytest.mark.parametrize(
    ("filters", "says"),
    [
        ({"status": []}, "the status filter names no status"),
        ({"status": ["DONE"]}, "not a status: 'DONE' is not a valid Status"),
        ({"older_than": timedelta(seconds=-1)}, "older_than must be a timedelta of at least 0"),
        ({"newer_than": 3600}, "newer_than must be a timedelta of at least 0, not 3600"),
        ({"limit": 0}, "limit must be at least 1, not 0"),
    ],
)
async def test_records_refuses_an_unusable_filter(sqlite_db: Database, filters: dict[str, object], says: str) -> None:
    """Barrier.records refuses a filter it cannot use with ConfigurationError, before any query."""
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        await Barrier(sqlite_db.sessionmaker).records(**filters)  # type: ignore[arg-type]


async def test_records_takes_one_status_or_several(sqlite_db: Database) -> None:
    """status= takes a Status, or any iterable of them (repeats ignored)."""
    barrier, key = Barrier(sqlite_db.sessionmaker), new_key()
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        uow.fail(None)
    assert [r.key for r in await barrier.records(status=Status.FAILED)] == [key]
    assert [r.key for r in await barrier.records(status=(Status.FAILED, Status.FAILED, Status.UNKNOWN))] == [key]
    assert await barrier.records(status=Status.COMPLETED) == []


def test_progress_before_the_clock_moves_has_no_rate() -> None:
    """A batch reported before any time has passed shows no rate rather than dividing by zero."""
    stream = io.StringIO()
    Progress(Purged(compacted=0, deleted=20), batch_size=10, stream=stream, clock=Clock())("deleted", 10)
    assert stream.getvalue() == "purge: 10 of 20 records deleted (50%, -/s)\n"

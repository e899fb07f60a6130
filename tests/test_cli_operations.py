"""The operator's commands: unresolved, resolve, inspect by state, and the outbox's parked messages, run in
process against a real database (PostgreSQL and SQLite), with text and JSON output and their exit statuses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
import pytest
from sqlalchemy import text

from idembarrier import Barrier, ReconciliationRequiredError, UnitOfWorkError
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
    now = "now()" if db.dialect == "postgresql" else "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    sql = text(f"SELECT count(*) FROM idempotency_keys WHERE key = :key AND locked_until <= {now}")
    with anyio.fail_after(10):
        while True:
            async with db.engine.connect() as conn:
                if (await conn.execute(sql, {"key": key})).scalar_one():
                    return
            await anyio.sleep(0.05)  # waiting for a clock, not ordering tasks


async def stale_lease(db: Database, barrier: Barrier, key: str, *, checkpoint: str | None = None) -> None:
    """Leave ``key`` as a holder that died would: IN_PROGRESS, its lease run out."""
    with pytest.raises(UnitOfWorkError):
        async with barrier.leased(key, scope=SCOPE, lease=SHORT, max_reclaims=0) as lease:
            if checkpoint is not None:
                await lease.checkpoint(checkpoint)
            await until_stale(db, key)


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
        *("completed_at", "expires_at", "compact", "response"),
    }
    assert (data["status"], data["compact"], data["response"]) == ("COMPLETED", False, '{"paid":true}')
    assert data["completed_at"]
    assert data["expires_at"]
    assert "stale" not in shown
    assert "locked_until" not in shown
    assert "expires_at" in shown
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
        await conn.exec_driver_sql(f"UPDATE idempotency_keys SET response_expires_at = {past}")
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
    assert "stale" not in data
    assert "stale" not in shown
    assert "idembarrier resolve" in shown
    stale_key = new_key()
    await stale_lease(db, barrier, stale_key)
    stale, said = await inspected(db, capfd, stale_key)
    assert stale["stale"] is True
    assert "its lease ran out" in said


NEW_COMMANDS = {
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

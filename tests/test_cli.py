"""The command line: migrate, stats, purge and inspect against a real database, with text and JSON output."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from idembarrier import Barrier
from tests._cli import run, run_async

if TYPE_CHECKING:
    import pytest

    from tests.conftest import Database


async def test_stats_and_inspect_report_records(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """stats prints the status distribution; inspect prints one record, or exits 1 when there is none."""
    async with Barrier(db.sessionmaker).unit_of_work("order-7", scope="shop") as uow:
        uow.complete({"paid": True})
    stats = await run_async(capfd, "stats", "--database-url", db.url, "--json")
    assert stats.status == 0, stats.err
    assert json.loads(stats.out) == {
        "statuses": {"COMPLETED": 1},
        "oldest_in_progress_seconds": None,
        "outbox": {"pending": 0, "parked": 0},
    }
    found = await run_async(capfd, "inspect", "shop", "order-7", "--database-url", db.url, "--json")
    assert found.status == 0, found.err
    record = json.loads(found.out)
    assert (record["status"], record["response"], record["attempt"]) == ("COMPLETED", '{"paid":true}', 1)
    missing = await run_async(capfd, "inspect", "shop", "order-8", "--database-url", db.url)
    assert missing.status == 1
    assert "no record" in missing.out
    text = await run_async(capfd, "stats", "--database-url", db.url)
    assert "COMPLETED" in text.out


async def test_purge_and_migrate(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """purge reports how many records it deleted; migrate leaves a database at head as it was."""
    migrated = await run_async(capfd, "migrate", "--database-url", db.url)
    assert (migrated.status, migrated.out.strip()) == (0, "schema is at head")
    purged = await run_async(capfd, "purge", "--database-url", db.url, "--json", "--batch-size", "10")
    assert purged.status == 0, purged.err
    assert json.loads(purged.out) == {"compacted": 0, "deleted": 0}


async def test_purge_reports_each_batch_on_stderr(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """Off a terminal, purge prints one progress line per batch on stderr and its totals on stdout."""
    async with Barrier(db.sessionmaker).unit_of_work("order-9", scope="shop") as uow:
        uow.complete({"paid": True})
    past = "now() - interval '1 day'" if db.dialect == "postgresql" else "datetime('now', '-1 day')"
    async with db.engine.begin() as conn:
        cleanup = f", cleanup_at = {past}" if db.dialect == "postgresql" else ""  # PostgreSQL's cleanup horizon
        await conn.exec_driver_sql(
            f"UPDATE idempotency_keys SET expires_at = {past}, response_expires_at = {past}{cleanup}"
        )
    done = await run_async(capfd, "purge", "--database-url", db.url, "--batch-size", "10")
    assert done.status == 0, done.err
    assert done.out.endswith("deleted 1 records\n"), done.out
    assert "purge: 1 of 1 records deleted (100%, " in done.err.splitlines()[-1], done.err


async def test_purge_paces_its_batches_with_max_share(db: Database, capfd: pytest.CaptureFixture[str]) -> None:
    """--max-share is passed to the purge, which still deletes everything due; a share outside (0, 1] is a
    usage error (exit 2) before anything runs."""
    async with Barrier(db.sessionmaker).unit_of_work("order-10", scope="shop") as uow:
        uow.complete({"paid": True})
    past = "now() - interval '1 day'" if db.dialect == "postgresql" else "datetime('now', '-1 day')"
    async with db.engine.begin() as conn:
        cleanup = f", cleanup_at = {past}" if db.dialect == "postgresql" else ""
        await conn.exec_driver_sql(
            f"UPDATE idempotency_keys SET expires_at = {past}, response_expires_at = {past}{cleanup}"
        )
    for bad in ("0", "1.5", "nan", "half"):
        refused = await run_async(capfd, "purge", "--database-url", db.url, "--max-share", bad)
        assert refused.status == 2, (bad, refused.err)
    assert await db.records("order-10") != []
    done = await run_async(capfd, "purge", "--database-url", db.url, "--json", "--max-share", "0.5")
    assert done.status == 0, done.err
    assert json.loads(done.out) == {"compacted": 1, "deleted": 1}
    assert await db.records("order-10") == []


def test_a_dead_database_exits_3_with_our_message(capfd: pytest.CaptureFixture[str]) -> None:
    """An unreachable database makes the command exit 3 with a one-line error, not a traceback."""
    done = run(capfd, "stats", "--database-url", "postgresql+asyncpg://postgres@127.0.0.1:1/none")
    assert done.status == 3
    assert done.line.startswith("idembarrier: database ")


def test_a_missing_url_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """Without --database-url or IDEMBARRIER_DATABASE_URL the command exits 2 and says what to give."""
    monkeypatch.delenv("IDEMBARRIER_DATABASE_URL", raising=False)
    done = run(capfd, "stats")
    assert done.status == 2
    assert "give --database-url or set IDEMBARRIER_DATABASE_URL" in done.line


def test_bad_usage_exits_2_without_a_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    """A batch size below 1 or a URL SQLAlchemy cannot parse exits 2 with a one-line error."""
    batch = run(capfd, "purge", "--database-url", "sqlite+aiosqlite:///:memory:", "--batch-size", "0")
    url = run(capfd, "stats", "--database-url", "nonsense")
    for done in (batch, url):
        assert done.status == 2, done.err
        assert done.line.startswith("idembarrier: ")

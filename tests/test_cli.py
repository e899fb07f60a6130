"""The command line: migrate, stats, purge and inspect against a real database, with text and JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from idembarrier import Barrier
from idembarrier.__main__ import main

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console entry point's module, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "idembarrier", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


async def test_stats_and_inspect_report_records(db: Database) -> None:
    """stats prints the status distribution; inspect prints one record, or exits 1 when there is none."""
    async with Barrier(db.sessionmaker).unit_of_work("order-7", scope="shop") as uow:
        uow.complete({"paid": True})
    stats = cli("stats", "--database-url", db.url, "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout) == {
        "statuses": {"COMPLETED": 1},
        "oldest_in_progress_seconds": None,
        "outbox": {"pending": 0, "parked": 0},
    }
    found = cli("inspect", "shop", "order-7", "--database-url", db.url, "--json")
    assert found.returncode == 0, found.stderr
    record = json.loads(found.stdout)
    assert (record["status"], record["response"], record["attempt"]) == ("COMPLETED", '{"paid":true}', 1)
    missing = cli("inspect", "shop", "order-8", "--database-url", db.url)
    assert missing.returncode == 1
    assert "no record" in missing.stdout
    text = cli("stats", "--database-url", db.url)
    assert "COMPLETED" in text.stdout


async def test_purge_and_migrate(db: Database) -> None:
    """purge reports how many records it deleted; migrate leaves a database at head as it was."""
    migrated = cli("migrate", "--database-url", db.url)
    assert (migrated.returncode, migrated.stdout.strip()) == (0, "schema is at head")
    purged = cli("purge", "--database-url", db.url, "--json", "--batch-size", "10")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"compacted": 0, "deleted": 0}


def test_a_dead_database_exits_3_with_our_message() -> None:
    """An unreachable database makes the command exit 3 with a one-line error, not a traceback."""
    done = cli("stats", "--database-url", "postgresql+asyncpg://postgres@127.0.0.1:1/none")
    assert done.returncode == 3
    assert done.stderr.startswith("idembarrier: ")
    assert "Traceback" not in done.stderr


def test_a_missing_url_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --database-url or IDEMBARRIER_DATABASE_URL the command exits 2 and says what to give."""
    monkeypatch.delenv("IDEMBARRIER_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as caught:
        main(["stats"])
    assert caught.value.code == 2


def test_bad_usage_exits_2_without_a_traceback() -> None:
    """A batch size below 1 or a URL SQLAlchemy cannot parse exits 2 with a one-line error."""
    batch = cli("purge", "--database-url", "sqlite+aiosqlite:///:memory:", "--batch-size", "0")
    url = cli("stats", "--database-url", "nonsense")
    for done in (batch, url):
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("idembarrier: ")
        assert "Traceback" not in done.stderr

"""The example payments API answers the scripted retry session as the Idempotency-Key draft prescribes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from examples.retry_session import run_session, serve_api

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parent.parent


async def test_retry_session_gets_the_prescribed_answers(db: Database) -> None:
    """On each engine: first run, replay, 422, 400, a concurrent burst of 409s then replays, a stored 402."""
    with serve_api(db.url) as url:
        await run_session(url)


def test_retry_session_runs_with_one_command() -> None:
    """`python -m examples.retry_session` serves the API on embedded SQLite, runs the session and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "examples.retry_session"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "idempotent-replayed: true" in done.stdout
    assert "OK: every answer was the one the draft prescribes" in done.stdout

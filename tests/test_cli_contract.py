"""The command line's failure contract, for every command: exit 2 for usage or configuration, 3 for the
database, one line on stderr that keeps the server's (or the OS's) reason, and never a traceback.

The commands run in process, through `main` (stderr captured at the file descriptor); one smoke test runs
the real ``python -m idembarrier``."""

from __future__ import annotations

import errno
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

import idembarrier
from idembarrier import cli
from tests._cli import run
from tests._postgres_server import EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN_HOST = "no-such-host.invalid"  # RFC 6761: never resolves

COMMANDS = {
    "migrate": ["migrate"],
    "stats": ["stats"],
    "purge": ["purge"],
    "inspect": ["inspect", "shop", "order-1"],
    "list": ["list"],
    "unresolved": ["unresolved"],
    "parked": ["parked"],
    "lab": ["lab"],
    "demo": ["demo", "--orders", "1", "--duplicates", "1"],
}


@pytest.fixture(autouse=True)
def _no_url_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command gets its URL from ``--database-url`` or not at all, never from the caller's environment."""
    monkeypatch.delenv("IDEMBARRIER_DATABASE_URL", raising=False)


@pytest.fixture(scope="module")
def refused_port() -> Iterator[int]:
    """A port that is bound but never listens: every connection to it is refused, and no one can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _resolver_reason(host: str) -> str:
    """What the resolver itself says about ``host`` on this machine ("Name or service not known", …)."""
    try:
        socket.getaddrinfo(host, 5432)
    except socket.gaierror as exc:
        return str(exc.strerror)
    pytest.fail(f"{host} resolved")  # pragma: no cover


def _url(**parts: str | int) -> str:
    from tests.conftest import ADMIN_URL

    return ADMIN_URL.set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


def _database_url_args(command: str, url: str) -> list[str]:
    return [*COMMANDS[command], "--database-url", url]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_host_exits_3_with_the_resolvers_reason(command: str, capfd: pytest.CaptureFixture[str]) -> None:
    """A host name that does not resolve exits 3; the line names the host and the resolver's reason."""
    done = run(capfd, *_database_url_args(command, _url(host=UNKNOWN_HOST)))
    assert done.status == 3
    assert UNKNOWN_HOST in done.line
    assert _resolver_reason(UNKNOWN_HOST) in done.line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_port_exits_3_saying_connection_refused(
    command: str, refused_port: int, capfd: pytest.CaptureFixture[str]
) -> None:
    """A port nobody listens on exits 3 with the OS's reason, not "the connection was lost"."""
    done = run(capfd, *_database_url_args(command, _url(host="127.0.0.1", port=refused_port)))
    assert done.status == 3
    assert os.strerror(errno.ECONNREFUSED) in done.line
    assert "lost" not in done.line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_database_exits_3_with_the_servers_reason(command: str, capfd: pytest.CaptureFixture[str]) -> None:
    """A database the server does not have exits 3 with the server's own message and SQLSTATE."""
    done = run(capfd, *_database_url_args(command, _url(database="idembarrier_no_such_db")))
    assert done.status == 3
    assert 'database "idembarrier_no_such_db" does not exist' in done.line
    assert "3D000" in done.line


def test_an_unknown_role_exits_3_with_the_servers_reason(capfd: pytest.CaptureFixture[str]) -> None:
    """A role the server does not know exits 3 with the server's message (it answers before any password)."""
    done = run(capfd, "stats", "--database-url", _url(username="idembarrier_no_such_role"))
    assert done.status == 3
    assert 'role "idembarrier_no_such_role" does not exist' in done.line


@pytest.fixture(scope="module")
def password_server() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of its own that checks passwords (SCRAM), unlike the trusting test server."""
    server = EmbeddedPostgres.start(make_url("postgresql+asyncpg://postgres@127.0.0.1/postgres"), password="right")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("command", ["migrate", "stats", "inspect"])
def test_a_wrong_password_exits_3_saying_authentication_failed(
    command: str, password_server: EmbeddedPostgres, capfd: pytest.CaptureFixture[str]
) -> None:
    """A password the server refuses exits 3 with the server's reason and SQLSTATE, never "the database failed"."""
    wrong = password_server.url.set(password="wrong").render_as_string(hide_password=False)
    done = run(capfd, *_database_url_args(command, wrong))
    assert done.status == 3
    assert 'password authentication failed for user "postgres"' in done.line
    assert "28P01" in done.line
    assert "wrong" not in done.line  # the password is never printed


@pytest.mark.parametrize("command", COMMANDS)
def test_a_sync_driver_url_exits_2_naming_what_is_supported(command: str, capfd: pytest.CaptureFixture[str]) -> None:
    """``postgresql://`` (SQLAlchemy's synchronous default driver) exits 2 and names postgresql+asyncpg."""
    sync = make_url(_url()).set(drivername="postgresql").render_as_string(hide_password=False)
    done = run(capfd, *_database_url_args(command, sync))
    assert done.status == 2
    assert "postgresql+asyncpg" in done.line
    assert "synchronous" in done.line


@pytest.mark.parametrize("command", ["migrate", "lab"])
def test_an_unsupported_driver_exits_2_naming_what_is_supported(
    command: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """An Oracle URL is refused before any connection, exit 2, naming the supported databases."""
    done = run(capfd, *_database_url_args(command, "oracle+oracledb://app@127.0.0.1/app"))
    assert done.status == 2
    assert "oracle+oracledb" in done.line
    assert "sqlite+aiosqlite" in done.line


@pytest.mark.parametrize("command", ["migrate", "demo"])
def test_a_missing_driver_exits_2_naming_the_extra(
    command: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When asyncpg is not installed the command exits 2 and says which extra installs it."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # what `import asyncpg` finds when it is not installed
    done = run(capfd, *_database_url_args(command, _url()))
    assert done.status == 2
    assert "idembarrier[postgres]" in done.line


@pytest.mark.parametrize("command", ["stats", "lab", "demo"])
def test_an_in_memory_sqlite_url_exits_2_naming_a_file_url(command: str, capfd: pytest.CaptureFixture[str]) -> None:
    """An in-memory SQLite URL is a configuration error whose line names the fix."""
    done = run(capfd, *_database_url_args(command, "sqlite+aiosqlite://"))
    assert done.status == 2
    assert "sqlite+aiosqlite:///" in done.line


@pytest.mark.parametrize("args", [["frobnicate"], ["stats"], ["purge", "--batch-size", "ten"], []])
def test_usage_errors_exit_2_with_one_line(args: list[str], capfd: pytest.CaptureFixture[str]) -> None:
    """An unknown command, a missing URL, a bad option value or no command at all: exit 2, one line."""
    done = run(capfd, *args)
    assert done.status == 2
    assert "--help" in done.line


def test_an_unusable_key_for_inspect_is_a_usage_error(capfd: pytest.CaptureFixture[str]) -> None:
    """inspect refuses a key with a control character before it connects: exit 2, one line."""
    done = run(capfd, "inspect", "shop", "order\x01", "--database-url", _url(host=UNKNOWN_HOST))
    assert done.status == 2
    assert "control character" in done.line


def test_version_prints_the_installed_distributions_version(capfd: pytest.CaptureFixture[str]) -> None:
    """``idembarrier --version`` prints the version from the installed distribution's metadata."""
    done = run(capfd, "--version")
    assert (done.status, done.out, done.err) == (0, f"idembarrier {idembarrier.__version__}\n", "")


def test_a_bug_leaves_main_with_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception that is not a usage, configuration or database failure is raised, not printed as one."""

    def broken(args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_run_lab", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["lab"])


def test_python_m_idembarrier_is_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m idembarrier`` runs `main` and exits with its status."""
    monkeypatch.setattr(sys, "argv", ["idembarrier", "--version"])
    with pytest.raises(SystemExit) as caught:
        runpy.run_module("idembarrier", run_name="__main__")
    assert caught.value.code == 0


def test_the_command_runs_in_a_fresh_interpreter() -> None:
    """Smoke test of the real process: ``--version`` exits 0 and a usage error exits 2, one line on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "IDEMBARRIER_DATABASE_URL"}

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "idembarrier", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            env=env,
        )

    version, usage = command("--version"), command("stats")
    assert (version.returncode, version.stdout, version.stderr) == (0, f"idembarrier {idembarrier.__version__}\n", "")
    assert (usage.returncode, usage.stdout) == (2, "")
    assert usage.stderr.startswith("idembarrier: give --database-url"), usage.stderr
    assert len(usage.stderr.splitlines()) == 1, usage.stderr

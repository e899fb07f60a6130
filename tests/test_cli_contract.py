"""The command line's failure contract, for every command: exit 2 for usage or configuration, 3 for the
database, one line on stderr that keeps the server's (or the OS's) reason, and never a traceback."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

import idembarrier

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN_HOST = "no-such-host.invalid"  # RFC 6761: never resolves

COMMANDS = {
    "migrate": ["migrate"],
    "stats": ["stats"],
    "purge": ["purge"],
    "inspect": ["inspect", "shop", "order-1"],
    "lab": ["lab"],
    "demo": ["demo", "--orders", "1", "--duplicates", "1"],
}


def cli(*args: str, blocked: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command line in a fresh interpreter; ``blocked`` names a module made unimportable first."""
    env = {k: v for k, v in os.environ.items() if k != "IDEMBARRIER_DATABASE_URL"}
    command = [sys.executable, "-m", "idembarrier"]
    if blocked is not None:
        command = [
            sys.executable,
            "-c",
            f"import sys; sys.modules[{blocked!r}] = None; from idembarrier.__main__ import main; "
            "sys.exit(main(sys.argv[1:]))",
        ]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=90, check=False, env=env)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a failing command printed on stderr."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("idembarrier: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


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
def test_an_unknown_host_exits_3_with_the_resolvers_reason(command: str) -> None:
    """A host name that does not resolve exits 3; the line names the host and the resolver's reason."""
    line = one_line(done := cli(*_database_url_args(command, _url(host=UNKNOWN_HOST))))
    assert done.returncode == 3
    assert UNKNOWN_HOST in line
    assert _resolver_reason(UNKNOWN_HOST) in line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_port_exits_3_saying_connection_refused(command: str, refused_port: int) -> None:
    """A port nobody listens on exits 3 with the OS's reason, not "the connection was lost"."""
    line = one_line(done := cli(*_database_url_args(command, _url(host="127.0.0.1", port=refused_port))))
    assert done.returncode == 3
    assert os.strerror(errno.ECONNREFUSED) in line
    assert "lost" not in line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_database_exits_3_with_the_servers_reason(command: str) -> None:
    """A database the server does not have exits 3 with the server's own message and SQLSTATE."""
    line = one_line(done := cli(*_database_url_args(command, _url(database="idembarrier_no_such_db"))))
    assert done.returncode == 3
    assert 'database "idembarrier_no_such_db" does not exist' in line
    assert "3D000" in line


def test_an_unknown_role_exits_3_with_the_servers_reason() -> None:
    """A role the server does not know exits 3 with the server's message (it answers before any password)."""
    line = one_line(done := cli("stats", "--database-url", _url(username="idembarrier_no_such_role")))
    assert done.returncode == 3
    assert 'role "idembarrier_no_such_role" does not exist' in line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_sync_driver_url_exits_2_naming_what_is_supported(command: str) -> None:
    """``postgresql://`` (SQLAlchemy's synchronous default driver) exits 2 and names postgresql+asyncpg."""
    sync = make_url(_url()).set(drivername="postgresql").render_as_string(hide_password=False)
    line = one_line(done := cli(*_database_url_args(command, sync)))
    assert done.returncode == 2
    assert "postgresql+asyncpg" in line
    assert "synchronous" in line


@pytest.mark.parametrize("command", ["migrate", "lab"])
def test_an_unsupported_driver_exits_2_naming_what_is_supported(command: str) -> None:
    """A MariaDB URL is refused before any connection, exit 2, naming the supported databases."""
    line = one_line(done := cli(*_database_url_args(command, "mariadb+asyncmy://root@127.0.0.1/app")))
    assert done.returncode == 2
    assert "mariadb+asyncmy" in line
    assert "sqlite+aiosqlite" in line


@pytest.mark.parametrize("command", ["migrate", "demo"])
def test_a_missing_driver_exits_2_naming_the_extra(command: str) -> None:
    """When asyncpg is not installed the command exits 2 and says which extra installs it."""
    line = one_line(done := cli(*_database_url_args(command, _url()), blocked="asyncpg"))
    assert done.returncode == 2
    assert "idembarrier[postgres]" in line


@pytest.mark.parametrize("command", ["stats", "lab", "demo"])
def test_an_in_memory_sqlite_url_exits_2_naming_a_file_url(command: str) -> None:
    """An in-memory SQLite URL is a configuration error whose line names the fix."""
    line = one_line(done := cli(*_database_url_args(command, "sqlite+aiosqlite://")))
    assert done.returncode == 2
    assert "sqlite+aiosqlite:///" in line


@pytest.mark.parametrize("args", [["frobnicate"], ["stats"], ["purge", "--batch-size", "ten"], []])
def test_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    """An unknown command, a missing URL, a bad option value or no command at all: exit 2, one line."""
    done = cli(*args)
    assert done.returncode == 2
    assert "--help" in one_line(done)


def test_an_unusable_key_for_inspect_is_a_usage_error() -> None:
    """inspect refuses a key with a control character before it connects: exit 2, one line."""
    done = cli("inspect", "shop", "order\x01", "--database-url", _url(host=UNKNOWN_HOST))
    assert done.returncode == 2
    assert "control character" in one_line(done)


def test_version_prints_the_installed_distributions_version() -> None:
    """``idembarrier --version`` prints the version from the installed distribution's metadata."""
    done = cli("--version")
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, f"idembarrier {idembarrier.__version__}", "")

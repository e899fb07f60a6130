"""A PgBouncer in transaction mode in front of the test's PostgreSQL, started for the tests that need one.

PgBouncer comes from Debian's package (``apt-get install pgbouncer``; `.ci/run` installs it). It runs from a
temporary directory on a free port of 127.0.0.1, forwards every database name to the test server, trusts
every user (as the test server does), and is stopped when its block ends. PgBouncer refuses to run as root,
so a root session runs it as ``nobody``. Where the binary is missing the test fails under CI
(``IDEMBARRIER_CI``) and is skipped with the reason everywhere else (see `tests.helpers.require`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tests._postgres_server import answers, free_port
from tests.helpers import require

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import URL

_CONFIG = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/users.txt
pool_mode = transaction
max_client_conn = 400
default_pool_size = 20
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {directory}/pgbouncer.log
"""


def binary() -> str:
    """PgBouncer's executable; a test that needs it fails (CI) or is skipped with the reason (elsewhere)."""
    found = shutil.which("pgbouncer") or next(
        (str(path) for path in (Path("/usr/sbin/pgbouncer"), Path("/usr/bin/pgbouncer")) if path.exists()), None
    )
    if found is None:
        require(False, "PgBouncer is not installed (Debian: apt-get install pgbouncer)")
        raise AssertionError("unreachable")  # require fails or skips
    return found


@contextmanager
def pgbouncer(target: URL) -> Iterator[URL]:
    """Run PgBouncer (transaction pooling) in front of ``target``; yield the URL that goes through it."""
    executable = binary()
    directory = Path(tempfile.mkdtemp(prefix="idembarrier-pgbouncer-"))
    directory.chmod(0o777)  # written by `nobody` when the session is root
    listen = free_port()
    (directory / "users.txt").write_text(f'"{target.username}" ""\n')
    config = directory / "pgbouncer.ini"
    config.write_text(_CONFIG.format(host=target.host, port=target.port or 5432, listen=listen, directory=directory))
    with (directory / "stderr.txt").open("wb") as stderr:
        process = subprocess.Popen(
            [executable, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            user="nobody" if os.geteuid() == 0 else None,
        )
    try:
        through = target.set(host="127.0.0.1", port=listen)
        deadline = time.monotonic() + 10
        while not answers(through, timeout=0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                log = (directory / "pgbouncer.log").read_text() if (directory / "pgbouncer.log").exists() else ""
                raise RuntimeError(
                    f"PgBouncer did not start: {process.stderr.read() if process.stderr else ''!r} {log}"
                )
            time.sleep(0.05)  # a server starting: nothing to wait on but its port
        yield through
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)

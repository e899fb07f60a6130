"""Set up the checkout's virtual environment, then run the lab or the tests: ``python3 dev.py lab|test [ARGS…]``.

Only the standard library, so it runs on a machine that has nothing but Python 3.11 or newer:

- ``lab``: ``.venv`` with idembarrier and its ``sqlite`` and ``postgres`` extras (the lab runs on embedded
  SQLite, or on the server that ``--database-url`` names), then ``python -m idembarrier lab ARGS``.
- ``test``: ``.venv`` with the ``dev`` extra, then ``python -m pytest ARGS``. Where no PostgreSQL answers at
  ``IDEMBARRIER_TEST_DATABASE_URL``, the session starts an embedded one (see ``tests/_postgres_server.py``).

Each command creates ``.venv`` if it is missing and reinstalls only when ``pyproject.toml`` changed since
that command's last install. The exit status is the lab's or pytest's.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
COMMANDS = {
    "lab": ("sqlite,postgres", ["-m", "idembarrier", "lab"]),
    "test": ("dev", ["-m", "pytest"]),
}


def install(command: str, extras: str) -> None:
    """Make ``.venv`` hold the checkout (editable) with ``extras``, unless it did for this ``pyproject.toml``."""
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    stamp = VENV / f".dev-py-{command}"  # the pyproject.toml this command last installed from
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    print(f"dev.py: installing .[{extras}] into {VENV}", file=sys.stderr)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", f"{ROOT}[{extras}]"], check=True)
    stamp.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python3 dev.py {{{'|'.join(COMMANDS)}}} [ARGS…]", file=sys.stderr)
        return 2
    extras, command = COMMANDS[argv[0]]
    install(argv[0], extras)
    return subprocess.run([str(PYTHON), *command, *argv[1:]], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

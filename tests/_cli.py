"""The command line run in process, as its console script runs it, with what it printed kept apart."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from idembarrier.cli import main

if TYPE_CHECKING:
    import pytest


@dataclass(frozen=True)
class Ran:
    """One command's exit status and output."""

    status: int
    out: str
    err: str

    @property
    def line(self) -> str:
        """The single line a failing command printed on stderr (asserted to be the only one)."""
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("idembarrier: "), self.err
        return lines[0]


def run(capture: pytest.CaptureFixture[str], *args: str) -> Ran:
    """Call `main` on ``args``; argparse's ``SystemExit`` (usage errors, ``--version``) gives the status."""
    capture.readouterr()  # what the test printed before is not the command's
    try:
        status = main(list(args))
    except SystemExit as exc:  # as the interpreter reads it: None is 0, a message is 1
        status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    out, err = capture.readouterr()
    return Ran(status, out, err)


async def run_async(capture: pytest.CaptureFixture[str], *args: str) -> Ran:
    """`run` from an async test: `main` runs an event loop of its own, so it runs in a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(run, capture, *args))

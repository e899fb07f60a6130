"""``purge``: retention applied from the command line, with its progress on stderr, or counted with ``--dry-run``.

A purge counts what it has to do first (`Barrier.purgeable`, one query), so its progress has a real total.
On a terminal each kind of work (responses dropped, records deleted) is one line redrawn in place: a bar,
done of total, the percentage and the rate; it ends full. Off a terminal (a log, a pipe) it prints one
plain line per batch that did something, with the same numbers.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from ._operator import emit

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from .._barrier import Barrier, Purged
    from .._codec import JSON

__all__ = ["Progress", "purge"]

_WIDTH = 30
_WORDS = {"compacted": "responses dropped", "deleted": "records deleted"}


class Progress:
    """`Barrier.purge`'s ``on_batch``: each kind's progress against its total, on ``stream``.

    Args:
        totals: What `Barrier.purgeable` counted, per kind. A purge may find more than was counted
            (records expire meanwhile) or less (another purger took some): the total then grows to what
            was done, and at the kind's last batch it is what was done.
        batch_size: The purge's batch size; a batch smaller than it is the kind's last.
        stream: Where the progress goes (stderr).
        live: Redraw one line in place (a terminal) or print a line per batch; ``None``: ask ``stream``.
        clock: Seconds, for the rate (`time.monotonic`).
    """

    def __init__(
        self,
        totals: Purged,
        *,
        batch_size: int,
        stream: TextIO,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._totals = totals._asdict()
        self._batch_size = batch_size
        self._stream = stream
        self._live = stream.isatty() if live is None else live
        self._clock = clock
        self._done = dict.fromkeys(self._totals, 0)
        self._kind: str | None = None
        self._since = self._last = clock()
        self._open = False  # a live line is drawn and not ended yet

    def __call__(self, kind: str, count: int) -> None:
        """Report one batch of ``kind`` that took ``count`` records."""
        now = self._clock()
        if kind != self._kind:  # this kind's batches began when the previous kind's last one ended
            self._kind, self._since = kind, self._last
        self._last = now
        self._done[kind] += count
        last = count < self._batch_size
        if self._done[kind] == 0:  # nothing of this kind to do: nothing to show
            return
        if last:  # nothing more is due: the total was what there turned out to be (another purger took part?)
            self._totals[kind] = self._done[kind]
        line = self.line(kind, now)
        if self._live:
            self._stream.write(f"\r{line}\x1b[K")  # erase what a longer line left behind
            self._open = not last
            if last:
                self._stream.write("\n")
        elif count:
            self._stream.write(f"{line}\n")
        self._stream.flush()

    def line(self, kind: str, now: float) -> str:
        """The progress of ``kind`` as of ``now``: bar (on a terminal), done of total, percentage, rate."""
        done = self._done[kind]
        total = max(self._totals[kind], done)
        share = done / total if total else 1.0
        elapsed = now - self._since
        rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 else "-/s"
        numbers = f"{done:,} of {total:,} {_WORDS[kind]} ({share:.0%}, {rate})"
        if not self._live:
            return f"purge: {numbers}"
        filled = round(share * _WIDTH)
        return f"  [{'#' * filled}{'.' * (_WIDTH - filled)}] {numbers}"

    def close(self) -> None:
        """End a line left open (the purge failed midway), so what follows starts on a line of its own."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False


async def purge(barrier: Barrier[JSON], args: argparse.Namespace) -> int:
    """``purge [--dry-run] [--batch-size N]``: apply retention (or count what it would take); exit 0."""
    if args.dry_run:
        due = await barrier.purgeable()
        text = (
            f"would drop {due.compacted} expired responses (compact records kept) "
            f"and delete {due.deleted} records; nothing changed (dry run)"
        )
        return emit(args, {"dry_run": True, **due._asdict()}, text)
    progress = None if args.json else Progress(await barrier.purgeable(), batch_size=args.batch_size, stream=sys.stderr)
    try:
        done = await barrier.purge(batch_size=args.batch_size, max_share=args.max_share, on_batch=progress)
    finally:
        if progress is not None:
            progress.close()
    text = f"dropped {done.compacted} expired responses (compact records kept), deleted {done.deleted} records"
    return emit(args, done._asdict(), text)

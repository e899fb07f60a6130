"""What a barrier remembers of keys that finished in this process: which ones, and their finished records.

Two memories, both bounded, least recently used forgotten first:

* the **keys** that finished (or replayed) here: only a hint that a retry is likely a replay, so its unit of
  work reads before it claims (`Memory.seen`);
* the **finished records** a lookup read here, each until its response expires (`Memory.recall`). A
  COMPLETED or FAILED record with its response cannot change before its ``response_expires_at``: nothing
  updates a finished record, cleanup compacts it only after that instant and deletes it later still. So a
  replay of such a key may be answered from memory, by the same decision the database's copy would get
  (fingerprint included), without a connection. The time left comes from the database's own clock, read
  in the lookup (`Record.response_expires_in`), and is counted on this process's monotonic clock from
  before the lookup was sent: no clock skew between hosts enters it. A remembered record only ever
  answers a replay; it never lets a body run.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._record import Record

__all__ = ["FINISHED_KEYS", "MARGIN", "REMEMBERED_BYTES", "Memory"]

FINISHED_KEYS = 4096
"""How many keys that finished here a barrier remembers, and at most how many of their records: ~0.5 MB."""
REMEMBERED_BYTES = 4 * 1024 * 1024
"""The most response bytes the remembered records hold together; a larger response is not remembered."""
MARGIN = 1.0
"""Seconds a remembered record is given up before its response expires: for the lookup's own duration on
the server (its clock was read during the statement, after ``read_at``) and the clocks' rate drift."""


class _Remembered(NamedTuple):
    record: Record
    until: float  # on the memory's clock
    size: int


class Memory:
    """The keys that finished here, and the finished records read here until their responses expire."""

    __slots__ = ("_bytes", "_keys", "_records", "clock")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._records: OrderedDict[tuple[str, str], _Remembered] = OrderedDict()
        self._bytes = 0

    # -- keys -------------------------------------------------------------------------------------------

    def note(self, scope: str, key: str) -> None:
        """Note that ``key`` finished (or replayed) here."""
        self._keys[(scope, key)] = None
        self._keys.move_to_end((scope, key))
        if len(self._keys) > FINISHED_KEYS:
            self._keys.popitem(last=False)

    def seen(self, scope: str, key: str) -> bool:
        """Whether ``key`` finished here lately (a hint for the order of two statements, never a decision)."""
        return (scope, key) in self._keys

    # -- finished records -------------------------------------------------------------------------------

    def remember(self, record: Record, *, read_at: float) -> None:
        """Keep ``record``, read by a lookup sent at ``read_at`` (this memory's clock), while its response lasts.

        Only a finished record with its response and the time that response had left is kept; anything
        else (IN_PROGRESS, UNKNOWN, compact, or read by a statement that does not tell the time left) is not.
        """
        left, response = record.response_expires_in, record.response
        if not record.status.finished or response is None or left is None or left <= MARGIN:
            return
        size = len(response)
        if size > REMEMBERED_BYTES:
            return
        self.forget(record.scope, record.key)
        self._records[(record.scope, record.key)] = _Remembered(record, read_at + left - MARGIN, size)
        self._bytes += size
        while len(self._records) > FINISHED_KEYS or self._bytes > REMEMBERED_BYTES:
            _, oldest = self._records.popitem(last=False)
            self._bytes -= oldest.size

    def recall(self, scope: str, key: str) -> Record | None:
        """The remembered finished record of ``key`` while its response lasts, else ``None`` (and forget it)."""
        remembered = self._records.get((scope, key))
        if remembered is None:
            return None
        if self.clock() >= remembered.until:
            self.forget(scope, key)
            return None
        self._records.move_to_end((scope, key))
        return remembered.record

    def forget(self, scope: str, key: str) -> None:
        """Forget the record of ``key``, if one is remembered."""
        remembered = self._records.pop((scope, key), None)
        if remembered is not None:
            self._bytes -= remembered.size

    def clear(self) -> None:
        """Forget every key and every record, as a new process would start."""
        self._keys.clear()
        self._records.clear()
        self._bytes = 0

    @property
    def records(self) -> int:
        """How many finished records are remembered (some may have expired, unread since)."""
        return len(self._records)

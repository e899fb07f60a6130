"""A serialization failure after the body ran, told apart: a lost race to a duplicate that committed first.

On one primary a concurrent duplicate waits on the holder's claim and never runs. On a multi-primary cluster
(MariaDB Galera) nothing locks across nodes: a duplicate on another node claims the key as well, runs its
body, and certification refuses the second COMMIT with error 1213 (SQLSTATE 40001), or the first one's
applied writes abort it before (a brute-force abort, 1213 at its next statement). Its writes are rolled back
either way. One fresh read then tells what happened: when another execution's record of the key is there,
the unit of work raises `KeyInProgressError` carrying that record (a retry replays it); otherwise (the
winner's writes not yet applied on this node, or no winner at all) the `SerializationError` stands, which is
as safe to retry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import anyio

from ._exceptions import KeyInProgressError, SerializationError

if TYPE_CHECKING:
    import uuid

    from ._runtime import Runtime

__all__ = ["lost_race"]

R = TypeVar("R")


async def lost_race(
    runtime: Runtime[R], error: BaseException, *, scope: str, key: str, token: uuid.UUID
) -> KeyInProgressError | None:
    """The `KeyInProgressError` that ``error`` (ours, after the body ran) stands for, if it was a lost race.

    Only a `SerializationError` can be one. The read runs in a session of its own, outside any transaction,
    bounded by the barrier's ``cleanup_timeout``; if it fails, ``error`` stands (``None`` is returned).
    """
    if not isinstance(error, SerializationError):
        return None
    record = None
    with anyio.move_on_after(runtime.options.cleanup_timeout):
        try:
            async with runtime.sessionmaker() as session:
                storage = await runtime.storage_on(await session.connection(), check=False)
                # A plain read of the committed record: a winner's row once this node has applied it.
                record = await storage.lookup(scope, key)
        except Exception as exc:  # the database failed again: the serialization failure stands, said as is
            error.add_note(f"idembarrier: looking for the winner of the race also failed: {exc!r}")
            return None
    if record is None or record.token == token:
        return None
    return KeyInProgressError(scope=scope, key=key, record=record)

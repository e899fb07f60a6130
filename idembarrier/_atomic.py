"""A transaction of idembarrier's own beside the units of work: the relay's batches, failure counts."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

from ._errors import checkout, connection_lost, translate
from ._exceptions import IdembarrierError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._barrier import Barrier

__all__ = ["transaction"]

R = TypeVar("R")


@asynccontextmanager
async def transaction(barrier: Barrier[R], doing: str) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction opened as a claim opens it, committed when the block exits cleanly.

    The transaction waits for SQLite's write lock as long as a claim would (the barrier's
    ``wait_timeout``). A database error, in the block or at the commit, becomes our `StorageError` (or
    one of its kinds) naming what was being done; a dead connection is discarded, never pooled again, and
    one found dead in the pool before anything was sent is replaced.
    """
    try:
        async with barrier.sessionmaker() as session:
            try:
                conn = await checkout(session, doing, replace=True)  # a session of ours: nothing sent yet
                storage = await barrier._storage_on(conn)
                await storage.begin(barrier.options.wait_timeout)
                yield conn
                await session.commit()
            except BaseException as exc:
                if connection_lost(exc):
                    await session.invalidate()
                raise
    except IdembarrierError:
        raise
    except Exception as exc:
        if (ours := translate(exc, doing)) is not None:
            raise ours from exc
        raise

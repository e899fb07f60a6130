"""A transaction of idembarrier's own beside the units of work: the relay's batches, failure counts."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._runtime import Runtime

__all__ = ["transaction"]

R = TypeVar("R")


@asynccontextmanager
async def transaction(runtime: Runtime[R], doing: str) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction opened as a claim opens it, committed when the block exits cleanly.

    The transaction waits for SQLite's write lock as long as a claim would (the barrier's
    ``wait_timeout``); errors and dead connections are handled as `Runtime.transaction` says.
    """
    async with runtime.transaction(doing, wait=runtime.options.wait_timeout) as storage:
        yield storage.connection

"""LISTEN for the outbox's notifications, and keep listening: reconnect with backoff, detect a pooler.

PostgreSQL's side of the seam (`idembarrier._postgres` and `idembarrier._psycopg` register it as their
`Dialect.listen`; the relay asks `idembarrier._storage.listen`, and polls where a dialect has none). Through
asyncpg's listeners, or psycopg's ``notifies()`` on a connection of its own.

The listening connection is the barrier's engine's, or a direct one from ``listen_url`` when the engine goes
through a transaction pooler. Once listening, a probe NOTIFY sent through the barrier's engine must arrive:
behind a transaction pooler LISTEN is accepted yet belongs to no session, and nothing would ever arrive.
When it does not, the relay says so once in the log and polls.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from ._backoff import Backoff

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from anyio.abc import TaskStatus
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["listen"]

_log = logging.getLogger("idembarrier.relay")

PROBE_TIMEOUT = 2.0
"""How long a probe NOTIFY may take to come back before LISTEN is judged useless (a pooler)."""
_PROBE = "idembarrier-probe"


async def listen(
    engine: AsyncEngine,
    listen_url: str | None,
    channel: str,
    wake: Callable[[], object],
    *,
    max_backoff: float = 30.0,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``wake`` for every notification on ``channel``, reconnecting whenever the connection dies.

    Reports started after the first attempt to listen, successful or not, and runs until cancelled (or
    returns at once where LISTEN cannot work). After each reconnection it wakes the relay once, for what
    committed while nobody listened.
    """
    source = engine if listen_url is None else create_async_engine(listen_url, poolclass=NullPool)
    if source.dialect.name != "postgresql" or source.dialect.driver not in ("asyncpg", "psycopg"):
        _log.warning(
            "idembarrier: LISTEN needs postgresql+asyncpg or postgresql+psycopg, not %s; the relay polls",
            source.url.drivername,
        )
        task_status.started()
        return
    opening = _listening if source.dialect.driver == "asyncpg" else _listening_psycopg
    backoff, started, failing = Backoff(0.05, max_backoff), False, False
    try:
        while True:
            lost = anyio.Event()
            try:
                async with opening(source, channel, wake, lost) as arrived:
                    if not await _probe(engine, channel, arrived):
                        _log.warning(
                            "idembarrier: LISTEN on %r receives no notifications (a transaction pooler?); "
                            "the relay polls. Pass listen_url= with a direct connection to be woken at once",
                            channel,
                        )
                        return
                    if failing:
                        _log.warning("idembarrier: listening on %r again", channel)
                    backoff.reset()
                    failing = False
                    wake()  # whatever committed while nobody listened
                    if not started:
                        task_status.started()
                        started = True
                    await lost.wait()
                    _log.warning("idembarrier: the LISTEN connection on %r was lost; reconnecting", channel)
            except Exception as exc:
                if not failing:  # once per outage, not once per retry
                    _log.warning(
                        "idembarrier: listening on %r failed (%r); the relay polls meanwhile, and retries", channel, exc
                    )
                failing = True
            if not started:
                task_status.started()
                started = True
            await anyio.sleep(backoff.next())
    finally:
        if not started:
            task_status.started()
        if source is not engine:
            with anyio.CancelScope(shield=True):
                await source.dispose()


class _listening:
    """``async with``: a connection that LISTENs, calling ``wake`` per notification and ``lost`` at its end.

    Yields an event set by the probe's own notification.
    """

    def __init__(self, engine: AsyncEngine, channel: str, wake: Callable[[], object], lost: anyio.Event) -> None:
        self._engine, self._channel, self._wake, self._lost = engine, channel, wake, lost
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> anyio.Event:
        arrived = anyio.Event()

        def on_notify(connection: object, pid: object, channel: object, payload: object) -> None:
            if payload == _PROBE:
                arrived.set()
            self._wake()

        def on_terminate(connection: object) -> None:
            self._lost.set()

        try:
            conn = await self._stack.enter_async_context(self._engine.connect())
            self._conn = conn
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None  # a connection just opened
            driver.add_termination_listener(on_terminate)
            await driver.add_listener(self._channel, on_notify)
        except BaseException:
            await self._close(broken=True)
            raise
        self._driver, self._on_notify, self._on_terminate = driver, on_notify, on_terminate
        return arrived

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        await self._close(broken=self._lost.is_set())

    async def _close(self, *, broken: bool) -> None:
        with anyio.CancelScope(shield=True):  # give the connection back clean, even when cancelled
            driver = getattr(self, "_driver", None)
            if driver is not None and not broken:
                try:
                    driver.remove_termination_listener(self._on_terminate)
                    await driver.remove_listener(self._channel, self._on_notify)
                except Exception:
                    broken = True
            conn = getattr(self, "_conn", None)
            if conn is not None and broken:
                await conn.invalidate()  # a dead or half-cleaned connection: never pooled again
            await self._stack.aclose()


@asynccontextmanager
async def _listening_psycopg(
    engine: AsyncEngine, channel: str, wake: Callable[[], object], lost: anyio.Event
) -> AsyncIterator[anyio.Event]:
    """`_listening` through psycopg: a connection of its own, in autocommit mode, read by a task.

    Not the pool's: LISTEN takes effect only once committed, and a pooled connection would have to be put back
    out of autocommit mode. The connection ends with the block, or ``lost`` is set when psycopg loses it.
    """
    import psycopg  # the engine is psycopg's: it is installed
    from psycopg import sql

    arrived = anyio.Event()
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

        async def read() -> None:
            try:
                async for note in conn.notifies():
                    if note.payload == _PROBE:
                        arrived.set()
                    wake()
            except psycopg.Error:
                pass  # the connection was lost: `lost` says so
            finally:
                lost.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read)
            try:
                yield arrived
            finally:
                tasks.cancel_scope.cancel()


async def _probe(engine: AsyncEngine, channel: str, arrived: anyio.Event) -> bool:
    """Send a NOTIFY through ``engine`` and tell whether the listener heard it within `PROBE_TIMEOUT`."""
    async with engine.begin() as conn:
        await conn.execute(select(func.pg_notify(channel, _PROBE)))
    with anyio.move_on_after(PROBE_TIMEOUT):
        await arrived.wait()
    return arrived.is_set()

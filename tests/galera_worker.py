"""One OS process of the Galera tests (`tests.test_galera`): a storm of duplicates on one node, or a crash.

``python -m tests.galera_worker storm URL NODE CALLS KEY...`` runs CALLS units of work per key on the node of
URL, all at once. It prints ``ready`` and waits for ``go`` on stdin. A body that ran (its payment flushed,
uncommitted) prints ``body KEY`` and waits until the orchestrator answers ``commit KEY``, which it does once
the key has a body on each node: every key's race then crosses nodes, lined up by these words, not by time.
When stdin ends it prints ``result JSON``: per key what each call saw (``executed`` or ``replayed`` with the
response, or the name of the exception), and the tracebacks of anything that is not idembarrier's.

``python -m tests.galera_worker crash URL KEY`` claims KEY, flushes its payment, prints ``flushed`` and
blocks on stdin until it is SIGKILLed (if stdin ends instead, it leaves by an exception: nothing commits).
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback

import anyio
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from idembarrier import JSON, Barrier, IdembarrierError
from tests.models import Payment

SCOPE = "payments"
LINE_UP = 60.0
"""Longest wait, in seconds, for ``go`` and for a key's ``commit``: the other node's body, in another process."""


def say(*words: str) -> None:
    print(*words, flush=True)


async def read_line() -> str:
    return await anyio.to_thread.run_sync(sys.stdin.readline)


class Storm:
    """The calls of one process; ``released`` holds each key's ``commit`` from the orchestrator."""

    def __init__(self, barrier: Barrier[JSON], node: int, keys: list[str]) -> None:
        self.barrier, self.node = barrier, node
        self.released = {key: anyio.Event() for key in keys}
        self.seen: dict[str, list[list[JSON]]] = {key: [] for key in keys}
        self.escapes: list[str] = []

    async def call(self, key: str) -> None:
        try:
            async with self.barrier.unit_of_work(key, scope=SCOPE) as uow:
                if uow.replayed:
                    self.seen[key].append(["replayed", uow.response])
                    return
                payment = Payment(key=key, amount=100)
                uow.session.add(payment)
                await uow.session.flush()
                say("body", key)
                with anyio.fail_after(LINE_UP):
                    await self.released[key].wait()
                uow.complete({"payment_id": payment.id, "node": self.node})
            self.seen[key].append(["executed", uow.response])
        except IdembarrierError as exc:
            self.seen[key].append([type(exc).__name__, None])
        except Exception as exc:  # counting what escapes is the point
            self.seen[key].append([f"ESCAPE {type(exc).__module__}.{type(exc).__qualname__}", None])
            self.escapes.append("".join(traceback.format_exception(exc)))

    async def listen(self) -> None:
        """Set each key's event on its ``commit`` line, until stdin ends."""
        while line := await read_line():
            word, key = line.split()
            assert word == "commit", line
            self.released[key].set()


async def storm(url: str, node: int, calls: int, keys: list[str]) -> None:
    engine = create_async_engine(url, pool_size=calls * len(keys), max_overflow=0)
    try:
        storm = Storm(Barrier(async_sessionmaker(engine, expire_on_commit=False)), node, keys)
        say("ready")
        with anyio.fail_after(LINE_UP):
            assert (await read_line()).strip() == "go"
        async with anyio.create_task_group() as tg:
            tg.start_soon(storm.listen)
            for key in keys:
                for _ in range(calls):
                    tg.start_soon(storm.call, key)
        say("result", json.dumps({"seen": storm.seen, "escapes": storm.escapes}))
    finally:
        await engine.dispose()


async def crash(url: str, key: str) -> None:
    engine = create_async_engine(url)
    barrier: Barrier[JSON] = Barrier(async_sessionmaker(engine))
    async with barrier.unit_of_work(key, scope=SCOPE) as uow:
        uow.session.add(Payment(key=key, amount=100))
        await uow.session.flush()
        say("flushed")
        await read_line()
        raise SystemExit("the orchestrator went away")


def main() -> None:
    mode, url, *rest = sys.argv[1:]
    if mode == "storm":
        node, calls, *keys = rest
        asyncio.run(storm(url, int(node), int(calls), keys))
    else:
        (key,) = rest
        asyncio.run(crash(url, key))


if __name__ == "__main__":
    main()

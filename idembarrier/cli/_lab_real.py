"""The lab's ``--real`` mode: its failures produced by real processes, connections and (if given) a real broker.

- **Partial execution**: each first attempt runs in an OS process of its own, which the lab SIGKILLs where
  its design is weakest (after the naive claim's commit, after the naive write's commit, or inside the
  barrier's unit of work after its write reached the database); the retry then runs as a new request.
- **Concurrent check race**: ``concurrency`` OS processes, each with its own connection, send every key at
  once; for the naive design the lab lets them all pass their SELECT before any of them inserts (they report
  it and wait for the lab's go), as requests arriving within milliseconds of each other do.
- **Layer mismatch**, with ``broker=HOST:PORT`` (a Kafka-protocol broker): the API's unit of work publishes
  through the outbox, the relay sends to a real topic, and each consumer group reads every event twice: its
  first consumer dies before committing its offsets, so the broker delivers again to the next one.

A worker is this module run as a program: ``python -m idembarrier.cli._lab_real ROLE URL RUN DESIGN KEY…``.
It prints a word after each step and waits for ``go`` on its standard input before the next, so the lab
decides where a process dies and when racing processes go, without sleeping.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Literal

import anyio
from anyio.streams.text import TextReceiveStream
from sqlalchemy import text

from ._engine import create_engine
from ._lab import ScenarioResult, _Lab, _naive_partial, layer_result, partial_result, race_result

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import TypeAlias

    from aiokafka import ConsumerRecord
    from anyio.abc import Process
    from sqlalchemy.ext.asyncio import AsyncSession

    Record: TypeAlias = ConsumerRecord[bytes, bytes]

__all__ = ["concurrent_race", "layer_mismatch", "partial_execution"]

_WORKER = [sys.executable, "-m", "idembarrier.cli._lab_real"]


class _Worker:
    """One worker process, read line by line; told ``go`` between its steps."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        assert process.stdin is not None
        self._lines = TextReceiveStream(process.stdout)
        self._buffer = ""

    async def said(self) -> str:
        """The next word the worker printed (its step), or ``""`` once it has exited."""
        while "\n" not in self._buffer:
            try:
                self._buffer += await self._lines.receive()
            except anyio.EndOfStream:
                return ""
        line, self._buffer = self._buffer.split("\n", 1)
        return line.strip()

    async def go(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(b"go\n")

    async def kill(self) -> None:
        """SIGKILL: no exception handler, no ``finally``, no rollback from the client; the server's side only."""
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


async def _spawn(url: str, lab: _Lab, role: str, design: str, *keys: str) -> _Worker:
    command = [*_WORKER, role, url, lab.run, design, *keys]
    return _Worker(await anyio.open_process(command, stdin=-1, stdout=-1, stderr=None))


async def _kill_at(worker: _Worker, step: str) -> None:
    """Let ``worker`` run until it reports ``step``, then SIGKILL it."""
    while (word := await worker.said()) != step:
        if not word:
            raise RuntimeError(f"the lab's worker exited before {step!r}")
        await worker.go()
    await worker.kill()


async def partial_execution(lab: _Lab, url: str) -> ScenarioResult:
    """Each first attempt SIGKILLed in its own process at its design's weakest point; then the retry."""
    policies: tuple[tuple[Literal["refuse", "rerun"], str], ...] = (("refuse", "claimed"), ("rerun", "written"))
    for key in lab.keys:
        for on_in_progress, killed_after in policies:
            design = f"partial/naive-{on_in_progress}"
            await _kill_at(await _spawn(url, lab, "naive-partial", design, key), killed_after)
            await _naive_partial(lab, design, key, on_in_progress=on_in_progress, crash_after=None)
        await _kill_at(await _spawn(url, lab, "barrier-partial", "partial/barrier", key), "flushed")
        await lab.once("partial/barrier", key)
    return await partial_result(
        lab,
        "a process SIGKILLed between commits",
        "each first attempt in an OS process of its own, SIGKILLed after the naive claim's commit, "
        "after the naive write's commit, or inside the barrier's unit of work once its write was flushed",
    )


async def concurrent_race(lab: _Lab, url: str) -> ScenarioResult:
    """``concurrency`` processes send every key at once; the naive ones all SELECT before any INSERTs."""
    for design, role, lined_up_at in (
        ("race/naive", "naive-race", "checked"),
        ("race/barrier", "barrier-race", "ready"),
    ):
        workers = [await _spawn(url, lab, role, design, *lab.keys) for _ in range(lab.concurrency)]
        for _ in lab.keys:
            for worker in workers:  # every process has reached the line: checked (naive) or about to claim
                if await worker.said() != lined_up_at:
                    raise RuntimeError(f"a racing worker of {design} did not report {lined_up_at!r}")
            for worker in workers:
                await worker.go()
        for worker in workers:
            if await worker.process.wait() != 0:
                raise RuntimeError(f"a racing worker of {design} failed")
    return await race_result(
        lab,
        "processes",
        f"{lab.concurrency} OS processes, each with its own database connection; the naive ones "
        "all pass their SELECT before any INSERT, the barrier's claim at the same moment",
    )


async def layer_mismatch(lab: _Lab, broker: str) -> ScenarioResult:
    """The API publishes through the outbox to a real topic; every consumer group gets each event twice."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from ..kafka import AIOKafkaPublisher, OutboxRelay, consume

    topic = f"idembarrier-lab-{lab.run[:12]}"
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        for key in lab.keys:
            for _ in range(2):  # the client's retry: replayed at the API, so published once
                async with lab.barrier.unit_of_work(key, scope=lab.scope("layer/api")) as uow:
                    if uow.replayed:
                        continue
                    lab.add(uow.session, "layer/naive", key, "order")
                    lab.add(uow.session, "layer/barrier", key, "order")
                    uow.publish(topic, key.encode(), key=key.encode())
                    uow.complete({"order": key})
        await OutboxRelay(lab.barrier, AIOKafkaPublisher(producer)).relay_once()
    finally:
        await producer.stop()

    async def read_all(group: str, handle: Callable[[Record], Awaitable[None]]) -> None:
        """One consumer of ``group`` reads every event and dies without committing: the next reads them again."""
        for commit in (False, True):
            consumer = AIOKafkaConsumer(
                topic, bootstrap_servers=broker, group_id=group, enable_auto_commit=False,
                auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=500,
            )  # fmt: skip
            await consumer.start()
            try:
                seen = 0
                with anyio.fail_after(30):
                    while seen < len(lab.keys):
                        for records in (await consumer.getmany(timeout_ms=500)).values():
                            for record in records:
                                await handle(record)
                                seen += 1
                if commit:
                    await consumer.commit()
            finally:
                await consumer.stop()

    async def naive(record: Record) -> None:
        await lab.write("layer/naive", record.value.decode(), "shipment")

    async def ship(session: AsyncSession, message: Record) -> None:
        lab.add(session, "layer/barrier", message.value.decode(), "shipment")

    async def barrier(record: Record) -> None:
        await consume(lab.barrier, record, ship, group=f"lab-{lab.run}")

    await read_all(f"lab-{lab.run}-naive", naive)
    await read_all(f"lab-{lab.run}-barrier", barrier)
    return await layer_result(
        lab,
        f"the outbox relayed to a real topic on {broker}; each group's first consumer stops without "
        "committing its offsets, so the broker delivers every event again to the next one",
    )


# -- the worker, run as a program --------------------------------------------------------------------------


async def _step(word: str) -> None:
    """Report ``word`` and wait for the lab's go (it may SIGKILL us instead)."""
    print(word, flush=True)
    if (await anyio.to_thread.run_sync(sys.stdin.readline)).strip() != "go":
        raise SystemExit("the lab went away")


async def _work(role: str, url: str, run: str, design: str, keys: list[str]) -> None:
    engine = create_engine(url)
    lab = _Lab(engine, keys=len(keys), concurrency=1, run=run)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))  # connected before the race starts, as a running service is
        for key in keys:
            if role == "naive-partial":
                await lab.claim(design, key)
                await _step("claimed")
                await lab.write(design, key)
                await _step("written")
                await lab.finish(design, key)
            elif role == "barrier-partial":
                async with lab.barrier.unit_of_work(key, scope=lab.scope(design)) as uow:
                    lab.add(uow.session, design, key)
                    await uow.session.flush()
                    await _step("flushed")
                    uow.complete({"key": key})
            elif role == "naive-race":
                found = await lab.claim_status(design, key)
                await _step("checked")
                if found is None:
                    await lab.write(design, key, claim="COMPLETED")
            elif role == "barrier-race":
                await _step("ready")
                await lab.once(design, key)
            else:
                raise SystemExit(f"unknown role {role!r}")
    finally:
        await engine.dispose()


if __name__ == "__main__":  # pragma: no cover - run by the lab as a worker process, measured there
    role, url, run, design, *keys = sys.argv[1:]
    anyio.run(_work, role, url, run, design, keys)

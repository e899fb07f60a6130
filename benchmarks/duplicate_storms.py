"""Storms of concurrent duplicates: how long until every copy of a key has its answer, idembarrier beside idemkit.

Issue 13's "no regression" for duplicates: the issue measured 500 duplicates of one key all answered in
142 ms with one execution, and 50 keys x 20 duplicates in 303 ms (idemkit 524 ms). Here a request is one whole
storm on fresh keys: every copy of every key started at once as its own task (shuffled), one payment row
per execution, on a pool of 16 connections. It succeeds only when each key ran exactly once and every copy
of it got the same payment id; the request's latency is the storm's wall-clock time. Variants, each in its
own worker process, measured with ``benchmarks/_blocks.py``'s paired rounds at c = 1 (one storm at a time):

* ``ib_one`` / ``idemkit_one``: one key, ``--one`` copies (default 500);
* ``ib_fifty`` / ``idemkit_fifty``: ``--keys`` keys (default 50), ``--copies`` copies each (default 20).

idembarrier runs with its defaults (a copy waits on the holder's row lock, then replays what it committed;
a copy that starts after the key finished in this process replays from memory); idemkit's ``@idempotent``
with its PostgreSQL backend waits for the holder (LISTEN/NOTIFY and polling), then replays. A cell is the
median over rounds of the per-round ratio idembarrier ÷ idemkit, with its spread.

Usage::

    python benchmarks/duplicate_storms.py [--one 500] [--keys 50] [--copies 20] [--rounds 5] [--block 3]
                                          [--smoke] [--json out.json]

This is a measurement: it exits 0 whatever the ratios (non-zero only when it cannot run or a storm's answers
do not add up).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is benchmarks/_blocks.py
    sys.path.insert(0, str(ROOT))

from sqlalchemy.engine import make_url  # noqa: E402

from benchmarks import _blocks, peers_core  # noqa: E402
from benchmarks._database import installed, payments_by_variant  # noqa: E402

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/idembarrier_storms"
VARIANTS = ("ib_one", "ib_fifty", "idemkit_one", "idemkit_fifty")
NEEDS = {"idemkit_one": "idemkit", "idemkit_fifty": "idemkit"}
POOL = 16
ISSUE = {"one": 142.0, "fifty": 303.0}  # the issue's idembarrier storm times, ms


async def storm(shape: tuple[int, int], call: Callable[[str], Awaitable[str]]) -> None:
    """``shape`` = (keys, copies): every copy of every fresh key at once through ``call`` (which returns the
    payment id it answered with); raises unless all the copies of each key got the same answer."""
    keys, copies = shape
    calls = [str(uuid.uuid4()) for _ in range(keys)] * copies
    random.shuffle(calls)
    answers = await asyncio.gather(*(call(key) for key in calls))
    by_key: dict[str, set[str]] = {}
    for key, answer in zip(calls, answers, strict=True):
        by_key.setdefault(key, set()).add(answer)
    if any(len(ids) != 1 for ids in by_key.values()):
        raise RuntimeError(f"copies of a key answered differently: {[i for i in by_key.values() if len(i) > 1][:3]}")


class Storming:
    """What both libraries' variants share: the storm's shape from the name, a pool of 16 at any c."""

    name: str
    config: dict[str, Any]
    executed: int

    def shape(self) -> tuple[int, int]:
        kind = self.name.rsplit("_", 1)[1]
        keys, copies = self.config["shapes"][kind]
        return int(keys), int(copies)

    def pool(self, conc: int) -> int:
        return POOL

    async def checked(self, call: Callable[[str], Awaitable[str]]) -> None:
        """One storm; it must have executed each key once."""
        before = self.executed
        await storm(self.shape(), call)
        if self.executed - before != self.shape()[0]:
            raise RuntimeError(f"{self.executed - before} executions for {self.shape()[0]} keys")


class IdembarrierStorm(Storming, peers_core.Idembarrier):
    async def setup(self) -> None:
        return None

    async def answer(self, key: str) -> str:
        amount = len(self.name)
        async with self.barrier.unit_of_work(key, scope=self.name, fingerprint={"amount": amount}) as uow:
            if uow.replayed:
                assert isinstance(uow.response, dict)
                self.replayed += 1
                return str(uow.response["payment_id"])
            payment = self.payment()
            uow.session.add(payment)
            uow.complete({"payment_id": str(payment.id), "amount": amount})
        self.executed += 1
        return str(payment.id)

    async def request(self) -> None:
        await self.checked(self.answer)


class IdemkitStorm(Storming, peers_core.Idemkit):
    async def setup(self) -> None:
        return None

    async def answer(self, key: str) -> str:
        answered = await self.pay(len(self.name), idempotency_key=key)  # the body counts its executions
        return str(answered["payment_id"])

    async def request(self) -> None:
        await self.checked(self.answer)


def make(name: str, config: dict[str, Any]) -> _blocks.Variant:
    return IdemkitStorm(name, config) if name.startswith("idemkit") else IdembarrierStorm(name, config)


# -- the controller -----------------------------------------------------------------------------------------


def report(run: _blocks.Run, names: list[str], missing: list[str]) -> list[str]:
    """Print the tables (Markdown) and the reading against the issue's figures; return the reading's lines."""
    header = ["idembarrier ÷ idemkit", "storms/s", "storm p50", "client CPU", "PostgreSQL CPU"]
    rows = []
    for kind in ("one", "fifty"):
        ours, theirs = f"ib_{kind}", f"idemkit_{kind}"
        if ours in names and theirs in names:
            metrics = ("throughput", "p50_ms", "client", "server")
            rows.append([f"{ours} / {theirs}", *(_blocks.ratio(run, 1, m, ours, theirs).cell() for m in metrics)])
    print("\n### idembarrier ÷ idemkit (median of per-round ratios [IQR, or the range under 4 rounds])\n")
    print(_blocks.table(header, rows) if rows else f"idemkit not installed ({', '.join(missing)})")

    print("\n### Per storm (medians over rounds)\n")
    print(_blocks.per_request_table(run, [1], names))

    lines = [
        f"{v}: storm p50 {_blocks.median_field(run, 1, 'p50_ms', v):.0f} ms (the issue's: {ISSUE[v[3:]]:.0f} ms)"
        for v in names
        if v.startswith("ib_")
    ]
    _blocks.print_lines("READING (issue 13, no regression for duplicates)", lines)
    return lines


async def controller(args: argparse.Namespace) -> int:
    url = make_url(args.database_url)
    names = [v for v in VARIANTS if installed(NEEDS, v)]
    missing = [v for v in VARIANTS if not installed(NEEDS, v)]
    shapes = {"one": (1, args.one), "fifty": (args.keys, args.copies)}
    print(_blocks.versions_line())
    print(
        f"storms: one key x {args.one}, {args.keys} keys x {args.copies} | pool {POOL} | {args.rounds} rounds x "
        f"{len(names)} variants, blocks of {args.warmup}+{args.block} s | "
        f"not installed: {', '.join(missing) or 'none'}",
        flush=True,
    )
    started = time.perf_counter()
    await peers_core.prepare(url, [])
    dsn = peers_core.dsn_of(url)
    config = {
        "url": url.render_as_string(hide_password=False),
        "dsn": dsn,
        "probe_dsn": dsn,
        "pg_port": url.port or 5432,
        "prefill": 0,
        "shapes": shapes,
    }
    workers = {v: _blocks.Worker(Path(__file__), v, config) for v in names}
    run = _blocks.Run()
    counts = _blocks.run_workers(workers, run, [1], args.rounds, args.warmup, args.block)
    problems = peers_core.check(counts, await payments_by_variant(url, peers_core.Payment.__tablename__))
    print(f"\nruntime {time.perf_counter() - started:.0f} s | {_blocks.machine_line()}")
    report(run, names, missing)
    return _blocks.conclude(args, problems, run.blocks, _blocks.errors_of(run))


def main(argv: list[str] | None = None) -> int:
    parser = _blocks.script_parser(__doc__, DEFAULT_URL, smoke="a seconds-long run: small storms, 1 round")
    parser.add_argument("--one", type=int, default=500, help="copies of the one key (default: %(default)s)")
    parser.add_argument("--keys", type=int, default=50, help="keys of the other storm (default: %(default)s)")
    parser.add_argument("--copies", type=int, default=20, help="copies of each of them (default: %(default)s)")
    _blocks.add_run_arguments(parser, rounds=5, block=3.0, per=None)
    return _blocks.run_script(
        parser, argv, make, controller, {"one": 20, "keys": 5, "copies": 4, "rounds": 1, "block": 0.2, "warmup": 0.05}
    )


if __name__ == "__main__":
    sys.exit(main())

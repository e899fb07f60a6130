"""What a purge does to concurrent claims: claim latency in quiet blocks and in blocks with a purge running beside.

Issue 13's target: a concurrent claim's p99 during a purge of 10^6 records at most 1.3x its p99 without.

Method (one run, everything side by side):

* A database of its own (``--database-url``), idembarrier's tables migrated anew and ``peers_core``'s
  payments table. ``--claimers`` tasks (default 8) in this process run ``peers_core``'s first execution
  continuously: ``barrier.unit_of_work`` on a fresh key writing one payment row. A claim's latency is that
  whole unit of work (claim, write, completion, commit); a block counts the claims that started inside it.
* The purge runs in a process of its own (this script with ``--purger``), with its own engine (one
  connection) and its own ``Barrier``, so that it takes nothing from the claimers' event loop.
* For each purge variant in a round (the order rotating every round): the claimers pause, ``--records``
  expired compact records (response dropped, record horizon passed, as a purge finds them) are inserted
  in one ``INSERT ... SELECT generate_series``, then ``VACUUM ANALYZE`` and a ``CHECKPOINT`` (all unmeasured:
  old records are vacuumed and their pages written, and no checkpoint lands in one block rather than
  another). The claimers resume; after ``--warmup`` seconds, a **quiet** block of ``--quiet`` seconds, then
  a **purging** block that lasts exactly as long as ``Barrier.purge`` takes to delete all of them.
  The variant ``none`` fills nothing and its "purging" block is another quiet one of ``--quiet`` seconds:
  its ratio is the noise of two quiet blocks.
* Per round and variant: the ratio purging p99 / quiet p99 of its two adjacent blocks. A cell is the
  median of the per-round ratios with their spread (lowest and highest). Purge rows/s is the records
  deleted over the purge's wall-clock time. CPU: the purger's backend (procfs ``schedstat``), the
  claimers' backends per claim (found by their client ports, as ``benchmarks/_blocks.py`` does), and this
  process's own CPU per claim.

Variants (``--variants``; each is one ``Barrier.purge`` call of the purger):

* ``share1``: today's default, ``max_share=1`` (batches of 1000, no pause);
* ``share0.5``, ``share0.25``: paced, a pause of *d* (1 - s) / s after each full batch;
* ``batch100``: ``batch_size=100``, no pause;
* ``nosync``: ``max_share=1`` with the purger's connection at ``synchronous_commit = off`` (its commits do
  not wait for the WAL flush).

Usage::

    python benchmarks/purge_beside_claims.py [--records 1000000] [--claimers 8] [--rounds 3]
                                              [--variants none,share1,...] [--smoke] [--json out.json]

This is a measurement: it exits 0 whatever the ratios (non-zero only when it cannot run or its counts do
not add up: every record filled was deleted, and every claim's record and payment are there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is benchmarks/_blocks.py and _database.py
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402 - after the path set-up above
from sqlalchemy.engine import URL, make_url  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402

import idembarrier  # noqa: E402
from benchmarks import _blocks, peers_core  # noqa: E402
from benchmarks._database import RECORDS, create_databases, fresh_tables  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/idembarrier_purge"
VARIANTS: dict[str, dict[str, Any]] = {  # name: Barrier.purge's options, and the purger's server settings
    "none": {},
    "share1": {"max_share": 1.0},
    "share0.5": {"max_share": 0.5},
    "share0.25": {"max_share": 0.25},
    "batch100": {"max_share": 1.0, "batch_size": 100},
    "nosync": {"max_share": 1.0, "server_settings": {"synchronous_commit": "off"}},
}
TARGET = 1.3
"""Issue 13's bound on purging p99 / quiet p99."""
CLAIMS = "ib_own"
"""The scope (and payment variant) of the claimers' records, peers_core's first execution."""
EXPIRED = "expired"
"""The scope of the filled records."""

# Expired compact records, as a purge finds them: completed two months ago, the response dropped at its
# horizon (a day later) and the record past its own (30 days); cleanup_at = expires_at, as compaction sets
# it. Keys are md5 strings (random order in the primary key, as client keys are); expires_at ascends.
FILL = f"""
    INSERT INTO {RECORDS} (scope, key, fingerprint, status, response, token, attempt, created_at, updated_at,
                           completed_at, response_expires_at, expires_at, fingerprint_version, cleanup_at)
    SELECT '{EXPIRED}', md5(:tag || i::text), sha256(convert_to(i::text, 'UTF8')), 'COMPLETED', NULL,
           gen_random_uuid(), 1, at.t - interval '60 days', at.t - interval '59 days', at.t - interval '60 days',
           at.t - interval '59 days', at.t - interval '30 days' + i * interval '1 microsecond', 1,
           at.t - interval '30 days' + i * interval '1 microsecond'
    FROM generate_series(1, :n) AS i, (SELECT now() AS t) AS at"""


# -- the purger (its own process) ---------------------------------------------------------------------------


async def purger(url: str) -> int:
    """Serve purge requests read as JSON lines on stdin: ``{"variant": name}`` -> the purge's numbers."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        options = dict(VARIANTS[json.loads(line)["variant"]])
        settings = options.pop("server_settings", {})
        engine = create_async_engine(
            url, pool_size=1, max_overflow=0, connect_args={"server_settings": settings} if settings else {}
        )
        try:
            async with engine.connect() as conn:  # the pool's one connection: the purge's backend
                pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            barrier: idembarrier.Barrier[idembarrier.JSON] = idembarrier.Barrier(async_sessionmaker(engine))
            batches, compacted_at = 0, 0.0

            def count(kind: str, _n: int) -> None:
                nonlocal batches, compacted_at
                batches += 1
                if kind == "compacted":  # the compaction pass ends where the deletions begin
                    compacted_at = time.monotonic()

            _say({"ready": True})
            await reader.readline()  # go
            cpu0, client0, started = _blocks.process_cpu_ns(pid), _blocks.client_cpu_s(), time.monotonic()
            purged = await barrier.purge(on_batch=count, **options)
            seconds = time.monotonic() - started
            cpu1 = _blocks.process_cpu_ns(pid)
            backend = math.nan if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / 1e9
            _say({
                "deleted": purged.deleted, "compacted": purged.compacted, "seconds": seconds,
                "compacting_s": compacted_at - started,
                "batches": batches, "backend_cpu_s": backend, "client_cpu_s": _blocks.client_cpu_s() - client0,
            })  # fmt: skip
        finally:
            await engine.dispose()
    return 0


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Purger:
    """The controller's end of the purger process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--purger", "--database-url", self.url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the purger exited ({await self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            await self.proc.wait()


# -- the claimers -------------------------------------------------------------------------------------------


class Claimers:
    """``n`` tasks running first executions back to back while the gate is open, each claim timed."""

    def __init__(self, url: str, n: int) -> None:
        self.variant = peers_core.Idembarrier(CLAIMS, {"url": url, "prefill": 0})
        self.n = n
        self.gate = asyncio.Event()
        self.samples: list[tuple[float, float]] = []  # (start, seconds) per completed claim
        self.errors: dict[str, int] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.running = True

    async def start(self) -> None:
        await self.variant.open(self.n)
        self.tasks = [asyncio.create_task(self._loop()) for _ in range(self.n)]

    async def _loop(self) -> None:
        while True:
            await self.gate.wait()
            if not self.running:
                return
            started = time.monotonic()
            try:
                await self.variant.request()
            except Exception as exc:  # counted and reported, the run goes on
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                continue
            self.samples.append((started, time.monotonic() - started))

    def between(self, a: float, b: float) -> list[float]:
        return [s for t, s in self.samples if a <= t < b]

    async def stop(self) -> None:
        """Let every claim in flight finish (its record and payment then counted), then close the pool."""
        self.running = False
        self.gate.set()
        await asyncio.gather(*self.tasks)
        await self.variant.close()


# -- the run ------------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One measured block: its claims' latencies and the CPU beside them."""

    claims: int
    seconds: float
    p50_ms: float
    p99_ms: float
    client_cpu_s: float
    server_cpu_s: float


@dataclass
class Pair:
    """One variant in one round: the quiet block, the purging block and the purge's own numbers."""

    variant: str
    round: int
    quiet: Block
    purging: Block
    purge: dict[str, Any] = field(default_factory=dict)
    fill_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.purging.p99_ms / self.quiet.p99_ms if self.quiet.p99_ms else math.nan


class Bench:
    """The database, the claimers, the purger and the blocks."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url: URL = make_url(args.database_url)
        self.claimers = Claimers(args.database_url, args.claimers)
        self.purger = Purger(args.database_url)
        self.admin = create_async_engine(self.url, isolation_level="AUTOCOMMIT", pool_size=1)
        self.probe = _blocks.ServerProbe(self.url.set(drivername="postgresql").render_as_string(False), self.port)
        self.filled = 0
        self.deleted = 0

    @property
    def port(self) -> int:
        return self.url.port or 5432

    async def prepare(self, n: int) -> float:
        """Pause the claimers, fill ``n`` expired records, vacuum and checkpoint; the seconds the fill took."""
        self.claimers.gate.clear()
        async with self.admin.connect() as conn:
            started = time.monotonic()
            if n:
                await conn.execute(text(FILL), {"tag": uuid.uuid4().hex, "n": n})
                self.filled += n
            took = time.monotonic() - started
            await conn.exec_driver_sql(f"VACUUM ANALYZE {RECORDS}")
            await conn.exec_driver_sql("CHECKPOINT")
        self.claimers.gate.set()
        await asyncio.sleep(self.args.warmup)  # the claimers back at speed before a block begins
        return took

    async def block(self, purge: str | None) -> tuple[Block, dict[str, Any]]:
        """A block of claims: ``--quiet`` seconds, or as long as the purge variant ``purge`` takes."""
        backends = await self.probe.backends()
        if purge is not None:
            ready = await self.purger.ask({"variant": purge})
            assert ready == {"ready": True}, ready
        cpu0, client0, a = _blocks.cpu_of(backends), _blocks.client_cpu_s(), time.monotonic()
        if purge is None:
            await asyncio.sleep(self.args.quiet)
            done: dict[str, Any] = {}
        else:
            done = await self.purger.ask({"go": True})
            self.deleted += int(done["deleted"])
        b, client1, cpu1 = time.monotonic(), _blocks.client_cpu_s(), _blocks.cpu_of(backends)
        latencies = self.claimers.between(a, b)
        server = sum(cpu1[p] - cpu0[p] for p in cpu1 if p in cpu0) / 1e9 if cpu0 else math.nan
        ms = [s * 1e3 for s in latencies]
        return Block(
            claims=len(latencies), seconds=b - a, p50_ms=_blocks.percentile(ms, 0.5),
            p99_ms=_blocks.percentile(ms, 0.99), client_cpu_s=client1 - client0, server_cpu_s=server,
        ), done  # fmt: skip

    async def run(self) -> list[Pair]:
        await create_databases(self.url)
        await fresh_tables(self.url, peers_core.Base.metadata)
        await self.purger.start()
        await self.claimers.start()
        pairs: list[Pair] = []
        try:
            variants: list[str] = self.args.variants
            for r in range(self.args.rounds):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for name in order:
                    fill = await self.prepare(0 if name == "none" else self.args.records)
                    quiet, _ = await self.block(None)
                    purging, purge = await self.block(None if name == "none" else name)
                    pairs.append(Pair(name, r + 1, quiet, purging, purge, fill))
                    print(f"round {r + 1} {name}: {_line(pairs[-1])}", file=sys.stderr, flush=True)
        finally:
            await self.claimers.stop()
            await self.purger.stop()
            await self.probe.close()
        return pairs

    async def check(self) -> list[str]:
        """What does not add up: filled records left, claims without their record or payment."""
        async with self.admin.connect() as conn:
            rows = await conn.execute(text(f"SELECT scope, count(*) FROM {RECORDS} GROUP BY scope"))
            records = {str(s): int(n) for s, n in rows.all()}
            payments = int((await conn.execute(text("SELECT count(*) FROM peers_payments"))).scalar_one())
        await self.admin.dispose()
        executed, problems = self.claimers.variant.executed, []
        if self.deleted != self.filled or records.get(EXPIRED, 0):
            problems.append(f"filled {self.filled}, deleted {self.deleted}, {records.get(EXPIRED, 0)} left")
        if records.get(CLAIMS, 0) != executed or payments != executed:
            problems.append(f"{executed} claims, {records.get(CLAIMS, 0)} records, {payments} payments")
        return problems


def _line(pair: Pair) -> str:
    q, p = pair.quiet, pair.purging
    return f"quiet p99 {q.p99_ms:.1f} ms ({q.claims}), purging p99 {p.p99_ms:.1f} ms ({p.claims}) in {p.seconds:.1f} s"


# -- the report ---------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _spread(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return _blocks.DASH
    return f"{statistics.median(values):.2f} [{min(values):.2f}{_blocks.DASH}{max(values):.2f}]"


def _per_claim_us(block: Block, cpu: float) -> float:
    return cpu / block.claims * 1e6 if block.claims else math.nan


def report(pairs: list[Pair], args: argparse.Namespace) -> str:
    """The tables, the target's verdict per variant, the machine."""
    out = [
        f"## Claims beside a purge of {args.records} expired records ({args.claimers} claimers, {args.rounds} rounds)",
        "",
        _blocks.machine_line(),
        "",
        f"### Claim latency, quiet vs purging (medians over rounds; ratio: median [min{_blocks.DASH}max] per round)",
        "",
    ]
    rows, verdicts = [], []
    for name in args.variants:
        mine = [p for p in pairs if p.variant == name]
        ratios = [p.ratio for p in mine]
        purge_s = _median([p.purging.seconds for p in mine]) if name != "none" else math.nan
        rate = _median([p.purge["deleted"] / p.purge["seconds"] for p in mine if p.purge.get("seconds")])
        rows.append([
            name,
            _blocks.number(_median([p.quiet.p50_ms for p in mine]), 1),
            _blocks.number(_median([p.quiet.p99_ms for p in mine]), 1),
            _blocks.number(_median([p.purging.p50_ms for p in mine]), 1),
            _blocks.number(_median([p.purging.p99_ms for p in mine]), 1),
            _spread(ratios),
            _blocks.number(_median([p.quiet.claims / p.quiet.seconds for p in mine])),
            _blocks.number(_median([p.purging.claims / p.purging.seconds for p in mine])),
            _blocks.number(purge_s, 1),
            _blocks.number(rate),
        ])  # fmt: skip
        if name != "none" and ratios:
            met = "MET" if _median(ratios) <= TARGET else "MISSED"
            verdicts.append(f"claim p99 purging <= {TARGET}x quiet ({name}): {met} ({_median(ratios):.2f})")
    out.append(_blocks.table(
        ["variant", "quiet p50 ms", "quiet p99 ms", "purging p50 ms", "purging p99 ms", "p99 purging ÷ quiet",
         "claims/s quiet", "claims/s purging", "purge s", "purge rows/s"],
        rows,
    ))  # fmt: skip
    out += ["", "### CPU (medians over rounds)", ""]
    cpu_rows = []
    for name in args.variants:
        mine = [p for p in pairs if p.variant == name]
        cpu_rows.append([
            name,
            _blocks.number(_median([_per_claim_us(p.quiet, p.quiet.server_cpu_s) for p in mine])),
            _blocks.number(_median([_per_claim_us(p.purging, p.purging.server_cpu_s) for p in mine])),
            _blocks.number(_median([_per_claim_us(p.quiet, p.quiet.client_cpu_s) for p in mine])),
            _blocks.number(_median([_per_claim_us(p.purging, p.purging.client_cpu_s) for p in mine])),
            _blocks.number(_median([p.purge.get("backend_cpu_s", math.nan) for p in mine]), 2),
            _blocks.number(_median([p.purge.get("batches", math.nan) for p in mine])),
            _blocks.number(_median([p.purge.get("compacting_s", math.nan) for p in mine]), 2),
            _blocks.number(_median([p.fill_s for p in mine]), 1),
        ])  # fmt: skip
    out.append(_blocks.table(
        ["variant", "claimers' PG µs/claim quiet", "purging", "client µs/claim quiet", "purging",
         "purger backend CPU s", "batches", "compaction pass s", "fill s (unmeasured)"],
        cpu_rows,
    ))  # fmt: skip
    out += ["", "### Per round (p99 ms quiet → purging)", ""]
    per_round = [
        [p.variant, str(p.round), f"{p.quiet.p99_ms:.1f}", f"{p.purging.p99_ms:.1f}", f"{p.ratio:.2f}"] for p in pairs
    ]
    out.append(_blocks.table(["variant", "round", "quiet p99", "purging p99", "ratio"], per_round))
    out += ["", *verdicts]
    return "\n".join(out)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--records", type=int, default=1_000_000, help="expired records each purge deletes")
    parser.add_argument("--claimers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds of a quiet block")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of claims before a quiet block")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="tiny purges, short blocks: runs in seconds")
    parser.add_argument("--json", type=Path, help="write every block here")
    parser.add_argument("--purger", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if args.smoke:
        args.records, args.rounds, args.quiet, args.warmup = 3000, 1, 0.3, 0.1
    return args


async def main(args: argparse.Namespace) -> int:
    if args.purger:
        return await purger(args.database_url)
    bench = Bench(args)
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    pairs = await bench.run()
    problems = await bench.check()
    print(report(pairs, args))
    errors = sum(bench.claimers.errors.values())
    print(f"\nCORRECTNESS: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)}; claim errors: {errors}")
    if bench.claimers.errors:
        print(f"claim errors by type: {bench.claimers.errors}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(p) for p in pairs], indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))

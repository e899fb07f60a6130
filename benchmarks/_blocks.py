"""The block-interleaved harness the peers benchmarks share: one process per variant, paired rounds, CPU per request.

How a measurement is taken (the method of ``research/performance_measured.md``):

* Every variant runs in its own long-lived worker process (the same script, started with ``--worker NAME``),
  so that no variant's imports, pools, threads or garbage slow another's. Only one worker is active at a time.
* A **block** is: open the variant's pools, warm up (unmeasured: at least ``warmup`` seconds and ``3 c``
  requests), measure a closed loop of ``c`` tasks for ``block`` seconds, close the pools.
* A **round** is one block of every variant, in an order that rotates every round. Each round yields the
  ratios variant ÷ reference (throughput, client CPU per request, server CPU per request), so that drift
  of the shared machine cancels within a round. A table cell is the **median of the per-round ratios**,
  with their spread (the lowest and highest per-round ratio, and the interquartile range).
* **Client CPU** is the worker's own ``getrusage`` (every thread) over the measured window. **Server
  CPU** is the ``schedstat`` run time of the worker's own PostgreSQL backends over the same window: the
  backends whose client ports are this worker's sockets (whatever the driver, DBOS's system database
  included). **Broker CPU** is that of a broker process of this machine, or Redis's ``INFO cpu``; Redis is
  shared, so small values are noise.

A worker talks to the controller in JSON lines over a pipe of its own (its stdout is sent to stderr, so
that libraries printing cannot break the protocol).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

import sqlalchemy

import idembarrier

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
DASH = "\u2013"  # the en dash of a range, as the README writes them


class Variant(Protocol):
    """One way of doing the request, as a worker process runs it."""

    async def setup(self) -> None:
        """Prepare what the variant needs in a fresh database (keys to replay…); once per repeat."""

    async def open(self, conc: int) -> None:
        """Open the pools for ``conc`` concurrent callers."""

    async def request(self) -> None:
        """Do one request; raise on a wrong answer."""

    async def close(self) -> None:
        """Close the pools."""

    def counts(self) -> dict[str, int]:
        """What the variant did since `setup`, for the controller's correctness check."""


# -- what a worker measures ---------------------------------------------------------------------------------


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def local_ports(remote_port: int) -> list[int]:
    """The local ports of this process's TCP connections to ``remote_port`` (from procfs)."""
    inodes, ports = _socket_inodes(), []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.append(int(local.rsplit(":", 1)[1], 16))
    return ports


def process_cpu_ns(pid: int) -> int | None:
    """The run time of process ``pid`` in ns (procfs ``schedstat`` of its threads), or None when unreadable."""
    try:  # every thread's: a broker (Tansu) runs on several
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks)
    except (OSError, ValueError, IndexError):
        return None


def client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ServerProbe:
    """Finds this worker's PostgreSQL backends and reads their CPU; one asyncpg connection of its own."""

    def __init__(self, dsn: str | None, port: int) -> None:
        self.dsn, self.port = dsn, port
        self.conn: Any = None
        self.own_pid = 0

    async def backends(self) -> list[int]:
        if self.dsn is None:
            return []
        import asyncpg

        if self.conn is None:
            self.conn = await asyncpg.connect(self.dsn)
            self.own_pid = await self.conn.fetchval("SELECT pg_backend_pid()")
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[]) AND pid <> $2",
            local_ports(self.port),
            self.own_pid,
        )
        return [r["pid"] for r in rows]

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


def cpu_of(pids: Sequence[int]) -> dict[int, int]:
    return {pid: ns for pid in pids if (ns := process_cpu_ns(pid)) is not None}


class BrokerProbe:
    """The CPU of the server beside PostgreSQL: a broker process of this machine, or Redis (``INFO cpu``)."""

    def __init__(self, url: str | None, pid: int | None = None) -> None:
        self.url, self.pid = url, pid
        self.client: Any = None

    async def cpu_s(self) -> float:
        if self.pid is not None:
            ns = process_cpu_ns(self.pid)
            return math.nan if ns is None else ns / 1e9
        if self.url is None:
            return math.nan
        import redis.asyncio as aioredis

        if self.client is None:
            self.client = aioredis.from_url(self.url)
        info = await self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


@dataclass
class Block:
    """One measured block of one variant."""

    variant: str
    requests: int  # completed inside the measured window
    seconds: float
    client_cpu_s: float
    server_cpu_s: float  # NaN where the backends could not be read
    broker_cpu_s: float  # the broker's or Redis's; NaN without one
    p50_ms: float
    p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else math.nan

    def per_request_us(self, what: str) -> float:
        value: float = getattr(self, f"{what}_cpu_s")
        return value / self.requests * 1e6 if self.requests else math.nan


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def measure(
    variant: Variant,
    name: str,
    conc: int,
    warmup: float,
    seconds: float,
    server: ServerProbe,
    redis: BrokerProbe,
) -> Block:
    """One block: open, warm up, a closed loop of ``conc`` callers for ``seconds``, close."""
    errors: dict[str, int] = {}
    await variant.open(conc)
    try:
        warm_end, warm_done = time.perf_counter() + warmup, 0

        async def warm() -> None:
            nonlocal warm_done
            while time.perf_counter() < warm_end or warm_done < 3 * conc:
                await variant.request()
                warm_done += 1

        await asyncio.gather(*(warm() for _ in range(conc)))
        pids = await server.backends()
        latencies: list[float] = []
        started = asyncio.Event()
        t_start = t_end = 0.0
        snap: dict[str, Any] = {}

        async def caller() -> None:
            await started.wait()
            while (begin := time.perf_counter()) < t_end:
                try:
                    await variant.request()
                except Exception as exc:
                    what = f"{type(exc).__name__}: {str(exc)[:120]}"
                    errors[what] = errors.get(what, 0) + 1
                    continue
                end = time.perf_counter()
                if end <= t_end:
                    latencies.append(end - begin)

        tasks = [asyncio.create_task(caller()) for _ in range(conc)]
        snap["redis"] = await redis.cpu_s()
        snap["server"], snap["client"] = cpu_of(pids), client_cpu_s()
        t_start = time.perf_counter()
        t_end = t_start + seconds
        started.set()
        await asyncio.sleep(seconds)
        client = client_cpu_s() - snap["client"]
        server_after = cpu_of(pids)
        elapsed = time.perf_counter() - t_start
        broker_cpu = await redis.cpu_s() - snap["redis"]
        await asyncio.gather(*tasks)
    finally:
        await variant.close()
        await server.close()  # between blocks, hold no connection the active variant could need
    common = set(snap["server"]) & set(server_after)
    server_cpu = sum(server_after[p] - snap["server"][p] for p in common) / 1e9 if common else math.nan
    return Block(
        variant=name,
        requests=len(latencies),
        seconds=elapsed,
        client_cpu_s=client,
        server_cpu_s=server_cpu,
        broker_cpu_s=broker_cpu,
        p50_ms=percentile(latencies, 0.5) * 1e3,
        p99_ms=percentile(latencies, 0.99) * 1e3,
        errors=errors,
    )


class Stream(Protocol):
    """A consumer, as a broker benchmark's worker runs it: messages flow until it is told to stop."""

    async def setup(self) -> None:
        """Prepare what the variant needs (messages already recorded…); once."""

    async def open(self, conc: int) -> None:
        """Subscribe afresh (a new group or queue, from the first message)."""

    async def stream(self, stop: asyncio.Event, counted: Callable[[], None]) -> None:
        """Consume until ``stop`` is set, calling ``counted()`` once per message settled (acked/committed)."""

    async def close(self) -> None:
        """Unsubscribe."""

    def counts(self) -> dict[str, int]:
        """What the variant did, for the controller's correctness check."""


async def measure_stream(
    variant: Stream, name: str, warmup: float, seconds: float, server: ServerProbe, redis: BrokerProbe
) -> Block:
    """One block of a consumer: subscribe, let it run ``warmup`` seconds, count messages for ``seconds``."""
    await variant.open(1)
    try:
        stop, flowing, settled = asyncio.Event(), asyncio.Event(), 0
        stamps: list[float] = []

        def counted() -> None:
            nonlocal settled
            settled += 1
            stamps.append(time.perf_counter())
            flowing.set()

        task = asyncio.create_task(variant.stream(stop, counted))
        waiting = asyncio.create_task(flowing.wait())
        await asyncio.wait([task, waiting], timeout=60, return_when=asyncio.FIRST_COMPLETED)  # the group joined
        waiting.cancel()
        if task.done():
            await task  # it failed: say why
            raise RuntimeError(f"{name} stopped before its first message")
        if not flowing.is_set():
            raise RuntimeError(f"{name} settled no message in 60 s")
        await asyncio.sleep(warmup)
        pids = await server.backends()
        redis_before = await redis.cpu_s()
        server_before, client_before, before = cpu_of(pids), client_cpu_s(), settled
        t_start = time.perf_counter()
        await asyncio.sleep(seconds)
        client = client_cpu_s() - client_before
        server_after, done = cpu_of(pids), settled - before
        elapsed = time.perf_counter() - t_start
        broker_cpu = await redis.cpu_s() - redis_before
        stop.set()
        await task
    finally:
        await variant.close()
        await server.close()
    common = set(server_before) & set(server_after)
    server_cpu = sum(server_after[p] - server_before[p] for p in common) / 1e9 if common else math.nan
    gaps = [b - a for a, b in itertools.pairwise(stamps) if t_start <= b <= t_start + elapsed]
    return Block(
        variant=name,
        requests=done,
        seconds=elapsed,
        client_cpu_s=client,
        server_cpu_s=server_cpu,
        broker_cpu_s=broker_cpu,
        p50_ms=percentile(gaps, 0.5) * 1e3,
        p99_ms=percentile(gaps, 0.99) * 1e3,
    )


def script_parser(
    doc: str | None, default_url: str, *, smoke: str, url_help: str = "postgresql+asyncpg URL"
) -> argparse.ArgumentParser:
    """A paired-rounds script's parser: its docstring's first paragraph, ``--database-url`` and ``--smoke``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument("--database-url", default=default_url, help=f"{url_help} (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help=smoke)
    return parser


def run_script(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    make: Callable[[str, dict[str, Any]], Variant | Stream],
    controller: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    smoke: Mapping[str, Any],
) -> int:
    """A paired-rounds script's main: serve as a worker when started as one (`add_worker_arguments`), else run
    ``controller`` on the parsed options, with ``smoke``'s values over them under ``--smoke``."""
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if (served := serve_worker(make, args)) is not None:
        return served
    if args.smoke:
        vars(args).update(smoke)
    return asyncio.run(controller(args))


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options with which the controller starts a script as one of its workers (see `Run`)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)


def add_run_arguments(
    parser: argparse.ArgumentParser, *, rounds: int, block: float = 1.0, per: str | None = "concurrency"
) -> None:
    """The options every paired-rounds script shares: ``--rounds``, ``--block``, ``--warmup`` and ``--json``."""
    what = "rounds" if per is None else f"rounds per {per}"
    parser.add_argument("--rounds", type=int, default=rounds, help=f"{what} (default: %(default)s)")
    parser.add_argument("--block", type=float, default=block, help="measured seconds per block (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=0.4, help="warm-up seconds per block (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write every block here")


def serve_worker(make: Callable[[str, dict[str, Any]], Variant | Stream], args: argparse.Namespace) -> int | None:
    """`serve` when the script was started as a worker (`add_worker_arguments`), else ``None``."""
    return serve(make, args.worker, json.loads(args.worker_config)) if args.worker else None


def serve(make: Callable[[str, dict[str, Any]], Variant | Stream], name: str, config: dict[str, Any]) -> int:
    """A worker's main: answer the controller's commands (JSON lines) until it says ``quit``."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever a library prints goes to stderr
    runner = asyncio.Runner()
    variant = make(name, config)
    server = ServerProbe(config.get("probe_dsn"), int(config.get("pg_port", 5432)))
    redis = BrokerProbe(config.get("redis_probe_url"), config.get("broker_pid"))
    channel.write(json.dumps({"ready": True}) + "\n")
    try:
        for line in sys.stdin:
            command = json.loads(line)
            op = command["op"]
            answer: dict[str, Any]
            try:
                if op == "quit":
                    break
                if op == "setup":
                    runner.run(variant.setup())
                    answer = {"ok": True}
                elif op == "block" and command.get("stream"):
                    block = runner.run(
                        measure_stream(
                            cast("Stream", variant), name, command["warmup"], command["block"], server, redis
                        )
                    )
                    answer = {"ok": True, "block": asdict(block)}
                elif op == "block":
                    conc, warmup, seconds = command["conc"], command["warmup"], command["block"]
                    block = runner.run(measure(cast("Variant", variant), name, conc, warmup, seconds, server, redis))
                    answer = {"ok": True, "block": asdict(block)}
                elif op == "counts":
                    answer = {"ok": True, "counts": variant.counts()}
                else:
                    answer = {"ok": False, "error": f"unknown command {op!r}"}
            except Exception as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            channel.write(json.dumps(answer, default=str) + "\n")
    finally:
        runner.run(server.close())
        runner.run(redis.close())
        runner.close()
    return 0


# -- the controller -----------------------------------------------------------------------------------------


class Worker:
    """The controller's end of one worker process."""

    def __init__(self, script: Path, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, str(script), "--worker", name, "--worker-config", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.failed: str | None = None

    def ask(self, **command: Any) -> dict[str, Any]:
        stdin, stdout = self._pipes()
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self._answer(stdout)

    def ready(self) -> None:
        _, stdout = self._pipes()
        self._answer(stdout)

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        return self.process.stdin, self.process.stdout

    def _answer(self, stdout: IO[str]) -> dict[str, Any]:
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited with {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok", True):
            raise RuntimeError(f"worker {self.name}: {answer.get('error')}")
        return answer

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            self.ask(op="quit")
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Run:
    """Every block of a run, by repeat, concurrency and round."""

    blocks: list[dict[str, Any]] = field(default_factory=list)  # each: repeat, conc, round, + Block fields

    def of(self, conc: int) -> dict[tuple[int, int], dict[str, dict[str, Any]]]:
        """(repeat, round) → variant → block, at ``conc``."""
        out: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
        for b in self.blocks:
            if b["conc"] == conc:
                out.setdefault((b["repeat"], b["round"]), {})[b["variant"]] = b
        return out


def run_rounds(
    workers: dict[str, Worker],
    run: Run,
    repeat: int,
    conc: int,
    rounds: int,
    warmup: float,
    block: float,
    *,
    stream: bool = False,
) -> None:
    """``rounds`` rounds of one block per variant at ``conc``, the order rotating every round."""
    names = list(workers)
    for r in range(rounds):
        shift = (r + repeat) % len(names)
        for name in names[shift:] + names[:shift]:
            answer = workers[name].ask(op="block", conc=conc, warmup=warmup, block=block, stream=stream)
            run.blocks.append({"repeat": repeat, "conc": conc, "round": r, **answer["block"]})
        print(f"  repeat {repeat + 1} c={conc} round {r + 1}/{rounds} done", flush=True)


def run_workers(
    workers: dict[str, Worker],
    run: Run,
    concs: Sequence[int],
    rounds: int,
    warmup: float,
    block: float,
    *,
    repeat: int = 0,
    stream: bool = False,
    label: str = "workers",
) -> dict[str, Any]:
    """Start ``workers``, set them up in their order, run `run_rounds` at each of ``concs``; stop them all.

    Returns each variant's counts, read before the workers stop.
    """
    try:
        started = time.perf_counter()
        for w in workers.values():
            w.ready()
        ready = time.perf_counter()
        for w in workers.values():
            w.ask(op="setup")
        print(f"{label} started in {ready - started:.1f} s, set up in {time.perf_counter() - ready:.1f} s", flush=True)
        for c in concs:
            run_rounds(workers, run, repeat, c, rounds, warmup, block, stream=stream)
        return {v: w.ask(op="counts")["counts"] for v, w in workers.items()}
    finally:
        for w in workers.values():
            w.stop()


def _value(b: dict[str, Any], metric: str) -> float:
    """A block's ``throughput`` (requests/s), ``client``/``server``/``broker`` CPU µs per request, or a field
    of its own such as ``p50_ms``."""
    if metric.endswith("_ms"):
        return float(b[metric])
    if metric == "throughput":
        return float(b["requests"]) / b["seconds"] if b["seconds"] else math.nan
    requests = b["requests"]
    return float(b[f"{metric}_cpu_s"]) / requests * 1e6 if requests else math.nan


@dataclass(frozen=True)
class Ratio:
    """A median of per-round ratios, with the spread of those ratios."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    n: int

    def cell(self) -> str:
        if self.n == 0 or math.isnan(self.median):
            return DASH
        if self.n < 4:
            return f"{self.median:.2f} [{self.low:.2f}{DASH}{self.high:.2f}]"
        return f"{self.median:.2f} [{self.q1:.2f}{DASH}{self.q3:.2f}]"


def ratio(run: Run, conc: int, metric: str, over: str, under: str) -> Ratio:
    """Median over rounds of ``metric(over) / metric(under)``, measured in the same round."""
    values = []
    for blocks in run.of(conc).values():
        if over in blocks and under in blocks:
            a, b = _value(blocks[over], metric), _value(blocks[under], metric)
            if b and not math.isnan(a) and not math.isnan(b):
                values.append(a / b)
    if not values:
        return Ratio(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return Ratio(statistics.median(values), min(values), max(values), q[0], q[2], len(values))


def median_value(run: Run, conc: int, metric: str, variant: str) -> float:
    values = [_value(blocks[variant], metric) for blocks in run.of(conc).values() if variant in blocks]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def median_field(run: Run, conc: int, name: str, variant: str) -> float:
    values = [float(b[name]) for blocks in run.of(conc).values() if (b := blocks.get(variant))]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def errors_of(run: Run) -> dict[str, int]:
    total: dict[str, int] = {}
    for b in run.blocks:
        for what, n in b["errors"].items():
            key = f"{b['variant']}: {what}"
            total[key] = total.get(key, 0) + n
    return total


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(run: Run, concs: Sequence[int], metric: str, variant: str, bound: float) -> str:
    """Issue 13's reading of a target at c = 8 and 32: ``variant`` ÷ bare at least ``bound`` (at most, for the
    server's CPU), as ``MET (c=8 0.81, c=32 0.84)``, ``MISSED (...)``, or ``not measured``."""
    at = [c for c in concs if c in (8, 32)]
    if not at:
        return "not measured"
    got = {c: ratio(run, c, metric, variant, "bare").median for c in at}
    met = all((x <= bound) if metric == "server" else (x >= bound) for x in got.values())
    numbers = ", ".join(f"c={c} {x:.2f}" for c, x in got.items())
    return f"{'MET' if met else 'MISSED'} ({numbers})"


def conclude(
    args: argparse.Namespace, problems: Sequence[str], blocks: object, errors: dict[str, int] | None = None
) -> int:
    """Print the correctness verdict (with the measured blocks' errors, where counted) and each problem, and
    write ``blocks`` to ``--json`` when it is given; return the exit status, 1 when a problem was found."""
    line = f"\nCORRECTNESS: {'OK' if not problems else 'MISMATCH'}"
    print(line if errors is None else f"{line}; errors in measured blocks: {errors or 0}")
    for p in problems:
        print(f"  {p}")
    if args.json is not None:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": None}, "blocks": blocks}, indent=1))
    return 1 if problems else 0


def ratio_row(run: Run, concs: Sequence[int], label: str, variant: str) -> list[str]:
    """``label``, then ``variant`` ÷ bare in throughput, client CPU and PostgreSQL CPU at each of ``concs``."""
    return [
        label,
        *(ratio(run, c, m, variant, "bare").cell() for m in ("throughput", "client", "server") for c in concs),
    ]


def per_request_table(run: Run, concs: Sequence[int], names: Sequence[str]) -> str:
    """Per variant and concurrency: requests/s, client and PostgreSQL CPU µs, p50 and p99 (medians over rounds)."""
    header = ["variant"]
    for c in concs:
        header += [f"c={c} req/s", f"c={c} client / PG µs", f"c={c} p50 / p99 ms"]
    rows = []
    for v in names:
        row = [v]
        for c in concs:
            row.append(number(median_value(run, c, "throughput", v)))
            client, server = (median_value(run, c, m, v) for m in ("client", "server"))
            row.append(f"{number(client)} / {number(server)}")
            p50, p99 = (median_field(run, c, f, v) for f in ("p50_ms", "p99_ms"))
            row.append(f"{number(p50, 2)} / {number(p99, 1)}")
        rows.append(row)
    return table(header, rows)


def number(x: float, digits: int = 0) -> str:
    return DASH if math.isnan(x) else f"{x:.{digits}f}"


def versions_line() -> str:
    """What a run's first line says: the versions measured and the machine they ran on."""
    return (
        f"idembarrier {idembarrier.__version__} | SQLAlchemy {sqlalchemy.__version__} | Python "
        f"{platform.python_version()} | {machine_line()}"
    )


def print_lines(heading: str, lines: Sequence[str]) -> None:
    """``heading`` after a blank line, then each of ``lines`` indented: how a run prints its verdicts."""
    print(f"\n{heading}")
    for line in lines:
        print(f"  {line}")


def machine_line() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"


def shuffled(items: list[str], seed: int) -> list[str]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out

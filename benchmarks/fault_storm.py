"""A fault storm: thousands of payments, many sent twice (also at the same moment), while the database breaks.

Client processes (``tests/storm_worker.py``) send ``--requests`` payments, ``--duplicates`` of them a key
sent again: a third at the same moment from another process, a third at the same moment from the same
process, a third later. A failed attempt is retried with the same key, as a careful client does. Every
database connection of the code under test goes through `tests.faultproxy.FaultProxy`, and while the
requests arrive (``--rate`` per process) an injector breaks it in shuffled rounds of every kind of fault: a
COMMIT dropped, a COMMIT's reply swallowed (it committed), the connection cut right after a COMMIT's reply,
every connection cut, half-open paths (either way) and blackholes (their connections then die), refused
connects, and ``pg_terminate_backend`` of the application's backends. The stragglers' retries then finish
on a healed database.

``--mode direct`` runs units of work on the barrier in the client processes (a bounded deadline per
attempt, ``Barrier(cleanup_timeout=...)``); ``--mode http`` posts to the ASGI middleware under uvicorn with
2 workers (their connections through the proxy), the clients abandoning some requests midway.

What must be zero (the script exits 1 otherwise): duplicate effects (a key with two payment rows), lost
acknowledged writes (an answered success whose payment row is missing), exceptions escaping that are not
``IdembarrierError``, HTTP 500s, exceptions leaving the app, payments without their COMPLETED record or
the reverse, and crashed client processes.

Usage::

    python benchmarks/fault_storm.py [--requests 5000] [--processes 2] [--duplicates 0.25] [--mode both]
                                     [--database-url URL] [--json out.json] [--keep-logs]

The database (``idembarrier_storm`` by default) is created when missing through the server's ``test``
database, and migrated; each run's keys carry a fresh prefix, so runs never see each other's rows. The
processes' logs (a temporary directory per mode) are kept when a storm fails, or with ``--keep-logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's tests/ hold the proxy and the workers
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402 - after the path set-up above
from sqlalchemy import NullPool, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine  # noqa: E402

import idembarrier  # noqa: E402
from tests.faultproxy import CommitCut, FaultProxy  # noqa: E402
from tests.models import Base  # noqa: E402
from tests.storm_worker import ESCAPE, SCOPE, Plan, Result  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/idembarrier_storm"
ADMIN_DATABASE = "test"
SERVER_WORKERS = 2
COMMIT_CUTS = {
    "commit_dropped": CommitCut.DROP,
    "commit_reply_swallowed": CommitCut.BEFORE_REPLY,
    "cut_after_commit_reply": CommitCut.AFTER_REPLY,
}
SILENCES = ("half_open_to_client", "half_open_to_server", "blackhole")
FAULT_KINDS = (*COMMIT_CUTS, "cut", *SILENCES, "refuse", "pg_terminate_backend")
"""Every kind the injector injects, as `FaultProxy.faults` (and the injector) count them."""
ZERO_TARGETS = (
    "duplicate_effects",
    "lost_acknowledged_writes",
    "differing_answers",
    "payments_without_record",
    "records_without_payment",
    "records_in_progress",
    "escapes",
    "http_500",
    "server_exceptions",
    "crashed_clients",
)
"""The report's counters that must be 0 (`Report.violations`)."""


def fault_kinds(mode: str) -> tuple[str, ...]:
    """The fault kinds a storm in ``mode`` must have injected: over HTTP, clients also abandon requests."""
    return (*FAULT_KINDS, "client_abandoned") if mode == "http" else FAULT_KINDS


GAP = (0.05, 0.3)
"""Seconds between two faults."""
ANSWERED = "guarded request answered 503: "
"""How the middleware's warning for a storage failure it answered begins, the exception's repr following."""
SHORTEST_SILENCE = 0.2
"""Seconds a path stays silent (or connects stay refused), at least; at most ``--max-silence``."""


@dataclass
class Report:
    """What one storm did and what it left in the database; `violations` lists the zero-targets missed."""

    mode: str
    requests: int
    processes: int
    duplicates_sent: int
    keys: int
    attempts: int = 0
    seconds: float = 0.0
    duplicates_in_flight_together: int = 0
    duplicates_in_flight_across_processes: int = 0
    acknowledged_requests: int = 0
    unsettled_requests: int = 0
    executions: int = 0
    duplicate_effects: int = 0
    lost_acknowledged_writes: int = 0
    differing_answers: int = 0
    payments_without_record: int = 0
    records_without_payment: int = 0
    records_in_progress: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    escapes: int = 0
    escape_samples: list[str] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)
    server_answers: dict[str, int] = field(default_factory=dict)
    """HTTP: the failures the middleware answered, by exception type (read from the server's warnings)."""
    http_500: int = 0
    server_exceptions: int = 0
    server_processes: int = 0
    crashed_clients: int = 0
    max_deadline_overrun: float = 0.0
    logs: str = ""

    def violations(self) -> list[str]:
        """The zero-targets this storm missed, and its own requirements it did not meet."""
        missed = [f"{name.replace('_', ' ')}: {value}" for name in ZERO_TARGETS if (value := getattr(self, name))]
        missed += [f"no fault of kind {kind} happened" for kind in fault_kinds(self.mode) if not self.faults.get(kind)]
        if self.mode == "http" and self.server_processes < SERVER_WORKERS:
            missed.append(f"only {self.server_processes} server processes answered")
        return missed


Sends = list[tuple[int, str, int, float]]


def share_sends(requests: int, processes: int, duplicates: float, prefix: str, rng: random.Random) -> list[Sends]:
    """Share the sends out: each key once, round-robin, then the duplicates, at the same slot or later."""
    n_duplicates = round(requests * duplicates)
    n_keys = requests - n_duplicates
    sends: list[Sends] = [[] for _ in range(processes)]
    for i in range(n_keys):
        sends[i % processes].append((i, f"{prefix}{i}", 1 + i % 1000, float(i // processes)))
    for j in range(n_duplicates):
        i = rng.randrange(n_keys)
        home, slot = i % processes, float(i // processes)
        how = rng.randrange(3)
        if how == 0 and processes > 1:  # the same moment, from another process
            where = (home + 1 + rng.randrange(processes - 1)) % processes
        elif how == 1:  # the same moment, from the same process
            where = home
        else:  # later, from any process: a retry after a while
            where, slot = rng.randrange(processes), slot + rng.uniform(1, 60)
        sends[where].append((n_keys + j, f"{prefix}{i}", 1 + i % 1000, slot))
    return sends


class Injector:
    """Breaks the proxied connections without pause, in shuffled rounds of every kind of fault."""

    def __init__(self, proxy: FaultProxy, admin: AsyncEngine, rng: random.Random, max_silence: float) -> None:
        self.proxy = proxy
        self.max_silence = max_silence
        self.admin = admin
        self.rng = rng
        self.terminated = 0

    async def run(self, until: float) -> None:
        """Inject rounds of faults until the monotonic clock reads ``until``; a round begun is finished."""
        while time.monotonic() < until:
            kinds = list(FAULT_KINDS)
            self.rng.shuffle(kinds)
            for kind in kinds:
                await asyncio.sleep(self.rng.uniform(*GAP))  # fault timing, not ordering
                await self.inject(kind)

    async def inject(self, kind: str) -> None:
        proxy = self.proxy
        if kind in COMMIT_CUTS:
            proxy.cut_at_commit(COMMIT_CUTS[kind])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):  # the next COMMIT of any client takes the cut
                    await proxy.commit_cut.wait()
        elif kind == "cut":
            proxy.cut_all()
        elif kind == "pg_terminate_backend":
            await self.terminate(self.rng.randint(1, 4))
        else:
            if kind == "refuse":
                proxy.refuse()
            elif kind == "blackhole":
                proxy.blackhole()
            else:
                proxy.half_open("to_client" if kind == "half_open_to_client" else "to_server")
            await asyncio.sleep(self.rng.uniform(SHORTEST_SILENCE, self.max_silence))
            if kind != "refuse":
                # A path that went silent does not come back on its own: its connections die (TCP would
                # reset them); the proxy would otherwise resume a stream it dropped bytes of.
                proxy.cut_all(count=False)
            await proxy.heal()

    async def terminate(self, n: int) -> None:
        """``pg_terminate_backend`` of ``n`` of the application's backends, chosen at random.

        Right after a cut the application may hold no connection at all (its pools refill as requests come):
        then it tries again, for up to 2 s, so that the round's termination really happens.
        """
        for _ in range(40):
            if await self._terminate(n):
                return
            await asyncio.sleep(0.05)  # waiting for the application to reconnect, not ordering anything

    async def _terminate(self, n: int) -> int:
        async with self.admin.connect() as conn:
            done = await conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM ("
                    " SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    " ORDER BY random() LIMIT :n) AS chosen"
                ),
                {"n": n},
            )
            terminated = int(done.scalar_one())
        self.terminated += terminated
        return terminated


async def ensure_database(url: URL) -> None:
    """Create ``url``'s database when missing, and migrate it: idembarrier's tables and the payments table."""
    admin = create_async_engine(url.set(database=ADMIN_DATABASE), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            query = text("SELECT 1 FROM pg_database WHERE datname = :name")
            if (await conn.execute(query, {"name": url.database})).scalar() is None:
                quoted = conn.dialect.identifier_preparer.quote(str(url.database))
                await conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
    except Exception as exc:  # the database may exist and be reachable all the same: migrating it tells
        print(f"note: could not check/create {url.database} through {ADMIN_DATABASE!r}: {exc!r}")
    finally:
        await admin.dispose()
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        await idembarrier.upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
    finally:
        await engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_server(proxied_url: str, logs: Path) -> tuple[asyncio.subprocess.Process, str, int]:
    """uvicorn with 2 workers serving `tests.storm_worker.create_app`; return it once both workers answer."""
    port = free_port()
    env = {**os.environ, "STORM_DATABASE_URL": proxied_url, "STORM_ERRORS": str(logs / "server-errors.jsonl")}
    # fmt: off
    command = [
        sys.executable, "-m", "uvicorn", "tests.storm_worker:create_app", "--factory",
        "--workers", str(SERVER_WORKERS), "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "5",
    ]
    # fmt: on
    with (logs / "server.log").open("wb") as log:
        server = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env, stdout=log, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    async with asyncio.timeout(60), httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while len(pids) < SERVER_WORKERS:  # the server's readiness, which it reports nowhere else: polled
            assert server.returncode is None, f"uvicorn exited {server.returncode}; see {logs / 'server.log'}"
            with contextlib.suppress(httpx.HTTPError):
                # A fresh connection each time, so that the kernel may hand it to either worker.
                response = await client.get("/health", headers={"connection": "close"})
                pids.add(int(response.json()["pid"]))
            await asyncio.sleep(0.05)
    return server, base_url, len(pids)


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def run_clients(mode: str, target: str, plans: list[Plan], logs: Path, injector: Injector) -> list[Result | None]:
    """Start a client process per plan, release them at one T0 once all are ready, and break the database
    while requests arrive (not before, not after); collect their results."""
    clients = []
    for n, plan in enumerate(plans):
        (logs / f"plan-{n}.json").write_text(json.dumps(plan))
        command = [sys.executable, "-m", "tests.storm_worker", mode, target, str(logs / f"plan-{n}.json")]
        with (logs / f"client-{n}.log").open("wb") as log:
            clients.append(
                await asyncio.create_subprocess_exec(
                    *command,
                    str(logs / f"result-{n}.json"),
                    cwd=ROOT,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                )
            )
    try:
        async with asyncio.timeout(60):
            for client in clients:
                assert client.stdout is not None
                line = await client.stdout.readline()
                assert line == b"ready\n", f"a client did not start: {line!r}; see {logs}"
        t0 = time.monotonic() + 0.2  # CLOCK_MONOTONIC is system-wide: the same T0 in every process
        for client in clients:
            assert client.stdin is not None
            client.stdin.write(f"go {t0}\n".encode())
            await client.stdin.drain()
        # Faults fall while requests arrive; the stragglers' retries then finish on a healed database.
        arrivals_end = t0 + max(slot for plan in plans for *_, slot in plan["sends"]) / plans[0]["rate"]
        chaos = asyncio.ensure_future(injector.run(until=arrivals_end))
        try:
            await asyncio.gather(*(client.wait() for client in clients))
        finally:
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
            await injector.proxy.heal()
    finally:
        for client in clients:
            if client.returncode is None:
                client.kill()
                await client.wait()
    results: list[Result | None] = []
    for n, client in enumerate(clients):
        path = logs / f"result-{n}.json"
        results.append(json.loads(path.read_text()) if client.returncode == 0 and path.exists() else None)
    return results


async def storm(mode: str, url: str, args: argparse.Namespace, logs: Path) -> Report:
    """Run one storm in ``mode`` against the database ``url``; return its report."""
    rng = random.Random(args.seed)
    prefix = f"storm-{uuid.uuid4().hex[:8]}-"
    plans = [
        Plan(
            rate=args.rate,
            in_flight=args.in_flight,
            deadline=args.deadline,
            attempts=args.attempts,
            abandon=args.abandon if mode == "http" else 0.0,
            seed=rng.randrange(2**32),
            sends=sends,
        )
        for sends in share_sends(args.requests, args.processes, args.duplicates, prefix, rng)
    ]
    keys = args.requests - round(args.requests * args.duplicates)
    report = Report(mode, args.requests, args.processes, args.requests - keys, keys, logs=str(logs))
    admin = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    server = None
    started = time.monotonic()
    try:
        async with FaultProxy.for_url(url) as proxy:
            target = proxy.url(url)
            if mode == "http":
                server, target, report.server_processes = await start_server(target, logs)
            injector = Injector(proxy, admin, rng, args.max_silence)
            results = await run_clients(mode, target, plans, logs, injector)
            report.seconds = time.monotonic() - started
            if server is not None:
                await stop(server)
            report.faults = {**proxy.faults, "pg_terminate_backend": injector.terminated}
        await tally(report, results, admin, prefix, logs)
    finally:
        if server is not None:
            await stop(server)
        await admin.dispose()
    return report


async def tally(report: Report, results: list[Result | None], admin: AsyncEngine, prefix: str, logs: Path) -> None:
    """Count the outcomes the clients saw, and check them against the rows the database holds."""
    report.crashed_clients = sum(result is None for result in results)
    outcomes: Counter[str] = Counter()
    acknowledged: dict[int, tuple[str, int]] = {}
    spans: dict[str, dict[int, tuple[float, float, int]]] = defaultdict(dict)
    for process, result in enumerate(results):
        if result is None:
            continue
        report.max_deadline_overrun = max(report.max_deadline_overrun, result["max_overrun"])
        report.escape_samples += result["escapes"][:3]
        report.samples = result["samples"] | report.samples
        for send, key, _attempt, outcome, start, end, payment_id in result["attempts"]:
            report.attempts += 1
            outcomes[outcome] += 1
            if payment_id is not None:
                acknowledged[send] = (key, payment_id)
            first, last, _ = spans[key].get(send, (start, end, process))
            spans[key][send] = (min(first, start), max(last, end), process)
    if report.mode == "http":
        report.faults["client_abandoned"] = outcomes["abandoned by the client"]
    report.outcomes = dict(outcomes.most_common())
    report.escapes = sum(n for kind, n in outcomes.items() if kind.startswith(ESCAPE))
    report.http_500 = sum(n for kind, n in outcomes.items() if kind.startswith("500"))
    answered: Counter[str] = Counter()
    if (log := logs / "server.log").exists():
        with log.open(errors="replace") as warnings:
            for line in warnings:
                if line.startswith(ANSWERED):
                    answered[line[len(ANSWERED) :].split("(", 1)[0]] += 1
    report.server_answers = dict(answered.most_common())
    errors = logs / "server-errors.jsonl"
    if errors.exists():
        lines = errors.read_text().splitlines()
        report.server_exceptions = len(lines)
        report.escape_samples += [json.loads(line)["traceback"] for line in lines[:3]]
    report.acknowledged_requests = len(acknowledged)
    report.unsettled_requests = report.requests - len(acknowledged)
    for sends in spans.values():
        for send, (start, end, process) in sends.items():
            others = [(s, e, p) for other, (s, e, p) in sends.items() if other != send and s < end and start < e]
            report.duplicates_in_flight_together += bool(others)
            report.duplicates_in_flight_across_processes += any(p != process for _, _, p in others)

    async with admin.connect() as conn:
        like = {"prefix": prefix + "%", "scope": SCOPE}
        rows = (await conn.execute(text("SELECT key, id FROM payments WHERE key LIKE :prefix"), like)).all()
        records = (
            await conn.execute(
                text("SELECT key, status FROM idempotency_keys WHERE scope = :scope AND key LIKE :prefix"), like
            )
        ).all()
    payments: dict[str, set[int]] = defaultdict(set)
    for key, payment_id in rows:
        payments[key].add(payment_id)
    status = {str(key): str(s) for key, s in records}
    report.executions = len(rows)
    report.duplicate_effects = sum(len(ids) > 1 for ids in payments.values())
    report.lost_acknowledged_writes = sum(pid not in payments.get(key, set()) for key, pid in acknowledged.values())
    answers: dict[str, set[int]] = defaultdict(set)
    for key, payment_id in acknowledged.values():
        answers[key].add(payment_id)
    report.differing_answers = sum(len(ids) > 1 for ids in answers.values())
    report.payments_without_record = sum(status.get(key) != "COMPLETED" for key in payments)
    report.records_without_payment = sum(s == "COMPLETED" and key not in payments for key, s in status.items())
    report.records_in_progress = sum(s == "IN_PROGRESS" for s in status.values())


def print_report(report: Report, command: str) -> None:
    """Print ``report`` as a table of counts, the zero-targets marked."""
    zero = "  (target 0)"
    share = report.duplicates_sent / report.requests
    overrun = f"{report.max_deadline_overrun:.3f}" if report.mode == "direct" else "-"
    rows: list[tuple[str, object]] = [
        ("mode", report.mode),
        ("requests", report.requests),
        ("client processes", report.processes),
        ("uvicorn worker processes", report.server_processes if report.mode == "http" else "-"),
        ("distinct keys", report.keys),
        ("duplicates sent (same key again)", f"{report.duplicates_sent} ({share:.0%})"),
        ("requests in flight with another of their key", report.duplicates_in_flight_together),
        ("  of which with one from another process", report.duplicates_in_flight_across_processes),
        ("attempts (requests + same-key retries)", report.attempts),
        ("requests acknowledged (success answered)", report.acknowledged_requests),
        ("requests never acknowledged (retries ran out)", report.unsettled_requests),
        ("executions (business rows)", report.executions),
        ("duplicate effects (keys with > 1 row)" + zero, report.duplicate_effects),
        ("lost acknowledged writes" + zero, report.lost_acknowledged_writes),
        ("keys acknowledged with differing answers" + zero, report.differing_answers),
        ("rows without a COMPLETED record" + zero, report.payments_without_record),
        ("COMPLETED records without a row" + zero, report.records_without_payment),
        ("IN_PROGRESS records left" + zero, report.records_in_progress),
        ("non-IdembarrierError escapes" + zero, report.escapes),
        ("HTTP 500s" + zero, report.http_500),
        ("exceptions leaving the app" + zero, report.server_exceptions),
        ("crashed client processes" + zero, report.crashed_clients),
        ("max overrun of a caller's deadline (s)", overrun),
        ("run time (s)", f"{report.seconds:.1f}"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows) + 2
    print(f"\n== fault storm, {report.mode}: {command}")
    for name, value in rows:
        print(f"{name:<{width}}{value:>10}")
    print(f"faults injected (total {sum(report.faults.values())}):")
    for kind, n in report.faults.items():
        print(f"  {kind:<{width - 2}}{n:>10}")
    print("outcomes of attempts, by exception type / HTTP status:")
    for kind, n in report.outcomes.items():
        print(f"  {kind:<{width - 2}}{n:>10}")
    if report.server_answers:
        print("failures the middleware answered 503, by exception type (from the server's log):")
        for kind, n in report.server_answers.items():
            print(f"  {kind:<{width - 2}}{n:>10}")
    for kind, sample in report.samples.items():
        print(f"  e.g. {kind}: {sample}")
    for sample in report.escape_samples:
        print(f"-- escaped:\n{sample}")
    violations = report.violations()
    if report.logs:
        print(f"logs of the processes: {report.logs}")
    print(f"VERDICT {report.mode}: " + ("OK" if not violations else "FAILED: " + "; ".join(violations)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000, help="requests per mode (default 5000)")
    parser.add_argument("--processes", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--duplicates", type=float, default=0.25, help="share of requests re-sending a key")
    parser.add_argument("--mode", choices=("direct", "http", "both"), default="both")
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument(
        "--rate", type=float, default=30.0, help="requests started per second per process; faults fall meanwhile"
    )
    parser.add_argument("--in-flight", type=int, default=24, help="requests in flight per process, at most")
    parser.add_argument("--deadline", type=float, default=1.5, help="a direct attempt's deadline, in seconds")
    parser.add_argument(
        "--max-silence", type=float, default=2.5, help="longest silence of a path, in seconds (beyond --deadline)"
    )
    parser.add_argument("--attempts", type=int, default=8, help="attempts per request (same key), at most")
    parser.add_argument("--abandon", type=float, default=0.02, help="share of HTTP attempts abandoned midway")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs of a storm that passed")
    parser.add_argument("--json", type=Path, default=None, help="also write the reports to this file")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if not 0 <= args.duplicates < 1 or args.processes < 1 or args.requests < 1:
        parser.error("need --requests >= 1, --processes >= 1 and 0 <= --duplicates < 1")
    return args


async def main_async(args: argparse.Namespace) -> list[Report]:
    url = make_url(args.database_url)
    await ensure_database(url)
    modes = ("direct", "http") if args.mode == "both" else (args.mode,)
    reports = []
    for mode in modes:
        logs = Path(tempfile.mkdtemp(prefix=f"fault-storm-{mode}-"))
        report = await storm(mode, url.render_as_string(hide_password=False), args, logs)
        if not report.violations() and not args.keep_logs:
            shutil.rmtree(logs)
            report.logs = ""
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reports = asyncio.run(main_async(args))
    command = " ".join(["python", "benchmarks/fault_storm.py", *(sys.argv[1:] if argv is None else argv)])
    for report in reports:
        print_report(report, f"{command} (seed {args.seed})")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) | {"violations": r.violations()} for r in reports], indent=2))
    return 1 if any(report.violations() for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())

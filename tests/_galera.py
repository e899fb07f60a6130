"""A two-node MariaDB Galera cluster on loopback ports, started for the tests that need a multi-primary engine.

Debian's packages: ``galera-4`` (the provider, ``/usr/lib/galera/libgalera_smm.so``) and ``mariadb-server``
(``mariadbd``, ``mariadb-install-db``); `.ci/run` installs them. Each node is a ``mariadbd`` of its own in a
temporary directory, with a defaults file of its own (nothing from ``/etc/mysql`` is read, so the machine's
own MariaDB on 3306 is never touched), on free ports of 127.0.0.1: one for clients, one for Galera's group
communication (``gmcast``), one for incremental state transfer (IST) and one for SST.

No state snapshot transfer runs: ``mariadb-install-db`` fills one data directory, which is copied for the
second node before either starts; the first node bootstraps the cluster (``--wsrep-new-cluster``) and the
second joins with ``wsrep_sst_method=skip``, which Galera documents for exactly this case (every node starts
from the same data). So neither rsync nor mariabackup is needed. The cluster is ready when both nodes report
``wsrep_cluster_size = 2``, ``wsrep_ready = ON`` and ``wsrep_local_state_comment = Synced``. On the way out
each node gets SIGTERM (a clean leave), then SIGKILL after a bound, and the directory is deleted.

The root user has an empty password over TCP, like the machine's server; ``mariadbd`` runs as root with
``--user=root`` when the session is root. Where a package is missing, the test fails under CI
(``IDEMBARRIER_CI``) and is skipped with the reason everywhere else (`tests.helpers.require`).
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests._postgres_server import free_port
from tests.helpers import require

if TYPE_CHECKING:
    from collections.abc import Iterator

PROVIDER = Path("/usr/lib/galera/libgalera_smm.so")
_START_TIMEOUT = 90.0  # two 2-core-shared starts plus the group forming; measured ~5 s when the machine is idle
_STOP_TIMEOUT = 30.0

# Throwaway nodes: durability buys nothing. The settings Galera requires are ROW binlog format, InnoDB and
# interleaved auto-increment locks (innodb_autoinc_lock_mode=2).
_CONFIG = """\
[mariadbd]
datadir = {datadir}
socket = {directory}/mariadbd.sock
pid-file = {directory}/mariadbd.pid
log-error = {directory}/error.log
port = {port}
bind-address = 127.0.0.1
{user}
binlog_format = ROW
default_storage_engine = InnoDB
innodb_autoinc_lock_mode = 2
innodb_buffer_pool_size = 32M
innodb_log_file_size = 8M
innodb_flush_log_at_trx_commit = 0
performance_schema = OFF
max_connections = 200
wsrep_on = ON
wsrep_provider = {provider}
wsrep_cluster_name = {cluster}
wsrep_cluster_address = gcomm://{peers}
wsrep_node_name = {name}
wsrep_node_address = 127.0.0.1:{gmcast}
wsrep_node_incoming_address = 127.0.0.1:{port}
wsrep_sst_method = rsync
wsrep_sst_receive_address = 127.0.0.1:{sst_port}
wsrep_provider_options = "gmcast.listen_addr=tcp://127.0.0.1:{gmcast};ist.recv_addr=127.0.0.1:{ist};gcache.size=16M;pc.recovery=FALSE"
"""


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found is None:
        require(False, f"{name} is not installed (Debian: apt-get install mariadb-server galera-4)")
        raise AssertionError("unreachable")  # require fails or skips
    return found


def binaries() -> tuple[str, str]:
    """``mariadbd`` and ``mariadb-install-db``, and the Galera provider; fails (CI) or skips when one is missing."""
    server, install = _binary("mariadbd"), _binary("mariadb-install-db")
    if not PROVIDER.exists():
        require(False, f"the Galera provider {PROVIDER} is missing (Debian: apt-get install galera-4)")
    return server, install


@dataclass
class Node:
    """One ``mariadbd`` of the cluster: its client port, its directory, its process."""

    name: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "", *, driver: str = "aiomysql") -> str:
        """An async SQLAlchemy URL of this node (root, no password), for ``database`` when given."""
        return f"mysql+{driver}://root@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> str:
        """The node's error log so far (startup, Galera's view changes, the reason it died)."""
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self, *names: str) -> dict[str, str]:
        """``SHOW GLOBAL STATUS`` values of this node, read with the ``mariadb`` client over TCP."""
        wanted = ",".join(f"'{n}'" for n in names)
        return _query(self.port, f"SHOW GLOBAL STATUS WHERE Variable_name IN ({wanted})")

    def sql(self, statement: str) -> None:
        """Run one statement on this node (the client, outside any transaction)."""
        _client(self.port, statement)


@dataclass
class Cluster:
    """A running two-node Galera cluster; ``nodes[0]`` bootstrapped it."""

    directory: Path
    nodes: list[Node] = field(default_factory=list)

    def stop(self) -> None:
        """SIGTERM every node (a clean leave), SIGKILL what outlives the bound, and delete the directory."""
        for node in reversed(self.nodes):  # the joiner leaves first: the bootstrap node keeps a primary view
            _stop(node)
        shutil.rmtree(self.directory, ignore_errors=True)


def _stop(node: Node) -> None:
    process = node.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _client(port: int, statement: str) -> str:
    done = subprocess.run(
        [_binary("mariadb"), "--no-defaults", "-h127.0.0.1", f"-P{port}", "-uroot", "-N", "-B", "-e", statement],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"mariadb -P{port} -e {statement!r}: {done.stderr.strip()}")
    return done.stdout


def _query(port: int, statement: str) -> dict[str, str]:
    rows = (line.split("\t", 1) for line in _client(port, statement).splitlines() if "\t" in line)
    return {row[0]: row[1] for row in rows}


def _synced(node: Node, size: int) -> bool:
    try:
        state = node.status("wsrep_cluster_size", "wsrep_ready", "wsrep_local_state_comment")
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return (
        state.get("wsrep_cluster_size") == str(size)
        and state.get("wsrep_ready") == "ON"
        and state.get("wsrep_local_state_comment") == "Synced"
    )


def _wait(node: Node, ready: Node | None, size: int, deadline: float) -> None:
    """Wait until ``node`` answers and (with ``ready``) both see the cluster at ``size``, Synced."""
    while True:
        assert node.process is not None
        if node.process.poll() is not None:
            raise RuntimeError(f"Galera node {node.name} exited with {node.process.returncode}:\n{node.log[-4000:]}")
        if _synced(node, size) and (ready is None or _synced(ready, size)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Galera node {node.name} did not sync within {_START_TIMEOUT} s:\n{node.log[-4000:]}")
        time.sleep(0.1)  # a server starting and a group forming: nothing to wait on but its status


def _system_user() -> str | None:
    """Whom ``mariadbd`` runs as: ourselves, or (a root session) the package's ``mysql`` account.

    Not root: the rsync daemon that Galera's state transfer starts would switch to ``nobody`` as root and
    could not write into the node's directory.
    """
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        require(False, "the system user mysql is missing (Debian's mariadb-server adds it)")
    return "mysql"


def start(size: int = 2) -> Cluster:
    """Start a Galera cluster of ``size`` nodes on free loopback ports; it is synced when this returns."""
    server, install = binaries()
    directory = Path(tempfile.mkdtemp(prefix="idembarrier-galera-"))
    cluster = Cluster(directory)
    user = _system_user()
    name = f"idembarrier-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + _START_TIMEOUT
    try:
        if user is not None:
            shutil.chown(directory, user, user)
        seed = _seed(server, install, directory, user, name, deadline)
        ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(size)]
        peers = ",".join(f"127.0.0.1:{gmcast}" for _, gmcast, _, _ in ports)
        for i, ports_of in enumerate(ports):
            node = _node(directory, f"node{i + 1}", ports_of, peers=peers, cluster=name, user=user)
            shutil.copytree(seed, node.directory / "data")
            if i > 0:  # only the first node may bootstrap the cluster; the others join it
                state = node.directory / "data" / "grastate.dat"
                state.write_text(state.read_text().replace("safe_to_bootstrap: 1", "safe_to_bootstrap: 0"))
            cluster.nodes.append(node)
        _own(directory, user)
        for i, node in enumerate(cluster.nodes):
            _launch(server, node, bootstrap=i == 0)
            _wait(node, cluster.nodes[0] if i else None, i + 1, deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _seed(server: str, install: str, directory: Path, user: str | None, cluster: str, deadline: float) -> Path:
    """The data directory every node starts from: installed, then run once as a one-node cluster.

    That one run records the cluster's position (its history UUID and seqno) both in InnoDB and in
    ``grastate.dat``, so that every copy of the directory starts at the same position of the same history.
    """
    node = _node(
        directory, "seed", (free_port(), free_port(), free_port(), free_port()), peers="", cluster=cluster, user=user
    )
    done = subprocess.run(
        [install, "--no-defaults", f"--datadir={node.directory / 'data'}", "--auth-root-authentication-method=normal",
         "--skip-test-db", "--innodb-log-file-size=8M", *([f"--user={user}"] if user else [])],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"mariadb-install-db exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    _own(directory, user)
    _launch(server, node, bootstrap=True)
    try:
        _wait(node, None, 1, deadline)
    finally:
        _stop(node)
    if node.process is not None and node.process.returncode != 0:
        raise RuntimeError(f"the seed node exited with {node.process.returncode}:\n{node.log[-4000:]}")
    return node.directory / "data"


def _node(
    directory: Path, name: str, ports: tuple[int, int, int, int], *, peers: str, cluster: str, user: str | None
) -> Node:
    port, gmcast, ist, sst = ports
    node = Node(name, port, directory / name)
    node.directory.mkdir()
    (node.directory / "my.cnf").write_text(
        _CONFIG.format(
            datadir=node.directory / "data", directory=node.directory, port=port,
            user=f"user = {user}" if user else "", provider=PROVIDER, cluster=cluster, peers=peers,
            name=name, gmcast=gmcast, ist=ist, sst_port=sst,
        )
    )  # fmt: skip
    return node


def _own(directory: Path, user: str | None) -> None:
    """Give everything under ``directory`` to ``user`` (a root session's nodes run as ``mysql``)."""
    if user is not None:
        for path in (directory, *directory.rglob("*")):
            shutil.chown(path, user, user)


def _launch(server: str, node: Node, *, bootstrap: bool) -> None:
    args = [server, f"--defaults-file={node.directory / 'my.cnf'}", *(["--wsrep-new-cluster"] if bootstrap else [])]
    node.process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@contextmanager
def galera_cluster(size: int = 2) -> Iterator[Cluster]:
    """A Galera cluster for the block; stopped (SIGTERM, then SIGKILL) and deleted on the way out."""
    cluster = start(size)
    try:
        yield cluster
    finally:
        with suppress(Exception):
            cluster.stop()


_shared: Cluster | BaseException | None = None


def shared() -> Cluster:
    """The session's cluster: started on first use, shared by every test module, stopped when the process exits.

    A start that failed is not retried: each later test fails the same way at once.
    """
    global _shared
    if _shared is None:
        try:
            _shared = start()
        except Exception as exc:
            _shared = exc
            raise
        atexit.register(_shared.stop)
    if isinstance(_shared, BaseException):
        raise RuntimeError("the session's Galera cluster did not start (see the first test that needed it)")
    return _shared

"""A real local Redis Cluster for tests: ``redis-server`` processes in cluster mode on loopback.

Three masters with one replica each by default, every node in its own folder under ``data_dir`` (``node-<port>/``:
``nodes.conf``, the append-only file with ``appendfsync always`` by default, ``redis-server.log``). The cluster is
formed by ``redis-cli --cluster create`` (the ``redis-cli`` next to the server binary that
:func:`index.redis_server.find_redis_server` finds), and :meth:`LocalRedisCluster.start` returns only once every
node says ``cluster_state:ok`` and every replica's link to its master is up.

Fault injection: :meth:`kill` a node (SIGKILL by default), :meth:`wait_failover` for its replica to take over its
slots, :meth:`restart` it (it rejoins, as a replica of whoever holds its slots now).

    with LocalRedisCluster(tmp_path) as cluster:
        rc = redis.cluster.RedisCluster.from_url(cluster.url)
        old = cluster.master_for_key("reid:gallery:{a}:x")
        cluster.kill(old)
        new = cluster.wait_failover(old)

A node's role is never cached: it is asked (``INFO replication``) each time, since failovers change it.
tests/test_redis_cluster_harness.py shows redis-py's cluster client on it: transactions on one hash tag, and WAIT
sent on the connection that did the write (the only one whose WAIT covers that write).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from index.redis_server import RedisBinaryNotFound, find_redis_server

__all__ = ["LocalRedisCluster", "Node", "find_redis_cli", "free_cluster_port"]

BUS_PORT_OFFSET = 10000  # Redis Cluster's node-to-node bus listens on port + 10000


class Node(NamedTuple):
    host: str
    port: int
    role: str  # "master", "replica", or "down" (not running, or not answering: SIGSTOPped)
    pid: int | None


def find_redis_cli(server_binary: str) -> str:
    """The ``redis-cli`` of the same build as ``server_binary`` (same folder), else the one on PATH."""
    cand = Path(server_binary).with_name("redis-cli")
    if cand.is_file():
        if not os.access(cand, os.X_OK):  # wheels sometimes lose the exec bit (as in find_redis_server)
            try:
                cand.chmod(cand.stat().st_mode | 0o111)
            except OSError:
                pass
        return str(cand)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise RedisBinaryNotFound(f"no redis-cli next to {server_binary} nor on PATH (needed for --cluster create)")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_cluster_port(host: str = "127.0.0.1", taken: set[int] = frozenset()) -> int:
    """A free port whose bus port (+10000) is free too, both below the kernel's ephemeral range.

    Not ``free_port()``: that returns an ephemeral port, whose +10000 may not exist (> 65535), and the kernel may hand
    an ephemeral port to an outgoing connection while its node is down, so :meth:`LocalRedisCluster.restart` could
    not bind it again. Ports below the ephemeral range are never used as the local end of a connection."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    hi = max(low - BUS_PORT_OFFSET, 11000)
    for _ in range(500):
        port = random.randrange(10000, hi)
        if port in taken or port + BUS_PORT_OFFSET in taken:
            continue
        if _bindable(host, port) and _bindable(host, port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found for a cluster node")


class _NodeProc:
    """One redis-server process of the cluster: its port, folder, command line, process and log file."""

    def __init__(self, port: int, folder: Path, args: list[str]):
        self.port = port
        self.folder = folder
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.log = None

    @property
    def log_path(self) -> Path:
        return self.folder / "redis-server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        self.close_log()
        self.log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=str(self.folder))
        except OSError:
            self.close_log()
            raise

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class LocalRedisCluster:
    """``masters`` masters with ``replicas_per_master`` replicas each, as child processes, formed and healthy."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        masters: int = 3,
        replicas_per_master: int = 1,
        binary: str | None = None,
        node_timeout_ms: int = 1000,
        appendfsync: str = "always",
        host: str = "127.0.0.1",
        start_timeout: float = 60.0,
    ):
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        if appendfsync not in ("always", "everysec"):
            raise ValueError(f"appendfsync must be always or everysec, got {appendfsync!r}")
        self.data_dir = Path(data_dir).resolve()
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.binary = binary
        self.node_timeout_ms = node_timeout_ms
        self.appendfsync = appendfsync
        self.host = host
        self.start_timeout = start_timeout
        self._procs: list[_NodeProc] = []
        # slot ranges a node served when kill() stopped it: what wait_failover() watches move to another node
        self._slots_at_kill: dict[int, list[tuple[int, int]]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        """``redis://host:port/0`` of the first live node. RedisCluster.from_url accepts ``/0`` (db 0 is the only
        one a cluster has; any other db in the URL is refused) and discovers the other nodes from this one."""
        for p in self._procs:
            if p.running:
                return f"redis://{self.host}:{p.port}/0"
        raise RuntimeError("LocalRedisCluster has no running node")

    @property
    def nodes(self) -> list[Node]:
        return [self._node(p) for p in self._procs]

    @property
    def pids(self) -> list[int]:
        return [p.proc.pid for p in self._procs if p.running]

    # ------------------------------------------------------------------ small helpers
    def _client(self, port: int) -> redis.Redis:
        # Short timeouts and no retries: a killed or stopped node must not stall the polling loops below (redis-py
        # retries a timed-out command by default, which makes one question to a SIGSTOPped node last ~15 s).
        return redis.Redis(host=self.host, port=port, socket_timeout=1, socket_connect_timeout=1,
                           decode_responses=True, retry=Retry(NoBackoff(), 0))

    def _ask(self, port: int, *cmd):
        """One command on a fresh connection to one node (a plain client, no cluster redirections)."""
        c = self._client(port)
        try:
            return c.execute_command(*cmd)
        finally:
            c.close()

    def _proc(self, node: Node | int) -> _NodeProc:
        port = node if isinstance(node, int) else node.port
        for p in self._procs:
            if p.port == port:
                return p
        raise KeyError(f"no node on port {port} in this cluster")

    def _role(self, p: _NodeProc) -> str:
        if not p.running:
            return "down"
        try:
            role = self._ask(p.port, "INFO", "replication")["role"]
        except redis.RedisError:
            return "down"
        return "replica" if role == "slave" else role

    def _node(self, p: _NodeProc) -> Node:
        return Node(self.host, p.port, self._role(p), p.proc.pid if p.running else None)

    def _live(self) -> list[_NodeProc]:
        return [p for p in self._procs if p.running]

    def _slot_owner(self, slot: int, via: int) -> int | None:
        """Port of the master serving ``slot`` as node ``via`` sees it (CLUSTER SLOTS), None if uncovered."""
        # a plain client returns CLUSTER SLOTS raw: [[start, end, [host, port, id], [replica...]...], ...]
        for start, end, primary, *_ in self._ask(via, "CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1])
        return None

    def _own_slots(self, port: int) -> list[tuple[int, int]]:
        """The slot ranges ``port`` serves, as the first node that answers sees them (itself last: it may be
        stopped)."""
        for p in sorted(self._live(), key=lambda q: q.port == port):
            try:
                slots = self._ask(p.port, "CLUSTER SLOTS")
            except redis.RedisError:
                continue
            return [(int(start), int(end)) for start, end, primary, *_ in slots if int(primary[1]) == port]
        return []

    def _cluster_ok(self, port: int) -> bool:
        return self._ask(port, "CLUSTER INFO").get("cluster_state") == "ok"

    def _link_up(self, port: int) -> bool:
        info = self._ask(port, "INFO", "replication")
        return info["role"] != "slave" or info.get("master_link_status") == "up"

    def _aof_idle(self, port: int) -> bool:
        # A replica rewrites its AOF after each full sync; until that ends it refuses SHUTDOWN ("Writing initial
        # AOF, can't exit"), and its AOF does not hold the synced data yet: start/restart wait for it.
        info = self._ask(port, "INFO", "persistence")
        return not int(info.get("aof_rewrite_in_progress", 0)) and not int(info.get("aof_rewrite_scheduled", 0))

    def _wait(self, what: str, check, timeout: float):
        """Poll ``check()`` until it returns something truthy; node errors while polling count as 'not yet'."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                got = check()
                if got:
                    return got
            except (redis.RedisError, OSError, KeyError) as e:
                last = e
            time.sleep(0.05)
        logs = "\n".join(f"--- node {p.port} ({'up' if p.running else 'down'}):\n{p.log_tail(600)}"
                         for p in self._procs)
        raise TimeoutError(f"{what}: not within {timeout:.0f}s (last error: {last!r})\n{logs}")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalRedisCluster":
        if self._procs:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A folder with a nodes.conf belongs to an earlier cluster (other ports, other ids): this harness only
        # creates new clusters, so it refuses rather than mixing the two.
        old = sorted(self.data_dir.glob("node-*/nodes.conf"))
        if old:
            raise RuntimeError(f"{self.data_dir} already holds a cluster ({old[0]}): use an empty data_dir")
        binary = self.binary or find_redis_server()
        cli = find_redis_cli(binary)
        try:
            for _ in range(self.masters * (1 + self.replicas_per_master)):
                self._start_node(binary)
            self._create(cli)
            self.wait_healthy(self.start_timeout)
        except BaseException:
            self.stop()  # never leave half a cluster running
            raise
        return self

    def _node_args(self, binary: str, port: int, folder: Path) -> list[str]:
        return [
            binary,
            "--bind", self.host,
            "--port", str(port),
            "--dir", str(folder),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # a replica may take over however long its link was down: a test that kills a master right after
            # a pause must still see a failover (the data it has is what WAIT acknowledged)
            "--cluster-replica-validity-factor", "0",
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--appendfilename", "appendonly.aof",
            "--save", "",
            # replicas sync over the socket at once (the default waits 5 s for more replicas, or writes an RDB)
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
            "--loglevel", "notice",
        ]

    def _start_node(self, binary: str) -> None:
        taken = {p.port for p in self._procs} | {p.port + BUS_PORT_OFFSET for p in self._procs}
        last = ""
        for _ in range(5):  # a port can be taken between the check and the bind: try another one
            port = free_cluster_port(self.host, taken)
            folder = self.data_dir / f"node-{port}"
            folder.mkdir(parents=True, exist_ok=True)
            p = _NodeProc(port, folder, self._node_args(binary, port, folder))
            self._procs.append(p)
            p.spawn()
            try:
                self._wait_ping(p, 15.0)
                return
            except RuntimeError as e:
                last = str(e)
                self._kill_proc(p)
                self._procs.remove(p)
                taken.add(port)
        raise RuntimeError(f"could not start a cluster node: {last}")

    def _wait_ping(self, p: _NodeProc, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not p.running:
                raise RuntimeError(f"redis-server on port {p.port} exited with code {p.proc.returncode}: "
                                   f"{p.log_tail()}")
            try:
                if self._ask(p.port, "PING"):
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {p.port} did not answer PING within {timeout}s: {p.log_tail()}")

    def _create(self, cli: str) -> None:
        addrs = [f"{self.host}:{p.port}" for p in self._procs]
        cmd = [cli, "--cluster", "create", *addrs, "--cluster-replicas", str(self.replicas_per_master),
               "--cluster-yes"]
        log_path = self.data_dir / "cluster-create.log"
        with open(log_path, "wb") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=self.start_timeout).returncode
        if rc != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {rc}:\n{log_path.read_text()[-3000:]}")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node: ``cluster_state:ok`` and knows every node; every replica: link to its master up;
        ``masters`` masters in all."""
        n = len(self._procs)

        def healthy() -> bool:
            live = self._live()
            for p in live:
                info = self._ask(p.port, "CLUSTER INFO")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != n:
                    return False
                if not self._link_up(p.port) or not self._aof_idle(p.port):
                    return False
            return sum(self._role(p) == "master" for p in live) == self.masters

        self._wait("cluster healthy", healthy, timeout)

    # ------------------------------------------------------------------ topology
    def master_for_key(self, key: str | bytes) -> Node:
        """The master serving ``key``'s hash slot now (its hash tag ``{...}``, if any, decides the slot)."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for p in self._live():
            try:
                port = self._slot_owner(slot, p.port)
            except redis.RedisError:
                continue
            if port is not None:
                return self._node(self._proc(port))
        raise RuntimeError(f"no live node knows who serves slot {slot}")

    def replica_of(self, master: Node | int) -> Node:
        port = master if isinstance(master, int) else master.port
        for p in self._live():
            try:
                info = self._ask(p.port, "INFO", "replication")
            except redis.RedisError:
                continue
            if info["role"] == "slave" and int(info["master_port"]) == port:
                return self._node(p)
        raise LookupError(f"no live replica of the node on port {port}")

    # ------------------------------------------------------------------ faults
    def kill(self, node: Node | int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a node (SIGKILL by default: no chance to say goodbye to the cluster). SIGKILL and SIGTERM
        wait for the process to end; SIGSTOP / SIGCONT just send."""
        p = self._proc(node)
        if not p.running:
            return
        ends = sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
        if ends:  # remember what it served, for wait_failover()
            self._slots_at_kill[p.port] = self._own_slots(p.port)
        p.proc.send_signal(sig)
        if ends:
            p.proc.wait(timeout=30)
            p.close_log()

    def wait_failover(self, old_master: Node | int, timeout: float = 30.0) -> Node:
        """Wait until the slots ``old_master`` served (when :meth:`kill` stopped it) are served by another node
        that says it is a master, as every live node sees it, and every live node says ``cluster_state:ok``.
        Returns that node (the promoted replica)."""
        old = old_master if isinstance(old_master, int) else old_master.port
        ranges = self._slots_at_kill.get(old)
        if not ranges:
            raise ValueError(f"node {old} served no slots when kill() stopped it: nothing fails over")
        slot = ranges[0][0]  # a master's slots move together in a failover: one tells for all

        def promoted() -> Node | None:
            owners = set()
            for p in self._live():
                if not self._cluster_ok(p.port):
                    return None
                owners.add(self._slot_owner(slot, p.port))
            if len(owners) != 1:
                return None
            (port,) = owners
            if port is None or port == old:
                return None
            node = self._node(self._proc(port))
            return node if node.role == "master" else None

        return self._wait(f"failover of the slots of node {old}", promoted, timeout)

    def restart(self, node: Node | int, timeout: float = 30.0) -> Node:
        """Start a killed node again on its port and folder: its nodes.conf brings it back into the cluster, as a
        replica of the node that took its slots over (if one did). Returns once it is in sync (link up, state ok)."""
        p = self._proc(node)
        if p.running:
            return self._node(p)
        ranges = self._slots_at_kill.get(p.port, [])

        def back() -> bool:
            # Right after start the node believes its nodes.conf (it may still claim the slots it had): wait for
            # the role the others give it. Still the owner of its slots (no failover happened): a master;
            # otherwise a replica whose link to its master is up.
            if not self._cluster_ok(p.port):
                return False
            others = [q for q in self._live() if q is not p]
            still_owner = bool(ranges and others) and self._slot_owner(ranges[0][0], others[0].port) == p.port
            info = self._ask(p.port, "INFO", "replication")
            if still_owner:
                return info["role"] == "master" and self._aof_idle(p.port)
            return info["role"] == "slave" and info.get("master_link_status") == "up" and self._aof_idle(p.port)

        p.spawn()
        try:
            self._wait_ping(p, timeout)
            self._wait(f"node {p.port} back in the cluster", back, timeout)
        except BaseException:
            self._kill_proc(p)
            raise
        self._slots_at_kill.pop(p.port, None)
        return self._node(p)

    # ------------------------------------------------------------------ shutdown
    def _kill_proc(self, p: _NodeProc) -> None:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
        if p.proc is not None:
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        p.close_log()

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN NOSAVE every node (the AOF is flushed anyway; NOSAVE skips an RDB), then kill what is left."""
        for p in self._procs:
            if p.running:
                p.proc.send_signal(signal.SIGCONT)  # a node stopped with SIGSTOP could not answer
                self._send_shutdown(p.port)
        deadline = time.monotonic() + timeout
        for p in self._procs:
            # A node can refuse SHUTDOWN for a moment (a replica writing its initial AOF): ask again until the
            # deadline, then kill it.
            while p.running and time.monotonic() < deadline:
                try:
                    p.proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    self._send_shutdown(p.port)
            self._kill_proc(p)
        self._procs = []
        self._slots_at_kill.clear()

    def _send_shutdown(self, port: int) -> None:
        try:
            # raw RESP over a socket, as EmbeddedRedis.stop does: redis-py would retry the dropped connection
            with socket.create_connection((self.host, port), timeout=2) as sock:
                sock.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
                sock.recv(64)  # b"" once the server closed the connection; an -ERR if it refused
        except OSError:
            pass

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # pragma: no cover - safety net only
        try:
            for p in self._procs:
                if p.proc is not None and p.proc.poll() is None:
                    p.proc.kill()
        except Exception:
            pass

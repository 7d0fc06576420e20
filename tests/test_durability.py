"""Crashes and Redis faults lose no acknowledged image (README "Durability").

The crash tests run the API as a real process (``reid serve``) on a real redis-server, with 4 concurrent
clients uploading 1,000 distinct images in batches; mid-way the API, Redis, or both get SIGKILL and are
started again. Clients retry what was not acknowledged, as a camera uploader would (ids are content
hashes, so a retry is harmless). Afterwards every acknowledged image is stored once and found first by
a search with its own bytes, and no request ever got a 500.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import redis

from index.durability import DurablePipeline, NotDurable, WriteWait, probe
from index.redis_server import EmbeddedRedis, find_redis_server, free_port
from index.store import RedisStore
from service.api_process import ApiProcess, gallery_count, noise_images, pid_alive, top1, upload

N_IMAGES = 1000
CLIENTS = 4
BATCH = 10
KILL_AFTER = 300  # acknowledged images before the fault (then, for the API, a periodic snapshot and more writes)


@dataclass
class Clients:
    """4 uploader threads; ``gate`` closed = they wait instead of sending (while the API is down)."""

    url: str
    gallery: str
    images: list[bytes]
    acked: dict[int, int] = field(default_factory=dict)  # image index -> id
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    unexpected: list[str] = field(default_factory=list)
    in_flight_failures: set[int] = field(default_factory=set)  # batches whose request failed without an answer
    created: int = 0
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.gate.set()
        batches = [list(range(i, min(i + BATCH, len(self.images)))) for i in range(0, len(self.images), BATCH)]
        self.threads = [threading.Thread(target=self._run, args=(batches[c::CLIENTS],), daemon=True)
                        for c in range(CLIENTS)]

    def start(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "uploads did not finish in time"

    def _run(self, batches: list[list[int]]) -> None:
        client = httpx.Client(timeout=30)
        deadline = time.monotonic() + 240
        for b, batch in enumerate(batches):
            while time.monotonic() < deadline:
                self.gate.wait()
                try:
                    r = client.post(f"{self.url}/v1/galleries/{self.gallery}/images",
                                    files=[("files", (f"{i}.png", self.images[i], "image/png")) for i in batch])
                except httpx.HTTPError:  # the API died with this request in flight
                    with self.lock:
                        self.in_flight_failures.add(batch[0])
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                if r.status_code == 201:
                    items = r.json()["items"]
                    with self.lock:
                        for it in items:
                            self.acked[batch[it["index"]]] = it["id"]
                            self.created += it["status"] == "created"
                    break
                if r.status_code == 503:
                    body = r.json()
                    if body["error"]["code"] not in ("store_unavailable", "not_ready") or \
                            not r.headers.get("retry-after", "").isdigit():
                        self.unexpected.append(f"503 without store_unavailable + Retry-After: {r.text}")
                    time.sleep(0.1)
                    continue
                self.unexpected.append(f"{r.status_code}: {r.text[:300]}")
                break
        client.close()

    def wait_acked(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} images acknowledged"
            assert not self.unexpected, self.unexpected
            time.sleep(0.01)


def _check_acked_searchable(url: str, gallery: str, images: list[bytes], acked: dict[int, int]) -> None:
    order = sorted(acked)
    found = top1(url, gallery, [images[i] for i in order])
    wrong = [(i, acked[i], f) for i, f in zip(order, found) if f != acked[i]]
    assert not wrong, f"{len(wrong)} acknowledged images not found first by their own bytes: {wrong[:5]}"


def _check_final(clients: Clients, url: str, redis_url: str) -> None:
    images, g = clients.images, clients.gallery
    assert not clients.unexpected, clients.unexpected
    assert 500 not in clients.statuses, clients.statuses
    assert len(clients.acked) == N_IMAGES
    assert len(set(clients.acked.values())) == N_IMAGES  # distinct ids: nothing stored twice
    assert clients.created <= N_IMAGES
    assert gallery_count(url, g) == N_IMAGES
    store = RedisStore(redis_url)
    try:  # never a partial write: every vector has its metadata and bytes
        ids = store.vector_ids(g)
        assert ids == set(clients.acked.values())
        assert all(rec is not None for rec in store.get_many(g, sorted(ids)))
        assert store.count_images(g) == N_IMAGES
    finally:
        store.close()
    _check_acked_searchable(url, g, images, clients.acked)
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def _redis_url_of(api: ApiProcess) -> str:
    import json

    port = json.loads((api.data_dir / "redis" / "embedded.json").read_text())["port"]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def images():
    return noise_images(N_IMAGES, seed=11)


def _kill_and_restart_api(api: ApiProcess, clients: Clients, kill_redis: bool, procs: list) -> ApiProcess:
    """Close the gate, SIGKILL (the API, and its embedded redis-server too if asked), start a new API on the same
    port and data dir, check that what was acknowledged survived, then open the gate."""
    deadline = time.monotonic() + 20
    clients.gate.clear()  # uploads wait for the snapshot: at full speed they could all finish before it
    while not api.metric("reid_index_snapshot_writes_total"):  # a periodic snapshot exists, then more writes
        assert time.monotonic() < deadline, "no periodic snapshot"
        time.sleep(0.05)
    clients.gate.set()
    clients.wait_acked(len(clients.acked) + 2 * BATCH)
    clients.gate.clear()
    redis_pid = api.redis_pid()
    assert redis_pid is not None and pid_alive(redis_pid)
    with clients.lock:
        before = dict(clients.acked)
    if kill_redis:
        os.kill(redis_pid, signal.SIGKILL)
    api.kill()
    time.sleep(0.3)  # requests that were in flight fail now
    with clients.lock:
        acked, in_flight = dict(clients.acked), len(clients.in_flight_failures)
    assert set(before) <= set(acked)
    assert pid_alive(redis_pid) != kill_redis  # SIGKILLed API: its redis-server is orphaned, still holding the AOF
    api2 = ApiProcess(api.data_dir, api.model_dir, port=api.port, log_path=api.log_path)
    procs.append(api2)  # killed by the test even if a check below fails
    api2.start()
    assert not pid_alive(redis_pid), "the new API must stop the orphaned redis-server, not run beside it"
    if not kill_redis:
        assert "left by an earlier run still holds" in api2.log()
    assert api2.redis_pid() != redis_pid
    # the periodic snapshot (REID_SNAPSHOT_INTERVAL_S=1) was loaded and the log replayed over it: no rebuild
    assert api2.metric("reid_index_snapshot_loads_total") == 1 and api2.metric("reid_index_rebuilds_total") == 0
    n = gallery_count(api2.url, clients.gallery)
    # stored: everything acknowledged, plus at most the batches whose answer the kill cut off (up to 1 per client)
    assert len(acked) <= n <= len(acked) + CLIENTS * BATCH, (n, len(acked), in_flight)
    _check_acked_searchable(api2.url, clients.gallery, clients.images, acked)
    clients.gate.set()
    return api2


@pytest.mark.slow
@pytest.mark.parametrize("kill_redis", [False, True], ids=["api", "api+redis"])
def test_sigkill_api_loses_no_acknowledged_image(tmp_path, tiny_bundle, images, kill_redis):
    """Embedded default (the API owns its redis-server): SIGKILL the API (and its Redis, for api+redis) mid-way."""
    api = ApiProcess(tmp_path / "data", tiny_bundle, env={"REID_SNAPSHOT_INTERVAL_S": "1"})
    procs = [api]
    try:
        api.start()
        clients = Clients(api.url, "cams", images).start()
        clients.wait_acked(KILL_AFTER)
        api2 = _kill_and_restart_api(api, clients, kill_redis, procs)
        clients.join(240)
        _check_final(clients, api2.url, _redis_url_of(api2))
        redis_pid = api2.redis_pid()
        api2.stop()
        assert "Application shutdown complete" in api2.log(), api2.log()[-2000:]  # (uvicorn re-raises SIGTERM)
        assert not pid_alive(redis_pid), "a clean stop stops the embedded redis-server"
        assert (tmp_path / "data" / "index" / "cams.faiss").exists()  # snapshot at shutdown
    finally:
        for a in procs:  # the APIs first: a live one would start its redis-server again
            a.kill()
        pid = api.redis_pid()
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_redis_gives_503_then_recovers(tmp_path, tiny_bundle, images):
    """External Redis killed with SIGKILL mid-way and started again: clients see 503 + Retry-After (never a 500),
    the API recovers by itself and nothing acknowledged is lost."""
    srv = EmbeddedRedis(tmp_path / "redis").start()
    api = ApiProcess(tmp_path / "data", tiny_bundle, redis_url=srv.url).start()
    try:
        clients = Clients(api.url, "cams", images).start()
        clients.wait_acked(KILL_AFTER)
        srv.kill()
        time.sleep(1.5)
        r = httpx.get(f"{api.url}/readyz", timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"].isdigit()
        srv.start()  # same port; the AOF is replayed
        clients.join(240)
        assert clients.statuses.get(503, 0) > 0, clients.statuses  # the fault was seen
        deadline = time.monotonic() + 10
        while httpx.get(f"{api.url}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{api.url}/readyz").text
            time.sleep(0.1)
        _check_final(clients, api.url, srv.url)
        assert api.metric("reid_index_resyncs_total") >= 1
    finally:
        api.kill()
        srv.stop()


def test_embedded_redis_that_dies_is_restarted(tmp_path, tiny_bundle, image_bytes):
    """The API's own redis-server gets SIGKILL: /readyz is 503, then the API starts it again and is ready."""
    api = ApiProcess(tmp_path / "data", tiny_bundle).start()
    try:
        assert upload(api.url, "g", [("a.png", image_bytes(1))]).status_code == 201
        old = api.redis_pid()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(f"{api.url}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, api.log()[-2000:]
            time.sleep(0.1)
        assert api.redis_pid() not in (None, old)
        assert upload(api.url, "g", [("b.png", image_bytes(2))]).status_code == 201
        assert top1(api.url, "g", [image_bytes(1), image_bytes(2)])[0] is not None
        assert gallery_count(api.url, "g") == 2
    finally:
        pid = api.redis_pid()
        api.stop()
        assert pid is None or not pid_alive(pid)


# ---------------------------------------------------------------------------- durability settings


def test_probe_embedded_always_and_everysec(tmp_path):
    with EmbeddedRedis(tmp_path / "a") as srv:
        r = redis.Redis.from_url(srv.url)
        p = probe(r)
        assert (p.appendonly, p.appendfsync, p.durable, p.warning) == ("yes", "always", True, None)
        assert not p.use_waitaof
    with EmbeddedRedis(tmp_path / "b", appendfsync="everysec") as srv:
        r = redis.Redis.from_url(srv.url)
        assert r.config_get("appendfsync")["appendfsync"] == "everysec"
        opted = probe(r, "everysec")
        assert opted.durable is False and "1 s" in opted.warning and not opted.use_waitaof
        strict = probe(r, "always")  # an external server on everysec, the service asking for always
        if strict.has_waitaof:
            assert strict.use_waitaof and strict.durable
        else:
            assert strict.durable is False and "WAITAOF" in strict.warning


def test_probe_tolerates_disabled_config(tmp_path):
    """Managed Redis often disables CONFIG: the probe says it cannot tell instead of failing."""
    import subprocess

    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--rename-command", "CONFIG", '""', "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with pytest.raises(redis.ResponseError):
            r.config_get("appendonly")
        p = probe(r)
        assert p.appendonly is None and p.appendfsync is None
        if p.has_waitaof:  # WAITAOF itself tells that the AOF is off
            assert p.durable is False
        else:
            assert p.durable is None and "CONFIG" in p.warning
    finally:
        proc.kill()
        proc.wait()


def test_readyz_shows_everysec_loss_window(server_factory, tmp_path):
    srv = server_factory(redis_url=None, data_dir=tmp_path / "d", redis_appendfsync="everysec")
    r = httpx.get(f"{srv.url}/readyz")
    assert r.status_code == 200, r.text  # a chosen loss window is not an outage
    d = r.json()["checks"]["durability"]
    assert d["appendfsync"] == "everysec" and d["durable"] is False and "1 s" in d["warning"]
    assert "reid_store_durable 0.0" in httpx.get(f"{srv.url}/metrics").text


def test_waitaof_pipeline_on_a_server_that_has_it(tmp_path):
    """WAITAOF (Redis >= 7.2): a write on an everysec server returns only once fsynced. Skipped on older servers."""
    with EmbeddedRedis(tmp_path / "r", appendfsync="everysec") as srv:
        r = redis.Redis.from_url(srv.url)
        p = probe(r, "always")
        if not p.has_waitaof:
            pytest.skip(f"redis-server {p.version} has no WAITAOF (needs >= 7.2)")
        assert p.use_waitaof and p.durable
        store = RedisStore(srv.url, wait_aof_ms=2000)
        store.put("g", 1, np.ones(4, np.float32))
        assert store.count("g") == 1
        pipe = DurablePipeline(r, WriteWait(aof_ms=1))
        pipe.set("k", "v")
        try:
            pipe.execute()
        except NotDurable:
            pass  # 1 ms may or may not see the fsync; it must not be retried as a connection error

"""Issue 18: how an import job ends. A cancelled or crashed import keeps its last counts in ``result``; a job left
running by a process that died is failed when the service starts again (the next import is accepted at once,
not ``409 job_running``); an import that stored nothing ends ``failed``.

Real uvicorn, real redis-server, the tiny ONNX model; the crash is a SIGKILL of a real ``reid serve`` process.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid

import httpx
import redis

from index.job_store import JobStore
from service.api_process import ApiProcess, gallery_count
from service.jobs import JobManager, process_identity
from tests.archives import tar_bytes


def _start_import(base: str, gallery: str, data: bytes) -> str:
    r = httpx.post(f"{base}/v1/galleries/{gallery}/imports", files=[("files", ("big.tar", data))], timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait(base: str, job_id: str, until, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _progressed(n: int):
    return lambda job: job["status"] not in ("queued", "running") or (job["result"] or {}).get("done", 0) >= n


def test_a_cancelled_import_keeps_its_counts(server_factory, gallery_name, image_bytes):
    base, g = server_factory(import_chunk=1, batch_max_delay_ms=0).url, gallery_name
    job_id = _start_import(base, g, tar_bytes({f"cam/{i}.png": image_bytes(3000 + i, size=(64, 128)) for i in range(300)}))
    _wait(base, job_id, _progressed(3))
    r = httpx.delete(f"{base}/v1/jobs/{job_id}", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    res = r.json()["result"]
    assert res is not None and 3 <= res["done"] < 300
    # the counts are those of the images stored until the work stopped
    assert res["created"] == gallery_count(base, g) and res["failed"] == 0
    assert httpx.get(f"{base}/v1/jobs/{job_id}").json()["result"] == res


def test_an_import_that_stored_nothing_fails(live_server, gallery_name):
    base, g = live_server, gallery_name
    job_id = _start_import(base, g, tar_bytes({f"bad{i}.jpg": b"not an image" for i in range(3)}))
    job = _wait(base, job_id, lambda j: j["status"] not in ("queued", "running"))
    assert job["status"] == "failed" and "none of the 3" in job["message"], job
    assert job["result"]["failed"] == 3 and job["result"]["created"] == 0 and len(job["result"]["errors"]) == 3


def test_a_crashed_import_is_failed_at_restart_with_its_counts(tmp_path, tiny_bundle, redis_url, image_bytes):
    g, env = "crash", {"REID_IMPORT_CHUNK": "1", "REID_BATCH_MAX_DELAY_MS": "0"}
    data = tar_bytes({f"cam/{i}.png": image_bytes(4000 + i, size=(64, 128)) for i in range(300)})
    api = ApiProcess(tmp_path / "data", tiny_bundle, redis_url=redis_url, env=env).start()
    try:
        job_id = _start_import(api.url, g, data)
        _wait(api.url, job_id, _progressed(5))
        api.kill()
        api = ApiProcess(tmp_path / "data", tiny_bundle, redis_url=redis_url, env=env).start()
        job = httpx.get(f"{api.url}/v1/jobs/{job_id}").json()
        assert job["status"] == "failed" and "stopped" in job["message"], job
        res = job["result"]
        assert res is not None and 5 <= res["done"] < 300
        assert 5 <= res["created"] <= gallery_count(api.url, g)  # a chunk stored after the last report is uncounted
        # the kind is free at once: the retry is accepted and skips what was stored
        retry = _start_import(api.url, g, data)
        job = _wait(api.url, retry, lambda j: j["status"] not in ("queued", "running"))
        assert job["status"] == "succeeded" and job["result"]["created"] + job["result"]["exists"] == 300, job
        assert gallery_count(api.url, g) == 300
    finally:
        api.stop()


def _dead_process_identity() -> str:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    finally:
        proc.kill()
        proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:{start}"


def test_only_jobs_of_dead_processes_of_this_host_are_orphans(redis_url):
    store = JobStore(redis.Redis.from_url(redis_url))
    dead, alive, elsewhere = (uuid.uuid4().hex for _ in range(3))
    for job_id, kind, owner in ((dead, "import", _dead_process_identity()), (alive, "adapt", process_identity()),
                                (elsewhere, "activate", "another-host:1:123")):
        assert store.claim(kind, job_id) is None
        store.create(job_id, kind, None, {}, owner=owner)
        store.update(job_id, status="running", result={"done": 7})
    mgr = JobManager(store, owner=f"{socket.gethostname()}:0:fresh")  # a new process of this host starting
    assert mgr.fail_orphans() == [dead]
    got = store.get(dead)
    assert got["status"] == "failed" and got["result"] == {"done": 7}
    assert store.get(alive)["status"] == "running" and store.get(elsewhere)["status"] == "running"
    assert store.claim("import", uuid.uuid4().hex) is None  # its kind was freed at once


def test_a_lock_left_by_a_finished_job_does_not_block(redis_url):
    store = JobStore(redis.Redis.from_url(redis_url))
    old = uuid.uuid4().hex
    assert store.claim("import", old) is None
    store.create(old, "import", None, {})
    store.finish(old, "failed", "gone")  # its process died before releasing the lock
    mgr = JobManager(store)
    job = mgr.start("import", None, {}, lambda ctx: {"ok": True})
    assert job["id"] != old
    mgr.shutdown()

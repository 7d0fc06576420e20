"""An ``activate`` entry of the change log replayed by :meth:`service.index_sync.IndexSync.reconcile`: at start-up
from a snapshot older than the activation, and by a running follower that resynchronises after losing Redis.

Real uvicorn servers in process (so the tests can reach their state), real redis-servers, real ONNX bundles. The
activation itself is the HTTP job of another replica (``POST /v1/models/{id}/activate``), as in production.
"""

from __future__ import annotations

import logging
import shutil

import httpx
import pytest

from conftest import within, write_tiny_bundle
from index.redis_server import EmbeddedRedis
from index.store import image_id


def _upload(base: str, gallery: str, blobs: list[bytes]) -> None:
    files = [("files", (f"{n}.png", data, "image/png")) for n, data in enumerate(blobs)]
    r = httpx.post(f"{base}/v1/galleries/{gallery}/images", files=files, timeout=60)
    assert r.status_code == 201, r.text


def _search(base: str, gallery: str, data: bytes) -> dict:
    r = httpx.post(f"{base}/v1/galleries/{gallery}/search", files={"file": ("q.png", data, "image/png")},
                   data={"top_k": "2", "refine": "none"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _activate(base: str, bundle_id: str) -> None:
    r = httpx.post(f"{base}/v1/models/{bundle_id}/activate", timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    within(60, lambda: httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] not in ("queued", "running"))
    job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job


def _active(base: str) -> str:
    return httpx.get(f"{base}/v1/models").json()["active"]["bundle_id"]


def test_a_process_whose_snapshot_is_older_than_an_activation_starts(server_factory, make_settings, tmp_path,
                                                                     gallery_name, image_bytes):
    """The snapshot stays valid across the activation (the activated bundle is the same model under another id),
    so the restart loads it instead of rebuilding, and serves the bundle that Redis records as active (it reads
    that at start, so the global log's ``activate`` entry need not be replayed)."""
    g = gallery_name
    settings = make_settings()
    # another replica, with its own snapshots; the kept bytes (the blob store) are shared, as replicas must
    other = make_settings(data_dir=tmp_path / "other", blob_dir=settings.blob_path)
    for s in (settings, other):
        shutil.copytree(s.model_dir, s.bundles_dir / "same")
    blobs = [image_bytes(n) for n in range(4)]

    a = server_factory(settings)
    _upload(a.url, g, blobs)
    a.stop()  # writes the snapshot at the log's current position
    b = server_factory(other)
    _activate(b.url, "same")
    b.stop()

    a = server_factory(settings)  # this start used to fail with a TypeError when it replayed the activate entry
    state = a.app.state.reid
    assert state.sync.loaded[g] == "snapshot"
    assert state.sync.stats["events_replayed_at_start"] == 0  # the gallery's log did not move; nothing to rebuild
    assert state.bundle_id == "same" and _active(a.url) == "same"
    assert _search(a.url, g, blobs[2])["results"][0]["id"] == image_id(g, blobs[2])
    assert httpx.get(f"{a.url}/readyz").status_code == 200


def test_a_follower_resynchronising_after_losing_redis_replays_an_activation(server_factory, make_settings, tmp_path,
                                                                            gallery_name, image_bytes, caplog):
    """Replica A's follower misses another replica's activation (held back, then Redis goes away): once Redis is
    back it resynchronises, replaying the ``activate`` entry, and serves the activated model."""
    g = gallery_name
    srv = EmbeddedRedis(tmp_path / "redis").start()
    servers = []
    try:
        settings = make_settings(data_dir=tmp_path / "a", redis_url=srv.url)
        other = make_settings(data_dir=tmp_path / "b", redis_url=srv.url, blob_dir=settings.blob_path)
        for s in (settings, other):
            write_tiny_bundle(s.bundles_dir / "alt", seed=7, name="tiny-alt", version="0.0.2")
        blobs = [image_bytes(n) for n in range(4)]
        servers.append(a := server_factory(settings))
        servers.append(b := server_factory(other))
        _upload(a.url, g, blobs)
        state = a.app.state.reid
        state.follower.stop()  # A falls behind
        _activate(b.url, "alt")
        assert state.bundle_id == "default"

        caplog.set_level(logging.INFO, logger="reid.service")
        srv.kill()
        state.start_follower()  # its first read fails: it resynchronises once Redis is back
        within(10, lambda: not state.follower.connected)
        srv.start()  # same port, the AOF replayed
        within(30, lambda: state.follower.connected and state.bundle_id == "alt")
        assert "change-log follower failed" not in caplog.text
        assert "activated elsewhere" in caplog.text
        res = _search(a.url, g, blobs[1])
        assert res["model"] == "tiny-alt:0.0.2" and res["results"][0]["id"] == image_id(g, blobs[1])
        assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        within(10, lambda: httpx.get(f"{a.url}/readyz").status_code == 200)
    finally:
        for s in servers:  # before their Redis goes
            s.stop()
        srv.stop()

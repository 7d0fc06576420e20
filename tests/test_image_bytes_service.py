"""Kept image bytes on disk, through the running service: uploads write blobs (not Redis), thumbnails, the
adaptation export and model activation read them, deletion removes them, bytes of the previous layout (inside
Redis) are still served and ``reid migrate-store --blobs`` moves them, ``reid gc-blobs`` sweeps orphans, and
float16 stored vectors serve searches and survive a change of the setting.

Real uvicorn servers (``server_factory``), the session's real redis-server, real tiny ONNX bundles.
"""

from __future__ import annotations

import io
import json
import os
import time

import httpx
import pytest
from PIL import Image

from conftest import write_tiny_bundle
from index.blob_store import BlobStore, blob_key
from index.store import RedisStore, image_id
from scripts.cli import main as reid
from service.adapt import export_images
from tests.http_checks import assert_error


def upload(base: str, gallery: str, blobs: list[bytes], cameras: list[str] | None = None) -> list[int]:
    files = [("files", (f"{n}.png", data, "image/png")) for n, data in enumerate(blobs)]
    meta = [{"camera_id": c} for c in cameras] if cameras else None
    r = httpx.post(f"{base}/v1/galleries/{gallery}/images", files=files,
                   data={"metadata": json.dumps(meta)} if meta else None, timeout=60)
    assert r.status_code == 201, r.text
    return [it["id"] for it in r.json()["items"]]


def thumbnail(base: str, gallery: str, id_: int) -> httpx.Response:
    return httpx.get(f"{base}/v1/galleries/{gallery}/images/{id_}/thumbnail", timeout=30)


def is_jpeg(r: httpx.Response) -> bool:
    return r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and \
        Image.open(io.BytesIO(r.content)).format == "JPEG"


def top1(base: str, gallery: str, data: bytes) -> dict:
    r = httpx.post(f"{base}/v1/galleries/{gallery}/search", files={"file": ("q.png", data, "image/png")},
                   data={"top_k": "1", "refine": "none"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def wait_job(base: str, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


@pytest.fixture
def store(redis_url, make_settings):
    s = RedisStore(redis_url, blob_dir=make_settings().blob_path)
    yield s
    s.close()


def test_uploads_keep_bytes_on_disk_and_thumbnails_read_them(server_factory, store, gallery_name, image_bytes):
    srv = server_factory()
    g, blobs_dir = gallery_name, srv.settings.blob_path
    data = [image_bytes(n) for n in range(4)]
    ids = upload(srv.url, g, data)
    blobs = BlobStore(blobs_dir / g)
    assert sorted(blobs.keys()) == sorted(blob_key(d) for d in data)
    assert not store.r.exists(store.k_images(g))  # nothing of the bytes in Redis but a 32-byte reference each
    assert is_jpeg(thumbnail(srv.url, g, ids[0]))
    # a referenced blob that went missing (a volume not shared, a bad disk) is an error, never a wrong image
    blobs.path(blob_key(data[1])).unlink()
    body = assert_error(thumbnail(srv.url, g, ids[1]), 500, "image_bytes_unreadable")
    assert blob_key(data[1]) in body["error"]["message"]
    # deleting an image removes its blob; deleting the gallery removes its folder
    assert httpx.delete(f"{srv.url}/v1/galleries/{g}/images/{ids[2]}").status_code == 200
    assert not blobs.exists(blob_key(data[2])) and blobs.exists(blob_key(data[3]))
    assert_error(thumbnail(srv.url, g, ids[2]), 404, "image_not_found")
    assert httpx.delete(f"{srv.url}/v1/galleries/{g}").status_code == 200
    assert not (blobs_dir / g).exists()


def test_keep_images_false_keeps_no_blob(server_factory, store, gallery_name, image_bytes):
    srv = server_factory(keep_images=False)
    (i,) = upload(srv.url, gallery_name, [image_bytes(1)])
    assert not (srv.settings.blob_path / gallery_name).exists() and store.count_images(gallery_name) == 0
    assert_error(thumbnail(srv.url, gallery_name, i), 404, "image_bytes_not_kept")


def test_adaptation_export_and_activation_read_the_blobs(server_factory, make_settings, store, gallery_name,
                                                          image_bytes, tmp_path):
    settings = make_settings()
    write_tiny_bundle(settings.bundles_dir / "other", seed=7, name="tiny-other")
    srv = server_factory(settings)
    g = gallery_name
    data = [image_bytes(n) for n in range(6)]
    ids = upload(srv.url, g, data, cameras=["c1", "c2"] * 3)
    assert not store.r.exists(store.k_images(g))
    # the adaptation job's export: every kept image, from disk, under its camera
    assert export_images(store, g, tmp_path / "export") == 6
    for i, d, cam in zip(ids, data, ["c1", "c2"] * 3):
        assert (tmp_path / "export" / cam / f"{i}.png").read_bytes() == d
    # activation re-embeds every kept image: with one blob gone it fails, changing nothing
    blobs = BlobStore(settings.blob_path / g)
    lost = blobs.path(blob_key(data[4]))
    saved = lost.read_bytes()
    lost.unlink()
    job = wait_job(srv.url, httpx.post(f"{srv.url}/v1/models/other/activate").json()["id"])
    assert job["status"] == "failed" and blob_key(data[4]) in job["message"]
    assert httpx.get(f"{srv.url}/v1/models").json()["active"]["bundle_id"] == "default"
    blobs.put(saved)
    job = wait_job(srv.url, httpx.post(f"{srv.url}/v1/models/other/activate").json()["id"])
    assert job["status"] == "succeeded", job
    for i, d in zip(ids, data):
        hit = top1(srv.url, g, d)
        assert hit["id"] == i and hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert httpx.get(f"{srv.url}/v1/galleries/{g}/images/{ids[0]}").json()["model"] == "tiny-other:0.0.1"


def test_galleries_of_a_replaced_default_model_are_reported_then_re_embedded(server_factory, make_settings, store,
                                                                              gallery_name, image_bytes):
    """An upgrade replaces the default bundle under stored vectors: the service says so (readyz 503) instead of
    comparing features of two models, and activating the default again re-embeds them (under a copy's new id)."""
    srv = server_factory(make_settings())
    g = gallery_name
    data = [image_bytes(n) for n in range(4)]
    ids = upload(srv.url, g, data)
    served = httpx.get(f"{srv.url}/v1/model").json()
    model_id = f"{served['name']}:{served['version']}"
    assert store.gallery_models([g]) == {g: model_id}
    assert_error(httpx.post(f"{srv.url}/v1/models/default/activate"), 409, "already_active")
    # as if these vectors were written under the previous default model
    store.r.hset(store.k_gallery(g), "model", "reid-default:old")
    # a write of this model's vectors into it is refused, whole: one gallery never mixes two models' features
    files = [("files", ("a.png", image_bytes(9), "image/png")), ("files", ("b.png", image_bytes(10), "image/png"))]
    body = assert_error(httpx.post(f"{srv.url}/v1/galleries/{g}/images", files=files), 409, "gallery_model_mismatch")
    assert "reid-default:old" in body["error"]["message"] and "/v1/models/default/activate" in body["error"]["message"]
    assert store.count(g) == len(data)
    # ... and answered 503 + Retry-After while another replica's activation is not followed here yet (the follower
    # tries to load the bundle recorded as active; this one does not exist, so the replica stays behind)
    store.r.set(store.k_active_bundle(), "bundle-of-another-replica")
    response = httpx.post(f"{srv.url}/v1/galleries/{g}/images", files=files)
    assert_error(response, 503, "model_switching")
    assert int(response.headers["Retry-After"]) > 0 and store.count(g) == len(data)
    store.r.delete(store.k_active_bundle())
    body = assert_error(httpx.get(f"{srv.url}/readyz"), 503, "not_ready")
    assert f"{g} (reid-default:old)" in body["error"]["message"] and "/v1/models/default/activate" in body["error"][
        "message"]
    job = wait_job(srv.url, httpx.post(f"{srv.url}/v1/models/default/activate").json()["id"])
    assert job["status"] == "succeeded", job
    active = httpx.get(f"{srv.url}/v1/models").json()["active"]["bundle_id"]
    assert active.startswith("default-reembed-") and store.active_bundle() == active
    assert store.gallery_models([g]) == {g: model_id} and httpx.get(f"{srv.url}/readyz").status_code == 200
    for i, d in zip(ids, data):
        assert top1(srv.url, g, d)["id"] == i
    (new,) = upload(srv.url, g, [image_bytes(9)])  # re-embedded: writes are the served model's again
    assert top1(srv.url, g, image_bytes(9))["id"] == new
    assert_error(httpx.post(f"{srv.url}/v1/models/{active}/activate"), 409, "already_active")


def test_bytes_of_the_previous_layout_are_served_then_migrated_and_orphans_swept(
        server_factory, make_settings, store, redis_url, gallery_name, image_bytes):
    settings = make_settings()
    g = gallery_name
    data = [image_bytes(n) for n in range(5)]
    # written as before the blob store: bytes inside Redis
    old = server_factory(settings.model_copy(update={"image_storage": "redis"}))
    ids = upload(old.url, g, data)
    old.stop()
    assert store.r.hlen(store.k_images(g)) == 5 and not (settings.blob_path / g).exists()

    srv = server_factory(settings)  # disk storage now: the old bytes are still served, from Redis
    assert all(is_jpeg(thumbnail(srv.url, g, i)) for i in ids)
    (new,) = upload(srv.url, g, [image_bytes(50)])
    assert BlobStore(settings.blob_path / g).exists(blob_key(image_bytes(50)))

    args = ["--redis-url", redis_url, "--data-dir", str(settings.data_dir)]
    assert reid(["migrate-store", "--blobs", *args]) == 0  # while the service runs
    assert not store.r.exists(store.k_images(g)) and store.count_images(g) == 6
    blobs = BlobStore(settings.blob_path / g)
    assert sorted(blobs.keys()) == sorted(blob_key(d) for d in [*data, image_bytes(50)])
    assert all(is_jpeg(thumbnail(srv.url, g, i)) for i in [*ids, new])
    assert store.get_image_bytes(g, ids) == data

    # an orphan (a crash between a blob's fsync and its transaction) goes; referenced blobs stay
    orphan = blobs.put(image_bytes(77))
    past = time.time() - 3600
    os.utime(blobs.path(orphan), (past, past))
    assert reid(["gc-blobs", "--grace-s", "60", *args]) == 0
    assert not blobs.exists(orphan) and len(list(blobs.keys())) == 6
    assert all(is_jpeg(thumbnail(srv.url, g, i)) for i in [*ids, new])


def test_float16_vectors_serve_searches_and_outlive_a_change_of_the_setting(server_factory, make_settings, store,
                                                                            gallery_name, image_bytes):
    g = gallery_name
    settings = make_settings(store_dtype="float16", snapshots=False)  # restarts rebuild from what Redis holds
    data = [image_bytes(n) for n in range(6)]
    srv = server_factory(settings)
    ids = upload(srv.url, g, data)
    assert store.vector_dtype(g) == "float16"
    assert {len(v) for v in store.get_raw_vectors(g, ids)[1]} == {2 * 64}  # the tiny bundle's dim 64
    for i, d in zip(ids, data):
        hit = top1(srv.url, g, d)
        assert hit["id"] == i and hit["score"] == pytest.approx(1.0, abs=2e-3)
    srv.stop()
    srv = server_factory(settings.model_copy(update={"store_dtype": "float32"}))  # the setting changed
    assert httpx.get(f"{srv.url}/readyz").status_code == 200
    for i, d in zip(ids, data):
        assert top1(srv.url, g, d)["id"] == i
    (new,) = upload(srv.url, g, [image_bytes(20)])  # the gallery keeps its dtype: no mixed content
    assert len(store.get_raw_vectors(g, [new])[1][0]) == 2 * 64 and top1(srv.url, g, image_bytes(20))["id"] == new
    assert new == image_id(g, image_bytes(20))


def test_a_replica_with_its_own_blob_dir_is_not_ready(server_factory, make_settings, tmp_path):
    server_factory()  # the first replica claims the store for its blob directory
    lone = server_factory(make_settings(data_dir=tmp_path / "lone"))  # forgot the shared REID_BLOB_DIR
    r = httpx.get(f"{lone.url}/readyz")
    assert r.status_code == 503 and "REID_BLOB_DIR" in r.text
    assert reid(["gc-blobs", "--redis-url", lone.settings.redis_url, "--data-dir", str(tmp_path / "lone")]) == 1


def test_maintenance_commands_use_the_running_services_embedded_redis(server_factory, tmp_path, image_bytes,
                                                                      monkeypatch):
    """With no REID_REDIS_URL the commands connect to the redis-server the running service embedded (never a
    second server on its AOF, never stopping it), and start one of their own when the service is down."""
    monkeypatch.delenv("REID_REDIS_URL", raising=False)
    data = tmp_path / "embedded"
    srv = server_factory(redis_url=None, data_dir=data)
    (i,) = upload(srv.url, "people", [image_bytes(1)])
    redis_pid = srv.app.state.reid.redis_server.pid
    assert reid(["gc-blobs", "--data-dir", str(data), "--grace-s", "0"]) == 0
    assert srv.app.state.reid.redis_server.pid == redis_pid and srv.app.state.reid.redis_server.running
    assert is_jpeg(thumbnail(srv.url, "people", i)) and httpx.get(f"{srv.url}/readyz").status_code == 200
    srv.stop()
    assert reid(["migrate-store", "--blobs", "--data-dir", str(data)]) == 0  # its own server, stopped after
    srv = server_factory(redis_url=None, data_dir=data)
    assert is_jpeg(thumbnail(srv.url, "people", i))

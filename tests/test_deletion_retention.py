"""Bulk deletion (by camera, by time range, all) and per-gallery retention, over HTTP on a real server and Redis."""

import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from index.blob_store import BlobStore, blob_key
from index.store import RedisStore
from tests.http_checks import assert_error

N_IMAGES = 12


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


NOW = datetime.now(timezone.utc)
#: image s was captured s days ago; cameras cycle c0, c1, c2
CAPTURED = [NOW - timedelta(days=s, hours=1) for s in range(N_IMAGES)]


def upload(base, gallery, image_bytes, seeds, captured=True):
    files = [("files", (f"img{s}.png", image_bytes(s), "image/png")) for s in seeds]
    meta = [{"camera_id": f"c{s % 3 if s < 200 else 2}", "external_id": f"e{s}",
             **({"captured_at": iso(CAPTURED[s])} if captured else {})} for s in seeds]
    r = httpx.post(f"{base}/v1/galleries/{gallery}/images", files=files, data={"metadata": json.dumps(meta)},
                   timeout=60)
    assert r.status_code == 201, r.text
    return {s: it["id"] for s, it in zip(seeds, r.json()["items"])}


def search_ids(base, gallery, data, top_k=50):
    r = httpx.post(f"{base}/v1/galleries/{gallery}/search", files={"file": ("q.png", data, "image/png")},
                   data={"top_k": str(top_k)}, timeout=60)
    assert r.status_code == 200, r.text
    return {hit["id"] for hit in r.json()["results"]}


def assert_gone(base, store, gallery, ids, image_bytes, seeds):
    """Metadata, vectors, kept bytes (their blobs on disk too) and index entries of ``ids`` are gone; the change
    log says so."""
    for i in ids:
        assert httpx.get(f"{base}/v1/galleries/{gallery}/images/{i}").status_code == 404
    assert store.get_image_bytes(gallery, ids) == [None] * len(ids)
    blobs = BlobStore(store.blob_dir / gallery)
    assert not any(blobs.exists(blob_key(image_bytes(s))) for s in seeds)
    assert store.get_vectors(gallery, ids) == [None] * len(ids)
    for s in seeds:  # the deleted images themselves as queries: never returned
        assert not search_ids(base, gallery, image_bytes(s)) & set(ids)
    deletes = {int(f[b"id"]) for _, f in store.r.xrange(store.k_gallery_events(gallery)) if f[b"op"] == b"delete"}
    assert set(ids) <= deletes



def error_message(r, status, code) -> str:
    return assert_error(r, status, code)["error"]["message"]


@pytest.fixture
def store(redis_url, make_settings):
    s = RedisStore(redis_url, blob_dir=make_settings().blob_path)  # the servers' blob store
    yield s
    s.close()


@pytest.mark.parametrize("index", [
    {},
    {"index_type": "hnsw", "index_hnsw_m": 8, "index_hnsw_ef_construction": 40},
    {"index_type": "ivf_flat", "index_nlist": 2, "index_nprobe": 2, "index_train_threshold": 40},
], ids=["flat", "hnsw", "ivf_flat"])
def test_delete_by_camera(server_factory, store, gallery_name, image_bytes, index):
    srv = server_factory(**index)
    base, g = srv.url, gallery_name
    ids = upload(base, g, image_bytes, range(N_IMAGES))
    others = set(upload(base, g, image_bytes, range(200, 230), captured=False).values())  # camera c2
    idx = srv.app.state.reid.index_for(g)
    assert idx.wait_idle(30) and idx.kind == index.get("index_type", "flat")  # ivf_flat: trained by now
    cam1 = [ids[s] for s in range(N_IMAGES) if s % 3 == 1]
    r = httpx.delete(f"{base}/v1/galleries/{g}/images", params={"camera_id": "c1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"gallery": g, "count": len(cam1),
                        "filter": {"camera_id": "c1", "after": None, "before": None, "all": False}}
    assert httpx.get(f"{base}/v1/galleries/{g}").json()["count"] == N_IMAGES + 30 - len(cam1)
    assert_gone(base, store, g, cam1, image_bytes, [s for s in range(N_IMAGES) if s % 3 == 1])
    kept = {ids[s] for s in range(N_IMAGES) if s % 3 != 1} | others
    assert search_ids(base, g, image_bytes(0)) == kept
    assert store.get_image_bytes(g, [ids[0]])[0] == image_bytes(0)
    # again: nothing left to delete
    assert httpx.delete(f"{base}/v1/galleries/{g}/images", params={"camera_id": "c1"}).json()["count"] == 0
    assert httpx.get(f"{base}/readyz").status_code == 200


def test_delete_by_time_range_and_all(live_server, store, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    ids = upload(base, g, image_bytes, range(N_IMAGES))
    no_time = upload(base, g, image_bytes, [100, 101], captured=False)  # time = upload time (now)
    # [after, before): images captured 3..6 days ago (each is at s days + 1 hour)
    after, before = iso(NOW - timedelta(days=6, hours=1)), iso(NOW - timedelta(days=2, hours=12))
    r = httpx.delete(f"{base}/v1/galleries/{g}/images", params={"after": after, "before": before})
    assert r.status_code == 200, r.text
    gone_seeds = [3, 4, 5, 6]
    assert r.json()["count"] == len(gone_seeds)
    assert_gone(base, store, g, [ids[s] for s in gone_seeds], image_bytes, gone_seeds)
    left = {ids[s] for s in range(N_IMAGES) if s not in gone_seeds} | set(no_time.values())
    assert search_ids(base, g, image_bytes(0)) == left
    # before only, with a camera too: camera c0's images older than 8 days (9)
    r = httpx.delete(f"{base}/v1/galleries/{g}/images", params={"before": iso(NOW - timedelta(days=8)),
                                                                 "camera_id": "c0"})
    assert r.json()["count"] == 1 and store.get_vectors(g, [ids[9]]) == [None]
    # images without captured_at are dated by their upload: "after an hour ago" finds them (and image 0)
    r = httpx.delete(f"{base}/v1/galleries/{g}/images", params={"after": iso(NOW - timedelta(hours=1, minutes=5))})
    assert r.json()["count"] == 3
    assert store.get_image_bytes(g, list(no_time.values())) == [None, None]
    # all=true empties the gallery and keeps it
    left = N_IMAGES - len(gone_seeds) - 2
    r = httpx.delete(f"{base}/v1/galleries/{g}/images", params={"all": "true"})
    assert r.json()["count"] == left and r.json()["filter"]["all"] is True
    emptied = httpx.get(f"{base}/v1/galleries/{g}").json()
    assert (emptied["count"], emptied["cameras"], emptied["indexed"]) == (0, {}, 0)
    assert store.count_images(g) == 0 and search_ids(base, g, image_bytes(1)) == set()
    # deleting the gallery answers its image count
    upload(base, g, image_bytes, [1, 2])
    r = httpx.delete(f"{base}/v1/galleries/{g}")
    assert r.status_code == 200 and r.json()["count"] == 2


def test_bad_bulk_delete_parameters(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    upload(base, g, image_bytes, [0])
    url = f"{base}/v1/galleries/{g}/images"
    assert "all=true" in error_message(httpx.delete(url), 422, "filter_required")
    assert_error(httpx.delete(url, params={"all": "true", "camera_id": "c0"}), 422, "conflicting_filters")
    assert "before='yesterday'" in error_message(httpx.delete(url, params={"before": "yesterday"}), 422, "invalid_time")
    assert_error(httpx.delete(url, params={"after": "2024-13-01"}), 422, "invalid_time")
    msg = error_message(httpx.delete(url, params={"before": "2024-01-01", "after": "2024-02-01T00:00:00Z"}), 422,
                       "invalid_time_range")
    assert "must be later" in msg
    assert_error(httpx.delete(url, params={"before": "2024-01-01", "after": "2024-01-01"}), 422, "invalid_time_range")
    assert_error(httpx.delete(url, params={"camera_id": " "}), 422, "invalid_filter")
    assert_error(httpx.delete(url, params={"all": "maybe"}), 422, "validation_error")
    assert_error(httpx.delete(f"{base}/v1/galleries/nope-{g}/images", params={"all": "true"}), 404,
                 "gallery_not_found")
    assert httpx.get(f"{base}/v1/galleries/{g}").json()["count"] == 1  # nothing was deleted


def test_gallery_settings_create_and_patch(live_server, gallery_name):
    base, g = live_server, gallery_name
    r = httpx.post(f"{base}/v1/galleries", json={"name": g, "retention_days": 30})
    assert r.status_code == 201 and r.json() == {"name": g, "count": 0, "retention_days": 30}
    detail = httpx.get(f"{base}/v1/galleries/{g}").json()
    assert (detail["name"], detail["count"], detail["retention_days"]) == (g, 0, 30)
    assert {"name": g, "count": 0, "retention_days": 30} in httpx.get(f"{base}/v1/galleries").json()["galleries"]
    assert_error(httpx.post(f"{base}/v1/galleries", json={"name": g}), 409, "gallery_exists")
    assert_error(httpx.post(f"{base}/v1/galleries", json={"name": "a b"}), 422, "invalid_gallery_name")
    r = httpx.patch(f"{base}/v1/galleries/{g}", json={"retention_days": 7})
    assert r.status_code == 200 and r.json()["retention_days"] == 7
    r = httpx.patch(f"{base}/v1/galleries/{g}", json={"retention_days": None})
    assert r.status_code == 200 and r.json() == {"name": g, "count": 0}
    for bad in ({"retention_days": 0}, {"retention_days": "soon"}, {"retention_days": 10**6}, {"ttl": 3}):
        assert_error(httpx.patch(f"{base}/v1/galleries/{g}", json=bad), 422, "validation_error")
    assert_error(httpx.patch(f"{base}/v1/galleries/{g}", json={}), 422, "nothing_to_change")
    assert_error(httpx.patch(f"{base}/v1/galleries/nope-{g}", json={"retention_days": 1}), 404, "gallery_not_found")
    # plain galleries (created by an upload) have no retention and the keys they always had
    assert httpx.post(f"{base}/v1/galleries", json={"name": g + "x"}).json() == {"name": g + "x", "count": 0}


def test_retention_sweeper_deletes_expired_images(server_factory, store, gallery_name, image_bytes):
    srv = server_factory(retention_sweep_interval_s=0.2)
    base, g, other = srv.url, gallery_name, gallery_name + "-keep"
    ids = upload(base, g, image_bytes, range(N_IMAGES))
    upload(base, other, image_bytes, range(4))  # no retention: untouched
    sweeper = srv.app.state.retention
    assert sweeper.deleted == 0
    r = httpx.patch(f"{base}/v1/galleries/{g}", json={"retention_days": 5})  # images 5..11 are older
    assert r.status_code == 200
    deadline = time.monotonic() + 20
    while httpx.get(f"{base}/v1/galleries/{g}").json()["count"] != 5:
        assert time.monotonic() < deadline, "the sweeper did not run"
        time.sleep(0.1)
    expired = [s for s in range(N_IMAGES) if s >= 5]
    assert_gone(base, store, g, [ids[s] for s in expired], image_bytes, expired)
    assert search_ids(base, g, image_bytes(0)) == {ids[s] for s in range(5)}
    assert httpx.get(f"{base}/v1/galleries/{other}").json()["count"] == 4
    assert sweeper.deleted == len(expired)
    # a new gallery created with retention: its old upload goes at the next sweeps, the recent one stays
    assert httpx.post(f"{base}/v1/galleries", json={"name": g + "-new", "retention_days": 1}).status_code == 201
    new_ids = upload(base, g + "-new", image_bytes, [0, 3])
    while httpx.get(f"{base}/v1/galleries/{g}-new").json()["count"] != 1:
        assert time.monotonic() < deadline, "the sweeper did not run"
        time.sleep(0.1)
    assert store.get_vectors(g + "-new", [new_ids[0], new_ids[3]])[1] is None
    assert httpx.get(f"{base}/readyz").status_code == 200


@pytest.mark.parametrize("index", [
    {"index_type": "hnsw", "index_hnsw_m": 8, "index_hnsw_ef_construction": 40, "index_tombstone_ratio": 0.9},
    {"index_type": "ivf_pq", "index_nlist": 2, "index_nprobe": 2, "index_pq_m": 8, "index_pq_nbits": 4,
     "index_train_threshold": 40},
], ids=["hnsw", "ivf_pq"])
def test_snapshot_keeps_type_and_deletions_across_restart(server_factory, gallery_name, image_bytes, index):
    """The index (HNSW tombstones, a trained IVF-PQ) goes through the snapshot at shutdown and back at start;
    IVF-PQ answers re-ranked by the exact vectors it reads from Redis."""
    srv = server_factory(**index)
    g, kind = gallery_name, index["index_type"]
    ids = upload(srv.url, g, image_bytes, range(N_IMAGES))
    others = set(upload(srv.url, g, image_bytes, range(200, 230), captured=False).values())
    idx = srv.app.state.reid.index_for(g)
    assert idx.wait_idle(30) and idx.kind == kind
    assert httpx.delete(f"{srv.url}/v1/galleries/{g}/images", params={"camera_id": "c0"}).json()["count"] == 4
    if kind == "hnsw":
        assert idx._impl.dead == 4  # tombstones, below the rebuild share
    srv.stop()
    srv = server_factory(**index)
    state = srv.app.state.reid
    assert state.sync.loaded[g] == "snapshot" and state.index_for(g).kind == kind
    want = {ids[s] for s in range(N_IMAGES) if s % 3} | others
    assert search_ids(srv.url, g, image_bytes(0)) == want
    r = httpx.post(f"{srv.url}/v1/galleries/{g}/search", files={"file": ("q.png", image_bytes(1), "image/png")},
                   data={"top_k": "1"}, timeout=60)
    assert r.json()["results"][0]["id"] == ids[1] and r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert httpx.get(f"{srv.url}/readyz").status_code == 200


def test_another_replica_follows_a_bulk_delete(server_factory, gallery_name, image_bytes):
    a, b = server_factory(), server_factory()
    g = gallery_name
    ids = upload(a.url, g, image_bytes, range(N_IMAGES))
    assert len(search_ids(b.url, g, image_bytes(0))) == N_IMAGES
    assert httpx.delete(f"{a.url}/v1/galleries/{g}/images", params={"camera_id": "c2"}).json()["count"] == 4
    want = {ids[s] for s in range(N_IMAGES) if s % 3 != 2}
    deadline = time.monotonic() + 10
    while len(b.app.state.reid.index_for(g)) != len(want):  # b follows the change log
        assert time.monotonic() < deadline, "replica b did not follow the deletes"
        time.sleep(0.05)
    assert search_ids(b.url, g, image_bytes(2)) == want

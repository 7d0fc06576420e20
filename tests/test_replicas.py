"""Several API processes on one Redis: each follows the change logs (the global one, each gallery's) to keep its own
FAISS indexes.

Real uvicorn processes (``reid serve``) on a real redis-server; the trim test runs the app in process so it
can hold its follower back.
"""

from __future__ import annotations


import httpx
import numpy as np
import pytest

from conftest import within, write_tiny_bundle
from index.redis_server import EmbeddedRedis
from index.store import RedisStore, image_id
from service.api_process import ApiProcess, noise_images, top1, upload


@pytest.fixture
def two_replicas(tmp_path, tiny_bundle):
    srv = EmbeddedRedis(tmp_path / "redis").start()
    shared = {"REID_BLOB_DIR": str(tmp_path / "blobs")}  # replicas share the kept bytes (compose: a volume)
    a = ApiProcess(tmp_path / "a", tiny_bundle, redis_url=srv.url, env=shared)
    b = ApiProcess(tmp_path / "b", tiny_bundle, redis_url=srv.url, env=shared)
    try:
        yield srv, a, b
    finally:
        a.stop()
        b.stop()
        srv.stop()


@pytest.mark.slow
def test_write_through_one_replica_is_searchable_through_the_other(two_replicas):
    srv, a, b = two_replicas
    for bundles in (a.data_dir / "bundles", b.data_dir / "bundles"):  # for the activation below
        write_tiny_bundle(bundles / "alt", seed=7, name="tiny-alt", version="0.0.2")
    a.start()
    b.start()
    imgs = noise_images(6, seed=3)

    r = upload(a.url, "cams", [("0.png", imgs[0]), ("1.png", imgs[1])])
    assert r.status_code == 201, r.text
    ids = [it["id"] for it in r.json()["items"]]
    took = within(1.0, lambda: top1(b.url, "cams", [imgs[1]]) == [ids[1]])
    print(f"\nput through A searchable through B after {took * 1000:.0f} ms")

    assert httpx.delete(f"{b.url}/v1/galleries/cams/images/{ids[1]}").status_code == 200
    took = within(1.0, lambda: top1(a.url, "cams", [imgs[1]]) == [ids[0]])
    print(f"delete through B gone from A after {took * 1000:.0f} ms")

    # a gallery created through B shows up on A; deleting it through A removes it from B
    assert upload(b.url, "lobby", [("2.png", imgs[2])]).status_code == 201
    within(1.0, lambda: httpx.get(f"{a.url}/v1/galleries/lobby").status_code == 200 and
            top1(a.url, "lobby", [imgs[2]]) == [image_id("lobby", imgs[2])])
    assert httpx.delete(f"{a.url}/v1/galleries/lobby").status_code == 200
    within(1.0, lambda: "lobby" not in b.metric_labels("reid_index_vectors"))

    # both stay in sync with the store; each applied its own writes too, once (idempotent)
    for api in (a, b):
        assert httpx.get(f"{api.url}/readyz").status_code == 200
        assert api.metric_labels("reid_index_vectors") == {"cams": 1.0}

    # a model activated through A: B loads it too and rebuilds from the re-embedded vectors (no re-embedding)
    assert upload(a.url, "cams", [("3.png", imgs[3])]).status_code == 201
    r = httpx.post(f"{a.url}/v1/models/alt/activate", timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()
    within(60, lambda: httpx.get(f"{a.url}/v1/jobs/{job['id']}").json()["status"] in ("succeeded", "failed"))
    assert httpx.get(f"{a.url}/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    within(10, lambda: httpx.get(f"{b.url}/v1/models").json()["active"]["bundle_id"] == "alt")
    res = httpx.post(f"{b.url}/v1/galleries/cams/search", files={"file": ("q.png", imgs[3], "image/png")},
                     data={"top_k": "2"}).json()
    assert res["model"] == "tiny-alt:0.0.2"
    assert res["results"][0]["id"] == image_id("cams", imgs[3])
    assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert "activated elsewhere" in b.log()
    assert httpx.get(f"{b.url}/readyz").status_code == 200


def test_follower_behind_a_trim_rebuilds_from_redis(server_factory, redis_url, gallery_name):
    """A follower that fell further behind than the capped change log reaches rebuilds its indexes from Redis."""
    srv = server_factory(events_maxlen=1000)
    state = srv.app.state.reid
    g = gallery_name
    state.follower.stop()  # held back, as a replica that cannot keep up
    behind = state.sync.applied
    store = RedisStore(redis_url, events_maxlen=1000)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3000, 64)).astype(np.float32)
    for start in range(0, 3000, 500):
        store.put_many(g, [(i, vecs[i], None) for i in range(start, start + 500)], model=state.bundle.model_id)
    for i in range(10):
        store.delete(g, i)
    assert store.r.xlen(store.k_gallery_events(g)) < 2000  # trimmed past the follower's position
    rebuilds = state.sync.stats["rebuilds"]

    state.start_follower()
    within(10, lambda: state.sync.applied != behind and len(state.indexes.get(g, ())) == 2990)
    assert state.sync.stats["rebuilds"] > rebuilds  # not a replay: the entries were gone
    assert set(state.indexes[g].ids().tolist()) == set(range(10, 3000))
    assert httpx.get(f"{srv.url}/readyz").status_code == 200
    store.close()

"""The service on a real Redis Cluster (3 masters, 1 replica each, :class:`index.redis_cluster.LocalRedisCluster`):
two real API processes (``reid serve`` with REID_REDIS_CLUSTER=true) ingest and search galleries whose hash slots
live on different masters, and switch to another model; then a master is SIGKILLed while four clients ingest, and every image acknowledged
before, during and after the failover is still there once its replica took over. Acknowledged means after
``WAIT 1``: the replica held the write when the client got its 2xx. During the failover clients get 503 with
Retry-After, never a 500.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from conftest import redis_cluster_binary, within, write_tiny_bundle
from index.redis_cluster import LocalRedisCluster
from index.store import RedisStore
from service.api_process import ApiProcess, noise_images, top1, upload

pytestmark = pytest.mark.slow


def galleries_on_distinct_masters(cluster: LocalRedisCluster, n: int) -> list[str]:
    """``n`` gallery names whose keys live on ``n`` different masters."""
    chosen, masters = [], set()
    for i in range(200):
        g = f"cam-{i}"
        port = cluster.master_for_key(RedisStore.k_gallery(g)).port
        if port not in masters:
            chosen.append(g)
            masters.add(port)
        if len(chosen) == n:
            return chosen
    raise AssertionError("could not spread galleries over the masters")


@pytest.fixture
def cluster(tmp_path):
    with LocalRedisCluster(tmp_path / "cluster", binary=redis_cluster_binary()) as c:
        yield c


@pytest.fixture
def replicas(tmp_path, tiny_bundle, cluster):
    env = {"REID_REDIS_CLUSTER": "true", "REID_BLOB_DIR": str(tmp_path / "blobs"), "REID_REDIS_WAIT_MS": "1000"}
    procs = [ApiProcess(tmp_path / name, tiny_bundle, redis_url=cluster.url, env=env) for name in ("a", "b")]
    for p in procs:  # a second model to activate
        write_tiny_bundle(p.data_dir / "bundles" / "alt", seed=7, name="tiny-alt", version="0.0.2")
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def test_galleries_on_different_masters_are_ingested_searched_and_followed_across_replicas(cluster, replicas):
    a, b = replicas
    a.start()
    b.start()
    galleries = galleries_on_distinct_masters(cluster, 3)
    imgs = noise_images(9, seed=11)
    ids = {}
    for k, g in enumerate(galleries):
        r = upload(a.url, g, [(f"{n}.png", imgs[3 * k + n]) for n in range(3)])
        assert r.status_code == 201, r.text
        ids[g] = [it["id"] for it in r.json()["items"]]
    for k, g in enumerate(galleries):
        assert top1(a.url, g, [imgs[3 * k + 1]]) == [ids[g][1]]
        # the other replica follows every gallery's own change log, on whichever master it lives
        took = within(5.0, lambda: top1(b.url, g, [imgs[3 * k + 1]]) == [ids[g][1]])
        print(f"\n{g} (master :{cluster.master_for_key(RedisStore.k_gallery(g)).port}) searchable through B after "
              f"{took * 1000:.0f} ms")
    listed = httpx.get(f"{b.url}/v1/galleries").json()
    assert {it["name"]: it["count"] for it in listed["galleries"]} == {g: 3 for g in galleries}
    g = galleries[0]
    assert httpx.delete(f"{b.url}/v1/galleries/{g}/images/{ids[g][0]}").status_code == 200
    within(5.0, lambda: ids[g][0] not in top1(a.url, g, [imgs[0]]))
    assert httpx.delete(f"{a.url}/v1/galleries/{galleries[1]}").status_code == 200
    within(5.0, lambda: httpx.get(f"{b.url}/v1/galleries/{galleries[1]}").status_code == 404)

    # another model activated through A: the galleries on both remaining masters switch (one transaction each),
    # B follows and answers with it
    r = httpx.post(f"{a.url}/v1/models/alt/activate", timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    within(60, lambda: httpx.get(f"{a.url}/v1/jobs/{job}").json()["status"] in ("succeeded", "failed"))
    assert httpx.get(f"{a.url}/v1/jobs/{job}").json()["status"] == "succeeded"
    within(10, lambda: httpx.get(f"{b.url}/v1/models").json()["active"]["bundle_id"] == "alt")
    for k, g in enumerate(galleries):
        if g == galleries[1]:
            continue  # deleted above
        res = httpx.post(f"{b.url}/v1/galleries/{g}/search", data={"top_k": "1"},
                         files={"file": ("q.png", imgs[3 * k + 2], "image/png")}).json()
        assert res["model"] == "tiny-alt:0.0.2" and res["results"][0]["id"] == ids[g][2]
        assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    for api in (a, b):
        assert httpx.get(f"{api.url}/readyz").status_code == 200


def test_a_master_killed_during_ingest_loses_no_acknowledged_image(cluster, replicas):
    a, b = replicas
    a.start()
    b.start()
    galleries = galleries_on_distinct_masters(cluster, 3)
    victim_gallery = galleries[0]
    victim = cluster.master_for_key(RedisStore.k_gallery(victim_gallery))
    acked: dict[str, set[int]] = {g: set() for g in galleries}
    statuses: Counter = Counter()
    retry_after_missing = 0
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        nonlocal retry_after_missing
        seed = 1000 * (worker + 1)
        with httpx.Client(timeout=30.0) as http:
            while not stop.is_set():
                g = galleries[seed % len(galleries)]
                img = noise_images(1, seed=seed)[0]
                seed += 1
                url = (a if worker % 2 == 0 else b).url
                try:
                    r = http.post(f"{url}/v1/galleries/{g}/images", files=[("files", ("x.png", img, "image/png"))])
                except httpx.HTTPError:
                    with lock:
                        statuses["transport error"] += 1
                    continue
                with lock:
                    statuses[r.status_code] += 1
                    if r.status_code in (200, 201):
                        acked[g].update(it["id"] for it in r.json()["items"])
                    elif r.status_code == 503 and "retry-after" not in r.headers:
                        retry_after_missing += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        within(60, lambda: sum(len(s) for s in acked.values()) >= 40)  # before
        before = {g: len(s) for g, s in acked.items()}
        t0 = time.monotonic()
        cluster.kill(victim)
        promoted = cluster.wait_failover(victim, timeout=30)
        failover_s = time.monotonic() - t0
        cluster.restart(victim)  # back as the new master's replica: WAIT 1 can be met again
        within(60, lambda: len(acked[victim_gallery]) >= before[victim_gallery] + 10)  # after
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    print(f"\nmaster :{victim.port} killed, replica :{promoted.port} promoted after {failover_s:.1f} s; "
          f"statuses {dict(statuses)}; acknowledged {sum(len(s) for s in acked.values())} images")

    assert statuses[500] == 0 and set(statuses) <= {200, 201, 503}, statuses
    assert retry_after_missing == 0
    store = RedisStore(cluster.url, cluster=True)
    try:
        for g, ids in acked.items():
            present = store.exists_many(g, sorted(ids))
            assert all(present), f"{g}: {present.count(False)} acknowledged image(s) lost"
    finally:
        store.close()

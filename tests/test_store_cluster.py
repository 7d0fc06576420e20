"""The store itself on a real local Redis Cluster (3 masters + 3 replicas): its scripts and transactions run on the
master of each gallery's slot, and a model activation switches the galleries one transaction each, finishing when
run again after a crash part-way.

Skipped, with the reason, where no redis-server / redis-cli is found; under CI=true that fails instead."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import redis_cluster_binary
from index.redis_cluster import LocalRedisCluster
from index.store import RedisStore, StagingStale, image_id


def vec(seed: int, d: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalRedisCluster(tmp_path_factory.mktemp("store-cluster"), binary=redis_cluster_binary()) as c:
        yield c


@pytest.fixture
def store(cluster, tmp_path):
    s = RedisStore(cluster.url, cluster=True, wait_replicas=1, blob_dir=tmp_path / "blobs")
    yield s
    for g in s.list_galleries():
        s.delete_gallery(g)
    s.r.delete(s.k_active_bundle(), s.k_activation())
    s.close()


def two_galleries(cluster: LocalRedisCluster) -> list[str]:
    names, masters = [], set()
    for i in range(100):
        port = cluster.master_for_key(RedisStore.k_gallery(f"g{i}")).port
        if port not in masters:
            names.append(f"g{i}")
            masters.add(port)
        if len(names) == 2:
            return names
    raise AssertionError("no two galleries on different masters")


def test_writes_reads_and_deletes_run_on_each_gallerys_master(cluster, store):
    galleries = two_galleries(cluster)
    for n, g in enumerate(galleries):
        data = [b"image %d %d" % (n, k) for k in range(3)]
        ids = [image_id(g, d) for d in data]
        assert store.put_many(g, [(i, vec(k), {"camera_id": str(k)}) for k, i in enumerate(ids)], model="m:1",
                              images=data) == [False] * 3
        assert store.put_many(g, [(ids[0], vec(0), None)]) == [True]  # exists: untouched
        assert store.patch_metadata(g, ids[1], {"person_id": "p7"})
        assert store.get(g, ids[1]).metadata["person_id"] == "p7" and store.get(g, ids[1]).metadata["model"] == "m:1"
        np.testing.assert_array_equal(store.get_vector(g, ids[2]), vec(2))
        assert store.get_image_bytes(g, ids) == data
        assert store.delete_many(g, ids[:1]) == 1 and store.count(g) == 2
        assert store.get_image_bytes(g, ids[:1]) == [None]
    assert store.counts() == {g: 2 for g in galleries}


class _CrashingStore(RedisStore):
    """Dies (an exception standing in for a crash) when it is about to switch the gallery ``crash_at``."""

    crash_at: str | None = None

    def _queue_switch(self, pipe, g, model):
        if g == self.crash_at:
            raise RuntimeError("the process died here")
        super()._queue_switch(pipe, g, model)


def test_an_activation_switches_gallery_by_gallery_and_a_rerun_finishes_one_that_crashed(cluster, store):
    first, second = sorted(two_galleries(cluster))
    for g in (first, second):
        store.put_many(g, [(1, vec(1), None), (2, vec(2), None)], model="old:1")
    crashing = _CrashingStore(cluster.url, cluster=True, wait_replicas=1)

    def stage(s: RedisStore, seed: int) -> None:
        for g in (first, second):
            s.clear_staged(g)
            s.stage_vectors(g, [1, 2], np.stack([vec(seed + 1, 4), vec(seed + 2, 4)]))

    # staging that does not cover the images is refused before anything switches
    stage(crashing, 100)
    store.put_many(second, [(3, vec(3), None)], model="old:1")
    with pytest.raises(StagingStale):
        crashing.commit_staged([first, second], "new:1", "bundle-2", committed=(done := set()))
    assert done == {first} and store.interrupted_activation() == "bundle-2"  # first switched: no way back
    crashing.stage_vectors(second, [3], np.stack([vec(103, 4)]))
    crashing.crash_at = second
    with pytest.raises(RuntimeError, match="died"):
        crashing.commit_staged([first, second], "new:1", "bundle-2", committed=done)
    # the crash: first holds the new vectors, second the old ones, the old bundle is active, the intent says which
    assert store.get_vector(first, 1).shape == (4,) and store.get_vector(second, 1).shape == (8,)
    assert store.active_bundle() is None and store.interrupted_activation() == "bundle-2"
    assert store.get(first, 1).metadata["model"] == "new:1" and store.get(second, 1).metadata["model"] == "old:1"

    # run again (a new job re-stages everything): every gallery switches, the bundle is active, the intent gone
    stage(store, 200)
    store.stage_vectors(second, [3], np.stack([vec(203, 4)]))
    store.commit_staged([first, second], "new:1", "bundle-2")
    assert store.active_bundle() == "bundle-2" and store.interrupted_activation() is None
    for g in (first, second):
        np.testing.assert_array_equal(store.get_vector(g, 2), vec(202, 4))
        assert store.get(g, 2).metadata["model"] == "new:1" and not store.r.exists(store.k_staged(g))
    np.testing.assert_array_equal(store.get_vector(second, 3), vec(203, 4))
    crashing.close()


def test_a_script_that_reaches_a_key_of_another_master_is_a_retryable_cluster_error(cluster, store):
    """What a live reshard does to a script whose derived page key has already moved (index/vector_pages.py):
    Redis stops it with "non local key"; the store raises TryAgainError, which the service answers with 503 and
    Retry-After like any passing cluster state, not a 500."""
    import redis

    g, other = two_galleries(cluster)[:2]
    source = f"return redis.call('GET', '{RedisStore.k_gallery(other)}')"  # another master's slot
    with pytest.raises(redis.exceptions.TryAgainError, match="moving between masters"):
        store._script(source, [store.k_gallery(g)], [])


def test_compaction_runs_on_the_gallerys_master(cluster, store):
    g = two_galleries(cluster)[0]
    store.put_many(g, [(i, vec(i, 2048), None) for i in range(1, 71)])  # 8 KiB vectors: 31 to a page, 3 pages
    store.delete_many(g, list(range(1, 71, 2)))
    done = store.compact_vectors(g)
    assert (done.pages_before, done.pages_after) == (3, 2) and store.count(g) == 35
    np.testing.assert_array_equal(store.get_vector(g, 70), vec(70, 2048))

"""Index types (flat, ivf_flat, hnsw, ivf_pq): recall against exact search, ids, removals, rebuilds, GPU.

Real FAISS throughout. FAISS runs single-threaded here: on a shared 2-core machine OpenMP threads
fighting other work make everything many times slower, not faster.
"""

import threading

import faiss
import numpy as np
import pytest

from index.gpu import GpuMirror, num_gpus
from index.index_factory import IndexSpec
from index.recall import build_index, clustered_vectors, exact_neighbours, measure, recall_at_k
from index.vector_index import VectorIndex

TYPES = ("flat", "ivf_flat", "hnsw", "ivf_pq")
#: parameters for 20k vectors: nlist ~ sqrt(N); IVF probes 3/8 of the lists because a few-thousand-centre
#: data set puts about 4 of each top 10 in unrelated clusters, which only wide probing finds
PARAMS = {
    "flat": {},
    "ivf_flat": dict(nlist=128, nprobe=48),
    "hnsw": dict(hnsw_m=16, ef_search=64, ef_construction=80),
    "ivf_pq": dict(nlist=128, nprobe=48, pq_m=32, pq_nbits=8),
}
SMALL = {  # for the behaviour tests: tiny, and IVF trained from the start
    "flat": {},
    "ivf_flat": dict(nlist=8, nprobe=8, train_threshold=64),
    "hnsw": dict(hnsw_m=8, ef_search=32, ef_construction=40),
    "ivf_pq": dict(nlist=4, nprobe=4, pq_m=8, pq_nbits=4, train_threshold=64),
}


@pytest.fixture(autouse=True)
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def clustered():
    x = clustered_vectors(20_200, 256, centres=3000, seed=0)
    return x[:20_000], x[20_000:]


def test_recall_memory_latency_per_type(clustered):
    vectors, queries = clustered
    rows = {}
    for t in TYPES:
        rows[t] = measure(t, vectors, queries, k=10, threads=1, **PARAMS[t])
    rows["ivf_pq (no re-rank)"] = measure("ivf_pq", vectors, queries, k=10, threads=1,
                                          **{**PARAMS["ivf_pq"], "pq_refine": 0})
    print()
    for name, r in rows.items():
        print(f"{name:20s} recall@10 {r['recall@10']:.3f}  {r['bytes_per_vector']:7.1f} B/vector "
              f"({r['memory_per_million_bytes'] / 2**20:7.1f} MiB per 1M)  build {r['build_s']:6.2f}s  "
              f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    assert rows["flat"]["recall@10"] == 1.0
    assert rows["ivf_flat"]["recall@10"] >= 0.9
    assert rows["hnsw"]["recall@10"] >= 0.9
    assert rows["ivf_pq (no re-rank)"]["recall@10"] >= 0.6
    assert rows["ivf_pq"]["recall@10"] >= rows["ivf_pq (no re-rank)"]["recall@10"]
    assert rows["ivf_pq"]["bytes_per_vector"] < rows["flat"]["bytes_per_vector"] / 5
    # recall_at_k is the same figure on its own
    assert recall_at_k("ivf_flat", vectors, queries[:50], k=10, **PARAMS["ivf_flat"]) >= 0.85


def test_exact_duplicate_query_finds_itself_first(clustered):
    vectors, _ = clustered
    rows = np.random.default_rng(1).choice(len(vectors), 100, replace=False)
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 11  # ids other than row numbers
    exact = ids[exact_neighbours(vectors, vectors[rows], 1)[:, 0]]
    assert list(exact) == list(ids[rows])
    for t in TYPES:
        idx = build_index(t, vectors, ids=ids, **PARAMS[t])
        scores, got = idx.search(vectors[rows], 10)
        assert list(got[:, 0]) == list(exact), t
        assert np.allclose(scores[:, 0], 1.0, atol=1e-4), t
    # without its exact re-ranking, PQ still has the duplicate among the first 10 (not always first)
    raw = build_index("ivf_pq", vectors, ids=ids, **{**PARAMS["ivf_pq"], "pq_refine": 0})
    _, got = raw.search(vectors[rows], 10)
    assert all(e in g for e, g in zip(exact, got))


def _data(n, d=32, seed=0):
    return clustered_vectors(n, d, centres=40, seed=seed)


@pytest.mark.parametrize("kind", TYPES)
def test_ids_replace_remove_and_save_load(kind, tmp_path):
    x = _data(300)
    spec = IndexSpec(type=kind, gpu="off", **SMALL[kind])
    ids = np.arange(300, dtype=np.int64) + 10**12
    exact = {int(i): v for i, v in zip(ids, x)}
    idx = VectorIndex(32, spec, background=False, exact=lambda want: [exact.get(int(i)) for i in want])
    idx.add(ids[:200], x[:200])
    idx.add(ids[200:], x[200:])
    assert idx.kind == kind and len(idx) == 300
    idx.add(ids[:50], x[:50])  # applied twice (as the change-log follower does): nothing changes
    assert len(idx) == 300 and idx._impl.dead == 0
    assert idx.contains(int(ids[5])) and not idx.contains(7)
    _, got = idx.search(x[[5]], 3)
    assert got[0, 0] == ids[5]
    # replace: same id, another vector; no duplicate entry
    idx.add(ids[[5]], x[[6]])
    exact[int(ids[5])] = x[6]
    assert len(idx) == 300
    s, got = idx.search(x[[6]], 2)
    assert set(got[0]) == {ids[5], ids[6]} and s[0, 1] == pytest.approx(1.0, abs=1e-3)
    # remove: never returned again, by any search depth
    gone = ids[::3]
    assert idx.remove(np.concatenate([gone, [1, 2]])) == len(gone)
    for i in gone:
        exact.pop(int(i))
    assert len(idx) == 300 - len(gone) and not idx.contains(int(gone[0]))
    _, got = idx.search(x, len(idx))
    assert not set(got.ravel().tolist()) & set(gone.tolist())
    vecs, found = idx.vectors(np.array([ids[1], gone[1]]))
    assert found.tolist() == [True, False] and np.allclose(vecs[1], 0)
    item_ids, item_vecs = idx.items()
    assert sorted(item_ids.tolist()) == sorted(set(ids.tolist()) - set(gone.tolist()))
    assert item_vecs.shape == (len(idx), 32)
    # save / load keeps type, ids and removals
    idx.save(tmp_path / "g.faiss")
    back = VectorIndex.load(tmp_path / "g.faiss", dim=32, spec=spec)
    assert back.kind == kind and len(back) == len(idx)
    _, got = back.search(x, len(back))
    assert not set(got.ravel().tolist()) & set(gone.tolist())
    assert sorted(back.ids().tolist()) == sorted(item_ids.tolist())
    if kind != "flat":
        with pytest.raises(ValueError, match="index type is flat"):
            VectorIndex.load(tmp_path / "g.faiss", spec=IndexSpec())


def test_ivf_trains_in_background_and_keeps_answering():
    x = _data(6000, seed=3)
    ids = np.arange(6000, dtype=np.int64)
    spec = IndexSpec(type="ivf_flat", nlist=64, nprobe=64, train_threshold=3000, gpu="off")
    idx = VectorIndex(32, spec)
    idx.add(ids[:2999], x[:2999])
    assert idx.kind == "flat" and idx._journal is None
    idx.add(ids[2999:3000], x[2999:3000])  # reaches the threshold: training starts
    during = 0
    removed = []
    for s in range(3000, 6000, 100):  # writes and reads while it trains
        if idx._journal is not None:
            during += 1
        idx.add(ids[s:s + 100], x[s:s + 100])
        removed.append(int(ids[s - 2000]))
        idx.remove([removed[-1]])
        _, got = idx.search(x[[s]], 1)
        assert got[0, 0] == ids[s]
    assert idx.wait_idle(60) and idx.rebuild_error is None
    assert idx.kind == "ivf_flat" and len(idx) == 6000 - len(removed)
    assert during > 0  # some of those writes went through the journal
    _, got = idx.search(x, 10)
    assert not set(got.ravel().tolist()) & set(removed)
    kept = ~np.isin(ids, removed)
    assert (got[kept, 0] == ids[kept]).mean() > 0.99


def test_hnsw_tombstones_filtered_then_rebuilt():
    x = _data(1000, seed=4)
    ids = np.arange(1000, dtype=np.int64) + 5
    spec = IndexSpec(type="hnsw", hnsw_m=8, ef_search=16, ef_construction=40, tombstone_ratio=0.3, gpu="off")
    idx = VectorIndex(32, spec, background=False)
    idx.add(ids, x)
    gone = ids[:250]  # 25%: below the ratio, kept as tombstones
    idx.remove(gone)
    assert idx._impl.dead == 250 and len(idx) == 750
    s, got = idx.search(x[:250], 10)  # queries right on the removed vectors
    assert got.shape == (250, 10) and (got >= 0).all()
    assert not set(got.ravel().tolist()) & set(gone.tolist())
    idx.remove(ids[250:400])  # 40%: over the ratio, the graph is rebuilt without them
    assert idx._impl.dead == 0 and len(idx) == 600 and idx.kind == "hnsw"
    _, got = idx.search(x[400:], 1)
    assert (got[:, 0] == ids[400:]).mean() > 0.95


def test_spec_checks_name_the_setting():
    with pytest.raises(ValueError, match="index type must be one of"):
        IndexSpec(type="lsh").check(64)
    with pytest.raises(ValueError, match="pq_m=48 must divide the embedding dimension 256"):
        IndexSpec(type="ivf_pq", pq_m=48).check(256)
    with pytest.raises(ValueError, match="train_threshold=100 is below"):
        IndexSpec(type="ivf_flat", nlist=1024, train_threshold=100).check(64)
    with pytest.raises(ValueError, match="tombstone_ratio"):
        IndexSpec(type="hnsw", tombstone_ratio=1.5).check(64)


def test_gpu_mirror_generations_with_a_cpu_clone_as_device():
    """The GPU copy's bookkeeping, with faiss.clone_index standing in for the device copy (a real FAISS
    index on the CPU): a copy is searched only at the master's generation, pure adds follow it, a
    removal makes it stale until refreshed, a refresh that raced a removal is dropped."""
    x = _data(200, seed=5)
    master = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    master.add_with_ids(x[:100], np.arange(100, dtype=np.int64))
    mirror = GpuMirror(to_device=faiss.clone_index)
    lock = threading.Lock()
    gen = [0]

    def snapshot():
        with lock:
            clone = faiss.clone_index(master)
            mirror.begin_refresh(gen[0])
            return clone

    assert mirror.search(0, x[:1], 1) is None
    mirror.refresh_async(snapshot)
    _wait(lambda: mirror.current(0))
    assert mirror.search(0, x[:1], 1)[1][0, 0] == 0
    master.add_with_ids(x[100:110], np.arange(100, 110, dtype=np.int64))
    mirror.on_add(0, 1, np.arange(100, 110, dtype=np.int64), x[100:110], pure=True)
    gen[0] = 1
    assert mirror.search(1, x[[105]], 1)[1][0, 0] == 105  # followed the add
    master.remove_ids(faiss.IDSelectorBatch(np.array([105], np.int64)))
    gen[0] = 2
    mirror.on_change()
    assert mirror.search(2, x[[105]], 1) is None  # stale: the caller searches the master
    mirror.refresh_async(snapshot)
    _wait(lambda: mirror.current(2))
    assert mirror.search(2, x[[105]], 1)[1][0, 0] != 105
    assert mirror.search(2, x[:1], 3000) is None  # beyond the GPU k limit: CPU


def _wait(cond, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.skipif(num_gpus() == 0, reason="no GPU: faiss.get_num_gpus() == 0 (faiss-cpu, or no CUDA device)")
@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_gpu_copy_matches_cpu_and_never_returns_removed(kind):
    x = clustered_vectors(20_000, 64, centres=500, seed=6)
    ids = np.arange(20_000, dtype=np.int64) + 7
    params = {**SMALL[kind], "gpu_min_vectors": 1000}
    if kind != "flat":
        params.update(nlist=64, nprobe=16, train_threshold=5000)
    gpu_idx = VectorIndex.from_vectors(ids, x, IndexSpec(type=kind, gpu="auto", **params))
    cpu_idx = VectorIndex.from_vectors(ids, x, IndexSpec(type=kind, gpu="off", **params))
    gpu_idx.search(x[:1], 10)  # starts the device copy
    _wait(lambda: gpu_idx._gpu.current(gpu_idx._gen), timeout=60)
    assert gpu_idx._gpu.search(gpu_idx._gen, x[:50], 10) is not None
    _, g = gpu_idx.search(x[:50], 10)
    _, c = cpu_idx.search(x[:50], 10)
    assert (g[:, 0] == c[:, 0]).mean() > 0.95
    gpu_idx.remove(ids[:25])
    _, g = gpu_idx.search(x[:50], 10)  # stale copy: the CPU master answers
    assert not set(g.ravel().tolist()) & set(ids[:25].tolist())
    _wait(lambda: gpu_idx._gpu.current(gpu_idx._gen), timeout=60)
    _, g = gpu_idx.search(x[:50], 10)
    assert not set(g.ravel().tolist()) & set(ids[:25].tolist())


def test_bulk_build_meets_the_threshold_at_once():
    x = _data(3000, seed=5)
    ids = np.arange(3000, dtype=np.int64)
    spec = IndexSpec(type="ivf_flat", nlist=16, nprobe=16, train_threshold=2000, gpu="off")
    below = VectorIndex.from_vectors(ids[:1999], x[:1999], spec, threshold=True)
    assert below.kind == "flat" and len(below) == 1999
    at = VectorIndex.from_vectors(ids, x, spec, threshold=True, background=True)
    assert at.kind == "ivf_flat" and at._journal is None  # trained now, no background rebuild pending
    _, got = at.search(x[:50], 1)
    assert (got[:, 0] == ids[:50]).all()


def test_service_serves_a_large_ivf_gallery_trained_from_its_start(redis_url, server_factory, tiny_bundle,
                                                                   gallery_name):
    """Loaded from Redis past the threshold, the gallery is IVF when the service is ready: it is never served
    exact (80x slower at 1M vectors) while a background rebuild trains it."""
    import httpx

    from index.bundle import load_bundle
    from index.store import RedisStore

    bundle = load_bundle(tiny_bundle)
    x = _data(2500, d=bundle.embedding_dim, seed=6)
    store = RedisStore(redis_url)
    store.put_many(gallery_name, [(i + 1, v, {"camera_id": "c0"}) for i, v in enumerate(x)], model=bundle.model_id)
    srv = server_factory(index_type="ivf_flat", index_nlist=16, index_nprobe=16, index_train_threshold=2000)
    metrics = httpx.get(srv.url + "/metrics").text
    assert f'reid_index_vectors{{gallery="{gallery_name}",index="ivf_flat"}} 2500.0' in metrics
    assert srv.app.state.reid.indexes[gallery_name]._journal is None

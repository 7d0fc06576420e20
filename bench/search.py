"""Search latency and recall@10 against exact, per index type and gallery size, in process
(`index.recall.measure`) and over HTTP (a real `reid serve` on embedded Redis, embedding excluded).

Gallery vectors follow the real feature distribution: identity centres drawn from a Gaussian fitted to the
per-identity mean features of the shared protocol, images around them with the fitted within-identity
spread (uniform noise would make every index look better or worse than on ReID features)."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from index.bundle import ENCODER_FILE, load_bundle
from index.recall import clustered_vectors, measure
from index.vector_index import l2_normalize
from service.api_process import ApiProcess, noise_images

from . import data
from .features import protocol_features
from .timing import percentiles

INDEX_TYPES = ("flat", "ivf_flat", "hnsw", "ivf_pq")
TUNE_RECALL = 0.97  # ivf_flat's nprobe target: a margin over the goal's 0.95 for the measured queries
ENV = {"nlist": "INDEX_NLIST", "nprobe": "INDEX_NPROBE", "hnsw_m": "INDEX_HNSW_M", "ef_search": "INDEX_HNSW_EF_SEARCH",
       "ef_construction": "INDEX_HNSW_EF_CONSTRUCTION", "pq_m": "INDEX_PQ_M", "pq_refine": "INDEX_PQ_REFINE"}


class FeatureModel:
    """Between-identity Gaussian (shrunk covariance: fewer identities than dimensions) + within-identity
    per-dimension spread, fitted to L2-normalised features and their identity labels."""

    def __init__(self, features: np.ndarray, pids: list[int]):
        pids = np.asarray(pids)
        ids = np.unique(pids)
        means = np.stack([features[pids == i].mean(0) for i in ids])
        self.mean = means.mean(0)
        cov = np.cov(means, rowvar=False)
        shrink = 0.1 * np.trace(cov) / len(cov)
        self.chol = np.linalg.cholesky(cov + shrink * np.eye(len(cov)))
        residual = features - means[np.searchsorted(ids, pids)]
        self.within = residual.std(0)
        self.images_per_id = max(2.0, len(features) / len(ids))

    def draw(self, n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``n`` gallery vectors and ``queries`` query vectors (other images of the same identities)."""
        rng = np.random.default_rng(seed)
        centres = self.mean + rng.standard_normal((max(1, int(n / self.images_per_id)), len(self.mean))) @ self.chol.T
        which = rng.integers(0, len(centres), n + queries)
        x = np.empty((n + queries, len(self.mean)), np.float32)
        for start in range(0, len(x), 200_000):  # in blocks: 1M x 256 float64 temporaries would be 2 GB
            w = which[start:start + 200_000]
            x[start:start + len(w)] = centres[w] + self.within * rng.standard_normal((len(w), len(self.mean)))
        x = l2_normalize(x)
        return x[:n], x[n:]


def feature_model(bundle_dir: Path) -> tuple[FeatureModel | None, str]:
    dataset = data.protocol(data.PROTOCOL)
    if dataset is None:
        return None, "clustered random unit vectors (shared data absent)"
    q, g = protocol_features(bundle_dir / ENCODER_FILE, data.card(bundle_dir), dataset)
    pids = [s.pid for s in dataset.query] + [s.pid for s in dataset.gallery]
    return FeatureModel(np.concatenate([q, g]), pids), f"fitted to {len(pids)} {dataset.name} features"


def draw(model: FeatureModel | None, n: int, queries: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if model is None:
        x = clustered_vectors(n + queries, dim, centres=max(1, n // 4))
        return x[:n], x[n:]
    return model.draw(n, queries)


def index_params(index_type: str, n: int) -> dict:
    """Parameters per type and size: IVF cells 2*sqrt(N) (k-means on up to 256 vectors per cell: at 1M that
    training is the run's longest step, so no more cells), probing 1/16 of them until ``in_process`` tunes
    ``nprobe``; HNSW M=32, build beam 80."""
    nlist = max(16, int(2 * math.sqrt(n)))
    ivf = {"nlist": nlist, "nprobe": max(16, nlist // 16)}
    return {"flat": {}, "ivf_flat": ivf, "hnsw": {"hnsw_m": 32, "ef_search": 128, "ef_construction": 80},
            "ivf_pq": {**ivf, "pq_m": 32, "pq_refine": 4}}[index_type]


def in_process(model, dim: int, sizes, queries: int, hnsw_max: int, types=INDEX_TYPES,
               threaded_from: int = 100_000) -> dict:
    """One query per call (as the service searches). ``ivf_flat`` probes the fewest cells that reach recall@10
    0.97 on a second set of queries (tuning on the measured ones would report a selected recall); ``ivf_pq``
    then probes as many. Below ``threaded_from`` vectors on one FAISS thread: OpenMP fighting other work for
    two cores makes even exact search at 2,000 vectors take milliseconds; from there on all threads, or the IVF
    training and HNSW build alone would not fit the run. HNSW stops at ``hnsw_max`` vectors: its build at 1M
    alone takes longer than the whole run's budget on a 2-core machine; the IVF types cover 1M."""
    out = {}
    for n in sizes:
        vectors, probes = draw(model, n, 2 * queries, dim)
        tune, probes = probes[:queries], probes[queries:]
        threads = None if n >= threaded_from else 1
        out[n] = {}
        for t in types:
            if t == "hnsw" and n > hnsw_max:
                continue
            params = index_params(t, n)
            if t == "ivf_pq" and "ivf_flat" in out[n]:
                params["nprobe"] = out[n]["ivf_flat"]["params"]["nprobe"]
            out[n][t] = measure(t, vectors, probes, 10, threads=threads, tune=tune if t == "ivf_flat" else None,
                                target_recall=TUNE_RECALL, **params)
        del vectors
    return out


def fill(store, gallery: str, vectors: np.ndarray, model_id: str, batch: int = 5000) -> float:
    started = time.perf_counter()
    for start in range(0, len(vectors), batch):
        part = vectors[start:start + batch]
        store.put_many(gallery, [(1_000_000_000 + start + j, v, {"camera_id": "0"}) for j, v in enumerate(part)],
                       model=model_id)
    return time.perf_counter() - started


def over_http(bundle_dir: Path, model, n: int, requests: int, index_type: str, params: dict | None = None) -> dict:
    """p50/p99 of POST /search (top_k 10, refine none) with a real query image at gallery size N: wall
    time per request, and wall time minus the decode and embed stages the server reports."""
    import httpx

    from index.redis_server import EmbeddedRedis
    from index.store import RedisStore

    bundle = load_bundle(bundle_dir)
    blobs = data.image_bytes(16) or _noise_pngs()
    vectors, _ = draw(model, n, 0, bundle.embedding_dim)
    params = params or index_params(index_type, n)
    env = {"REID_INDEX_TYPE": index_type, "REID_INDEX_TRAIN_THRESHOLD": str(n), "REID_INDEX_GPU": "off",
           **{f"REID_{ENV[k]}": str(v) for k, v in params.items()}}
    with tempfile.TemporaryDirectory(prefix="reid-bench-search-") as tmp:
        srv = EmbeddedRedis(Path(tmp) / "redis").start()
        store, api = RedisStore(srv.url), None
        try:
            fill_s = fill(store, "bench", vectors, bundle.model_id)
            del vectors
            api = ApiProcess(Path(tmp) / "data", bundle_dir, redis_url=srv.url, env=env).start(timeout=900)
            served_by = {labels["index"]: int(v) for labels, v in api.metric_samples("reid_index_vectors")}
            if served_by != {index_type: n}:  # an exact index still training would measure the wrong thing
                raise RuntimeError(f"the API serves {served_by}, not {n:,} vectors of {index_type}")
            wall, served, search = [], [], []
            with httpx.Client(base_url=api.url, timeout=60) as client:
                for i in range(requests + 3):
                    started = time.perf_counter()
                    r = client.post("/v1/galleries/bench/search", data={"top_k": "10", "refine": "none"},
                                    files={"file": ("q.png", blobs[i % len(blobs)], "application/octet-stream")})
                    ms = (time.perf_counter() - started) * 1000
                    r.raise_for_status()
                    if i < 3:
                        continue  # warm-up
                    t = r.json()["timing_ms"]
                    wall.append(ms)
                    served.append(ms - t["decode"] - t["embed"])
                    search.append(t["search"])
            return {"n": n, "index_type": index_type, "params": params, "fill_s": round(fill_s, 1),
                    "ready_s": round(api.ready_after, 1), "wall": percentiles(wall),
                    "excluding_embedding": percentiles(served), "server_search_stage": percentiles(search)}
        finally:
            if api is not None:
                api.stop()
            store.close()
            srv.stop()


def _noise_pngs() -> list[bytes]:
    return noise_images(4, seed=0)


def run(bundle_dir: Path, cfg) -> dict:
    """``cfg``: search_sizes, search_queries, hnsw_max, http_size, http_requests, http_index_type."""
    dim = data.card(bundle_dir)["embedding_dim"]
    model, source = feature_model(bundle_dir)
    local = in_process(model, dim, cfg.search_sizes, cfg.search_queries, cfg.hnsw_max)
    tuned = local.get(cfg.http_size, {}).get(cfg.http_index_type, {}).get("params")  # same vectors' nprobe
    return {"vectors": source, "k": 10, "hnsw_max": cfg.hnsw_max, "tune_recall": TUNE_RECALL, "in_process": local,
            "http": over_http(bundle_dir, model, cfg.http_size, cfg.http_requests, cfg.http_index_type, tuned)}

"""How well each index type finds the exact neighbours, and what it costs: recall@k, memory, latency.

``recall_at_k`` answers the accuracy question for one type; ``measure`` adds build time, memory per
vector (and per million vectors) and single-query latency, for the benchmark to call at any N.
``clustered_vectors`` makes test data that looks like ReID embeddings more than uniform noise does:
unit vectors scattered around a few thousand identities.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

from .index_factory import IndexSpec
from .vector_index import VectorIndex, l2_normalize

__all__ = ["build_index", "clustered_vectors", "exact_neighbours", "measure", "recall_at_k", "tune_nprobe"]

#: the nprobe values ``tune_nprobe`` tries, smallest first
NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def clustered_vectors(n: int, dim: int = 256, centres: int = 3000, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    """``n`` L2-normalised vectors drawn around ``centres`` random unit centres (Gaussian, ``noise`` per
    unit vector norm: 0.35 puts an image about 0.94 cosine from its centre)."""
    rng = np.random.default_rng(seed)
    c = l2_normalize(rng.normal(size=(centres, dim)))
    which = rng.integers(0, centres, size=n)
    x = c[which] + rng.normal(scale=noise / np.sqrt(dim), size=(n, dim)).astype(np.float32)
    return l2_normalize(x)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of each query's exact top-``k`` by inner product (brute force)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(l2_normalize(vectors))
    return flat.search(l2_normalize(queries), k)[1]


def build_index(index_type: str, vectors: np.ndarray, ids: np.ndarray | None = None,
                **params: Any) -> VectorIndex:
    """A :class:`VectorIndex` of ``index_type`` over ``vectors`` (ids = row numbers unless given), built
    directly as that type: IVF types are trained on the vectors whatever their threshold. ``ivf_pq``
    re-ranks from ``vectors`` (as the service does from the store) unless ``pq_refine=0``."""
    spec = IndexSpec(type=index_type, **{"gpu": "off", **params})
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    row = {int(i): r for r, i in enumerate(ids.tolist())}
    exact = (lambda want: [vectors[row[int(i)]] if int(i) in row else None for i in want])
    return VectorIndex.from_vectors(ids, vectors, spec, exact=exact)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def recall_at_k(index_type: str, vectors: np.ndarray, queries: np.ndarray, k: int = 10, **params: Any) -> float:
    """Mean share of each query's exact top-``k`` that ``index_type`` returns in its top-``k``."""
    idx = build_index(index_type, vectors, **params)
    return _recall(idx.search(queries, k)[1], exact_neighbours(vectors, queries, k))


def tune_nprobe(idx: VectorIndex, vectors: np.ndarray, queries: np.ndarray, k: int, target: float) -> int:
    """Set an IVF index's ``nprobe`` to the smallest on :data:`NPROBE_LADDER` whose recall@``k`` on ``queries``
    reaches ``target`` (all cells if none does), and return it. Tune on queries other than those you then
    measure with, or the recall you report is selected on its own test set."""
    raw = idx._impl.faiss_index
    truth = exact_neighbours(vectors, queries, k)
    for nprobe in [p for p in NPROBE_LADDER if p < raw.nlist] + [int(raw.nlist)]:
        raw.nprobe = nprobe
        if _recall(idx.search(l2_normalize(queries), k)[1], truth) >= target:
            break
    return int(raw.nprobe)


def measure(index_type: str, vectors: np.ndarray, queries: np.ndarray, k: int = 10,
            threads: int | None = None, tune: np.ndarray | None = None, target_recall: float = 0.97,
            **params: Any) -> dict[str, Any]:
    """Build time, memory, single-query latency and recall@``k`` of one index type over ``vectors``.

    Memory is :meth:`VectorIndex.memory_bytes` (FAISS structures plus id bookkeeping) per vector, and
    that times a million; ``serialized_bytes_per_vector`` is the size of its saved file per vector.
    Latency is one query per call (what the service does), ``threads`` FAISS threads if given (on a
    shared machine, 1 is steadier than OpenMP fighting other work for the cores). ``ivf_pq``'s
    re-ranking reads exact vectors from ``vectors`` here; the service reads them from Redis. With ``tune``
    (other queries than ``queries``), ``ivf_flat`` gets the ``nprobe`` that reaches ``target_recall`` on them.
    """
    if threads is None:
        return _measure(index_type, vectors, queries, k, params, tune, target_recall)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    try:
        return _measure(index_type, vectors, queries, k, params, tune, target_recall)
    finally:
        faiss.omp_set_num_threads(before)


def _measure(index_type: str, vectors: np.ndarray, queries: np.ndarray, k: int, params: dict[str, Any],
             tune: np.ndarray | None, target_recall: float) -> dict[str, Any]:
    n = len(vectors)
    t0 = time.perf_counter()
    idx = build_index(index_type, vectors, **params)
    build_s = time.perf_counter() - t0
    if tune is not None and idx.kind == "ivf_flat":  # ivf_pq's recall is capped by its codes: not tunable so
        params = {**params, "nprobe": tune_nprobe(idx, vectors, tune, k, target_recall)}
    q = l2_normalize(queries)
    idx.search(q[:1], k)  # warm-up
    lat = []
    found = np.empty((len(q), k), np.int64)
    for i in range(len(q)):
        t = time.perf_counter()
        found[i] = idx.search(q[i:i + 1], k)[1][0]
        lat.append(time.perf_counter() - t)
    truth = exact_neighbours(vectors, q, k)
    per_vector = idx.memory_bytes() / max(n, 1)
    serialized = len(faiss.serialize_index(idx._impl.faiss_index)) / max(n, 1)
    lat_ms = np.asarray(lat) * 1e3
    return {
        "index_type": index_type,
        "n": n,
        "dim": int(vectors.shape[1]),
        "params": {k_: v for k_, v in params.items()},
        "build_s": round(build_s, 3),
        "bytes_per_vector": round(per_vector, 1),
        "memory_per_million_bytes": int(per_vector * 1e6),
        "serialized_bytes_per_vector": round(serialized, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 4),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 4),
        f"recall@{k}": round(_recall(found, truth), 4),
    }

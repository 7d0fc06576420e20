"""Search-time refinement with the bundle's `nformer.onnx`, shared by the service, `reid evaluate` and the
benchmarks, so that every figure measures the code that serves.

Modes (all return query x gallery similarities; higher = more alike):
- `none`: cosine of the encoder features.
- `joint`: the paper's protocol. NFormer over every query of the batch plus the whole gallery at once.
- `local`: NFormer over the queries plus the union of their top-K gallery candidates (optionally plus
  each candidate's own nearest gallery neighbours); gallery entries outside the candidates keep their cosine
  score, below every candidate. Cost independent of the gallery size.
- `kreciprocal`: k-reciprocal re-ranking (Zhong et al. 2017) on the same candidates as `local`.
- `local_kreciprocal`: both in turn on those candidates: NFormer over the query plus its candidates, as
  `local`, then k-reciprocal re-ranking of the refined features (docs/refine-combinations.md: the best
  multi-shot mode measured, and, like `kreciprocal`, a loss on single-shot galleries).

The neighbour top-k and the landmarks are chosen here (numpy), not inside the ONNX graph, so the graph is
O(N*k) in memory and a request always gives the same answer."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from .bundle import NFormerSpec

MODES = ("none", "joint", "local", "kreciprocal", "local_kreciprocal")
SMALL_KNN = 1 << 20  # up to this many similarities (4 MB), k-NN is one numpy matmul; beyond, FAISS in blocks


def sample_landmarks(n: int, layers: int, count: int, seed: int = 0) -> np.ndarray:
    """[layers, min(count, n)] distinct token indices per layer, uniformly drawn (as the official code does)
    but from a fixed seed, so the same input always gets the same landmarks."""
    return _landmarks(n, layers, count, seed).copy()


@lru_cache(maxsize=1024)
def _landmarks(n: int, layers: int, count: int, seed: int) -> np.ndarray:  # 80 us a draw, per query in `local`
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n, size=min(count, n), replace=False) for _ in range(layers)]).astype(np.int64)


def topk_neighbors(features: np.ndarray, k: int, base: np.ndarray | None = None,
                   with_similarities: bool = False):
    """[N,k] indices of each row's k most similar rows of `base` (default: the rows themselves, so each
    row's first neighbour is itself) by inner product, best first; small problems by one matmul and a partial
    sort, larger ones by FAISS's exact search in blocks, so memory stays O(N*k) whatever N. Optionally also the
    similarities."""
    import faiss

    base = features if base is None else base
    k = min(k, len(base))
    if len(features) * len(base) <= SMALL_KNN:  # one matmul: no OpenMP team to wake (ms on a busy machine)
        sims = np.asarray(features, np.float32) @ np.asarray(base, np.float32).T
        top = _k_largest(sims, k)
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
        ids = np.take_along_axis(top, order, 1).astype(np.int64)
        return (ids, np.take_along_axis(sims, ids, 1)) if with_similarities else ids
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(features, dtype=np.float32), k)
    return (ids, sims) if with_similarities else ids


def _k_largest(sims: np.ndarray, k: int) -> np.ndarray:
    """[N,k] column indices of each row's k largest, unordered. Through each row's k-th largest value (a
    value-only partition is 5x faster than argpartition at N = 201, where it was most of local's k-NN); rows
    with ties at that value take argpartition, which picks exactly k."""
    kth = np.partition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k, None]
    above = sims >= kth
    if (above.sum(1) == k).all():
        return np.nonzero(above)[1].reshape(len(sims), k)
    return np.argpartition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k:]


def expand_candidates(top: np.ndarray, expand: int, nearest: Callable[[int], np.ndarray]) -> np.ndarray:
    """A query's refine candidates: `top` (its K nearest gallery ids, best first) followed by each one's
    `expand` nearest gallery entries not already among them, in first-seen order. `nearest(k)` gives each
    candidate's k nearest gallery ids as [len(top), k] (each candidate is its own first, hence expand + 1;
    FAISS's -1 padding is skipped). The one rule for `Refiner` offline and the service over FAISS."""
    if not expand or not len(top):
        return top
    seen = set(top.tolist())
    extra = [i for i in nearest(expand + 1).ravel().tolist() if i >= 0 and not (i in seen or seen.add(i))]
    return np.concatenate([top, np.asarray(extra, dtype=top.dtype)])


class NeighborTransformer:
    """Runs `nformer.onnx` (ONNX Runtime) on one set of L2-normalised features."""

    def __init__(self, onnx_path: str | Path, spec: NFormerSpec, threads: int = 0, providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers or ["CPUExecutionProvider"])
        self.spec, self.path = spec, Path(onnx_path)

    def __call__(self, features: np.ndarray, neighbors: np.ndarray | None = None) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=np.float32)
        n = len(features)
        if neighbors is None:
            neighbors = topk_neighbors(features, self.spec.topk)
        landmarks = sample_landmarks(n, self.spec.layers, self.spec.landmarks, self.spec.landmark_seed)
        return self.session.run(["refined"], {"features": features, "neighbors": neighbors,
                                              "landmarks": landmarks})[0]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Refiner:
    """Scores queries against gallery features under one of `MODES`.

    `nformer` maps L2-normalised features [N,D] to refined, L2-normalised [N,D] (a `NeighborTransformer`, or
    any callable with that contract, e.g. the torch module during training). `candidates` is K of `local`,
    `kreciprocal` and `local_kreciprocal` (0 = the whole gallery); `expand` adds each candidate's own `expand`
    nearest gallery neighbours to the set they refine."""

    def __init__(self, nformer=None, candidates: int = 200, expand: int = 0,
                 k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
        self.nformer, self.candidates, self.expand = nformer, candidates, expand
        self.k1, self.k2, self.lambda_value = k1, k2, lambda_value

    def with_candidates(self, candidates: int) -> "Refiner":
        return Refiner(self.nformer, candidates, self.expand, self.k1, self.k2, self.lambda_value)

    def similarities(self, mode: str, query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """[Q,G], higher = more alike. Outside the candidate set of `local`/`kreciprocal`/`local_kreciprocal`,
        gallery entries keep their cosine, shifted below every candidate (the ranking a service returns past
        its K)."""
        if mode not in MODES:
            raise ValueError(f"unknown refine mode {mode!r}; one of {', '.join(MODES)}")
        query, gallery = _normalize(np.asarray(query, np.float32)), _normalize(np.asarray(gallery, np.float32))
        cosine = query @ gallery.T
        if mode == "none" or len(gallery) == 0:
            return cosine
        if mode == "kreciprocal" and not self.candidates:  # the classic: all queries and the whole gallery
            return self.kreciprocal(query, gallery)
        if mode == "joint":
            refined_query, refined_gallery = self.refine_together(query, gallery)
            return refined_query @ refined_gallery.T
        out = cosine - 10.0  # cosine lies in [-1, 1], candidate scores too: -10 puts the rest below them
        for qi in range(len(query)):
            candidates = self.candidate_ids(cosine[qi], gallery)
            out[qi, candidates] = self.rerank(mode, query[qi:qi + 1], gallery[candidates])[0]
        return out

    def candidate_ids(self, cosine_row: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """One query's candidates: its K best by cosine, best first, then their expansion."""
        k = len(cosine_row) if not self.candidates else min(self.candidates, len(cosine_row))
        top = np.argpartition(-cosine_row, k - 1)[:k] if k < len(cosine_row) else np.arange(len(cosine_row))
        top = top[np.argsort(-cosine_row[top], kind="stable")]
        return expand_candidates(top, self.expand, lambda kk: topk_neighbors(gallery[top], kk, base=gallery))

    def rerank(self, mode: str, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """[Q,C] refined similarities of queries to candidate features (what the service calls after FAISS)."""
        if mode == "local":
            refined_query, refined_candidates = self.refine_together(query, candidates)
            return refined_query @ refined_candidates.T
        if mode == "kreciprocal":
            return self.kreciprocal(query, candidates)
        if mode == "local_kreciprocal":
            return self.kreciprocal(*self.refine_together(query, candidates))
        return query @ candidates.T

    def refine_together(self, query: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The NFormer step of `local`, `local_kreciprocal` and (over the whole gallery) `joint`: one pass over
        the queries plus the candidates (in that order: landmarks are token positions); the refined queries and
        the refined candidates."""
        refined = self._run(np.concatenate([query, candidates]))
        return refined[: len(query)], refined[len(query):]

    def kreciprocal(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """[Q,C] k-reciprocal re-ranking of the candidates, all queries in one neighbourhood graph (the service
        calls it a query at a time)."""
        from .rerank import k_reciprocal_rerank

        # distance in [0, ~1.3] -> similarity in the cosine's range, higher = better
        return 1.0 - k_reciprocal_rerank(query, candidates, self.k1, self.k2, self.lambda_value)

    def _run(self, features: np.ndarray) -> np.ndarray:
        if self.nformer is None:
            raise ValueError("this model bundle has no nformer.onnx: only refine=none and kreciprocal")
        return self.nformer(features)

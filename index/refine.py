"""Search-time refinement with the bundle's `nformer.onnx`, shared by the service, `reid evaluate` and the
benchmarks, so that every figure measures the code that serves.

Modes (all return query x gallery similarities; higher = more alike):
- `none`: cosine of the encoder features.
- `joint`: the paper's protocol. NFormer over every query of the batch plus the whole gallery at once.
- `local`: NFormer over the queries plus the union of their top-K gallery candidates (optionally plus
  each candidate's own nearest gallery neighbours); gallery entries outside the candidates keep their cosine
  score, below every candidate. Cost independent of the gallery size.
- `kreciprocal`: k-reciprocal re-ranking (Zhong et al. 2017) on the same candidates as `local`.

The neighbour top-k and the landmarks are chosen here (numpy), not inside the ONNX graph, so the graph is
O(N*k) in memory and a request always gives the same answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODES = ("none", "joint", "local", "kreciprocal")


def sample_landmarks(n: int, layers: int, count: int, seed: int = 0) -> np.ndarray:
    """[layers, min(count, n)] distinct token indices per layer, uniformly drawn (as the official code does)
    but from a fixed seed, so the same input always gets the same landmarks."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n, size=min(count, n), replace=False) for _ in range(layers)]).astype(np.int64)


def topk_neighbors(features: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """[N,k] indices of each row's k most similar rows by inner product (cosine for normalised rows), itself
    included, best first. Row chunks keep memory at chunk x N."""
    n = len(features)
    k = min(k, n)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        sims = features[start:start + chunk] @ features.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(sims), 1))
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        out[start:start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


@dataclass
class NFormerSpec:
    """The card's `nformer` entry."""
    dim: int
    layers: int
    landmarks: int
    topk: int
    landmark_seed: int = 0

    @classmethod
    def from_card(cls, entry: dict) -> "NFormerSpec":
        return cls(int(entry["dim"]), int(entry["layers"]), int(entry["landmarks"]), int(entry["topk"]),
                   int(entry.get("landmark_seed", 0)))


class NeighborTransformer:
    """Runs `nformer.onnx` (ONNX Runtime) on one set of L2-normalised features."""

    def __init__(self, onnx_path: str | Path, spec: NFormerSpec, threads: int = 0, providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers or ["CPUExecutionProvider"])
        self.spec = spec

    def __call__(self, features: np.ndarray, neighbors: np.ndarray | None = None) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=np.float32)
        n = len(features)
        if neighbors is None:
            neighbors = topk_neighbors(features, self.spec.topk)
        landmarks = sample_landmarks(n, self.spec.layers, self.spec.landmarks, self.spec.landmark_seed)
        return self.session.run(["refined"], {"features": features, "neighbors": neighbors,
                                              "landmarks": landmarks})[0]

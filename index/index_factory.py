"""Which FAISS index a gallery uses, and how it is built (``REID_INDEX_TYPE`` and its parameters).

* ``flat``: exact inner product on L2-normalised vectors (the default; nothing to tune).
* ``ivf_flat`` / ``ivf_pq``: inverted lists over ``nlist`` k-means cells (spherical, as the vectors are
  on the unit sphere), ``nprobe`` cells searched; PQ stores ``pq_m`` sub-vector codes of ``pq_nbits``
  bits instead of the floats. They need training, so a gallery starts ``flat`` and is rebuilt as IVF
  once it holds ``train_threshold`` vectors (see :class:`index.vector_index.VectorIndex`).
* ``hnsw``: a graph of ``hnsw_m`` links per node, ``ef_construction`` / ``ef_search`` beam widths;
  removals are tombstones until they pass ``tombstone_ratio`` of the graph, then it is rebuilt.

PQ scores are approximate (an exact duplicate of a stored image is not always ranked first): with
``pq_refine`` > 0 the index fetches that many times ``k`` candidates and re-ranks them by their exact
vectors, which the owner supplies from where they live anyway (the Redis store), not from memory.

``IndexSpec`` holds no service types: ``service.settings`` builds it from ``REID_INDEX_*``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

from .id_indexes import FlatIds, HNSWIds, IVFIds

__all__ = ["INDEX_TYPES", "TRAINED_TYPES", "IndexSpec", "build", "new_index", "trained_ivf"]

log = logging.getLogger("reid.index")

INDEX_TYPES = ("flat", "ivf_flat", "hnsw", "ivf_pq")
TRAINED_TYPES = ("ivf_flat", "ivf_pq")
#: k-means wants about this many training points per cell; fewer cells are used below it
MIN_POINTS_PER_CELL = 39
#: k-means needs no more than this many points per cell (FAISS would subsample anyway, noisily)
MAX_POINTS_PER_CELL = 256
ADD_CHUNK = 65536


@dataclass(frozen=True)
class IndexSpec:
    type: str = "flat"
    nlist: int = 1024
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 200
    pq_m: int = 32
    pq_nbits: int = 8
    #: ivf_pq: fetch pq_refine x k candidates and re-rank them by their exact vectors (0 = off; needs the
    #: owner to supply them, see VectorIndex(exact=...))
    pq_refine: int = 4
    #: IVF types: a gallery switches from exact to IVF when it holds this many vectors
    train_threshold: int = 50_000
    #: HNSW: rebuild the graph when tombstones are more than this share of its entries
    tombstone_ratio: float = 0.2
    #: "auto": search a GPU copy when FAISS sees a GPU; "off": CPU only
    gpu: str = "auto"
    #: galleries smaller than this stay on the CPU (exact search there is sub-millisecond)
    gpu_min_vectors: int = 10_000

    @property
    def trained(self) -> bool:
        return self.type in TRAINED_TYPES

    def check(self, dim: int) -> "IndexSpec":
        """Raise ValueError, naming the setting, if these parameters cannot index ``dim``-d vectors."""
        if self.type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {self.type!r}")
        if self.pq_refine < 0:
            raise ValueError(f"index pq_refine must be >= 0, got {self.pq_refine}")
        for name in ("nlist", "nprobe", "ef_search", "ef_construction", "pq_m", "train_threshold"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"index {name} must be >= 1, got {getattr(self, name)}")
        if self.hnsw_m < 2:
            raise ValueError(f"index hnsw_m must be >= 2, got {self.hnsw_m}")
        if not 0.0 < self.tombstone_ratio < 1.0:
            raise ValueError(f"index tombstone_ratio must be in (0, 1), got {self.tombstone_ratio}")
        if self.gpu not in ("auto", "off"):
            raise ValueError(f"index gpu must be 'auto' or 'off', got {self.gpu!r}")
        if self.type == "ivf_pq":
            if dim % self.pq_m:
                raise ValueError(f"ivf_pq: pq_m={self.pq_m} must divide the embedding dimension {dim} "
                                 f"(e.g. {', '.join(str(m) for m in _divisors(dim))})")
            if not 1 <= self.pq_nbits <= 16:
                raise ValueError(f"ivf_pq: pq_nbits must be in 1..16, got {self.pq_nbits}")
        if self.trained:
            need = max(self.nlist, _min_train(self))
            if self.train_threshold < need:
                raise ValueError(f"{self.type}: train_threshold={self.train_threshold} is below the {need} "
                                 f"vectors that training needs (nlist cells, {MIN_POINTS_PER_CELL} per cell at "
                                 "least, 2**pq_nbits PQ centroids)")
        return self


def _divisors(dim: int) -> list[int]:
    return [m for m in (8, 16, 32, 64) if dim % m == 0] or [1]


def new_index(spec: IndexSpec, dim: int):
    """An empty index of the spec's type; IVF types start exact (they cannot be trained on nothing)."""
    if spec.type == "hnsw":
        return HNSWIds(dim, spec.hnsw_m, spec.ef_search, spec.ef_construction)
    return FlatIds(dim)


def build(spec: IndexSpec, dim: int, ids: np.ndarray, vecs: np.ndarray, seed: int = 0):
    """The spec's final index over ``(ids, vecs)`` (normalised, unique ids): IVF types are trained on them."""
    if spec.trained and len(vecs) >= _min_train(spec):
        idx = trained_ivf(spec, dim, vecs, seed)
    elif spec.trained:
        idx = FlatIds(dim)  # too few vectors to train on: stay exact
    else:
        idx = new_index(spec, dim)
    for s in range(0, len(ids), ADD_CHUNK):
        idx.add(ids[s:s + ADD_CHUNK], vecs[s:s + ADD_CHUNK])
    return idx


def trained_ivf(spec: IndexSpec, dim: int, sample: np.ndarray, seed: int = 0) -> IVFIds:
    """An empty IVF index of the spec's type trained on ``sample`` (normalised), for a caller that adds its
    vectors in chunks: a gallery too large to hold as float32 at once (the scale benchmark's 10M)."""
    return IVFIds(_train_ivf(spec, dim, sample, seed), spec.nprobe)


def _min_train(spec: IndexSpec) -> int:
    return max(MIN_POINTS_PER_CELL, 2 ** spec.pq_nbits if spec.type == "ivf_pq" else 1)


def _train_ivf(spec: IndexSpec, dim: int, vecs: np.ndarray, seed: int) -> faiss.IndexIVF:
    n = len(vecs)
    nlist = max(1, min(spec.nlist, n // MIN_POINTS_PER_CELL))
    if nlist < spec.nlist:
        log.warning("%s: %d training vectors are too few for nlist=%d; using %d cells", spec.type, n,
                    spec.nlist, nlist)
    quantizer = faiss.IndexFlatIP(dim)
    if spec.type == "ivf_pq":
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, spec.pq_m, spec.pq_nbits, faiss.METRIC_INNER_PRODUCT)
    else:
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.spherical = True  # unit vectors: centroids back on the sphere
    ivf.cp.seed = seed
    limit = MAX_POINTS_PER_CELL * max(nlist, 2 ** spec.pq_nbits if spec.type == "ivf_pq" else 1)
    sample = vecs
    if n > limit:
        sample = vecs[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]
    ivf.train(np.ascontiguousarray(sample, np.float32))
    return ivf

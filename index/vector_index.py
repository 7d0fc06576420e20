"""Exact inner-product vector index over L2-normalised embeddings.

A thin wrapper around FAISS ``IndexIDMap2(IndexFlatIP(d))``:

* vectors are float32, L2-normalised on the way in (so inner product == cosine);
* every vector carries a caller-chosen, stable int64 id (the store's image id);
* ``add`` with an id that is already present replaces that vector (no duplicates);
* ``search`` clips ``k`` to the index size and returns empty arrays on an empty index;
* ``save``/``load`` write a FAISS file atomically (temp file + ``os.replace``).

The index is a *cache* of the Redis store (see :mod:`index.store`); it can always be
rebuilt from it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import faiss
import numpy as np

__all__ = ["VectorIndex", "l2_normalize"]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Return a float32, C-contiguous, row-wise L2-normalised copy of ``x`` (2-D)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


class VectorIndex:
    """Exact cosine-similarity index with stable int64 ids.

    Thread-safe: a lock serialises mutations and searches (FAISS flat search is
    fast; the lock keeps ``add``/``remove`` from racing with a search).
    """

    def __init__(self, dim: int):
        if int(dim) <= 0:
            raise ValueError(f"index dimension must be positive, got {dim}")
        self.dim = int(dim)
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ helpers
    def _check_vectors(self, vecs: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(vecs, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(
                f"{what} must have shape (n, {self.dim}) for this index of dimension "
                f"{self.dim}; got shape {tuple(np.shape(vecs))}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} contain NaN or infinite values")
        return l2_normalize(arr)

    @staticmethod
    def _check_ids(ids, n: int | None = None) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if n is not None and arr.shape[0] != n:
            raise ValueError(f"got {arr.shape[0]} ids for {n} vectors")
        return np.ascontiguousarray(arr)

    # ------------------------------------------------------------------ API
    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, id_: int) -> bool:
        return self.contains(id_)

    def contains(self, id_: int) -> bool:
        with self._lock:
            try:
                self._index.reconstruct(int(id_))
            except RuntimeError:
                return False
            return True

    def add(self, ids, vecs: np.ndarray) -> None:
        """Add (or replace) vectors under the given ids."""
        vecs = self._check_vectors(vecs, "vectors")
        ids = self._check_ids(ids, vecs.shape[0])
        if len(ids) == 0:
            return
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add() call")
        with self._lock:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))  # replace semantics
            self._index.add_with_ids(vecs, ids)

    def remove(self, ids) -> int:
        """Remove ids (unknown ids are ignored). Returns how many were removed."""
        ids = self._check_ids(ids)
        if len(ids) == 0:
            return 0
        with self._lock:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def reset(self) -> None:
        with self._lock:
            self._index.reset()

    def ids(self) -> np.ndarray:
        """All ids currently in the index (int64 array, insertion order)."""
        with self._lock:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """The stored (L2-normalised) vectors of ``ids``, in that order: ``(vectors [n, dim], found [n] bool)``.

        Ids that are not in the index (e.g. deleted since a search returned them) get a zero row and
        ``found=False``, so a caller can drop them instead of failing the request.
        """
        ids = self._check_ids(ids)
        out = np.zeros((len(ids), self.dim), np.float32)
        found = np.ones(len(ids), bool)
        with self._lock:
            try:
                if len(ids):
                    out[:] = self._index.reconstruct_batch(ids)
            except RuntimeError:  # some id is gone: go one by one
                for row, id_ in enumerate(ids):
                    try:
                        out[row] = self._index.reconstruct(int(id_))
                    except RuntimeError:
                        found[row] = False
        return out, found

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of the whole index, in insertion order, read under one lock (so they match)."""
        with self._lock:
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            vecs = self._index.index.reconstruct_n(0, len(ids)) if len(ids) else np.zeros((0, self.dim), np.float32)
        return ids, np.ascontiguousarray(vecs, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by cosine similarity.

        Returns ``(scores, ids)`` both of shape ``(n_queries, min(k, len(self)))``,
        best first. An empty index (or ``k <= 0``) gives arrays with zero columns.
        """
        q = self._check_vectors(queries, "queries")
        with self._lock:
            kk = min(int(k), len(self))
            if kk <= 0:
                return (np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64))
            scores, ids = self._index.search(q, kk)
        return scores.astype(np.float32), ids.astype(np.int64)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (temp file in the same dir + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            with self._lock:
                faiss.write_index(self._index, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int | None = None) -> "VectorIndex":
        """Read an index written by :meth:`save`. If ``dim`` is given it must match."""
        raw = faiss.read_index(str(path))
        if dim is not None and raw.d != int(dim):
            raise ValueError(f"index file {path} has dimension {raw.d}, expected {dim}")
        if not isinstance(raw, faiss.IndexIDMap2):
            raw = faiss.downcast_index(raw)
            if not isinstance(raw, faiss.IndexIDMap2):
                raise ValueError(f"index file {path} is not an IndexIDMap2 index")
        obj = cls(raw.d)
        obj._index = raw
        return obj

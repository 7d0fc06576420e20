"""The vector index of one gallery: cosine search over L2-normalised embeddings with stable int64 ids.

* vectors are float32, L2-normalised on the way in (so inner product == cosine);
* every vector carries a caller-chosen, stable int64 id (the store's image id);
* ``add`` with an id that is already present replaces that vector (no duplicates);
* ``search`` clips ``k`` to the index size and returns empty arrays on an empty index;
* ``save``/``load`` write a FAISS file atomically (:func:`index.files.atomic_write`).

The FAISS index behind it is chosen by an :class:`~index.index_factory.IndexSpec` (exact ``flat`` by
default; ``ivf_flat``, ``hnsw``, ``ivf_pq``; see :mod:`index.index_factory` and :mod:`index.id_indexes`).
Some changes need the FAISS index rebuilt: an IVF gallery starts exact and is trained once it reaches
``train_threshold`` vectors, an HNSW graph is rebuilt once its tombstones pass ``tombstone_ratio``. The
rebuild runs in a background thread from a snapshot while the current index keeps answering; changes
made meanwhile are journaled and replayed onto the new index, which then replaces the old one under the
lock (atomically for readers). With a GPU (:mod:`index.gpu`) searches run on a device copy.

The index is a *cache* of the Redis store (see :mod:`index.store`); it can always be
rebuilt from it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from . import index_factory
from .files import atomic_write
from .gpu import GpuMirror, num_gpus
from .id_indexes import from_faiss
from .index_factory import IndexSpec

__all__ = ["IndexSpec", "VectorIndex", "l2_normalize"]

log = logging.getLogger("reid.index")

#: a rebuild swaps in its new index once the journal of changes made meanwhile is this short
#: (replayed under the lock); longer journals are replayed outside it first
SWAP_JOURNAL = 4096

#: ids -> their exact vectors (None where unknown): where ivf_pq re-ranks from (the store, in the service)
ExactVectors = Callable[[np.ndarray], Sequence["np.ndarray | None"]]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Return a float32, C-contiguous, row-wise L2-normalised copy of ``x`` (2-D)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


class VectorIndex:
    """Cosine-similarity index with stable int64 ids, of the type ``spec`` names (exact by default).

    Thread-safe: a lock serialises mutations and searches (the lock keeps ``add``/``remove`` from
    racing with a search). ``background=False`` runs rebuilds inline (benchmarks, tests). ``exact``
    gives the exact vectors of ids, for ``ivf_pq`` to re-rank its candidates (``spec.pq_refine``); it
    is called without the lock held.
    """

    def __init__(self, dim: int, spec: IndexSpec | None = None, *, background: bool = True,
                 exact: ExactVectors | None = None):
        if int(dim) <= 0:
            raise ValueError(f"index dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.spec = (spec or IndexSpec()).check(self.dim)
        self._impl = index_factory.new_index(self.spec, self.dim)
        self._lock = threading.RLock()
        self._background = background
        self._gen = 0  # bumped by every change (the GPU copy follows it)
        self._epoch = 0  # bumped by reset(): a rebuild started before it is discarded
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None  # while rebuilding
        self._rebuild_thread: threading.Thread | None = None
        self.rebuild_error: str | None = None
        self._gpu = GpuMirror() if self.spec.gpu == "auto" and num_gpus() > 0 else None
        self._exact = exact

    @classmethod
    def from_vectors(cls, ids, vecs: np.ndarray, spec: IndexSpec | None = None,
                     exact: ExactVectors | None = None, *, background: bool = False,
                     threshold: bool = False) -> "VectorIndex":
        """An index over ``(ids, vecs)`` built at once: IVF types trained on ``vecs`` whatever their
        threshold (benchmarks), or, with ``threshold``, only if ``vecs`` reach it (exact below it, as if
        added one by one: the service's loads from Redis, so a large gallery is never served exact while
        a background rebuild trains it)."""
        vecs = np.asarray(vecs, np.float32)
        obj = cls(vecs.shape[1], spec, background=background, exact=exact)
        vecs = obj._check_vectors(vecs, "vectors")
        ids = obj._check_ids(ids, vecs.shape[0])
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids")
        if threshold and obj.spec.trained and len(ids) < obj.spec.train_threshold:
            obj.add(ids, vecs)
        else:
            obj._impl = index_factory.build(obj.spec, obj.dim, ids, vecs)
        return obj

    @property
    def kind(self) -> str:
        """The FAISS index family in use now: ``flat`` while an IVF gallery is below its threshold."""
        return self._impl.kind

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
        return len(self._impl)

    def __contains__(self, id_: int) -> bool:
        return self.contains(id_)

    def contains(self, id_: int) -> bool:
        with self._lock:
            return self._impl.contains(int(id_))

    def add(self, ids, vecs: np.ndarray) -> None:
        """Add (or replace) vectors under the given ids."""
        vecs = self._check_vectors(vecs, "vectors")
        ids = self._check_ids(ids, vecs.shape[0])
        if len(ids) == 0:
            return
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add() call")
        with self._lock:
            same = self._impl.unchanged(ids, vecs)
            if same.any():  # a change applied twice (the change-log follower re-applies our own writes):
                if same.all():  # leave it, so HNSW gets no tombstone and a GPU copy stays current
                    return
                ids, vecs = ids[~same], vecs[~same]
            replaced = self._impl.add(ids, vecs)
            if self._journal is not None:
                self._journal.append(("add", ids, vecs))
            self._gen += 1
            if self._gpu is not None:
                self._gpu.on_add(self._gen - 1, self._gen, ids, vecs, pure=not replaced)
            self._maybe_rebuild()

    def remove(self, ids) -> int:
        """Remove ids (unknown ids are ignored). Returns how many were removed."""
        ids = self._check_ids(ids)
        if len(ids) == 0:
            return 0
        with self._lock:
            n = self._impl.remove(ids)
            if self._journal is not None:
                self._journal.append(("remove", ids, None))
            if n:
                self._gen += 1
                if self._gpu is not None:
                    self._gpu.on_change()
                self._maybe_rebuild()
            return n

    def reset(self) -> None:
        with self._lock:
            self._impl = index_factory.new_index(self.spec, self.dim)
            self._journal = None
            self._epoch += 1
            self._gen += 1
            if self._gpu is not None:
                self._gpu.on_change()

    def ids(self) -> np.ndarray:
        """All ids currently in the index (int64 array; insertion order for flat, by id for IVF)."""
        with self._lock:
            return self._impl.ids()

    def vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """The stored (L2-normalised) vectors of ``ids``, in that order: ``(vectors [n, dim], found [n] bool)``.

        Ids that are not in the index (e.g. deleted since a search returned them) get a zero row and
        ``found=False``, so a caller can drop them instead of failing the request. With ``ivf_pq`` the
        vectors are decoded from their PQ codes (approximate).
        """
        ids = self._check_ids(ids)
        with self._lock:
            vecs, found = self._impl.reconstruct(ids)
            refine = self._refining()
        if refine and found.any():  # exact vectors rather than decoded PQ codes
            exact, have = self._exact_rows(ids[found])
            rows = np.flatnonzero(found)
            vecs[rows[have]] = exact[have]
            found[rows[~have]] = False
        return vecs, found

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of the whole index, read under one lock (so they match)."""
        with self._lock:
            ids, vecs = self._impl.items()
        return ids, np.ascontiguousarray(vecs, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by cosine similarity.

        Returns ``(scores, ids)`` both of shape ``(n_queries, min(k, len(self)))``,
        best first. An empty index (or ``k <= 0``) gives arrays with zero columns. Approximate types
        may find fewer than ``k``: the missing tail has id -1 and score -inf.
        """
        q = self._check_vectors(queries, "queries")
        with self._lock:
            kk = min(int(k), len(self))
            gen, n_total = self._gen, len(self)
        if kk <= 0:
            return (np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64))
        with self._lock:
            refine = self._refining()
        fetch = min(kk * self.spec.pq_refine, n_total) if refine else kk
        found = self._gpu_search(gen, n_total, q, fetch)
        if found is None:
            with self._lock:
                fetch = min(fetch, len(self))  # a removal may have run since
                if fetch <= 0:
                    return (np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64))
                found = self._impl.search(q, fetch)
        scores, ids = np.asarray(found[0], np.float32), np.asarray(found[1], np.int64)
        if refine:
            return self._rerank(q, ids, min(kk, fetch))
        if (ids < 0).any():
            scores = np.where(ids < 0, np.float32(-np.inf), scores)
        return scores, ids

    # ------------------------------------------------------------------ ivf_pq exact re-ranking
    def _refining(self) -> bool:
        return self._exact is not None and self.spec.pq_refine > 0 and self._impl.kind == "ivf_pq"

    def _exact_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised exact vectors of ``ids`` and whether each was found (with this dimension)."""
        out = np.zeros((len(ids), self.dim), np.float32)
        have = np.zeros(len(ids), bool)
        for r, v in enumerate(self._exact(ids)):
            if v is not None and np.shape(v) == (self.dim,):
                out[r], have[r] = v, True
        if have.any():
            out[have] = l2_normalize(out[have])
        return out, have

    def _rerank(self, q: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` of each query's candidates ``ids`` by exact cosine; ids the owner no longer has drop."""
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        uniq = np.unique(ids[ids >= 0])
        vecs, have = self._exact_rows(uniq)
        row_of = {int(i): r for r, i in enumerate(uniq.tolist()) if have[r]}
        for qi in range(len(q)):
            cand = [i for i in ids[qi].tolist() if i in row_of]
            if not cand:
                continue
            sims = vecs[[row_of[i] for i in cand]] @ q[qi]
            order = np.argsort(-sims, kind="stable")[:k]
            out_s[qi, :len(order)] = sims[order]
            out_i[qi, :len(order)] = np.asarray(cand, np.int64)[order]
        return out_s, out_i

    def memory_bytes(self) -> int:
        """Estimated host memory of the FAISS index and its id bookkeeping (bytes)."""
        with self._lock:
            return int(self._impl.memory_bytes())

    # ------------------------------------------------------------------ rebuilds
    def _wants_rebuild(self) -> bool:
        impl, spec = self._impl, self.spec
        if spec.trained and impl.kind == "flat":
            return len(impl) >= spec.train_threshold
        if impl.kind == "hnsw" and impl.dead:
            return impl.dead > spec.tombstone_ratio * (impl.dead + len(impl))
        return False

    def _maybe_rebuild(self) -> None:
        """Under the lock: start a rebuild if one is due and none runs."""
        if self.rebuild_error is not None or self._journal is not None or not self._wants_rebuild():
            return
        if not self._background:
            self._rebuild_now()
            return
        self._journal = []  # journal from the snapshot on; the thread takes the snapshot under the lock
        self._rebuild_thread = threading.Thread(target=self._rebuild, args=(self._epoch,),
                                                name="faiss-rebuild", daemon=True)
        self._rebuild_thread.start()

    def _rebuild_now(self) -> None:
        ids, vecs = self._impl.items()
        t0 = time.perf_counter()
        old = self._impl.kind
        self._impl = index_factory.build(self.spec, self.dim, ids, vecs)
        self._after_swap(old, len(ids), t0)

    def _after_swap(self, old: str, n: int, t0: float) -> None:
        self._gen += 1
        if self._gpu is not None:
            self._gpu.on_change()
        log.info("index rebuilt: %s -> %s over %d vectors in %.2fs", old, self._impl.kind, n,
                 time.perf_counter() - t0)

    def _rebuild(self, epoch: int) -> None:
        t0 = time.perf_counter()
        try:
            with self._lock:
                if self._epoch != epoch:
                    return
                ids, vecs = self._impl.items()
                old = self._impl.kind
                journal = self._journal  # changes made after this snapshot
                journal.clear()
            new = index_factory.build(self.spec, self.dim, ids, vecs)  # the slow part, without the lock
            while True:
                with self._lock:
                    if self._epoch != epoch:  # reset meanwhile: this index is obsolete
                        return
                    pending = journal[:]
                    journal.clear()
                    if len(pending) <= SWAP_JOURNAL:
                        _replay(new, pending)
                        self._impl, self._journal = new, None
                        self._after_swap(old, len(ids), t0)
                        return
                _replay(new, pending)  # a long journal: catch up without blocking readers
        except Exception as e:  # keep serving the current index; do not retry in a loop
            log.exception("index rebuild failed; staying on %s", self._impl.kind)
            with self._lock:
                self.rebuild_error = repr(e)
                if self._epoch == epoch:
                    self._journal = None

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait for a running rebuild to finish (tests, benchmarks). True if none runs any more."""
        t = self._rebuild_thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    # ------------------------------------------------------------------ GPU
    def _gpu_search(self, gen: int, n: int, q: np.ndarray, k: int):
        gpu = self._gpu
        if gpu is None or gpu.disabled or self._impl.kind == "hnsw" or n < self.spec.gpu_min_vectors:
            return None
        found = gpu.search(gen, q, k)
        if found is None and not gpu.current(gen):
            gpu.refresh_async(self._gpu_snapshot)
        return found

    def _gpu_snapshot(self) -> faiss.Index:
        with self._lock:
            clone = faiss.clone_index(self._impl.faiss_index)
            self._gpu.begin_refresh(self._gen)
            return clone

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (temp file in the same dir + rename).

        The file is a plain FAISS index: ``IndexIDMap2(Flat)``, an ``IndexIVF*`` holding its ids, or
        ``IndexIDMap(HNSWFlat)`` whose removed entries have id -1.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, mode=0o600) as tmp, self._lock:  # owner-only: it holds people's embeddings
            faiss.write_index(self._impl.faiss_index, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int | None = None, spec: IndexSpec | None = None,
             exact: ExactVectors | None = None) -> "VectorIndex":
        """Read an index written by :meth:`save`. If ``dim`` is given it must match; if ``spec`` is given,
        the file's type must be the one it names (or exact, for an IVF type not trained yet). ``exact``: as
        for the constructor."""
        raw = faiss.read_index(str(path))
        if dim is not None and raw.d != int(dim):
            raise ValueError(f"index file {path} has dimension {raw.d}, expected {dim}")
        spec = spec or IndexSpec()
        impl = from_faiss(raw, nprobe=spec.nprobe, ef_search=spec.ef_search)
        if impl.kind != spec.type and not (spec.trained and impl.kind == "flat"):
            raise ValueError(f"index file {path} holds a {impl.kind} index, but the index type is {spec.type}")
        obj = cls(raw.d, spec, exact=exact)
        obj._impl = impl
        with obj._lock:
            obj._maybe_rebuild()
        return obj


def _replay(impl, journal: list[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
    for op, ids, vecs in journal:
        if op == "add":
            impl.add(ids, vecs)
        else:
            impl.remove(ids)

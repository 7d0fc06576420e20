"""FAISS indexes with stable int64 ids and replace/remove semantics, one class per index family.

Each class wraps one FAISS index over L2-normalised float32 vectors (inner product == cosine) and offers
the same small interface, so that :class:`index.vector_index.VectorIndex` does not care which it holds:

``add(ids, vecs) -> replaced``, ``remove(ids) -> removed``, ``contains(id)``, ``reconstruct(ids)``,
``unchanged(ids, vecs)`` (already stored exactly so: adding them again is a no-op), ``items()``,
``search(q, k)``, ``memory_bytes()``, ``faiss_index`` (what is saved and copied to a GPU).

* :class:`FlatIds`: ``IndexIDMap2(IndexFlatIP)``, exact.
* :class:`IVFIds`: ``IndexIVFFlat`` / ``IndexIVFPQ`` holding the ids itself (an ``IndexIDMap`` over an
  IVF cannot remove: it assumes the sub-index renumbers), with a hash-table direct map so that ids can be
  removed and reconstructed.
* :class:`HNSWIds`: ``IndexIDMap(IndexHNSWFlat)``. FAISS cannot remove from an HNSW graph, so a removed
  entry becomes a tombstone: its label is set to -1 and a bitmap of live entries filters every search
  (an ``IDSelectorBitmap`` inside the graph walk, so ``k`` live results still come back). The owner
  rebuilds the graph once tombstones pass a share of it (:attr:`HNSWIds.dead`).

Callers (VectorIndex) validate shapes, normalise, forbid duplicate ids within one call, clip ``k`` and
serialise access with a lock; these classes are not thread-safe on their own.
"""

from __future__ import annotations

import sys

import faiss
import numpy as np

__all__ = ["FlatIds", "HNSWIds", "IVFIds", "from_faiss"]

#: rough heap cost of one entry of a C++ unordered_map<int64, int64> (node, bucket, allocator slack)
_HASH_ENTRY_BYTES = 40


def _empty(dim: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)


def _reconstructs(index, id_: int) -> bool:
    """Whether a FAISS index with a direct map holds this id (reconstruct raises for an unknown one)."""
    try:
        index.reconstruct(int(id_))
    except RuntimeError:
        return False
    return True


class FlatIds:
    """Exact search: ``IndexIDMap2(IndexFlatIP)``."""

    kind = "flat"
    dead = 0

    def __init__(self, dim: int, raw: faiss.IndexIDMap2 | None = None):
        self.dim = int(dim)
        self.faiss_index = raw if raw is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> int:
        replaced = int(self.faiss_index.remove_ids(faiss.IDSelectorBatch(ids)))
        self.faiss_index.add_with_ids(vecs, ids)
        return replaced

    def remove(self, ids: np.ndarray) -> int:
        return int(self.faiss_index.remove_ids(faiss.IDSelectorBatch(ids)))

    def contains(self, id_: int) -> bool:
        return _reconstructs(self.faiss_index, id_)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.faiss_index.id_map).astype(np.int64)

    def reconstruct(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _reconstruct_each(self.faiss_index, ids, self.dim)

    def unchanged(self, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        return _same_if_all_present(self.faiss_index, ids, vecs)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids()
        if not len(ids):
            return _empty(self.dim)
        return ids, self.faiss_index.index.reconstruct_n(0, len(ids))

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.faiss_index.search(q, k)

    def memory_bytes(self) -> int:
        n = len(self)
        return n * (4 * self.dim + 8 + _HASH_ENTRY_BYTES)  # vectors, id_map, rev_map


class IVFIds:
    """``IndexIVFFlat`` or ``IndexIVFPQ`` (already trained), ids kept by the IVF lists themselves."""

    def __init__(self, raw: faiss.IndexIVF, nprobe: int):
        self.faiss_index = raw
        self.dim = int(raw.d)
        self.kind = "ivf_pq" if isinstance(raw, faiss.IndexIVFPQ) else "ivf_flat"
        self.dead = 0
        if raw.direct_map.type != faiss.DirectMap.Hashtable:  # needed to remove and reconstruct by id
            raw.set_direct_map_type(faiss.DirectMap.Hashtable)
        raw.nprobe = max(1, min(int(nprobe), int(raw.nlist)))

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def _remove(self, ids: np.ndarray) -> int:
        # the hash-table direct map only removes through an IDSelectorArray
        return int(self.faiss_index.remove_ids(faiss.IDSelectorArray(np.ascontiguousarray(ids, np.int64))))

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> int:
        replaced = self._remove(ids)
        self.faiss_index.add_with_ids(vecs, ids)
        return replaced

    def remove(self, ids: np.ndarray) -> int:
        return self._remove(ids)

    def contains(self, id_: int) -> bool:
        return _reconstructs(self.faiss_index, id_)

    def ids(self) -> np.ndarray:
        inv = self.faiss_index.invlists
        parts = []
        for lst in range(inv.nlist):
            n = inv.list_size(lst)
            if n:
                ptr = inv.get_ids(lst)
                parts.append(faiss.rev_swig_ptr(ptr, n).copy())
                inv.release_ids(lst, ptr)
        # sorted: an IVF has no insertion order, and callers like a stable one
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    def reconstruct(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _reconstruct_each(self.faiss_index, ids, self.dim)

    def unchanged(self, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        if self.kind == "ivf_pq":  # stored codes decode to what the same vector would encode to
            vecs = self.faiss_index.sa_decode(self.faiss_index.sa_encode(vecs))
        return _same_if_all_present(self.faiss_index, ids, vecs)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids()
        if not len(ids):
            return _empty(self.dim)
        return ids, np.ascontiguousarray(self.faiss_index.reconstruct_batch(ids), np.float32)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.faiss_index.search(q, k)  # may pad with id -1 when the probed lists hold fewer than k

    def memory_bytes(self) -> int:
        ivf = self.faiss_index
        n = len(self)
        code = ivf.code_size
        coarse = ivf.nlist * self.dim * 4
        pq = 0
        if isinstance(ivf, faiss.IndexIVFPQ):
            pq = ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub * 4
        return coarse + pq + n * (code + 8 + _HASH_ENTRY_BYTES)  # codes, list ids, direct map


class HNSWIds:
    """``IndexIDMap(IndexHNSWFlat)`` with tombstones for removed entries (see the module docstring)."""

    kind = "hnsw"

    def __init__(self, dim: int, m: int, ef_search: int, ef_construction: int,
                 raw: faiss.IndexIDMap | None = None):
        self.dim = int(dim)
        if raw is None:
            hnsw = faiss.IndexHNSWFlat(self.dim, int(m), faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = int(ef_construction)
            raw = faiss.IndexIDMap(hnsw)
        self.faiss_index = raw
        self._hnsw = faiss.downcast_index(raw.index)  # owned by `raw`, which we keep
        self.ef_search = int(ef_search)
        self._pos: dict[int, int] = {}  # live id -> position in the graph
        self._labels = np.zeros(0, np.int64)  # view of raw.id_map (-1 = tombstone); refreshed after adds
        self._live = np.zeros(0, np.uint8)  # bitmap over positions, bit order little
        self._refresh_labels()
        for pos, id_ in enumerate(self._labels.tolist()):
            if id_ >= 0:
                self._pos[id_] = pos
        self._live = np.packbits(self._labels >= 0, bitorder="little")
        self.dead = int(self.faiss_index.ntotal) - len(self._pos)

    def _refresh_labels(self) -> None:
        n = int(self.faiss_index.ntotal)
        # the vector may have moved when it grew: take a fresh view of its memory
        self._labels = faiss.rev_swig_ptr(self.faiss_index.id_map.data(), n) if n else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._pos)

    def _kill(self, ids: np.ndarray) -> int:
        n = 0
        for id_ in ids.tolist():
            pos = self._pos.pop(id_, None)
            if pos is not None:
                self._labels[pos] = -1
                self._live[pos >> 3] &= np.uint8(0xFF ^ (1 << (pos & 7)))
                n += 1
        self.dead += n
        return n

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> int:
        replaced = self._kill(ids)
        start = int(self.faiss_index.ntotal)
        self.faiss_index.add_with_ids(vecs, ids)
        self._refresh_labels()
        for off, id_ in enumerate(ids.tolist()):
            self._pos[id_] = start + off
        total = int(self.faiss_index.ntotal)
        need = (total + 7) // 8
        if len(self._live) < need:
            grown = np.zeros(max(need, 2 * len(self._live)), np.uint8)
            grown[:len(self._live)] = self._live
            self._live = grown
        for pos in range(start, total):  # new entries are live
            self._live[pos >> 3] |= np.uint8(1 << (pos & 7))
        return replaced

    def remove(self, ids: np.ndarray) -> int:
        return self._kill(ids)

    def contains(self, id_: int) -> bool:
        return int(id_) in self._pos

    def ids(self) -> np.ndarray:
        return np.fromiter(self._pos.keys(), np.int64, len(self._pos))

    def reconstruct(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros((len(ids), self.dim), np.float32)
        pos = np.array([self._pos.get(int(i), -1) for i in ids], np.int64)
        found = pos >= 0
        if found.any():
            out[found] = self._hnsw.reconstruct_batch(pos[found])
        return out, found

    def unchanged(self, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        old, found = self.reconstruct(ids)
        return found & np.all(old == vecs, axis=1)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._pos:
            return _empty(self.dim)
        ids = self.ids()
        pos = np.fromiter(self._pos.values(), np.int64, len(self._pos))
        return ids, np.ascontiguousarray(self._hnsw.reconstruct_batch(pos), np.float32)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, int(k))  # efSearch below k would cut results short
        live = self._live  # kept referenced for the duration of the search
        if self.dead:
            params.sel = faiss.IDSelectorBitmap(int(self.faiss_index.ntotal), faiss.swig_ptr(live))
        scores, pos = self._hnsw.search(q, int(k), params=params)
        labels = np.where(pos >= 0, self._labels[np.maximum(pos, 0)], -1)
        # belt and braces: a tombstone must never come back, even if the selector were bypassed
        bad = labels < 0
        if bad.any():
            scores = np.where(bad, -np.inf, scores).astype(np.float32)
        return scores, labels

    def memory_bytes(self) -> int:
        total = int(self.faiss_index.ntotal)
        hnsw = self._hnsw.hnsw
        graph = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
        id_map = total * 8
        # the id -> position dict: slots plus the two int objects of each entry
        pos = sys.getsizeof(self._pos) + 64 * len(self._pos)
        return total * 4 * self.dim + graph + id_map + pos + self._live.nbytes


def _same_if_all_present(index: faiss.Index, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """Per id, whether it is stored with exactly this vector. Only answered when every id is present (one
    batch look-up, the case of a change applied twice); otherwise all False, i.e. replace them all, which
    is correct and avoids one failing look-up per new id."""
    try:
        old = index.reconstruct_batch(ids)
    except RuntimeError:
        return np.zeros(len(ids), bool)
    return np.all(old == vecs, axis=1)


def _reconstruct_each(index: faiss.Index, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of ``ids`` by id; a missing id gives a zero row and ``found=False``."""
    out = np.zeros((len(ids), dim), np.float32)
    found = np.ones(len(ids), bool)
    if not len(ids):
        return out, found
    try:
        out[:] = index.reconstruct_batch(ids)
    except RuntimeError:  # some id is gone: go one by one
        for row, id_ in enumerate(ids.tolist()):
            try:
                out[row] = index.reconstruct(int(id_))
            except RuntimeError:
                found[row] = False
    return out, found


def from_faiss(raw: faiss.Index, *, nprobe: int = 32, ef_search: int = 128):
    """Wrap an index read from disk (:meth:`VectorIndex.save` wrote it) in the matching class."""
    if isinstance(raw, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(raw.index), faiss.IndexFlat):
        return FlatIds(raw.d, raw)
    if isinstance(raw, faiss.IndexIVF):
        return IVFIds(raw, nprobe)
    if isinstance(raw, faiss.IndexIDMap) and isinstance(faiss.downcast_index(raw.index), faiss.IndexHNSW):
        return HNSWIds(raw.d, 0, ef_search, 0, raw=raw)
    raise ValueError(f"unsupported index in file: {type(raw).__name__} (expected IDMap2+Flat, IVF, IDMap+HNSW)")

"""Search on a GPU copy of a CPU index when FAISS sees a GPU (``REID_INDEX_GPU=auto``).

FAISS GPU indexes cannot remove ids, so the CPU index stays the master: it takes every add and remove,
and :class:`GpuMirror` keeps a read-only copy on the device for searching. The copy carries the
master's *generation* (a counter bumped by every change); a search uses the copy only when the
generations match, else it runs on the CPU master and a refresh is started in the background. Pure adds
are also applied to the copy (GPU indexes can add), so steady ingest does not keep it stale; a removal
or a replaced id makes it stale until the next refresh. A removed id can therefore never be returned.

HNSW has no FAISS GPU index: those galleries stay on the CPU. ``k`` above :data:`MAX_K` (the FAISS GPU
limit) also runs on the CPU. With faiss-cpu (no ``StandardGpuResources``) nothing here is ever used.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import faiss
import numpy as np

log = logging.getLogger("reid.index")

__all__ = ["GpuMirror", "MAX_K", "num_gpus"]

#: FAISS GPU k-selection (and IVF nprobe) limit
MAX_K = 2048

_resources = None
#: one lock for every GPU call: StandardGpuResources is not safe for concurrent use
_gpu_lock = threading.Lock()


def num_gpus() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # a broken CUDA install: behave as CPU-only
        return 0


def _to_gpu(cpu_index: faiss.Index, device: int) -> faiss.Index:
    global _resources
    if _resources is None:
        _resources = faiss.StandardGpuResources()
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = False  # keep IVF-Flat / flat results identical to the CPU master
    gpu = faiss.index_cpu_to_gpu(_resources, device, cpu_index, opts)
    ivf = _ivf_of(gpu)
    if ivf is not None and hasattr(ivf, "nprobe"):
        ivf.nprobe = min(int(ivf.nprobe), MAX_K)
    return gpu


def _ivf_of(index: faiss.Index):
    inner = index.index if hasattr(index, "index") and hasattr(index, "id_map") else index
    try:
        return faiss.downcast_index(inner)
    except Exception:
        return None


class GpuMirror:
    """A GPU copy of one CPU index, kept at the master's generation (see the module docstring).

    ``to_device`` copies a CPU index to the device (the default uses FAISS's GPU cloner); a CPU clone
    can stand in for it to exercise the bookkeeping on a machine without a GPU.
    """

    def __init__(self, device: int = 0, to_device: Callable[[faiss.Index], faiss.Index] | None = None):
        self.device = device
        self._to_device = to_device or (lambda idx: _to_gpu(idx, device))
        self._copy: faiss.Index | None = None
        self._gen = -1  # generation of the master that the copy equals
        self._lock = threading.Lock()  # guards the fields below (GPU calls also hold _gpu_lock)
        self._refreshing = False
        self._pending: list[tuple[np.ndarray, np.ndarray]] | None = None  # adds during a refresh
        self._pending_gen = -1
        self.disabled = False  # the device refused this index (e.g. an IVF-PQ layout it lacks)

    def current(self, gen: int) -> bool:
        return self._copy is not None and self._gen == gen

    def search(self, gen: int, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Search the copy if it equals the master at ``gen``; None means: search the master."""
        if k > MAX_K:
            return None
        with self._lock:
            if not self.current(gen):
                return None
            copy = self._copy
            with _gpu_lock:
                return copy.search(q, k)

    def on_add(self, gen_before: int, gen_after: int, ids: np.ndarray, vecs: np.ndarray, pure: bool) -> None:
        """The master went from ``gen_before`` to ``gen_after`` by adding ``ids``; ``pure``: none replaced."""
        with self._lock:
            if pure and self.current(gen_before):
                try:
                    with _gpu_lock:
                        self._copy.add_with_ids(vecs, ids)
                    self._gen = gen_after
                except Exception as e:  # leave it stale; the next refresh replaces it
                    log.warning("GPU copy: add failed (%s); searching on the CPU until it is refreshed", e)
            if self._refreshing:
                if pure and self._pending is not None and self._pending_gen == gen_before:
                    self._pending.append((ids.copy(), vecs.copy()))
                    self._pending_gen = gen_after
                else:
                    self._pending = None  # the copy being made will be stale: drop it when it lands

    def on_change(self) -> None:
        """The master changed in a way the copy cannot follow (removal, replacement, swap)."""
        with self._lock:
            if self._refreshing:
                self._pending = None

    def begin_refresh(self, gen: int) -> None:
        """Called by the owner's snapshot, under the owner's lock, right after it cloned the master at ``gen``:
        adds from here on are queued for the copy being made."""
        with self._lock:
            self._pending, self._pending_gen = [], gen

    def refresh_async(self, snapshot: Callable[[], faiss.Index]) -> None:
        """Start a background refresh unless one runs. ``snapshot()`` clones the master under the owner's
        lock and calls :meth:`begin_refresh` before releasing it, so that no change slips in between."""
        with self._lock:
            if self._refreshing or self.disabled:
                return
            self._refreshing = True
            self._pending = None
        threading.Thread(target=self._refresh, args=(snapshot,), name="faiss-gpu-refresh", daemon=True).start()

    def _refresh(self, snapshot: Callable[[], faiss.Index]) -> None:
        try:
            clone = snapshot()
            with _gpu_lock:
                copy = self._to_device(clone)
            with self._lock:
                if self._pending is not None:  # else the master changed in a way the copy cannot follow
                    with _gpu_lock:
                        for ids, vecs in self._pending:
                            copy.add_with_ids(vecs, ids)
                    self._copy, self._gen = copy, self._pending_gen
        except Exception as e:
            log.warning("GPU copy of the index failed (%s); this index searches on the CPU", e)
            self.disabled = True
        finally:
            with self._lock:
                self._refreshing = False
                self._pending = None

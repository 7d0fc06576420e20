"""This process's gallery -> FAISS index map: a cache of the vectors in the Redis store, and its one owner.

Every index in the map holds vectors of one model (:class:`IndexedModel`); switching models replaces the whole
map at once (:meth:`IndexCache.install`). The map's lock is held to look up and swap entries, and while a gallery
that this process does not have yet is built from the store (so that two requests do not build it twice).
Changing an index's content is the index's own business (VectorIndex locks itself); keeping every index equal to
the store, in change-log order, is :class:`service.index_sync.IndexSync`'s.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from index.index_factory import IndexSpec
from index.store import RedisStore
from index.vector_index import VectorIndex

log = logging.getLogger("reid.service")


@dataclass(frozen=True)
class IndexedModel:
    """The model whose vectors the indexes hold (snapshots are keyed on it)."""

    bundle_id: str
    model_id: str
    dim: int


class IndexCache:
    def __init__(self, store: RedisStore, spec: IndexSpec, model: IndexedModel):
        self.store, self.spec = store, spec
        self.model = model
        self._indexes: dict[str, VectorIndex] = {}
        #: gallery -> stored vectors of another dimension than the model's (not indexed: re-ingest them)
        self._skipped: dict[str, int] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ reading
    def get(self, gallery: str) -> VectorIndex | None:
        """The gallery's index if this process has one (never builds)."""
        with self._lock:
            return self._indexes.get(gallery)

    def all(self) -> dict[str, VectorIndex]:
        """Gallery -> index, a copy taken at one moment."""
        with self._lock:
            return dict(self._indexes)

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Gallery -> (vectors in its index, stored vectors it cannot hold), taken at one moment."""
        with self._lock:
            return {g: (len(idx), self._skipped.get(g, 0)) for g, idx in self._indexes.items()}

    def index_for(self, gallery: str, create: bool = False) -> VectorIndex | None:
        """The gallery's index; built from the store if the gallery exists there but not here (an empty one with
        ``create``; None without)."""
        with self._lock:
            idx = self._indexes.get(gallery)
            if idx is not None:
                return idx
            if self.store.gallery_exists(gallery):
                idx = self.build(gallery)
            elif create:
                idx = self.new_index(gallery=gallery)
            else:
                return None
            self._indexes[gallery] = idx
            return idx

    # ------------------------------------------------------------------ building (not in the map until put there)
    def new_index(self, dim: int | None = None, gallery: str | None = None) -> VectorIndex:
        """An empty index for a gallery (the one place that says which kind: REID_INDEX_*)."""
        return VectorIndex(dim or self.model.dim, **self.load_kwargs(gallery))

    def load_kwargs(self, gallery: str | None = None) -> dict[str, Any]:
        """Extra arguments for ``VectorIndex.load`` when a snapshot is read (the index kind, for instance)."""
        kw: dict[str, Any] = {"spec": self.spec}
        if gallery is not None and self.spec.type == "ivf_pq":
            kw["exact"] = lambda ids: self.store.get_vectors(gallery, ids)  # re-rank PQ candidates from Redis
        return kw

    def build(self, gallery: str, dim: int | None = None) -> VectorIndex:
        """The gallery's index built from the vectors stored in Redis (HSCAN; nothing is re-embedded)."""
        dim = dim or self.model.dim
        skipped, id_parts, vec_parts = 0, [], []
        for ids, vecs in self.store.iter_vectors(gallery):
            if vecs.shape[1] != dim:
                skipped += len(ids)
                continue
            id_parts.append(ids)
            vec_parts.append(vecs)
        if not id_parts:
            idx = self.new_index(dim, gallery)
        else:  # in one go: a gallery past the IVF threshold is trained now, never served exact meanwhile
            ids, first = np.unique(np.concatenate(id_parts), return_index=True)  # HSCAN may repeat a field
            idx = VectorIndex.from_vectors(ids, np.concatenate(vec_parts)[first], background=True, threshold=True,
                                           **self.load_kwargs(gallery))
        if skipped:
            log.warning("gallery %s: %d stored vectors have a different dimension than model %s; "
                        "they are not searchable (re-ingest them)", gallery, skipped, self.model.model_id)
        with self._lock:
            self._skipped[gallery] = skipped
        return idx

    # ------------------------------------------------------------------ changing the map
    def put(self, gallery: str, idx: VectorIndex) -> None:
        with self._lock:
            self._indexes[gallery] = idx

    def drop(self, gallery: str) -> None:
        with self._lock:
            self._indexes.pop(gallery, None)
            self._skipped.pop(gallery, None)

    def replace(self, indexes: dict[str, VectorIndex]) -> None:
        """Every gallery's index at once (of the same model)."""
        with self._lock:
            self._indexes = dict(indexes)

    def install(self, model: IndexedModel, indexes: dict[str, VectorIndex]) -> None:
        """Another model's indexes, built from its vectors, instead of all of these."""
        with self._lock:
            self.model = model
            self._indexes = dict(indexes)
            self._skipped = {g: 0 for g in indexes}

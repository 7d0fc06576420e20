"""``refine=auto``: refine only the galleries where it pays, decided from each gallery's own features.

The rule (index/gallery_profile.py, measurements in docs/refine-auto.md): a gallery whose items have near
twins (``neighbour_excess`` at or above ``REID_REFINE_AUTO_THRESHOLD``) is multi-shot and gets
``REID_REFINE_AUTO_MODE``; any other gets ``none``.

`RefineAdvisor` is the one owner of the per-gallery decisions. A decision is made on first use and again
once the gallery's size has moved by more than ``REPROFILE_DRIFT`` of itself, or under another model (its
features differ). Making one costs one FAISS top-4 search for at most ``DEFAULT_SAMPLE`` (500) items: a
few milliseconds with IVF or HNSW, an estimated 1.4 s per million vectors with the exact flat index
(0.26 TFLOP at the 186 GFLOP/s sgemm rate `make bench` measured), paid by one search request each time the
gallery grows by 10 %."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from index.gallery_profile import DEFAULT_SAMPLE, MIN_ITEMS, GalleryProfile, choose_refine, profile_gallery
from index.vector_index import VectorIndex

REPROFILE_DRIFT = 0.1


@dataclass(frozen=True)
class AutoDecision:
    mode: str  # what refine=auto applies to this gallery now
    rule: str  # the rule in words, for /v1/galleries/{g}
    profile: GalleryProfile | None  # None: too few items to tell
    model: str
    decided_at: float

    def to_dict(self) -> dict:
        return {"mode": self.mode, "rule": self.rule, "model": self.model,
                "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.decided_at)),
                "profile": None if self.profile is None else self.profile.to_dict()}


def kth_other(idx: VectorIndex, ids: np.ndarray):
    """Each sampled item's k-th largest cosine to other gallery items: its top k + 1, itself dropped."""
    def run(vectors: np.ndarray, k: int) -> np.ndarray:
        scores, found = idx.search(vectors, k + 1)
        out = np.full(len(ids), -1.0)
        for row, (item, s, f) in enumerate(zip(ids, scores, found)):
            others = s[(f != item) & (f >= 0)]
            if len(others) >= k:
                out[row] = others[k - 1]
        return out
    return run


class RefineAdvisor:
    def __init__(self, mode: str, threshold: float, sample: int = DEFAULT_SAMPLE, seed: int = 0):
        self.mode, self.threshold, self.sample, self.seed = mode, threshold, sample, seed
        self._lock = threading.Lock()
        self._decisions: dict[str, AutoDecision] = {}

    def rule(self, mode: str) -> str:
        return (f"{mode} when neighbour_excess >= {self.threshold:g} (items have near twins: multi-shot), "
                f"else none; none below {MIN_ITEMS} items")

    def decide(self, gallery: str, idx: VectorIndex | None, model: str, has_nformer: bool = True) -> AutoDecision:
        """The gallery's current decision, re-made when it is stale. Without an NFormer in the model, a
        multi-shot gallery gets kreciprocal instead of local or local_kreciprocal."""
        size = 0 if idx is None else len(idx)
        mode = self.mode if has_nformer else "kreciprocal"
        with self._lock:
            current = self._decisions.get(gallery)
        if current is not None and current.model == model and not self._drifted(current, size):
            return current
        profile = self._profile(idx) if size >= MIN_ITEMS else None
        decision = AutoDecision(choose_refine(profile, self.threshold, mode), self.rule(mode), profile, model,
                                time.time())
        with self._lock:
            self._decisions[gallery] = decision
        return decision

    def forget(self, gallery: str | None = None) -> None:
        with self._lock:
            if gallery is None:
                self._decisions.clear()
            else:
                self._decisions.pop(gallery, None)

    @staticmethod
    def _drifted(decision: AutoDecision, size: int) -> bool:
        if decision.profile is None:  # undecided for want of items: look again once there are enough
            return size >= MIN_ITEMS
        before = decision.profile.items
        return abs(size - before) > REPROFILE_DRIFT * before

    def _profile(self, idx: VectorIndex) -> GalleryProfile:
        ids = idx.ids()
        if len(ids) > self.sample:
            ids = np.sort(np.random.default_rng(self.seed).choice(ids, size=self.sample, replace=False))
        vectors, found = idx.vectors(ids)
        ids, vectors = ids[found], vectors[found]
        return profile_gallery(vectors, len(idx), kth_other(idx, ids))

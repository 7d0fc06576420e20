"""One search, whichever endpoint asked (service/routes/search.py): decode the query images, embed them (a
tracklet's as one aggregate), rank the gallery (service/ranking.py) and mark the matches against the gallery's
calibration. No HTTP here: a bad request or image raises `SearchError`.

A tracklet's query is the mean of its crops' L2-normalised embeddings, re-normalised. Once the gallery is
calibrated (``POST /calibrate``) each result also has ``match`` (cosine above the stored threshold).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from functools import partial

import numpy as np

from index.vector_index import l2_normalize

from . import calibration
from .batcher import embed_images
from .images import ImageError, decode_image
from .ranking import Gallery, SearchError, SearchPlan, SearchRequest, plan_search, rank
from .schemas import SearchResult, SearchTiming
from .settings import RefineMode
from .state import ServiceState


class QueryKind(Enum):
    single = "single"  # one image, one query
    batch = "batch"  # each image its own query, refined together
    tracklet = "tracklet"  # several crops of one person, one query


@dataclass
class SearchOutcome:
    results: list[list[SearchResult]]  # per query
    timing: SearchTiming
    plan: SearchPlan
    model: str  # the model that embedded and ranked
    threshold: float | None  # the gallery's calibrated threshold, if any


def aggregate(vecs: np.ndarray) -> np.ndarray:
    """A tracklet's query: the mean of its L2-normalised embeddings, re-normalised, as (1, D)."""
    return l2_normalize(l2_normalize(vecs).mean(axis=0, keepdims=True))


def run_search(state: ServiceState, gallery: str, blobs: list[tuple[str | None, bytes]], request: SearchRequest,
               kind: QueryKind) -> SearchOutcome:
    """Results, timing and the plan, all of one model (see ServiceState.model_lock)."""
    t0 = time.perf_counter()
    images = _decode(state, blobs, name_files=kind is not QueryKind.single)
    td = time.perf_counter()
    with state.model_lock.shared():
        plan = plan_search(state, request, gallery)  # again: the model may have changed since the request came
        t1 = time.perf_counter()
        queries = embed_images(state, images)
        if kind is QueryKind.tracklet:
            queries = aggregate(queries)
        t2 = time.perf_counter()
        idx = state.index_for(gallery)
        ranking = rank(None if idx is None else Gallery(idx, partial(state.store.get_many, gallery)), queries, plan,
                       state.refiner)
        model = state.bundle.model_id
    calib = calibration.load(state.store, gallery)
    if calib is not None:
        for res in ranking.results:
            for r in res:
                r.match = r.cosine > calib["threshold"]
    t3 = time.perf_counter()
    timing = SearchTiming(decode=_ms(t0, td), embed=_ms(t1, t2), search=round(ranking.search_s * 1000.0, 3),
                          refine=None if plan.applied is RefineMode.none else round(ranking.refine_s * 1000.0, 3),
                          total=_ms(t0, t3))
    return SearchOutcome(ranking.results, timing, plan, model, None if calib is None else float(calib["threshold"]))


def _decode(state: ServiceState, blobs: list[tuple[str | None, bytes]], name_files: bool) -> list:
    """Decode every file or fail the whole request (all or nothing), naming the bad file where several may come."""
    images = []
    for i, (name, data) in enumerate(blobs):
        try:
            images.append(decode_image(data, max_pixels=state.settings.max_image_pixels))
        except ImageError as e:
            if not name_files:
                raise SearchError(e.code, e.message, e.status_code) from None
            raise SearchError(e.code, f"file #{i} ({name!r}): {e.message}", e.status_code,
                              extra={"index": i, "filename": name}) from None
    return images


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000.0, 3)

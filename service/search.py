"""One search, whichever endpoint asked (service/routes/search.py): decode the query images, embed them (a
tracklet's as one aggregate), rank the gallery (service/ranking.py) and mark the matches against the gallery's
calibration. No HTTP here: a bad request or image raises `SearchError`.

A search with an image already in the gallery (`run_stored_search`, what a click on a result of the web page
runs) takes its stored vector as the query: nothing is decoded or embedded, so it works whether or not the
image's bytes are kept, and the image itself is left out of its own results.

A tracklet's query is the mean of its crops' L2-normalised embeddings, re-normalised. Once the gallery is
calibrated (``POST /calibrate``) each result also has ``match`` (cosine above the stored threshold).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from enum import Enum
from functools import partial

import numpy as np

from index.vector_index import l2_normalize

from . import calibration
from .batcher import embed_queries
from .images import ImageError, decode_image
from .ranking import Gallery, Ranking, SearchError, SearchPlan, SearchRequest, plan_search, rank
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
    candidates_used: int | None = None  # see ranking.Ranking


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
        queries = embed_queries(state, images)
        if kind is QueryKind.tracklet:
            queries = aggregate(queries)
        t2 = time.perf_counter()
        ranking = _rank(state, gallery, queries, plan)
        model = state.bundle.model_id
    threshold = _mark_matches(state, gallery, ranking.results)
    t3 = time.perf_counter()
    timing = SearchTiming(decode=_ms(t0, td), embed=_ms(t1, t2), search=round(ranking.search_s * 1000.0, 3),
                          refine=_refine_ms(plan, ranking), total=_ms(t0, t3))
    return SearchOutcome(ranking.results, timing, plan, model, threshold, ranking.candidates_used)


def run_stored_search(state: ServiceState, gallery: str, image_id: int, request: SearchRequest) -> SearchOutcome:
    """One query, the stored vector of gallery image ``image_id``; its results leave the image itself out.
    Reading the vector counts as search time (a store look-up); decode and embed are 0."""
    t0 = time.perf_counter()
    with state.model_lock.shared():  # the vector and the index of one model
        plan = plan_search(state, request, gallery)
        vector = state.store.get_vector(gallery, image_id)
        if vector is None:
            raise SearchError("image_not_found", f"image {image_id} not found in gallery {gallery!r}", 404)
        t1 = time.perf_counter()
        # one more than asked, since the image itself is among the gallery's best answers to its own vector
        ran = _one_more(plan)
        ranking = _rank(state, gallery, vector[None, :], ran)
        model = state.bundle.model_id
    results = [[r for r in ranking.results[0] if r.id != image_id][:plan.top_k]]
    threshold = _mark_matches(state, gallery, results)
    t3 = time.perf_counter()
    timing = SearchTiming(decode=0.0, embed=0.0, search=round((t1 - t0 + ranking.search_s) * 1000.0, 3),
                          refine=_refine_ms(plan, ranking), total=_ms(t0, t3))
    return SearchOutcome(results, timing, ran, model, threshold, ranking.candidates_used)  # the K that ran


def _one_more(plan: SearchPlan) -> SearchPlan:
    top_k = plan.top_k + 1
    return replace(plan, top_k=top_k, candidates=None if plan.candidates is None else max(plan.candidates, top_k))


def _rank(state: ServiceState, gallery: str, queries: np.ndarray, plan: SearchPlan) -> Ranking:
    idx = state.index_for(gallery)
    return rank(None if idx is None else Gallery(idx, partial(state.store.get_many, gallery)), queries, plan,
                state.refiner)


def _mark_matches(state: ServiceState, gallery: str, results: list[list[SearchResult]]) -> float | None:
    """Once the gallery is calibrated, each result's ``match``; returns the threshold (None if not calibrated)."""
    calib = calibration.load(state.store, gallery)
    if calib is None:
        return None
    for res in results:
        for r in res:
            r.match = r.cosine > calib["threshold"]
    return float(calib["threshold"])


def _refine_ms(plan: SearchPlan, ranking: Ranking) -> float | None:
    return None if plan.applied is RefineMode.none else round(ranking.refine_s * 1000.0, 3)


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

"""Ranking one gallery for embedded queries under a refine mode; no HTTP here (service/search.py runs it for
every search endpoint).

Refine modes (index/refine.py; the bundle's ``nformer.onnx`` runs local, local_kreciprocal and joint):

- ``none``: FAISS cosine ranking.
- ``local``: FAISS top-K candidates among the images that pass the filters (K: ``candidates``, which may not be
  below ``top_k``; else REID_REFINE_CANDIDATES, raised to ``top_k``), then NFormer over the queries plus those
  candidates; re-ranked by the cosine of the refined features. A batch refines all its queries plus the union
  of their candidates in one pass.
- ``kreciprocal``: k-reciprocal re-ranking of each query's own K candidates.
- ``local_kreciprocal``: local's NFormer pass (the same candidates, one pass for a batch), then k-reciprocal
  re-ranking of each query's own candidates on the refined features (docs/refine-combinations.md).
- ``joint``: NFormer over the queries plus the whole gallery (the paper's protocol; for galleries up to
  ``joint_max_gallery``); the filters then drop results.
- ``auto``: per gallery, ``REID_REFINE_AUTO_MODE`` when the gallery's own features say it is multi-shot, else
  ``none`` (service/refine_auto.py). The plan's ``applied`` says which.

local, kreciprocal and local_kreciprocal refine the same candidates as `Refiner` offline (index/refine.py:
expand_candidates) with its own steps (`Refiner.rerank`), so that `reid evaluate` measures what serves. Each
result has ``score`` (the mode's ranking score) and ``cosine`` (the plain encoder cosine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from index.bundle import NFORMER_FILE
from index.refine import Refiner, expand_candidates
from index.store import StoredImage
from index.vector_index import VectorIndex

from .schemas import SearchResult
from .search_filter import SearchFilter
from .settings import RefineMode
from .state import ServiceState

MAX_CANDIDATES = 2000


class SearchError(ValueError):
    """A search that its parameters, its gallery or its query images rule out: answered with ``status`` and
    ``code`` (and ``extra`` body fields)."""

    def __init__(self, code: str, message: str, status: int = 422, extra: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.status, self.extra = code, message, status, extra or {}


@dataclass(frozen=True)
class SearchRequest:
    """A search's parameters as the search endpoints take them (routes/search.py: search_form)."""
    top_k: int = 10
    refine: RefineMode | None = None  # None: the server's default (REID_REFINE_DEFAULT)
    candidates: int | None = None  # K of the modes that refine candidates; None: REID_REFINE_CANDIDATES
    filter: SearchFilter = field(default_factory=SearchFilter)


@dataclass(frozen=True)
class SearchPlan:
    """A request checked against the served model and resolved for a gallery: what `rank` runs."""
    top_k: int
    refine: RefineMode  # as requested (or the default)
    applied: RefineMode  # the mode that runs: refine itself, or auto's choice for the gallery
    candidates: int | None  # K of local/kreciprocal/local_kreciprocal; None for none/joint
    expand: int  # with K: each candidate's own nearest neighbours also refined (REID_REFINE_EXPAND)
    filter: SearchFilter


def plan_search(state: ServiceState, request: SearchRequest, gallery: str | None = None) -> SearchPlan:
    """The one check of a search's parameters (SearchError otherwise). Without ``gallery`` (before the uploads
    are read) ``auto`` stays unresolved; with it, ``auto`` becomes the mode it applies to that gallery and
    ``joint`` is held to REID_JOINT_MAX_GALLERY."""
    s = state.settings
    if not 1 <= request.top_k <= s.max_top_k:
        raise SearchError("invalid_top_k", f"top_k must be between 1 and {s.max_top_k}, got {request.top_k}")
    refine = RefineMode(request.refine if request.refine is not None else state.refine_default)
    if refine.needs_nformer and not state.has_nformer:
        available = ", ".join(m.value for m in RefineMode if not m.needs_nformer)
        raise SearchError("refine_unavailable",
                          f"refine={refine} needs the NFormer, but model {state.bundle.model_id} has no "
                          f"{NFORMER_FILE}; available: {available}")
    candidates = request.candidates
    if candidates is not None and not 1 <= candidates <= MAX_CANDIDATES:
        raise SearchError("invalid_candidates", f"candidates must be between 1 and {MAX_CANDIDATES}, got {candidates}")
    if candidates is not None and candidates < request.top_k:  # refused, not raised: K bounds a request's cost
        raise SearchError("invalid_candidates", f"candidates ({candidates}) must be at least top_k ({request.top_k}): "
                                                "the refined modes answer top_k of their K candidates")
    applied = refine
    if refine is RefineMode.auto:
        applied = RefineMode(state.auto_refine(gallery).mode) if gallery is not None else RefineMode.none
    if applied is RefineMode.joint and gallery is not None:
        idx = state.index_for(gallery)
        if idx is not None and len(idx) > s.joint_max_gallery:
            raise SearchError("gallery_too_large_for_joint",
                              f"gallery {gallery!r} has {len(idx)} images; refine=joint refines the whole gallery "
                              f"and is limited to {s.joint_max_gallery} (REID_JOINT_MAX_GALLERY): use refine=local")
    k = None
    if applied.refines_candidates:
        k = candidates or max(s.refine_candidates, request.top_k)
    return SearchPlan(request.top_k, refine, applied, k, s.refine_expand, request.filter)


@dataclass(frozen=True)
class Gallery:
    """One gallery as ranking reads it: its FAISS index and its stored records."""
    index: VectorIndex
    records: Callable[[Sequence[int]], list[StoredImage | None]]  # by id, in order; None: deleted meanwhile


@dataclass
class Ranking:
    results: list[list[SearchResult]]  # per query, best first
    search_s: float  # FAISS searches and record reads
    refine_s: float  # the refine mode's re-ranking (0 for none)
    # the modes with K: the most candidates any query refined (before expansion); below the plan's K when the
    # gallery, after the filters, holds fewer
    candidates_used: int | None = None


@dataclass
class Hit:
    id: int
    cosine: float
    rec: StoredImage


def _result(hit_id: int, score: float, cosine: float, rec: StoredImage) -> SearchResult:
    m = rec.metadata
    return SearchResult(id=int(hit_id), score=float(score), cosine=float(cosine), external_id=m.get("external_id"),
                        camera_id=m.get("camera_id"), person_id=m.get("person_id"), captured_at=m.get("captured_at"))


def rank(gallery: Gallery | None, queries: np.ndarray, plan: SearchPlan, refiner: Refiner) -> Ranking:
    """Each query's top ``plan.top_k`` under ``plan.applied``, and where the time went."""
    t0 = time.perf_counter()
    if gallery is None or not len(gallery.index):
        return Ranking([[] for _ in range(len(queries))], time.perf_counter() - t0, 0.0,
                       None if plan.candidates is None else 0)
    return _RANKERS[plan.applied](gallery, queries, plan, refiner, t0)


def _hits(g: Gallery, queries: np.ndarray, want: int, flt: SearchFilter) -> list[list[Hit]]:
    """Per query, the first ``want`` gallery entries by cosine that pass the filters, best first.

    One FAISS search for all queries; a query whose filtered hits fall short searches deeper (x4) alone."""
    idx = g.index
    n = len(idx)
    # When filtering, search deeper (and deeper again) so that `want` hits still come back.
    k = min(n, want if not flt.active else want * 2 + 16)
    scores, ids = idx.search(queries, k)
    out = []
    for qi in range(len(queries)):
        s, i, kk = scores[qi], ids[qi], k
        while True:
            recs = g.records(i)
            hits = []
            for score, id_, rec in zip(s, i, recs):
                if flt.keep(rec):
                    hits.append(Hit(int(id_), float(score), rec))
                    if len(hits) == want:
                        break
            if len(hits) >= want or kk >= n:
                break
            kk = min(n, kk * 4)
            s, i = (a[0] for a in idx.search(queries[qi:qi + 1], kk))
        out.append(hits)
    return out


Candidates = list[tuple[list[Hit], np.ndarray]]  # per query: its hits and their index vectors


def _candidates(g: Gallery, queries: np.ndarray, plan: SearchPlan) -> tuple[Candidates, int]:
    """The modes with K: per query its K candidates that pass the filters, then their expansion (filtered
    too; an expansion's ``cosine`` is left 0, the refined modes compute every cosine themselves), with their
    index vectors; and the most candidates any query had before expansion."""
    out, used = [], 0
    for hits in _hits(g, queries, plan.candidates, plan.filter):
        used = max(used, len(hits))
        ids = np.asarray([h.id for h in hits], dtype=np.int64)
        vecs, found = g.index.vectors(ids)
        new = expand_candidates(ids, plan.expand, lambda k: g.index.search(vecs, k)[1])[len(ids):].tolist()
        extra = [Hit(i, 0.0, rec) for i, rec in zip(new, g.records(new)) if plan.filter.keep(rec)]
        if extra:
            extra_vecs, extra_found = g.index.vectors([h.id for h in extra])
            hits, vecs, found = hits + extra, np.concatenate([vecs, extra_vecs]), np.concatenate([found, extra_found])
        out.append(([h for h, f in zip(hits, found) if f], vecs[found]))  # drop ids deleted meanwhile
    return out, used


def _ranked(order_scores: np.ndarray, cosines: np.ndarray, hits: list[Hit], top_k: int) -> list[SearchResult]:
    order = np.argsort(-order_scores, kind="stable")[:top_k]
    return [_result(hits[j].id, order_scores[j], cosines[j], hits[j].rec) for j in order]


def _rank_none(g: Gallery, queries: np.ndarray, plan: SearchPlan, refiner: Refiner, t0: float) -> Ranking:
    results = [[_result(h.id, h.cosine, h.cosine, h.rec) for h in hits]
               for hits in _hits(g, queries, plan.top_k, plan.filter)]
    return Ranking(results, time.perf_counter() - t0, 0.0)


def _rank_joint(g: Gallery, queries: np.ndarray, plan: SearchPlan, refiner: Refiner, t0: float) -> Ranking:
    ids, gallery_vecs = g.index.items()
    # Landmarks are token positions, so the gallery goes in id order: the same answer on every replica,
    # whatever order its index was filled in (the write path, the change-log follower, a rebuild).
    by_id = np.argsort(ids, kind="stable")
    ids, gallery_vecs = ids[by_id], gallery_vecs[by_id]
    t1 = time.perf_counter()
    sims = refiner.similarities("joint", queries, gallery_vecs)
    t2 = time.perf_counter()
    cosines = queries @ gallery_vecs.T
    results = []
    for qi in range(len(queries)):
        # walk the refined ranking, fetching records a chunk at a time, until top_k pass the filters
        order, got, start = np.argsort(-sims[qi], kind="stable"), [], 0
        chunk = plan.top_k if not plan.filter.active else plan.top_k * 2 + 16
        while len(got) < plan.top_k and start < len(order):
            part = order[start:start + chunk]
            for j, rec in zip(part, g.records(ids[part])):
                if plan.filter.keep(rec) and len(got) < plan.top_k:
                    got.append(_result(ids[j], sims[qi, j], cosines[qi, j], rec))
            start, chunk = start + len(part), chunk * 4
        results.append(got)
    return Ranking(results, (t1 - t0) + (time.perf_counter() - t2), t2 - t1)


def _union(per_query: Candidates, dim: int) -> tuple[list[Hit], np.ndarray, list[np.ndarray]]:
    """The queries' candidates merged in first-seen order (what one NFormer pass refines), their vectors, and
    each query's own candidates as positions in the union."""
    union: dict[int, int] = {}
    hits, rows, positions = [], [], []
    for qhits, qvecs in per_query:
        for h, v in zip(qhits, qvecs):
            if h.id not in union:
                union[h.id] = len(hits)
                hits.append(h)
                rows.append(v)
        positions.append(np.asarray([union[h.id] for h in qhits], dtype=np.int64))
    vecs = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    return hits, vecs, positions


def _rank_local(g: Gallery, queries: np.ndarray, plan: SearchPlan, refiner: Refiner, t0: float) -> Ranking:
    per_query, used = _candidates(g, queries, plan)
    t1 = time.perf_counter()
    # One NFormer pass: all queries + the union of their candidates (first-seen order), as the paper
    # refines a query batch together; every query is then ranked over the whole union.
    hits, vecs, _ = _union(per_query, g.index.dim)
    nq = len(queries)
    sims = refiner.rerank("local", queries, vecs) if len(hits) else np.zeros((nq, 0), np.float32)
    cosines = queries @ vecs.T
    results = [_ranked(sims[qi], cosines[qi], hits, plan.top_k) for qi in range(nq)]
    return Ranking(results, t1 - t0, time.perf_counter() - t1, used)


def _kreciprocal_each(queries: np.ndarray, per_query: Candidates, features: Iterable[tuple[np.ndarray, np.ndarray]],
                      refiner: Refiner, top_k: int) -> list[list[SearchResult]]:
    """Each query k-reciprocal re-ranked on its own candidates alone, so that a batch answers each query as a
    single search of the same features would. ``features``: per query, (its row, its candidates' rows) to
    re-rank on, the encoder's or the NFormer's; ``cosine`` stays the encoder's."""
    results = []
    for qi, ((qhits, qvecs), (query_row, candidate_rows)) in enumerate(zip(per_query, features)):
        sims = refiner.rerank("kreciprocal", query_row, candidate_rows)[0] if qhits else np.zeros(0, np.float32)
        results.append(_ranked(sims, (queries[qi:qi + 1] @ qvecs.T)[0], qhits, top_k))
    return results


def _rank_kreciprocal(g: Gallery, queries: np.ndarray, plan: SearchPlan, refiner: Refiner, t0: float) -> Ranking:
    per_query, used = _candidates(g, queries, plan)
    t1 = time.perf_counter()
    encoder_features = ((queries[qi:qi + 1], qvecs) for qi, (_, qvecs) in enumerate(per_query))
    results = _kreciprocal_each(queries, per_query, encoder_features, refiner, plan.top_k)
    return Ranking(results, t1 - t0, time.perf_counter() - t1, used)


def _rank_local_kreciprocal(g: Gallery, queries: np.ndarray, plan: SearchPlan, refiner: Refiner,
                            t0: float) -> Ranking:
    per_query, used = _candidates(g, queries, plan)
    t1 = time.perf_counter()
    # local's one NFormer pass over the batch and the union of its candidates (Refiner.rerank's
    # local_kreciprocal for a single query), then kreciprocal's per-query re-ranking on the refined rows
    hits, vecs, positions = _union(per_query, g.index.dim)
    refined_queries, refined_union = refiner.refine_together(queries, vecs) if hits else (queries, vecs)
    refined = ((refined_queries[qi:qi + 1], refined_union[pos]) for qi, pos in enumerate(positions))
    results = _kreciprocal_each(queries, per_query, refined, refiner, plan.top_k)
    return Ranking(results, t1 - t0, time.perf_counter() - t1, used)


# auto is never applied itself: plan_search resolves it to one of these
_RANKERS = {RefineMode.none: _rank_none, RefineMode.joint: _rank_joint, RefineMode.local: _rank_local,
            RefineMode.kreciprocal: _rank_kreciprocal, RefineMode.local_kreciprocal: _rank_local_kreciprocal}

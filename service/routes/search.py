"""Search a gallery with one query image (``/search``) or several (``/search:batch``), optionally refined.

Refine modes (index/refine.py; the bundle's ``nformer.onnx`` runs local and joint):

- ``none``: FAISS cosine ranking.
- ``local``: FAISS top-K candidates (K = max(candidates, top_k)) among the images that pass
  the filters, then NFormer over the queries plus those candidates; re-ranked by the cosine
  of the refined features. A batch refines all its queries plus the union of their candidates in one pass.
- ``kreciprocal``: k-reciprocal re-ranking of each query's own K candidates.
- ``joint``: NFormer over the queries plus the whole gallery (the paper's protocol; for galleries up to
  ``joint_max_gallery``); the filters then drop results.
- ``auto``: per gallery, ``REID_REFINE_AUTO_MODE`` when the gallery's own features say it is multi-shot, else
  ``none`` (service/refine_auto.py). The answer's ``refine_applied`` says which.

Filters (service/search_filter.py): camera allow/deny lists, ``exclude_same_camera`` with the query's camera,
a time window and a person label. ``/search:tracklet`` takes several crops of one person and searches with
their aggregate: the mean of their L2-normalised embeddings, re-normalised.

Each result has ``score`` (the mode's ranking score) and ``cosine`` (the plain encoder cosine); once the gallery
is calibrated (``POST /calibrate``) also ``match`` (cosine above the stored threshold) and the answer carries
``threshold``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from index.vector_index import l2_normalize
from index.store import StoredImage
from index.vector_index import VectorIndex

from .. import calibration
from ..batcher import embed_images
from ..deletion import FilterError
from ..deps import READ_ONLY, GalleryDep, StateDep
from ..errors import ApiError
from ..images import ImageError, decode_image
from ..limits import EmbedSlot
from ..observability import observe_stage
from ..search_filter import SearchFilter
from ..settings import REFINE_CHOICES
from ..schemas import (BatchSearchResponse, ErrorResponse, QueryResults, SearchResponse, SearchResult,
                       SearchTiming)
from ..state import NFORMER_FILE, NFORMER_MODES, ServiceState

router = APIRouter(prefix="/v1/galleries", tags=["search"])

SUPPORTED_REFINE = REFINE_CHOICES
MAX_CANDIDATES = 2000
_ERRORS = {c: {"model": ErrorResponse} for c in (404, 413, 415, 422, 503)}


@dataclass
class Params:
    top_k: int
    refine: str  # as requested (or the default)
    applied: str  # the mode that runs: refine itself, or auto's choice for the gallery
    candidates: int | None  # K of local/kreciprocal; None for none/joint
    filter: SearchFilter


@dataclass
class Hit:
    id: int
    cosine: float
    rec: StoredImage


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000.0, 3)


def _result(hit_id: int, score: float, cosine: float, rec: StoredImage) -> SearchResult:
    m = rec.metadata
    return SearchResult(id=int(hit_id), score=float(score), cosine=float(cosine), external_id=m.get("external_id"),
                        camera_id=m.get("camera_id"), person_id=m.get("person_id"), captured_at=m.get("captured_at"))


def _hits(state: ServiceState, gallery: str, idx: VectorIndex, queries: np.ndarray, want: int,
          flt: SearchFilter) -> list[list[Hit]]:
    """Per query, the first ``want`` gallery entries by cosine that pass the filters, best first.

    One FAISS search for all queries; a query whose filtered hits fall short searches deeper (x4) alone."""
    n = len(idx)
    # When filtering, search deeper (and deeper again) so that `want` hits still come back.
    k = min(n, want if not flt.active else want * 2 + 16)
    scores, ids = idx.search(queries, k)
    out = []
    for qi in range(len(queries)):
        s, i, kk = scores[qi], ids[qi], k
        while True:
            recs = state.store.get_many(gallery, i)
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


def _expand(state: ServiceState, gallery: str, idx: VectorIndex, hits: list[Hit], vecs: np.ndarray,
            expand: int, flt: SearchFilter) -> list[Hit]:
    """Each hit's own ``expand`` nearest gallery neighbours not already among ``hits`` (first-seen order),
    filtered like the hits. Their ``cosine`` is left 0: the refined modes compute every cosine themselves."""
    _, nb = idx.search(vecs, expand + 1)
    seen, new = {h.id for h in hits}, []
    for i in map(int, nb.ravel()):
        if i >= 0 and i not in seen:
            seen.add(i)
            new.append(i)
    return [Hit(i, 0.0, rec) for i, rec in zip(new, state.store.get_many(gallery, new))
            if flt.keep(rec)]


def _ranked(order_scores: np.ndarray, cosines: np.ndarray, hits: list[Hit], top_k: int) -> list[SearchResult]:
    order = np.argsort(-order_scores, kind="stable")[:top_k]
    return [_result(hits[j].id, order_scores[j], cosines[j], hits[j].rec) for j in order]


Candidates = list[tuple[list[Hit], np.ndarray]]  # per query: its hits and their index vectors


def _candidates(state: ServiceState, gallery: str, idx: VectorIndex, queries: np.ndarray, p: Params) -> Candidates:
    """local/kreciprocal: per query its K candidates (plus expansion) and their index vectors."""
    out = []
    for hits in _hits(state, gallery, idx, queries, p.candidates, p.filter):
        vecs, found = idx.vectors([h.id for h in hits])
        if state.settings.refine_expand and hits:
            extra = _expand(state, gallery, idx, hits, vecs, state.settings.refine_expand, p.filter)
            extra_vecs, extra_found = idx.vectors([h.id for h in extra])
            hits, vecs, found = hits + extra, np.concatenate([vecs, extra_vecs]), np.concatenate([found, extra_found])
        out.append(([h for h, f in zip(hits, found) if f], vecs[found]))  # drop ids deleted meanwhile
    return out


def _rank(state: ServiceState, gallery: str, queries: np.ndarray,
          p: Params) -> tuple[list[list[SearchResult]], float, float]:
    """Results per query, the search time and the refine time (seconds)."""
    t0 = time.perf_counter()
    nq = len(queries)
    idx = state.index_for(gallery)
    if idx is None or not len(idx):
        return [[] for _ in range(nq)], time.perf_counter() - t0, 0.0
    if p.applied == "joint" and len(idx) > state.settings.joint_max_gallery:
        raise ApiError(422, "gallery_too_large_for_joint",
                       f"gallery {gallery!r} has {len(idx)} images; refine=joint refines the whole gallery and is "
                       f"limited to {state.settings.joint_max_gallery} (REID_JOINT_MAX_GALLERY): use refine=local")

    if p.applied == "none":
        results = [[_result(h.id, h.cosine, h.cosine, h.rec) for h in hits]
                   for hits in _hits(state, gallery, idx, queries, p.top_k, p.filter)]
        return results, time.perf_counter() - t0, 0.0

    if p.applied == "joint":
        ids, gallery_vecs = idx.items()
        t1 = time.perf_counter()
        sims = state.refiner.similarities("joint", queries, gallery_vecs)
        t2 = time.perf_counter()
        cosines = queries @ gallery_vecs.T
        results = []
        for qi in range(nq):
            # walk the refined ranking, fetching records a chunk at a time, until top_k pass the filters
            order, got, start = np.argsort(-sims[qi], kind="stable"), [], 0
            chunk = p.top_k if not p.filter.active else p.top_k * 2 + 16
            while len(got) < p.top_k and start < len(order):
                part = order[start:start + chunk]
                for j, rec in zip(part, state.store.get_many(gallery, ids[part])):
                    if p.filter.keep(rec) and len(got) < p.top_k:
                        got.append(_result(ids[j], sims[qi, j], cosines[qi, j], rec))
                start, chunk = start + len(part), chunk * 4
            results.append(got)
        return results, (t1 - t0) + (time.perf_counter() - t2), t2 - t1

    per_query = _candidates(state, gallery, idx, queries, p)
    t1 = time.perf_counter()
    results = []
    if p.applied == "local":
        # One NFormer pass: all queries + the union of their candidates (first-seen order), as the paper
        # refines a query batch together; every query is then ranked over the whole union.
        union: dict[int, int] = {}
        hits, rows = [], []
        for qhits, qvecs in per_query:
            for h, v in zip(qhits, qvecs):
                if h.id not in union:
                    union[h.id] = len(hits)
                    hits.append(h)
                    rows.append(v)
        vecs = np.stack(rows) if rows else np.zeros((0, idx.dim), np.float32)
        sims = state.refiner.rerank("local", queries, vecs) if len(hits) else np.zeros((nq, 0), np.float32)
        cosines = queries @ vecs.T
        results = [_ranked(sims[qi], cosines[qi], hits, p.top_k) for qi in range(nq)]
    else:  # kreciprocal: each query on its own candidates
        for qi, (qhits, qvecs) in enumerate(per_query):
            q = queries[qi:qi + 1]
            sims = state.refiner.rerank("kreciprocal", q, qvecs)[0] if qhits else np.zeros(0, np.float32)
            results.append(_ranked(sims, (q @ qvecs.T)[0], qhits, p.top_k))
    return results, t1 - t0, time.perf_counter() - t1


def _decode(state: ServiceState, blobs: list[tuple[str | None, bytes]], batch: bool) -> list:
    """Decode every file or fail the whole request, naming the bad file in a batch (all or nothing)."""
    images = []
    for i, (name, data) in enumerate(blobs):
        try:
            images.append(decode_image(data, max_pixels=state.settings.max_image_pixels))
        except ImageError as e:
            if not batch:
                raise ApiError(e.status_code, e.code, e.message) from None
            raise ApiError(e.status_code, e.code, f"file #{i} ({name!r}): {e.message}",
                           extra={"index": i, "filename": name}) from None
    return images


def aggregate(vecs: np.ndarray) -> np.ndarray:
    """A tracklet's query: the mean of its L2-normalised embeddings, re-normalised, as (1, D)."""
    return l2_normalize(l2_normalize(vecs).mean(axis=0, keepdims=True))


def _run(state: ServiceState, gallery: str, blobs: list[tuple[str | None, bytes]], form: tuple,
         flt: SearchFilter, batch: bool, tracklet: bool = False):
    """Results, timing, the parameters used, the model id and the calibration: all of one model
    (see ServiceState.model_lock)."""
    t0 = time.perf_counter()
    images = _decode(state, blobs, batch or tracklet)
    td = time.perf_counter()
    with state.model_lock.shared():
        p = _params(state, *form, flt=flt, gallery=gallery)  # again: the model may have changed since
        t1 = time.perf_counter()
        queries = embed_images(state, images)
        if tracklet:
            queries = aggregate(queries)
        t2 = time.perf_counter()
        results, search_s, refine_s = _rank(state, gallery, queries, p)
        model = state.bundle.model_id
    calib = calibration.load(state.store, gallery)
    if calib is not None:
        for res in results:
            for r in res:
                r.match = r.cosine > calib["threshold"]
    t3 = time.perf_counter()
    timing = SearchTiming(decode=_ms(t0, td), embed=_ms(t1, t2), search=round(search_s * 1000.0, 3),
                          refine=None if p.applied == "none" else round(refine_s * 1000.0, 3), total=_ms(t0, t3))
    return results, timing, p, model, calib


def _params(state: ServiceState, top_k: int, refine: str | None, candidates: int | None,
            flt: SearchFilter | None = None, gallery: str | None = None) -> Params:
    """The request's parameters, checked; with ``gallery``, ``auto`` is resolved to the mode it applies."""
    s = state.settings
    if not 1 <= top_k <= s.max_top_k:
        raise ApiError(422, "invalid_top_k", f"top_k must be between 1 and {s.max_top_k}, got {top_k}")
    refine = refine or state.refine_default
    if refine not in SUPPORTED_REFINE:
        raise ApiError(422, "unsupported_refine",
                       f"refine={refine!r} is not supported; supported: {', '.join(SUPPORTED_REFINE)}")
    if refine in NFORMER_MODES and not state.has_nformer:
        available = ", ".join(m for m in SUPPORTED_REFINE if m not in NFORMER_MODES)
        raise ApiError(422, "refine_unavailable",
                       f"refine={refine} needs the NFormer, but model {state.bundle.model_id} has no {NFORMER_FILE}; "
                       f"available: {available}")
    if candidates is not None and not 1 <= candidates <= MAX_CANDIDATES:
        raise ApiError(422, "invalid_candidates", f"candidates must be between 1 and {MAX_CANDIDATES}, "
                                                  f"got {candidates}")
    applied = refine
    if refine == "auto":
        applied = state.auto_refine(gallery).mode if gallery is not None else "none"
    k = None
    if applied in ("local", "kreciprocal"):
        k = max(candidates or s.refine_candidates, top_k)
    return Params(top_k, refine, applied, k, flt or SearchFilter())


def search_filter(
    exclude_camera_id: Annotated[str | None, Form(description="drop results from this camera")] = None,
    cameras: Annotated[str | None, Form(description="only these cameras (comma-separated camera_ids)")] = None,
    exclude_cameras: Annotated[str | None, Form(description="drop these cameras (comma-separated)")] = None,
    exclude_same_camera: Annotated[bool, Form(description="drop the query camera's images (needs "
                                              "query_camera_id; with query_person_id only that person's: the "
                                              "evaluation protocol's rule)")] = False,
    query_camera_id: Annotated[str | None, Form(description="the camera that took the query")] = None,
    query_person_id: Annotated[str | None, Form(description="the query's person label, if known")] = None,
    after: Annotated[str | None, Form(description="ISO 8601: only images whose time is this or later")] = None,
    before: Annotated[str | None, Form(description="ISO 8601: only images whose time is earlier")] = None,
    person_id: Annotated[str | None, Form(description="only images with this person label")] = None,
) -> SearchFilter:
    """The search's filters (an image's time is its captured_at, else its upload time)."""
    try:
        return SearchFilter.from_form(exclude_camera_id, cameras, exclude_cameras, exclude_same_camera,
                                      query_camera_id, query_person_id, after, before, person_id)
    except FilterError as e:
        raise ApiError(422, e.code, str(e)) from None


FilterDep = Annotated[SearchFilter, Depends(search_filter)]


def _observe(request: Request, p: Params, timing: SearchTiming) -> None:
    hist = getattr(request.app.state, "refine_seconds", None)
    if hist is not None and timing.refine is not None:
        hist.labels(p.applied).observe(timing.refine / 1000.0)
    for stage in ("decode", "embed", "search", "refine"):
        v = getattr(timing, stage)
        observe_stage(request.app.state, stage, None if v is None else v / 1000.0)


_REFINE_DOC = (f"re-ranking mode, one of {', '.join(REFINE_CHOICES)}; default: REID_REFINE_DEFAULT "
               f"(local and joint need a bundle with {NFORMER_FILE}; auto picks per gallery)")
_CANDIDATES_DOC = (f"local/kreciprocal: K FAISS candidates to refine (1..{MAX_CANDIDATES}); "
                   "default REID_REFINE_CANDIDATES")


def _threshold(calib: dict | None) -> float | None:
    return None if calib is None else float(calib["threshold"])


@router.post("/{gallery}/search", response_model=SearchResponse, responses=_ERRORS, openapi_extra=READ_ONLY)
async def search(
    request: Request,
    gallery: GalleryDep,
    state: StateDep,
    flt: FilterDep,
    _slot: EmbedSlot,
    file: Annotated[UploadFile, File(description="query image")],
    top_k: Annotated[int, Form()] = 10,
    refine: Annotated[str | None, Form(description=_REFINE_DOC)] = None,
    candidates: Annotated[int | None, Form(description=_CANDIDATES_DOC)] = None,
) -> SearchResponse:
    """Top-k most similar gallery images, best first (by ``score``, the refine mode's score)."""
    form = (top_k, refine, candidates)
    _params(state, *form)  # fail before reading the upload
    data = await file.read()
    results, timing, p, model, calib = await run_in_threadpool(_run, state, gallery, [(file.filename, data)],
                                                               form, flt, False)
    _observe(request, p, timing)
    return SearchResponse(results=results[0], timing_ms=timing, model=model, refine=p.refine,
                          refine_applied=p.applied, candidates=p.candidates, threshold=_threshold(calib))


@router.post("/{gallery}/search:tracklet", response_model=SearchResponse, responses=_ERRORS,
             openapi_extra=READ_ONLY)
async def search_tracklet(
    request: Request,
    gallery: GalleryDep,
    state: StateDep,
    flt: FilterDep,
    _slot: EmbedSlot,
    files: Annotated[list[UploadFile], File(description="crops of one person (repeat the field)")],
    top_k: Annotated[int, Form()] = 10,
    refine: Annotated[str | None, Form(description=_REFINE_DOC)] = None,
    candidates: Annotated[int | None, Form(description=_CANDIDATES_DOC)] = None,
) -> SearchResponse:
    """Multi-shot query: several crops of one person searched as one query, the mean of their L2-normalised
    embeddings re-normalised (a bad file fails the request and is named)."""
    form = (top_k, refine, candidates)
    _params(state, *form)
    limit = state.settings.max_batch_queries
    if len(files) > limit:
        raise ApiError(413, "too_many_queries", f"{len(files)} crops sent; at most {limit} per request "
                                                "(REID_MAX_BATCH_QUERIES)")
    blobs = [(f.filename, await f.read()) for f in files]
    results, timing, p, model, calib = await run_in_threadpool(_run, state, gallery, blobs, form, flt, False, True)
    _observe(request, p, timing)
    return SearchResponse(results=results[0], timing_ms=timing, model=model, refine=p.refine,
                          refine_applied=p.applied, candidates=p.candidates, threshold=_threshold(calib))


@router.post("/{gallery}/search:batch", response_model=BatchSearchResponse,
             responses={**_ERRORS, 400: {"model": ErrorResponse}}, openapi_extra=READ_ONLY)
async def search_batch(
    request: Request,
    gallery: GalleryDep,
    state: StateDep,
    flt: FilterDep,
    _slot: EmbedSlot,
    files: Annotated[list[UploadFile], File(description="query images (repeat the field)")],
    top_k: Annotated[int, Form()] = 10,
    refine: Annotated[str | None, Form(description=_REFINE_DOC)] = None,
    candidates: Annotated[int | None, Form(description=_CANDIDATES_DOC)] = None,
) -> BatchSearchResponse:
    """Several query images in one request, refined together (joint: all queries + the whole gallery in one
    NFormer pass; local: all queries + the union of their candidates). Any bad file fails the request."""
    form = (top_k, refine, candidates)
    _params(state, *form)  # fail before reading the uploads
    limit = state.settings.max_batch_queries
    if len(files) > limit:
        raise ApiError(413, "too_many_queries", f"{len(files)} query images sent; at most {limit} per request "
                                                "(REID_MAX_BATCH_QUERIES)")
    blobs = [(f.filename, await f.read()) for f in files]
    results, timing, p, model, calib = await run_in_threadpool(_run, state, gallery, blobs, form, flt, True)
    _observe(request, p, timing)
    return BatchSearchResponse(
        queries=[QueryResults(index=i, filename=name, results=r)
                 for i, ((name, _), r) in enumerate(zip(blobs, results))],
        timing_ms=timing, model=model, refine=p.refine, refine_applied=p.applied, candidates=p.candidates,
        threshold=_threshold(calib))

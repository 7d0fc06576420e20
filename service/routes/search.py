"""Search a gallery with one query image (``/search``), several (``/search:batch``), several crops of one
person (``/search:tracklet``) or one of its own images (``/images/{id}/search``), optionally refined.

Each handler unpacks its form (`search_form`: top_k, refine, candidates and the filters, as a `SearchRequest`)
and its files, and calls one core function, service/search.py: run_search (run_stored_search for a gallery
image); the refine modes and the ranking are
in service/ranking.py, the filters in service/search_filter.py. ``refine`` is a `RefineMode`: OpenAPI lists the
modes and FastAPI answers a bad one (422 unsupported_refine).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from starlette.concurrency import run_in_threadpool

from index.bundle import NFORMER_FILE

from ..deletion import FilterError
from ..deps import READ_ONLY, GalleryDep, StateDep
from ..errors import ApiError, field_error
from ..limits import EmbedSlot
from ..observability import observe_stage
from ..ranking import MAX_CANDIDATES, SearchError, SearchRequest, plan_search
from ..schemas import BatchSearchResponse, ErrorResponse, QueryResults, SearchResponse
from ..search import QueryKind, SearchOutcome, run_search, run_stored_search
from ..search_filter import SearchFilter
from ..settings import RefineMode
from ..state import ServiceState

router = APIRouter(prefix="/v1/galleries", tags=["search"])

_ERRORS = {c: {"model": ErrorResponse} for c in (404, 413, 415, 422, 503)}


def search_filter(
    exclude_camera_id: Annotated[str | None, Form(description="drop results from this camera")] = None,
    cameras: Annotated[str | None, Form(description="only these cameras: comma-separated camera_ids, or a JSON "
                                                    "array of them (ids holding a comma)")] = None,
    exclude_cameras: Annotated[str | None, Form(description="drop these cameras (comma-separated, or a JSON "
                                                            "array)")] = None,
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


def _known_refine(value: object, check: ValidatorFunctionWrapHandler) -> RefineMode | None:
    """The enum's own check, answered with the code a bad mode has always had."""
    try:
        return check(value)
    except ValidationError:
        raise field_error("unsupported_refine", "refine={refine} is not supported; supported: {supported}",
                          refine=repr(value), supported=", ".join(m.value for m in RefineMode)) from None


_REFINE_DOC = (f"re-ranking mode; default: REID_REFINE_DEFAULT (local, joint and local_kreciprocal need a "
               f"bundle with {NFORMER_FILE}; auto picks per gallery)")
_CANDIDATES_DOC = (f"local/kreciprocal/local_kreciprocal: K FAISS candidates to refine (top_k..{MAX_CANDIDATES}; "
                   "below top_k is 422 invalid_candidates); default REID_REFINE_CANDIDATES, raised to top_k")


def search_form(
    flt: Annotated[SearchFilter, Depends(search_filter)],
    top_k: Annotated[int, Form()] = 10,
    refine: Annotated[RefineMode | None, Form(description=_REFINE_DOC), WrapValidator(_known_refine)] = None,
    candidates: Annotated[int | None, Form(description=_CANDIDATES_DOC)] = None,
) -> SearchRequest:
    """The form fields every search endpoint takes."""
    return SearchRequest(top_k, refine, candidates, flt)


SearchForm = Annotated[SearchRequest, Depends(search_form)]


@contextmanager
def _api_errors() -> Iterator[None]:
    try:
        yield
    except SearchError as e:
        raise ApiError(e.status, e.code, e.message, extra=e.extra) from None


def _check(state: ServiceState, form: SearchRequest) -> None:
    """Fail on the parameters before reading the uploads."""
    with _api_errors():
        plan_search(state, form)


def _check_count(state: ServiceState, files: list[UploadFile], what: str) -> None:
    limit = state.settings.max_batch_queries
    if len(files) > limit:
        raise ApiError(413, "too_many_queries", f"{len(files)} {what} sent; at most {limit} per request "
                                                "(REID_MAX_BATCH_QUERIES)")


async def _search(request: Request, state: ServiceState, gallery: str, form: SearchRequest,
                  files: list[UploadFile], kind: QueryKind) -> SearchOutcome:
    blobs = [(f.filename, await f.read()) for f in files]
    with _api_errors():
        out = await run_in_threadpool(run_search, state, gallery, blobs, form, kind)
    _observe(request, out)
    return out


def _observe(request: Request, out: SearchOutcome, stages=("decode", "embed", "search", "refine")) -> None:
    """The search's stage times into /metrics (only the stages it ran)."""
    hist = getattr(request.app.state, "refine_seconds", None)
    if hist is not None and out.timing.refine is not None:
        hist.labels(out.plan.applied.value).observe(out.timing.refine / 1000.0)
    for stage in stages:
        v = getattr(out.timing, stage)
        observe_stage(request.app.state, stage, None if v is None else v / 1000.0)


def _answer(out: SearchOutcome) -> dict:
    """The fields every search answer has besides its results."""
    return dict(timing_ms=out.timing, model=out.model, refine=out.plan.refine.value,
                refine_applied=out.plan.applied.value, candidates=out.plan.candidates,
                candidates_used=out.candidates_used, threshold=out.threshold)


@router.post("/{gallery}/search", response_model=SearchResponse, responses=_ERRORS, openapi_extra=READ_ONLY)
async def search(
    request: Request,
    gallery: GalleryDep,
    state: StateDep,
    form: SearchForm,
    _slot: EmbedSlot,
    file: Annotated[UploadFile, File(description="query image")],
) -> SearchResponse:
    """Top-k most similar gallery images, best first (by ``score``, the refine mode's score)."""
    _check(state, form)
    out = await _search(request, state, gallery, form, [file], QueryKind.single)
    return SearchResponse(results=out.results[0], **_answer(out))


@router.post("/{gallery}/search:tracklet", response_model=SearchResponse, responses=_ERRORS,
             openapi_extra=READ_ONLY)
async def search_tracklet(
    request: Request,
    gallery: GalleryDep,
    state: StateDep,
    form: SearchForm,
    _slot: EmbedSlot,
    files: Annotated[list[UploadFile], File(description="crops of one person (repeat the field)")],
) -> SearchResponse:
    """Multi-shot query: several crops of one person searched as one query, the mean of their L2-normalised
    embeddings re-normalised (a bad file fails the request and is named)."""
    _check(state, form)
    _check_count(state, files, "crops")
    out = await _search(request, state, gallery, form, files, QueryKind.tracklet)
    return SearchResponse(results=out.results[0], **_answer(out))


@router.post("/{gallery}/search:batch", response_model=BatchSearchResponse,
             responses={**_ERRORS, 400: {"model": ErrorResponse}}, openapi_extra=READ_ONLY)
async def search_batch(
    request: Request,
    gallery: GalleryDep,
    state: StateDep,
    form: SearchForm,
    _slot: EmbedSlot,
    files: Annotated[list[UploadFile], File(description="query images (repeat the field)")],
) -> BatchSearchResponse:
    """Several query images in one request, refined together (joint: all queries + the whole gallery in one
    NFormer pass; local: all queries + the union of their candidates). Any bad file fails the request."""
    _check(state, form)
    _check_count(state, files, "query images")
    out = await _search(request, state, gallery, form, files, QueryKind.batch)
    return BatchSearchResponse(queries=[QueryResults(index=i, filename=f.filename, results=r)
                                        for i, (f, r) in enumerate(zip(files, out.results))], **_answer(out))


@router.post("/{gallery}/images/{image_id}/search", response_model=SearchResponse, responses=_ERRORS,
             openapi_extra=READ_ONLY)
async def search_stored(
    request: Request,
    gallery: GalleryDep,
    image_id: int,
    state: StateDep,
    form: SearchForm,
) -> SearchResponse:
    """Search with an image of the gallery (a result, or one found by browsing ``GET .../images``): its stored
    vector is the query, so nothing is uploaded, decoded or embedded and its bytes need not be kept. Same form
    fields and answer as ``/search``; the image itself is left out of the results. ``404 image_not_found``."""
    _check(state, form)
    with _api_errors():
        out = await run_in_threadpool(run_stored_search, state, gallery, image_id, form)
    _observe(request, out, stages=("search", "refine"))  # nothing decoded or embedded
    return SearchResponse(results=out.results[0], **_answer(out))

"""Search a gallery with one query image."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from ..deps import GalleryDep, StateDep
from ..errors import ApiError
from ..images import ImageError, decode_image
from ..schemas import ErrorResponse, SearchResponse, SearchResult, SearchTiming
from ..state import ServiceState

router = APIRouter(prefix="/v1/galleries", tags=["search"])

SUPPORTED_REFINE = ("none",)


def _search(state: ServiceState, gallery: str, data: bytes, top_k: int,
            exclude_camera_id: str | None) -> SearchResponse:
    t0 = time.perf_counter()
    try:
        img = decode_image(data, max_pixels=state.settings.max_image_pixels)
    except ImageError as e:
        raise ApiError(e.status_code, e.code, e.message) from None
    t1 = time.perf_counter()
    q = state.embedder.embed([img])
    t2 = time.perf_counter()
    idx = state.index_for(gallery)
    results: list[SearchResult] = []
    if idx is not None and len(idx):
        n = len(idx)
        # When filtering, search deeper (and deeper again) so that top_k results still come back.
        k = min(n, top_k if exclude_camera_id is None else top_k * 2 + 16)
        while True:
            scores, ids = idx.search(q, k)
            recs = state.store.get_many(gallery, ids[0])
            results = []
            for s, i, rec in zip(scores[0], ids[0], recs):
                if rec is None:  # deleted meanwhile
                    continue
                m = rec.metadata
                if exclude_camera_id is not None and m.get("camera_id") == exclude_camera_id:
                    continue
                results.append(SearchResult(id=int(i), score=float(s), external_id=m.get("external_id"),
                                            camera_id=m.get("camera_id"), person_id=m.get("person_id"),
                                            captured_at=m.get("captured_at")))
                if len(results) == top_k:
                    break
            if len(results) >= top_k or k >= n:
                break
            k = min(n, k * 4)
    t3 = time.perf_counter()
    ms = lambda a, b: round((b - a) * 1000.0, 3)  # noqa: E731
    return SearchResponse(
        results=results,
        timing_ms=SearchTiming(decode=ms(t0, t1), embed=ms(t1, t2), search=ms(t2, t3), total=ms(t0, t3)),
        model=state.bundle.model_id,
    )


@router.post("/{gallery}/search", response_model=SearchResponse,
             responses={c: {"model": ErrorResponse} for c in (404, 413, 415, 422, 503)})
async def search(
    gallery: GalleryDep,
    state: StateDep,
    file: Annotated[UploadFile, File(description="query image")],
    top_k: Annotated[int, Form()] = 10,
    refine: Annotated[str, Form(description="re-ranking mode; supported: none")] = "none",
    exclude_camera_id: Annotated[str | None, Form(description="drop results from this camera")] = None,
) -> SearchResponse:
    """Top-k most similar gallery images (cosine similarity), best first."""
    if not 1 <= top_k <= state.settings.max_top_k:
        raise ApiError(422, "invalid_top_k", f"top_k must be between 1 and {state.settings.max_top_k}, "
                                             f"got {top_k}")
    if refine not in SUPPORTED_REFINE:
        raise ApiError(422, "unsupported_refine",
                       f"refine={refine!r} is not supported; supported: {', '.join(SUPPORTED_REFINE)}")
    data = await file.read()
    return await run_in_threadpool(_search, state, gallery, data, top_k, exclude_camera_id or None)

"""Galleries and their images: create (with settings), ingest, list, inspect, delete (one, many, all)."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from index.store import GALLERY_NAME_RE

from ..deletion import FilterError, ImageFilter, delete_matching
from ..deps import GalleryDep, StateDep
from ..errors import ApiError, error_body
from ..ingest import ingest
from ..labels import MetadataError, build_metadata
from ..limits import EmbedSlot
from ..observability import observe_stage
from ..schemas import (BulkDeleted, DeleteFilter, ErrorResponse, GalleryCreate, GalleryDeleted, GalleryDetail,
                       GalleryInfo, GalleryList, GalleryPatch, ImageDeleted, ImageInfo, UploadResponse)

router = APIRouter(prefix="/v1/galleries", tags=["galleries"])

_ERRORS = {404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
           503: {"model": ErrorResponse}}


@router.get("", response_model=GalleryList)
async def list_galleries(state: StateDep) -> GalleryList:
    def work():
        return [GalleryInfo(name=g["name"], count=g["count"], retention_days=g["retention_days"])
                for g in state.store.list_gallery_info()]

    return GalleryList(galleries=await run_in_threadpool(work))


@router.get("/{gallery}", response_model=GalleryDetail, responses=_ERRORS)
async def get_gallery(gallery: GalleryDep, state: StateDep) -> GalleryDetail:
    """Count, images per camera (a scan of the gallery's metadata), model, index type and index size, and what
    refine=auto applies to it with the statistic behind the choice."""
    def work():
        info = state.store.gallery_info(gallery)
        if info is None:
            return None, None
        cameras = Counter(meta["camera_id"] or "" for batch in state.store.iter_image_meta(gallery, ["camera_id"])
                          for _, meta in batch)
        return info, cameras

    info, cameras = await run_in_threadpool(work)
    if info is None:
        raise ApiError(404, "gallery_not_found", f"gallery {gallery!r} does not exist")
    def current():  # one model for the index and the auto decision
        with state.model_lock.shared():
            return state.index_for(gallery), state.bundle.model_id, state.auto_refine(gallery).to_dict()

    idx, served, auto = await run_in_threadpool(current)
    model = info["model"] or served  # a gallery of an older layout has no record: it is the served model's
    return GalleryDetail(name=info["name"], count=info["count"], retention_days=info["retention_days"],
                         cameras=dict(sorted(cameras.items())), model=model,
                         index=idx.kind if idx is not None else None, indexed=len(idx) if idx is not None else 0,
                         refine_auto=auto)


@router.delete("/{gallery}", response_model=GalleryDeleted, responses=_ERRORS)
async def delete_gallery(gallery: GalleryDep, state: StateDep) -> GalleryDeleted:
    count = 0

    def work() -> bool:
        nonlocal count
        with state.model_lock.shared():  # not in the middle of a model switch
            count = state.store.count(gallery)  # for the answer; uploads racing with the delete are lost anyway
            existed = state.store.delete_gallery(gallery)
            state.refine_advisor.forget(gallery)
            state.sync.drop(gallery)  # its index and its snapshot
            return existed

    existed = await run_in_threadpool(work)
    if not existed:
        raise ApiError(404, "gallery_not_found", f"gallery {gallery!r} does not exist")
    return GalleryDeleted(gallery=gallery, count=count)


@router.post("/{gallery}/images", status_code=201, response_model=UploadResponse,
             responses={**_ERRORS, 415: {"model": ErrorResponse}})
async def upload_images(
    gallery: str,
    request: Request,
    state: StateDep,
    _slot: EmbedSlot,
    files: Annotated[list[UploadFile], File(description="one or more image files")],
    camera_id: Annotated[str | None, Form()] = None,
    person_id: Annotated[str | None, Form()] = None,
    captured_at: Annotated[str | None, Form(description="ISO 8601 date-time")] = None,
    external_id: Annotated[str | None, Form(description="only with a single file")] = None,
    metadata: Annotated[str | None, Form(description="JSON array of objects aligned with files "
                                                     "(keys: external_id, camera_id, person_id, "
                                                     "captured_at)")] = None,
):
    """Add images to a gallery (created if needed).

    Bad files are reported in ``errors`` and the good ones are kept; ``422`` only if none
    is usable. Ids are content hashes per gallery: re-uploading the same bytes returns the
    same id with status ``exists`` (not re-embedded; metadata of the first upload is kept).
    """
    if not GALLERY_NAME_RE.match(gallery):
        raise ApiError(422, "invalid_gallery_name",
                       f"invalid gallery name {gallery!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
                       "starting with a letter or digit")
    limit = state.settings.max_files_per_request
    if len(files) > limit:
        raise ApiError(413, "too_many_files", f"{len(files)} files sent; at most {limit} per request")
    try:
        metas = build_metadata(len(files), {"camera_id": camera_id, "person_id": person_id,
                                            "captured_at": captured_at, "external_id": external_id}, metadata)
    except MetadataError as e:
        raise ApiError(422, "invalid_metadata", str(e)) from None
    blobs = [(f.filename, await f.read()) for f in files]
    result = await run_in_threadpool(ingest, state, gallery, blobs, metas)
    for stage, seconds in result.seconds.items():
        observe_stage(request.app.state, stage, seconds)
    if not result.items:
        return JSONResponse(
            error_body("no_valid_images", f"none of the {len(files)} file(s) could be used: "
                       + "; ".join(f"#{e['index']} {e['filename']}: {e['message']}" for e in result.errors),
                       items=[], errors=result.errors),
            status_code=422)
    return UploadResponse(items=result.items, errors=result.errors)


@router.get("/{gallery}/images/{image_id}", response_model=ImageInfo, responses=_ERRORS)
async def get_image(gallery: GalleryDep, image_id: int, state: StateDep) -> ImageInfo:
    rec = await run_in_threadpool(state.store.get, gallery, image_id)
    if rec is None:
        raise ApiError(404, "image_not_found", f"image {image_id} not found in gallery {gallery!r}")
    return ImageInfo(**rec.to_dict())


@router.delete("/{gallery}/images/{image_id}", response_model=ImageDeleted, responses=_ERRORS)
async def delete_image(gallery: GalleryDep, image_id: int, state: StateDep) -> ImageDeleted:
    def work() -> bool:
        with state.model_lock.shared():  # not in the middle of a model switch
            existed = state.store.delete(gallery, image_id)
            state.index_refresh(gallery, [image_id])  # reads the store: the image is gone there
            return existed

    existed = await run_in_threadpool(work)
    if not existed:
        raise ApiError(404, "image_not_found", f"image {image_id} not found in gallery {gallery!r}")
    return ImageDeleted(gallery=gallery, id=image_id)


@router.post("", status_code=201, response_model=GalleryInfo, responses={409: {"model": ErrorResponse}, **_ERRORS})
async def create_gallery(body: GalleryCreate, state: StateDep) -> GalleryInfo:
    """Create an empty gallery with its settings (uploading to a missing gallery also creates it, without
    settings). ``409 gallery_exists`` if it exists: change its settings with ``PATCH``."""
    if not GALLERY_NAME_RE.match(body.name):
        raise ApiError(422, "invalid_gallery_name",
                       f"invalid gallery name {body.name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
                       "starting with a letter or digit")
    created = await run_in_threadpool(state.store.create_gallery, body.name, body.retention_days)
    if not created:
        raise ApiError(409, "gallery_exists", f"gallery {body.name!r} already exists; PATCH it to change settings")
    return GalleryInfo(name=body.name, count=0, retention_days=body.retention_days)


@router.patch("/{gallery}", response_model=GalleryInfo, responses=_ERRORS)
async def patch_gallery(gallery: GalleryDep, body: GalleryPatch, state: StateDep) -> GalleryInfo:
    """Change a gallery's settings: ``{"retention_days": N}`` (1..36500) or ``null`` to keep images forever.
    The retention sweeper applies a new value at its next run."""
    if "retention_days" not in body.model_fields_set:
        raise ApiError(422, "nothing_to_change", "the body names no setting; settable: retention_days")

    def work():
        if not state.store.set_retention(gallery, body.retention_days):
            return None
        return state.store.gallery_info(gallery)

    info = await run_in_threadpool(work)
    if info is None:
        raise ApiError(404, "gallery_not_found", f"gallery {gallery!r} does not exist")
    return GalleryInfo(name=info["name"], count=info["count"], retention_days=info["retention_days"])


@router.delete("/{gallery}/images", response_model=BulkDeleted, responses=_ERRORS)
async def delete_images(
    gallery: GalleryDep,
    state: StateDep,
    camera_id: Annotated[str | None, Query(description="delete this camera's images")] = None,
    before: Annotated[str | None, Query(description="ISO 8601: images whose time is earlier (exclusive)")] = None,
    after: Annotated[str | None, Query(description="ISO 8601: images whose time is this or later")] = None,
    delete_all: Annotated[bool, Query(alias="all", description="delete every image (keeps the gallery)")] = False,
) -> BulkDeleted:
    """Delete the images that match every filter given; an image's time is its ``captured_at`` if it was
    given, else its upload time. Vectors, metadata, kept bytes and index entries go, in batches, each with
    its change-log entries. A filter is required (``all=true`` for everything)."""
    try:
        flt = ImageFilter.from_query(camera_id, before, after, delete_all)
    except FilterError as e:
        raise ApiError(422, e.code, str(e)) from None
    count = await run_in_threadpool(delete_matching, state, gallery, flt)
    return BulkDeleted(gallery=gallery, count=count, filter=DeleteFilter(**flt.describe()))

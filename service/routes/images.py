"""A gallery's images a page at a time; one image: change its metadata, get its thumbnail."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from index.blob_store import BlobError

from ..deps import GalleryDep, StateDep
from ..errors import ApiError
from ..etag import ANY, none_match_tags
from ..image_meta import patch_metadata, thumbnail
from ..image_pages import image_page
from ..images import ImageError
from ..labels import MetadataError
from ..schemas import ErrorResponse, ImageInfo, ImagePage, ImagePatch

router = APIRouter(prefix="/v1/galleries", tags=["galleries"])

_ERRORS = {c: {"model": ErrorResponse} for c in (404, 422)}


def _not_found(gallery: str, image_id: int) -> ApiError:
    return ApiError(404, "image_not_found", f"image {image_id} not found in gallery {gallery!r}")


@router.get("/{gallery}/images", response_model=ImagePage, responses=_ERRORS)
async def list_images(
    gallery: GalleryDep,
    state: StateDep,
    offset: Annotated[int, Query(ge=0, description="images to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="images per page")] = 48,
) -> ImagePage:
    """The gallery's images (metadata, as ``GET .../images/{id}``) a page at a time, ordered by id, with the
    gallery's ``total``: what the web page's gallery view browses."""
    page = await run_in_threadpool(image_page, state, gallery, offset, limit)
    return ImagePage(gallery=gallery, total=page.total, offset=offset, limit=limit,
                     images=[ImageInfo(**rec.to_dict()) for rec in page.records])


@router.patch("/{gallery}/images/{image_id}", response_model=ImageInfo, responses=_ERRORS)
async def patch_image(gallery: GalleryDep, image_id: int, body: ImagePatch, state: StateDep) -> ImageInfo:
    """Change ``camera_id``, ``person_id``, ``captured_at`` (ISO 8601) or ``external_id``; ``null`` removes one.
    Fields not in the body are left as they are."""
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    if not changes:
        raise ApiError(422, "nothing_to_change", "the body names no field; settable: camera_id, person_id, "
                                                 "captured_at, external_id")
    try:
        found = await run_in_threadpool(patch_metadata, state.store, gallery, image_id, changes)
    except MetadataError as e:
        raise ApiError(422, "invalid_metadata", str(e)) from None
    if not found:
        raise _not_found(gallery, image_id)
    rec = await run_in_threadpool(state.store.get, gallery, image_id)
    if rec is None:
        raise _not_found(gallery, image_id)
    return ImageInfo(**rec.to_dict())


@router.get("/{gallery}/images/{image_id}/thumbnail", responses={**_ERRORS, 200: {"content": {"image/jpeg": {}}}},
            response_class=Response)
async def get_thumbnail(gallery: GalleryDep, image_id: int, state: StateDep, request: Request) -> Response:
    """A small JPEG of the kept image (``404 image_bytes_not_kept`` without REID_KEEP_IMAGES; ``500
    image_bytes_unreadable`` if its blob is missing or damaged on disk). Ids are content hashes, so a thumbnail
    never changes: it is cacheable (ETag, long max-age)."""
    size = state.settings.thumbnail_size
    etag = '"' + hashlib.sha1(f"{gallery}/{image_id}/{size}".encode()).hexdigest()[:20] + '"'
    headers = {"Cache-Control": "private, max-age=86400, immutable", "ETag": etag}
    held = none_match_tags(", ".join(request.headers.getlist("if-none-match")) or None)
    if etag in held:  # the tag names gallery, id and size: no need to read the store
        return Response(status_code=304, headers=headers)
    try:
        data = (await run_in_threadpool(state.store.get_image_bytes, gallery, [image_id]))[0]
    except BlobError as e:  # referenced but missing or damaged on disk (REID_BLOB_DIR not shared? a bad disk?)
        raise ApiError(500, "image_bytes_unreadable", f"image {image_id}'s kept bytes cannot be read: {e}") from None
    if data is None:
        if await run_in_threadpool(state.store.exists, gallery, image_id):
            raise ApiError(404, "image_bytes_not_kept", f"image {image_id}'s bytes are not kept (REID_KEEP_IMAGES)")
        raise _not_found(gallery, image_id)
    if ANY in held:  # "*": any current representation, which exists now
        return Response(status_code=304, headers=headers)
    try:
        jpeg = await run_in_threadpool(thumbnail, data, size, state.settings.max_image_pixels)
    except ImageError as e:
        raise ApiError(422, e.code, e.message) from None
    return Response(jpeg, media_type="image/jpeg", headers=headers)

"""Bulk imports: an archive (tar, tar.gz, zip) or many image files into a gallery, as a background job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from index.store import GALLERY_NAME_RE

from ..archive import ArchiveError, Limits, kind, scan, unsafe_name
from ..deps import StateDep
from ..errors import ApiError
from ..imports import Upload, run_import
from ..jobs import JobBusy
from ..schemas import ErrorResponse, Job

router = APIRouter(prefix="/v1/galleries", tags=["galleries"])


@router.post("/{gallery}/imports", status_code=202, response_model=Job,
             responses={c: {"model": ErrorResponse} for c in (409, 413, 415, 422)})
async def create_import(
    gallery: str,
    state: StateDep,
    response: Response,
    files: Annotated[list[UploadFile], File(description="one or more archives (tar, tar.gz, zip) and/or "
                                                        "image files")],
) -> Job:
    """Import images as a job (``202``; follow it at ``GET /v1/jobs/{id}``, cancel with ``DELETE``).

    Archives are checked first: too many files (``REID_IMPORT_MAX_MEMBERS``) or too many bytes uncompressed
    (``REID_IMPORT_MAX_UNCOMPRESSED_BYTES``) give ``413``; a member with an absolute or ``..`` path, a link or a
    special file gives ``422 unsafe_archive`` and nothing is imported (an image file whose name is such a path:
    ``422 unsafe_name``). Each image is then checked as a single upload is. Labels come from each file's name,
    the same way for every archive of the upload: its file name is the ``external_id``; ``<pid>_c<cam>...`` gives
    that person and camera (as numbers: ``0001_c1`` is person ``1``, camera ``1``); else ``<camera>/<file>``
    gives the camera. No parameter names a server-side path."""
    if not GALLERY_NAME_RE.match(gallery):
        raise ApiError(422, "invalid_gallery_name", f"invalid gallery name {gallery!r}: use 1-64 characters from "
                                                    "A-Z a-z 0-9 _ . -, starting with a letter or digit")
    s = state.settings
    if len(files) > s.max_files_per_request:
        raise ApiError(413, "too_many_files", f"{len(files)} files sent; at most {s.max_files_per_request}")
    uploads = [Upload(f.filename, await f.read()) for f in files]
    limits = Limits(s.import_max_members, s.import_max_uncompressed_bytes, s.max_upload_bytes)

    def check() -> int:
        n = 0
        for up in uploads:
            if kind(up.data) is None and up.filename and unsafe_name(up.filename):
                # a file's name gives its labels: one that climbs out of its folder names nothing sensible
                raise ArchiveError(422, "unsafe_name", f"file name {up.filename!r} is absolute or has a parent "
                                                       "('..'), a backslash or a drive letter; nothing was imported")
            n += scan(up.data, limits) if kind(up.data) is not None else 1
            if n > limits.max_members:
                raise ArchiveError(413, "too_many_members", f"more than {limits.max_members} images "
                                                            "(REID_IMPORT_MAX_MEMBERS)")
        return n

    try:
        total = await run_in_threadpool(check)
    except ArchiveError as e:
        raise ApiError(e.status, e.code, str(e)) from None
    if total == 0:
        raise ApiError(422, "no_images", "the upload holds no files to import")
    params = {"files": [u.filename for u in uploads], "total": total}

    def work(ctx):
        return run_import(ctx, state, gallery, uploads, total, limits, s.import_chunk, s.job_max_errors)

    try:
        job = await run_in_threadpool(state.jobs.start, "import", gallery, params, work)
    except JobBusy as e:
        raise ApiError(409, "job_running", f"{e}; wait for it or cancel it (DELETE /v1/jobs/{e.holder})",
                       headers={"Retry-After": "5"}) from None
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return Job(**job)

"""Adapt the active model to a gallery's cameras (GRACL) in a background job; see service/adapt.py."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..adapt import run_adapt, unavailable_reason
from ..deps import GalleryDep, StateDep
from ..errors import ApiError
from ..jobs import JobBusy
from ..model_registry import new_bundle_id
from ..schemas import AdaptRequest, ErrorResponse, Job

router = APIRouter(prefix="/v1/galleries", tags=["model"])


@router.post("/{gallery}/adapt", status_code=202, response_model=Job,
             responses={c: {"model": ErrorResponse} for c in (404, 409, 422, 501)})
async def adapt(gallery: GalleryDep, state: StateDep, body: AdaptRequest | None = None) -> Job:
    """Fine-tune the active model on the gallery's kept images without labels (GRACL), as a job.

    The result is a new bundle under ``{data_dir}/bundles/<bundle_id>`` (the job's ``result``); it is
    not activated (``POST /v1/models/{bundle_id}/activate``)."""
    body = body or AdaptRequest()
    s = state.settings
    n = await run_in_threadpool(state.store.count_images, gallery)
    if n < s.adapt_min_images:
        raise ApiError(422, "too_few_images", f"gallery {gallery!r} has {n} images with kept bytes; adapting needs "
                                              f"at least {s.adapt_min_images} (REID_ADAPT_MIN_IMAGES)")
    bundle, parent = state.bundle, state.bundle_id
    reason = unavailable_reason(bundle)
    if reason:
        raise ApiError(501, "adaptation_unavailable", reason)
    bundle_id = new_bundle_id(s, gallery)
    params = {"epochs": body.epochs, "name": body.name, "bundle_id": bundle_id, "parent": parent}

    def work(ctx):
        return run_adapt(ctx, state.store, gallery, bundle.path, s.bundles_dir / bundle_id, s.data_dir / "tmp",
                         body.epochs, body.name, s.adapt_extra_args)

    try:
        job = await run_in_threadpool(state.jobs.start, "adapt", gallery, params, work)
    except JobBusy as e:
        raise ApiError(409, "job_running", f"{e}; wait for it or cancel it (DELETE /v1/jobs/{e.holder})") from None
    return Job(**job)

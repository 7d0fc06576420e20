"""Model bundles: list those the service can serve, activate one (a job that re-embeds every gallery)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from index.bundle import BundleError, load_bundle

from ..activation import galleries_without_bytes, run_activation
from ..deps import StateDep
from ..errors import ApiError
from ..jobs import JobBusy
from ..model_registry import bundle_dir, copy_for_reembedding, list_bundles, summary, valid_bundle_id
from ..schemas import ErrorResponse, Job, ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["model"])


@router.get("", response_model=ModelList)
async def list_models(state: StateDep) -> ModelList:
    """The active bundle and every bundle that could be activated (``default`` is REID_MODEL_DIR)."""
    found = await run_in_threadpool(list_bundles, state.settings)
    active = ModelInfo(**summary(state.bundle_id, state.bundle))
    available = [ModelInfo(**summary(i, b)) for i, b in found if i != state.bundle_id]
    return ModelList(active=active, available=sorted([active, *available], key=lambda m: m.bundle_id))


@router.post("/{bundle_id}/activate", status_code=202, response_model=Job,
             responses={c: {"model": ErrorResponse} for c in (404, 409, 422)})
async def activate(bundle_id: str, state: StateDep) -> Job:
    """Start a job that re-embeds every gallery's kept images with the bundle, then serves it.

    Searches keep using the current model until the job switches (atomically); the choice survives
    restarts. Needs the bytes of every image (REID_KEEP_IMAGES). The bundle already active is refused (409), unless
    galleries hold vectors of another model (``/readyz`` says so after an upgrade replaced the default bundle):
    then a copy of it under a new id is activated, which re-embeds them."""
    if not valid_bundle_id(bundle_id):
        raise ApiError(422, "invalid_bundle_id", f"invalid bundle id {bundle_id!r}: use 1-128 characters from "
                                                 "A-Z a-z 0-9 _ . - (starting with a letter or digit, no '..')")
    path = bundle_dir(state.settings, bundle_id)
    if not path.is_dir():
        raise ApiError(404, "bundle_not_found", f"no model bundle {bundle_id!r}")
    try:
        await run_in_threadpool(load_bundle, path)  # hashes checked before anything starts
    except BundleError as e:
        raise ApiError(422, "invalid_bundle", f"model bundle {bundle_id!r} is not usable: {e}") from None
    reembed = False
    if bundle_id == state.bundle_id:
        # the model served, but galleries hold vectors of another one (an upgrade replaced the default bundle):
        # activating it again re-embeds them; otherwise there is nothing to do
        if not await run_in_threadpool(state.galleries_of_another_model):
            raise ApiError(409, "already_active", f"model bundle {bundle_id!r} is already active")
        reembed = True
    missing = await run_in_threadpool(galleries_without_bytes, state)
    if missing:
        raise ApiError(409, "images_without_bytes",
                       "these galleries hold images whose bytes were not kept, so they cannot be re-embedded "
                       "(re-ingest them with REID_KEEP_IMAGES=true, or delete them): "
                       + ", ".join(f"{g} ({n})" for g, n in sorted(missing.items())))
    if reembed:
        bundle_id = await run_in_threadpool(copy_for_reembedding, state.settings, bundle_id)
    try:
        job = await run_in_threadpool(state.jobs.start, "activate", None, {"bundle_id": bundle_id},
                                      lambda ctx: run_activation(ctx, state, bundle_id))
    except JobBusy as e:
        raise ApiError(409, "job_running", f"{e}; wait for it or cancel it (DELETE /v1/jobs/{e.holder})") from None
    return Job(**job)

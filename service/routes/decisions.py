"""Same-person decisions (calibrate a threshold) and evaluation (CMC/mAP) on a gallery's labeled images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from .. import calibration
from ..batcher import embed_queries
from ..calibration import CalibrationError, calibrate, labeled_vectors
from ..deps import READ_ONLY, GalleryDep, StateDep
from ..errors import ApiError
from ..evaluation import evaluate_gallery
from ..images import ImageError, decode_image
from ..labels import MetadataError, check_value, parse_metadata_json
from ..limits import EmbedSlot
from ..schemas import CalibrateRequest, Calibration, ErrorResponse, Evaluation

router = APIRouter(prefix="/v1/galleries", tags=["decisions"])

_ERRORS = {c: {"model": ErrorResponse} for c in (404, 413, 422)}


@router.post("/{gallery}/calibrate", response_model=Calibration, responses=_ERRORS)
async def calibrate_gallery(gallery: GalleryDep, state: StateDep, body: CalibrateRequest | None = None
                            ) -> Calibration:
    """Choose the cosine threshold for "same person" from the gallery's labeled images (genuine vs impostor
    cross-camera pairs) at ``target_fpr`` (default 1e-3) and keep it: searches then mark results ``match``."""
    body = body or CalibrateRequest()
    s = state.settings

    def work():
        _, pids, cams, vecs = labeled_vectors(state.store, gallery, s.calibrate_max_images)
        calib = calibrate(pids, cams, vecs, body.target_fpr, s.calibrate_max_pairs)
        calibration.save(state.store, gallery, calib)
        return calib

    try:
        return Calibration(**await run_in_threadpool(work))
    except CalibrationError as e:
        raise ApiError(422, e.code, str(e)) from None


@router.get("/{gallery}/calibration", response_model=Calibration, responses=_ERRORS)
async def get_calibration(gallery: GalleryDep, state: StateDep) -> Calibration:
    calib = await run_in_threadpool(calibration.load, state.store, gallery)
    if calib is None:
        raise ApiError(404, "not_calibrated", f"gallery {gallery!r} is not calibrated (POST .../calibrate)")
    return Calibration(**calib)


@router.post("/{gallery}/evaluate", response_model=Evaluation, responses=_ERRORS, openapi_extra=READ_ONLY)
async def evaluate(
    gallery: GalleryDep,
    state: StateDep,
    _slot: EmbedSlot,
    files: Annotated[list[UploadFile] | None, File(description="labeled query images; none: leave-one-out "
                                                               "over the gallery's labeled images")] = None,
    metadata: Annotated[str | None, Form(description="JSON array aligned with files: "
                                                     "[{\"person_id\", \"camera_id\"}, ...]")] = None,
) -> Evaluation:
    """CMC/mAP/mINP of the active model on the gallery's labeled images (index/metrics.py, the evaluator of
    ``reid evaluate``): same-person same-camera gallery images are ignored for each query."""
    s = state.settings
    files = files or []
    if len(files) > s.max_files_per_request:
        raise ApiError(413, "too_many_files", f"{len(files)} files sent; at most {s.max_files_per_request}")
    pids = cams = None
    if files:
        try:
            meta = parse_metadata_json(metadata or "null")
        except MetadataError as e:
            raise ApiError(422, "invalid_metadata", str(e)) from None
        if not isinstance(meta, list) or len(meta) != len(files) or not all(
                isinstance(m, dict) and isinstance(m.get("person_id"), (str, int))
                and isinstance(m.get("camera_id"), (str, int)) for m in meta):
            raise ApiError(422, "invalid_metadata", "metadata must be a JSON array with one "
                                                    "{\"person_id\", \"camera_id\"} per file")
        try:  # the labels the gallery's images were stored with follow the same rule (service/labels.py)
            pids = [check_value("person_id", m["person_id"]) for m in meta]
            cams = [check_value("camera_id", m["camera_id"]) for m in meta]
        except MetadataError as e:
            raise ApiError(422, "invalid_metadata", str(e)) from None
    blobs = [(f.filename, await f.read()) for f in files]

    def work():
        queries = None
        if blobs:
            images = []
            for i, (name, data) in enumerate(blobs):
                try:
                    images.append(decode_image(data, max_pixels=s.max_image_pixels))
                except ImageError as e:
                    raise ApiError(e.status_code, e.code, f"file #{i} ({name!r}): {e.message}") from None
        with state.model_lock.shared():
            if blobs:
                queries = embed_queries(state, images)
            return evaluate_gallery(state.store, gallery, s.evaluate_max_images, queries, pids, cams)

    try:
        m, n = await run_in_threadpool(work)
    except CalibrationError as e:
        raise ApiError(422, e.code, str(e)) from None
    return Evaluation(mAP=m.mAP, mINP=m.mINP, cmc=m.cmc, ranks=m.ranks, evaluated_queries=m.evaluated_queries,
                      skipped_queries=m.skipped_queries, gallery_images=n,
                      mode="uploaded" if blobs else "leave_one_out")

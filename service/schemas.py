"""Pydantic response models (they document the API in OpenAPI at /docs)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class OmitsAbsent(BaseModel):
    """Optional fields named in ``omit_if_none`` are left out of the JSON when None, so that answers without
    the feature (no calibration, no retention, refine=none) keep exactly the keys they always had."""

    omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        out = handler(self)
        for key in self.omit_if_none:
            if out.get(key) is None:
                out.pop(key, None)
        return out


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable snake_case code")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class UploadItem(BaseModel):
    index: int = Field(description="position of the file in the request")
    id: int = Field(description="stable 63-bit image id (content hash within the gallery)")
    external_id: str | None = None
    status: str = Field(description="'created' or 'exists' (same bytes already in this gallery)")


class UploadError(BaseModel):
    index: int
    filename: str | None = None
    code: str
    message: str


class UploadResponse(BaseModel):
    items: list[UploadItem]
    errors: list[UploadError]


class SearchResult(OmitsAbsent):
    omit_if_none = ("match",)

    id: int
    score: float = Field(description="ranking score of the refine mode, higher is more similar "
                                     "(refine=none: the cosine similarity)")
    cosine: float = Field(description="plain cosine similarity of the encoder features")
    external_id: str | None = None
    camera_id: str | None = None
    person_id: str | None = None
    captured_at: str | None = None
    match: bool | None = Field(None, description="once the gallery is calibrated: cosine above the threshold "
                                                 "(the same person); absent otherwise")


class SearchTiming(OmitsAbsent):
    omit_if_none = ("refine",)

    decode: float
    embed: float
    search: float = Field(description="FAISS search, store look-ups and candidate vectors")
    refine: float | None = Field(None, description="refinement (absent for refine=none)")
    total: float


_CANDIDATES_USED = Field(None, description="local/kreciprocal/local_kreciprocal: the candidates refined (the most "
                                           "of any query, before expansion): fewer than candidates when the "
                                           "gallery, after the filters, holds fewer; absent for the other modes")


class SearchResponse(OmitsAbsent):
    omit_if_none = ("threshold", "candidates_used")

    results: list[SearchResult]
    timing_ms: SearchTiming
    model: str
    refine: str = Field(description="refine mode asked for (or the server's default)")
    refine_applied: str = Field(description="the mode that ran: refine itself, or what auto chose for this "
                                            "gallery (none, local, kreciprocal or local_kreciprocal)")
    candidates: int | None = Field(None, description="local/kreciprocal/local_kreciprocal: K, the gallery "
                                                     "candidates refined per query before any expansion (the "
                                                     "request's candidates, else REID_REFINE_CANDIDATES raised "
                                                     "to top_k); else null")
    candidates_used: int | None = _CANDIDATES_USED
    threshold: float | None = Field(None, description="the calibrated cosine threshold behind ``match`` "
                                                      "(absent until the gallery is calibrated)")


class QueryResults(BaseModel):
    index: int = Field(description="position of the query file in the request")
    filename: str | None = None
    results: list[SearchResult]


class BatchSearchResponse(OmitsAbsent):
    omit_if_none = ("threshold", "candidates_used")

    queries: list[QueryResults]
    timing_ms: SearchTiming
    model: str
    refine: str
    refine_applied: str
    candidates: int | None = None
    candidates_used: int | None = _CANDIDATES_USED
    threshold: float | None = None


class GalleryInfo(OmitsAbsent):
    omit_if_none = ("retention_days",)

    name: str
    count: int
    retention_days: int | None = Field(None, description="images older than this many days are deleted by the "
                                                         "retention sweeper (absent: kept until deleted)")


class GalleryDetail(GalleryInfo):
    cameras: dict[str, int] = Field(description="images per camera id ('' for images without one)")
    model: str = Field(description="the model (bundle name:version) whose vectors the gallery holds: recorded by "
                                   "its first write and by each activation; another than the served model's after "
                                   "an upgrade replaced the default bundle (see /readyz)")
    index: str | None = Field(None, description="FAISS index family in use now (flat, ivf_flat, hnsw, ivf_pq)")
    indexed: int = Field(description="vectors in this process's index (equals count when in sync)")
    refine_auto: dict[str, Any] = Field(description="what refine=auto applies to this gallery now (mode), the rule, "
                                                    "and the statistic behind it (profile; null below 20 images)")


RETENTION_DAYS = Field(None, ge=1, le=36500, description="delete images older than this many days "
                                                         "(captured_at, else upload time); null: keep them")


class GalleryCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit")
    retention_days: int | None = RETENTION_DAYS


class GalleryPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retention_days: int | None = RETENTION_DAYS


class GalleryList(BaseModel):
    galleries: list[GalleryInfo]


class ImageInfo(BaseModel):
    id: int
    gallery: str
    external_id: str | None = None
    camera_id: str | None = None
    person_id: str | None = None
    captured_at: str | None = None
    filename: str | None = None
    created_at: str | None = None
    model: str | None = None


class ImagePage(BaseModel):
    gallery: str
    total: int = Field(description="images in the gallery's index")
    offset: int
    limit: int
    images: list[ImageInfo] = Field(description="this page, ordered by id (stable from page to page while the "
                                                "gallery does not change)")


class GalleryDeleted(BaseModel):
    deleted: bool = True
    gallery: str
    count: int = Field(description="the gallery's images, deleted with it")


# its own model, not an optional id on one shared with galleries: a gallery's answer had "id": null
class ImageDeleted(BaseModel):
    deleted: bool = True
    gallery: str
    id: int = Field(description="the image deleted")
    count: int = Field(1, description="images deleted: 1")


class DeleteFilter(BaseModel):
    camera_id: str | None = None
    after: str | None = Field(None, description="inclusive, UTC")
    before: str | None = Field(None, description="exclusive, UTC")
    all: bool = False


class BulkDeleted(BaseModel):
    gallery: str
    count: int = Field(description="images deleted (vectors, metadata, kept bytes and index entries)")
    filter: DeleteFilter


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, Any]


class Job(BaseModel):
    id: str
    kind: str = Field(description="'adapt', 'activate' or 'import'")
    gallery: str | None = Field(None, description="the gallery the job works on (adapt), else null")
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    progress: float = Field(description="0..1")
    stage: str | None = None
    message: str | None = None
    params: dict[str, Any] = Field(default_factory=dict, description="what the job was asked to do")
    result: dict[str, Any] | None = Field(None, description="adapt: {bundle_id, name, version}; import (also "
                                                            "while running): {total, done, created, exists, "
                                                            "failed, errors: [...] (capped), errors_truncated}")
    created_at: str
    updated_at: str


class JobList(BaseModel):
    jobs: list[Job] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as cursor for the next page; null on the last")


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1, le=50, description="training epochs (default: the command's own)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                             description="name of the new model in its card (default: derived from the parent)")


class ModelInfo(BaseModel):
    bundle_id: str = Field(description="'default' (REID_MODEL_DIR) or a directory under {data_dir}/bundles")
    name: str
    version: str
    embedding_dim: int
    parent: Any = Field(None, description="the card's 'parent' (the model an adapted one started from)")


class ModelList(BaseModel):
    active: ModelInfo
    available: list[ModelInfo]


class ImagePatch(BaseModel):
    """Metadata to change; a field set to null is removed."""
    model_config = ConfigDict(extra="forbid")

    camera_id: str | None = Field(None, max_length=1024)
    person_id: str | None = Field(None, max_length=1024)
    captured_at: str | None = Field(None, max_length=64, description="ISO 8601 date-time")
    external_id: str | None = Field(None, max_length=1024)


class CalibrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_fpr: float = Field(1e-3, gt=0, lt=1, description="false-positive rate the threshold is chosen at")


class RocPoint(BaseModel):
    fpr: float
    tpr: float
    threshold: float


class Calibration(BaseModel):
    threshold: float = Field(description="cosine above which two images are called the same person")
    target_fpr: float
    fpr: float = Field(description="impostor pass rate at the threshold")
    tpr: float = Field(description="genuine pass rate at the threshold")
    tpr_at_fpr_1e_2: float = Field(alias="tpr_at_fpr_1e-2")
    tpr_at_fpr_1e_3: float = Field(alias="tpr_at_fpr_1e-3")
    roc: list[RocPoint]
    genuine_pairs: int
    impostor_pairs: int
    images: int
    identities: int
    score: str = Field(description="the score calibrated: cosine of encoder features")
    genuine: dict[str, float]
    impostor: dict[str, float]

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class Evaluation(BaseModel):
    mAP: float
    mINP: float
    cmc: list[float] = Field(description="cmc[r-1]: share of evaluated queries with a match within the top r")
    ranks: dict[str, float]
    evaluated_queries: int
    skipped_queries: int
    gallery_images: int
    mode: str = Field(description="'uploaded' queries or the gallery's own labeled images 'leave_one_out'")

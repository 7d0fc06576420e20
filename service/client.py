"""`ReidClient`: the Python client of the HTTP API (the `reid` CLI and the demo use it too).

It imports only the standard library and httpx, so an application that calls a running service needs neither
FastAPI nor ONNX Runtime nor numpy (tests/test_client.py checks this in a fresh interpreter, and an
import-linter contract in pyproject.toml keeps it so). Answers come back as dataclasses; fields a newer server
adds are ignored, so an older client keeps working. ``429`` and ``503`` are retried after the answer's
``Retry-After`` (uploads are idempotent: ids are content hashes), up to ``retries`` times.
"""

from __future__ import annotations

import email.utils
import json
import mimetypes
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, TypeVar

import httpx

__all__ = ["DEFAULT_URL", "BatchSearchAnswer", "ClientError", "GalleryInfo", "IngestResult", "Job", "JobPage",
           "ModelCard", "QueryResults", "RejectedFile", "ReidClient", "SearchAnswer", "SearchHit", "ServiceError",
           "ServiceUnreachable", "UploadedImage"]

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)  # the service says "later": a full queue, overload, Redis away, starting up

Image = str | Path | bytes  # a path, or the encoded bytes themselves


class ClientError(Exception):
    """Any failure of a client call."""


class ServiceUnreachable(ClientError):
    """No answer: connection refused, name not resolved, timed out."""


class ServiceError(ClientError):
    """The service answered with an error status; ``code`` and ``message`` are its error body's."""

    def __init__(self, status: int, body: dict | str, retry_after: float | None = None):
        self.status, self.body, self.retry_after = status, body, retry_after
        error = body.get("error") if isinstance(body, dict) else None
        self.code = error.get("code") if isinstance(error, dict) else None
        self.message = error.get("message") if isinstance(error, dict) else str(body)[:300]
        super().__init__(f"HTTP {status}" + (f" {self.code}" if self.code else "") + f": {self.message}")


T = TypeVar("T")


def _known(cls: type[T], data: dict[str, Any], **nested: Any) -> T:
    """``cls`` from an answer's fields it knows (a newer server's extra fields are left out)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names}, **nested)


@dataclass(frozen=True)
class SearchHit:
    """One ranked gallery image."""
    id: int
    score: float  # the refine mode's ranking score (refine=none: the cosine)
    cosine: float  # plain cosine similarity of the encoder features
    external_id: str | None = None
    camera_id: str | None = None
    person_id: str | None = None
    captured_at: str | None = None
    match: bool | None = None  # once the gallery is calibrated: cosine above its threshold


def _hits(items: list[dict]) -> list[SearchHit]:
    return [_known(SearchHit, r) for r in items]


@dataclass(frozen=True)
class SearchAnswer:
    """`search` and `search_tracklet`."""
    results: list[SearchHit]
    model: str
    refine: str  # the mode asked for (or the server's default)
    refine_applied: str  # the mode that ran (auto's choice)
    timing_ms: dict[str, float]
    candidates: int | None = None  # local/kreciprocal/local_kreciprocal: K candidates refined per query
    candidates_used: int | None = None  # fewer than K when the gallery (after the filters) holds fewer
    threshold: float | None = None  # the calibrated threshold behind each hit's `match`


@dataclass(frozen=True)
class QueryResults:
    index: int
    filename: str | None
    results: list[SearchHit]


@dataclass(frozen=True)
class BatchSearchAnswer:
    """`search_batch`: one `QueryResults` per query, in the order sent."""
    queries: list[QueryResults]
    model: str
    refine: str
    refine_applied: str
    timing_ms: dict[str, float]
    candidates: int | None = None
    candidates_used: int | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class UploadedImage:
    index: int  # position in the `paths` given to `ingest`
    id: int  # 63-bit content id within the gallery
    external_id: str | None
    status: str  # created, or exists (the same bytes were already there)


@dataclass(frozen=True)
class RejectedFile:
    index: int
    filename: str | None
    code: str
    message: str


@dataclass(frozen=True)
class IngestResult:
    items: list[UploadedImage]
    errors: list[RejectedFile]

    @property
    def created(self) -> int:
        return sum(item.status == "created" for item in self.items)


@dataclass(frozen=True)
class GalleryInfo:
    """A gallery; `gallery(name)` fills the detail fields, `galleries()` only the first three."""
    name: str
    count: int
    retention_days: int | None = None
    cameras: dict[str, int] | None = None
    model: str | None = None
    index: str | None = None
    indexed: int | None = None
    refine_auto: dict[str, Any] | None = None


@dataclass(frozen=True)
class GalleryImage:
    """A stored image's record (no pixels)."""
    id: int
    gallery: str
    external_id: str | None = None
    camera_id: str | None = None
    person_id: str | None = None
    captured_at: str | None = None
    filename: str | None = None
    created_at: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class ImagePage:
    """One page of a gallery's images, in id order."""
    gallery: str
    total: int
    offset: int
    limit: int
    images: list[GalleryImage]


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    embedding_dim: int
    card: dict[str, Any]  # the whole model.json as served


@dataclass(frozen=True)
class Job:
    id: str
    kind: str  # adapt, activate or import
    status: str  # queued, running, succeeded, failed or cancelled
    progress: float
    created_at: str
    updated_at: str
    gallery: str | None = None
    stage: str | None = None
    message: str | None = None
    params: dict[str, Any] | None = None
    result: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.status not in ("queued", "running")


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]  # newest first
    next_cursor: str | None  # pass as `cursor` for the next page; None on the last one


def _file(image: Image, default_name: str) -> tuple[str, bytes, str]:
    if isinstance(image, bytes):
        return default_name, image, "application/octet-stream"
    path = Path(image)
    return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _form_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ReidClient:
    """A session with one service.

    ``retries``: how often a ``429``/``503`` answer is retried, each after its ``Retry-After`` (or 0.5 s, 1 s,
    2 s ... without one); an answer that asks for more than ``max_retry_wait`` seconds is not waited for but
    raised (`ServiceError.retry_after` says how long). Errors: `ServiceError` (an error answer),
    `ServiceUnreachable` (no answer), `FileNotFoundError` (a path to upload).
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, max_retry_wait: float = 60.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.retries, self.max_retry_wait = retries, max_retry_wait
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ReidClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                raise ServiceUnreachable(f"cannot reach the service at {self.base_url}: "
                                         f"{e or type(e).__name__}") from e
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                return response
            wait = _retry_after(response)
            if wait is None:
                wait = 0.5 * 2 ** attempt
            if wait > self.max_retry_wait:
                return response
            time.sleep(wait)
        raise AssertionError("unreachable")

    @staticmethod
    def _body(response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ServiceError(response.status_code, body, _retry_after(response))
        return body

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._body(self._send(method, path, **kwargs))

    # ------------------------------------------------------------------ service and model

    def wait_ready(self, timeout: float = 120.0, process=None) -> None:
        """Poll /readyz until 200; fail early if the server process (when given) has exited. The failure says what
        /readyz last reported."""
        self._wait_for("/readyz", "ready", timeout, process)

    def wait_live(self, timeout: float = 120.0, process=None) -> None:
        """Poll /healthz until 200 (the process answers; its model or store may not be ready)."""
        self._wait_for("/healthz", "up", timeout, process)

    def _wait_for(self, path: str, what: str, timeout: float, process) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ClientError(f"the server exited with code {process.returncode} before it was {what}")
            try:
                r = self.http.get(path)
                if r.status_code == 200:
                    return
                last = f"{r.status_code}: {r.text[:500]}"
            except httpx.TransportError as e:
                last = str(e) or type(e).__name__
            time.sleep(0.25)
        raise ServiceUnreachable(f"service at {self.base_url} not {what} after {timeout:.0f}s (last answer {last})")

    def model(self) -> ModelCard:
        card = self._call("GET", "/v1/model")
        return ModelCard(card["name"], card["version"], card["embedding_dim"], card)

    # ------------------------------------------------------------------ galleries and images

    def galleries(self) -> list[GalleryInfo]:
        return [_known(GalleryInfo, g) for g in self._call("GET", "/v1/galleries")["galleries"]]

    def gallery(self, name: str) -> GalleryInfo:
        return _known(GalleryInfo, self._call("GET", f"/v1/galleries/{name}"))

    def delete_gallery(self, name: str) -> int:
        """Delete a gallery and everything in it; returns how many images it held."""
        return self._call("DELETE", f"/v1/galleries/{name}")["count"]

    def ingest(self, gallery: str, paths: Sequence[str | Path], metadata: Sequence[dict] | None = None,
               batch_size: int = 32, progress: bool = False) -> IngestResult:
        """Upload image files in batches (the gallery is created if needed). ``metadata``: one dict per path
        (camera_id, person_id, captured_at, external_id). Files the service rejects are in ``errors``, with
        their index in ``paths``; the others are stored. ``progress``: a progress bar on stderr (tqdm)."""
        items: list[UploadedImage] = []
        errors: list[RejectedFile] = []
        bar = None
        if progress:
            from tqdm import tqdm  # only for the bar: the client itself needs no more than httpx

            bar = tqdm(total=len(paths), desc=f"ingest {gallery}", unit="img")
        try:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                files = [("files", _file(p, "image")) for p in chunk]
                data = {} if metadata is None else {"metadata": json.dumps(list(metadata[start:start + batch_size]))}
                try:
                    body = self._call("POST", f"/v1/galleries/{gallery}/images", files=files, data=data)
                except ServiceError as e:  # 422 no_valid_images still lists each file's error
                    if e.status != 422 or not isinstance(e.body, dict) or not isinstance(e.body.get("errors"), list):
                        raise
                    body = e.body
                items += [_known(UploadedImage, {**it, "index": it["index"] + start}) for it in body["items"]]
                errors += [_known(RejectedFile, {**e, "index": e["index"] + start}) for e in body["errors"]]
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return IngestResult(items, errors)

    def import_files(self, gallery: str, paths: Sequence[str | Path]) -> Job:
        """Start an import job: archives (tar, tar.gz, zip) and/or image files. Follow it with `wait_job`."""
        return _known(Job, self._call("POST", f"/v1/galleries/{gallery}/imports",
                                      files=[("files", _file(p, "upload")) for p in paths]))

    # ------------------------------------------------------------------ search

    @staticmethod
    def _search_form(top_k: int, refine: str | None, candidates: int | None, filters: dict[str, Any]) -> dict:
        data = {"top_k": str(top_k)}
        if refine is not None:  # None: the server's default (REID_REFINE_DEFAULT)
            data["refine"] = refine
        if candidates is not None:
            data["candidates"] = str(candidates)
        data.update({k: _form_value(v) for k, v in filters.items() if v is not None})
        return data

    def search(self, gallery: str, image: Image, top_k: int = 10, refine: str | None = "none",
               candidates: int | None = None, **filters: Any) -> SearchAnswer:
        """The ``top_k`` gallery images most like ``image``. ``refine``: none, local, joint, kreciprocal,
        local_kreciprocal or auto (None: the server's default); ``candidates``: K of local/kreciprocal/
        local_kreciprocal (None: the server's; at least ``top_k``). ``filters``: the search form's filters,
        e.g. ``cameras="1,2"``, ``exclude_camera_id="3"``, ``person_id``, ``after``/``before`` (ISO 8601),
        ``exclude_same_camera=True`` with ``query_camera_id``."""
        data = self._search_form(top_k, refine, candidates, filters)
        body = self._call("POST", f"/v1/galleries/{gallery}/search", files={"file": _file(image, "query")}, data=data)
        return _known(SearchAnswer, body, results=_hits(body.pop("results")))

    def search_tracklet(self, gallery: str, images: Sequence[Image], top_k: int = 10, refine: str | None = "none",
                        candidates: int | None = None, **filters: Any) -> SearchAnswer:
        """Several crops of one person searched as one query (their mean embedding)."""
        files = [("files", _file(im, f"crop{i}")) for i, im in enumerate(images)]
        data = self._search_form(top_k, refine, candidates, filters)
        body = self._call("POST", f"/v1/galleries/{gallery}/search:tracklet", files=files, data=data)
        return _known(SearchAnswer, body, results=_hits(body.pop("results")))

    def search_batch(self, gallery: str, images: Sequence[Image], top_k: int = 10, refine: str | None = "none",
                     candidates: int | None = None, **filters: Any) -> BatchSearchAnswer:
        """Several queries in one request, refined together; one `QueryResults` per image, in order."""
        files = [("files", _file(im, f"query{i}")) for i, im in enumerate(images)]
        data = self._search_form(top_k, refine, candidates, filters)
        body = self._call("POST", f"/v1/galleries/{gallery}/search:batch", files=files, data=data)
        queries = [QueryResults(q["index"], q.get("filename"), _hits(q["results"])) for q in body.pop("queries")]
        return _known(BatchSearchAnswer, body, queries=queries)

    def search_image(self, gallery: str, image_id: int, top_k: int = 10, refine: str | None = "none",
                     candidates: int | None = None, **filters: Any) -> SearchAnswer:
        """The ``top_k`` images most like a stored one (its stored vector; the image itself left out)."""
        data = self._search_form(top_k, refine, candidates, filters)
        body = self._call("POST", f"/v1/galleries/{gallery}/images/{int(image_id)}/search", data=data)
        return _known(SearchAnswer, body, results=_hits(body.pop("results")))

    def images(self, gallery: str, offset: int = 0, limit: int = 48) -> ImagePage:
        """One page of the gallery's images (records, in id order)."""
        body = self._call("GET", f"/v1/galleries/{gallery}/images", params={"offset": offset, "limit": limit})
        return _known(ImagePage, body, images=[_known(GalleryImage, i) for i in body.pop("images")])

    # ------------------------------------------------------------------ models

    def adapt(self, gallery: str, epochs: int | None = None, name: str | None = None) -> Job:
        """Start fine-tuning the active model on the gallery's images without labels (GRACL); the job's
        ``result["bundle_id"]`` names the new bundle, which is not activated."""
        body = {k: v for k, v in (("epochs", epochs), ("name", name)) if v is not None}
        return _known(Job, self._call("POST", f"/v1/galleries/{gallery}/adapt", json=body))

    def activate(self, bundle_id: str) -> Job:
        """Start re-embedding every gallery with the bundle, then serving it."""
        return _known(Job, self._call("POST", f"/v1/models/{bundle_id}/activate"))

    # ------------------------------------------------------------------ jobs

    def job(self, job_id: str) -> Job:
        return _known(Job, self._call("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, gallery: str | None = None, kind: str | None = None, status: str | None = None,
             limit: int | None = None, cursor: str | None = None) -> JobPage:
        """Jobs newest first, filtered by gallery, kind (adapt, activate, import) and status; one page."""
        params = {k: v for k, v in (("gallery", gallery), ("kind", kind), ("status", status), ("limit", limit),
                                    ("cursor", cursor)) if v is not None}
        body = self._call("GET", "/v1/jobs", params=params)
        return JobPage([_known(Job, j) for j in body["jobs"]], body.get("next_cursor"))

    def cancel_job(self, job_id: str) -> Job:
        return _known(Job, self._call("DELETE", f"/v1/jobs/{job_id}"))

    def wait_job(self, job_id: str, timeout: float = 3600.0, poll: float = 0.5) -> Job:
        """Poll a job until it has finished (whatever its status); TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.finished:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f}s")
            time.sleep(poll)


def metadata_for_samples(samples: Iterable) -> list[dict]:
    """`Sample(path, pid, camid)` -> the API's per-file metadata."""
    return [{"camera_id": str(s.camid), "person_id": str(s.pid), "external_id": Path(s.path).name} for s in samples]

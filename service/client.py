"""A small HTTP client for the service (used by `reid ingest`, `reid search`, the demo and tests)."""

from __future__ import annotations

import json
import mimetypes
import time
from pathlib import Path
from typing import Iterable

import httpx
from tqdm import tqdm


class ServiceError(RuntimeError):
    def __init__(self, status: int, body: dict | str):
        self.status, self.body = status, body
        super().__init__(f"HTTP {status}: {body}")


class ReIDClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)

    def close(self):
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ServiceError(response.status_code, body)
        return body

    def wait_ready(self, timeout: float = 120.0, process=None) -> None:
        """Poll /readyz until 200; fail early if the server process (when given) has exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"service at {self.http.base_url} not ready after {timeout:.0f}s")

    def model(self) -> dict:
        return self._check(self.http.get("/v1/model"))

    def gallery(self, name: str) -> dict:
        return self._check(self.http.get(f"/v1/galleries/{name}"))

    def ingest(self, gallery: str, paths: list[str | Path], metadata: list[dict] | None = None,
               batch_size: int = 32, progress: bool = True) -> dict:
        """Upload files in batches; returns all items and errors, indices relative to `paths`."""
        items, errors = [], []
        with tqdm(total=len(paths), desc=f"ingest {gallery}", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = [Path(p) for p in paths[start:start + batch_size]]
                files = [("files", (p.name, p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream"))
                         for p in chunk]
                data = {}
                if metadata is not None:
                    data["metadata"] = json.dumps(metadata[start:start + batch_size])
                response = self.http.post(f"/v1/galleries/{gallery}/images", files=files, data=data)
                if response.status_code == 422 and "errors" in response.text:
                    body = response.json()
                    batch_errors = body.get("errors") or body.get("error", {}).get("errors", [])
                    batch_items = []
                else:
                    body = self._check(response)
                    batch_items, batch_errors = body["items"], body["errors"]
                items.extend(batch_items)
                errors.extend({**e, "index": e["index"] + start} for e in batch_errors)
                bar.update(len(chunk))
        return {"items": items, "errors": errors}

    @staticmethod
    def _search_form(top_k: int, refine: str | None, candidates: int | None, exclude_camera_id: str | None) -> dict:
        data = {"top_k": str(top_k)}
        if refine is not None:  # None: the server's default (REID_REFINE_DEFAULT)
            data["refine"] = refine
        if candidates is not None:
            data["candidates"] = str(candidates)
        if exclude_camera_id is not None:
            data["exclude_camera_id"] = str(exclude_camera_id)
        return data

    def search(self, gallery: str, image: str | Path | bytes, top_k: int = 10, refine: str | None = "none",
               exclude_camera_id: str | None = None, candidates: int | None = None) -> dict:
        """One query. `refine`: none, local, joint, kreciprocal or auto (None = the server's default); `candidates`:
        K of local/kreciprocal (None = the server's)."""
        content = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = "query" if isinstance(image, bytes) else Path(image).name
        data = self._search_form(top_k, refine, candidates, exclude_camera_id)
        response = self.http.post(f"/v1/galleries/{gallery}/search", files={"file": (name, content)}, data=data)
        return self._check(response)

    def search_batch(self, gallery: str, paths: list[str | Path | bytes], top_k: int = 10,
                     refine: str | None = "none", candidates: int | None = None,
                     exclude_camera_id: str | None = None) -> dict:
        """Several queries refined together (POST .../search:batch); answers ``{"queries": [...], ...}``."""
        files = [("files", (f"query{i}" if isinstance(im, bytes) else Path(im).name,
                            im if isinstance(im, bytes) else Path(im).read_bytes()))
                 for i, im in enumerate(paths)]
        data = self._search_form(top_k, refine, candidates, exclude_camera_id)
        return self._check(self.http.post(f"/v1/galleries/{gallery}/search:batch", files=files, data=data))


def metadata_for_samples(samples: Iterable) -> list[dict]:
    """`Sample(path, pid, camid)` -> the API's per-file metadata."""
    return [{"camera_id": str(s.camid), "person_id": str(s.pid), "external_id": Path(s.path).name} for s in samples]

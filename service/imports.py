"""Bulk ingestion as a background job: an uploaded archive (or many files) into a gallery.

The request checks everything it can before answering ``202`` (archive safety and limits, service/archive.py);
the job then ingests the images a chunk at a time through the same write path as single uploads
(service/ingest.py: per-image checks, content-hash ids, durable store write, index), so a cancelled or failed
import keeps what it had stored and a retried one skips it (status ``exists``). The job's ``result`` shows the
counts and the per-item errors (capped at ``job_max_errors``) while it runs, and keeps the last ones when it is
cancelled or fails; an import that stored no image fails. Labels come from each file's own name
(service/labels.py), whatever else came in the same upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .archive import Limits, iter_members, kind
from .ingest import ingest
from .jobs import JobContext, JobFailed
from .labels import labels_from_name


@dataclass
class Upload:
    filename: str | None
    data: bytes


def items(uploads: list[Upload], limits: Limits
          ) -> Iterator[tuple[str, dict[str, str], bytes | None, str | None]]:
    """``(name, labels, bytes, error)`` of every image: archive members, or the uploaded file itself. With several
    uploads a member's name (stored as its ``filename``, shown in errors) says which archive it came from
    (``imp.zip:cam/x.png``); its labels are read from the member's own name."""
    for up in uploads:
        if kind(up.data) is not None:
            prefix = f"{up.filename}:" if len(uploads) > 1 else ""
            for name, blob, err in iter_members(up.data, limits):
                yield prefix + name, labels_from_name(name), blob, err
        else:
            yield up.filename or "", labels_from_name(up.filename or ""), up.data, None


def run_import(ctx: JobContext, state, gallery: str, uploads: list[Upload], total: int, limits: Limits,
               chunk: int, max_errors: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"total": total, "done": 0, "created": 0, "exists": 0, "failed": 0,
                               "errors": [], "errors_truncated": False}
    ctx.result = summary  # what the job keeps if it is cancelled or fails

    def error(name: str, code: str, message: str) -> None:
        summary["failed"] += 1
        if len(summary["errors"]) < max_errors:
            summary["errors"].append({"name": name, "code": code, "message": message})
        else:
            summary["errors_truncated"] = True

    def flush(batch: list[tuple[str, bytes]], metas: list[dict[str, str]]) -> None:
        ctx.check()
        if batch:
            res = ingest(state, gallery, batch, metas)
            for it in res.items:
                summary[it["status"]] += 1
            for e in res.errors:
                error(batch[e["index"]][0], e["code"], e["message"])
            summary["done"] += len(batch)
        if not ctx.store.update(ctx.id, progress=round(summary["done"] / max(1, total), 4),
                                stage="ingesting", result=summary):
            ctx.cancel()
        ctx.check()

    batch: list[tuple[str, bytes]] = []
    metas: list[dict[str, str]] = []
    for name, labels, blob, err in items(uploads, limits):
        if blob is None:
            error(name, "member_too_large" if "larger" in (err or "") else "unreadable_member", err or "")
            summary["done"] += 1
            continue
        batch.append((name, blob))
        metas.append(labels)
        if len(batch) >= chunk:
            flush(batch, metas)
            batch, metas = [], []
    flush(batch, metas)
    if summary["created"] + summary["exists"] == 0:
        raise JobFailed(f"none of the {summary['failed']} file(s) could be imported (see result.errors)")
    return summary

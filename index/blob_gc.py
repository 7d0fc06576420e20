"""The orphan sweep of the blob store: blobs no record references, and the leftovers of interrupted writes.

An orphan is what a crash (or a failed transaction) between a blob's fsync and the Redis transaction that would
have referenced it leaves behind, or a removal that could not finish. Orphans cost disk only, never correctness
(no record points to them), so this runs when an operator wants the space back: ``reid gc-blobs``.

For each gallery folder under the blob directory (a gallery deleted meanwhile included):

* a blob that the gallery's records do not reference and that is older than ``grace_s`` is removed through
  :meth:`index.store.RedisStore.remove_unreferenced_blob`, which re-checks the reference atomically and takes
  the same removal mark as a delete, so a writer referencing the blob at that very moment is never left with a
  missing file (the grace only spares in-flight writes needless retries);
* a damaged blob (its bytes no longer hash to its name) is reported, not touched;
* a ``.tmp-*`` file older than ``grace_s`` (a put that never finished) is removed; a ``.trash-*`` file (a removal
  that never finished) is put back if its image references it again and its blob is missing, else removed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .blob_store import BlobCorrupt, BlobMissing, BlobStore, blob_key
from .store import GALLERY_NAME_RE, RedisStore, image_id

__all__ = ["SweepReport", "sweep_orphan_blobs"]

DEFAULT_GRACE_S = 600.0


@dataclass
class SweepReport:
    galleries: int = 0
    blobs: int = 0  #: blobs found
    removed: int = 0  #: unreferenced blobs removed
    too_recent: int = 0  #: unreferenced blobs younger than the grace, left
    corrupt: int = 0  #: blobs whose bytes do not hash to their name (left for an operator)
    leftovers_removed: int = 0  #: .tmp-* / .trash-* files removed
    restored: int = 0  #: .trash-* files put back because their image references them

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def sweep_orphan_blobs(store: RedisStore, grace_s: float = DEFAULT_GRACE_S, now: float | None = None) -> SweepReport:
    if store.blob_dir is None:
        raise ValueError("this store has no blob directory to sweep")
    report = SweepReport()
    root = Path(store.blob_dir)
    if not root.is_dir():
        return report
    now = time.time() if now is None else now
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and GALLERY_NAME_RE.match(folder.name):
            report.galleries += 1
            _sweep_gallery(store, folder.name, BlobStore(folder), grace_s, now, report)
    return report


def _sweep_gallery(store: RedisStore, gallery: str, blobs: BlobStore, grace_s: float, now: float,
                   report: SweepReport) -> None:
    referenced = store.referenced_blobs(gallery)
    for key in blobs.keys():
        report.blobs += 1
        if key in referenced:
            continue
        mtime = blobs.mtime(key)
        if mtime is None:
            continue  # removed meanwhile
        if now - mtime < grace_s:
            report.too_recent += 1
            continue
        try:
            data = blobs.get(key)
        except BlobMissing:
            continue
        except BlobCorrupt:
            report.corrupt += 1
            continue
        if store.remove_unreferenced_blob(gallery, image_id(gallery, data), key):
            report.removed += 1
    for left in blobs.leftovers():
        if now - left.mtime < grace_s:
            continue
        if left.key is not None and _still_wanted(store, gallery, blobs, left.path, left.key):
            blobs.restore(left.path, left.key)
            report.restored += 1
        else:
            left.path.unlink(missing_ok=True)
            report.leftovers_removed += 1
    blobs.prune_empty_dirs()


def _still_wanted(store: RedisStore, gallery: str, blobs: BlobStore, trash: Path, key: str) -> bool:
    """A trashed blob whose image references it and whose own file is missing: a remover that was slower than its
    mark's lifetime and then crashed before putting it back."""
    if blobs.exists(key):
        return False
    try:
        data = trash.read_bytes()
    except FileNotFoundError:
        return False
    return blob_key(data) == key and store.is_blob_referenced(gallery, image_id(gallery, data), key)

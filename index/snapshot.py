"""Snapshots of a gallery's FAISS index: ``<dir>/<gallery>.faiss`` plus ``<dir>/<gallery>.json`` (the manifest).

The index is a cache of the Redis store; a snapshot only saves the time of rebuilding it. The manifest
says what the index file holds: the model whose vectors it indexes (bundle id, model id, dimension), the
index settings it was built with, the vector count, the size of the index file and ``stream_id``, the
last entry of the gallery's change log (``reid:gallery:{g}:events``) the index reflected *before* it was written (the index may reflect more:
replaying from there is idempotent). Both files are written atomically (temp file, fsync, rename), the
index file first, so a crash leaves the old pair or a new index with the old manifest, which the size
check rejects.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .files import atomic_write
from .vector_index import VectorIndex

__all__ = ["Manifest", "load_snapshot", "read_manifest", "remove_snapshot", "snapshot_galleries", "touch_manifest",
           "write_snapshot"]

log = logging.getLogger("reid.index")

FORMAT = 1


@dataclass
class Manifest:
    gallery: str
    bundle_id: str
    model: str
    dim: int
    count: int
    stream_id: str
    index_settings: dict[str, Any] = field(default_factory=dict)
    index_bytes: int = 0
    written_at: str = ""
    format: int = FORMAT


def _paths(root: Path, gallery: str) -> tuple[Path, Path]:
    return root / f"{gallery}.faiss", root / f"{gallery}.json"


def _write_manifest(path: Path, manifest: Manifest) -> None:
    with atomic_write(path, mode=0o600) as tmp:  # owner-only, like the index file beside it
        tmp.write_bytes(json.dumps(asdict(manifest), indent=1).encode())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_snapshot(root: str | os.PathLike, index: VectorIndex, manifest: Manifest) -> Manifest:
    """Write ``index`` and its manifest under ``root``. ``manifest.count``/``index_bytes`` are filled in here."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    faiss_path, json_path = _paths(root, manifest.gallery)
    manifest.count = len(index)  # before saving: the index may grow meanwhile, the count check will say so
    index.save(faiss_path)  # atomic, under the index's own lock
    manifest.index_bytes = faiss_path.stat().st_size
    manifest.written_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    _write_manifest(json_path, manifest)
    _fsync_dir(root)
    return manifest


def read_manifest(root: str | os.PathLike, gallery: str) -> Manifest | None:
    _, json_path = _paths(Path(root), gallery)
    try:
        raw = json.loads(json_path.read_text())
        return Manifest(**{k: raw[k] for k in Manifest.__dataclass_fields__ if k in raw})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("unreadable snapshot manifest %s: %s", json_path, e)
        return None


def load_snapshot(root: str | os.PathLike, gallery: str, *, model: str, dim: int, index_settings: dict[str, Any],
                  load_kwargs: dict[str, Any] | None = None) -> tuple[VectorIndex | None, Manifest | None, str]:
    """The gallery's snapshot if it is usable for this model and these settings: ``(index, manifest, why)``.

    ``index`` is None when there is no usable snapshot; ``why`` then says why (for the logs). ``load_kwargs``
    go to :meth:`VectorIndex.load` (the index type, for instance)."""
    root = Path(root)
    faiss_path, _ = _paths(root, gallery)
    m = read_manifest(root, gallery)
    if m is None:
        return None, None, "no snapshot"
    if m.format != FORMAT:
        return None, m, f"snapshot format {m.format}, expected {FORMAT}"
    if m.model != model or int(m.dim) != int(dim):
        return None, m, f"snapshot of model {m.model} (dim {m.dim}), serving {model} (dim {dim})"
    if m.index_settings != index_settings:
        return None, m, f"snapshot built with index settings {m.index_settings}, now {index_settings}"
    try:
        size = faiss_path.stat().st_size
    except FileNotFoundError:
        return None, m, "snapshot index file missing"
    if size != m.index_bytes:
        return None, m, f"index file has {size} bytes, manifest says {m.index_bytes} (torn snapshot)"
    try:
        idx = VectorIndex.load(faiss_path, dim=dim, **(load_kwargs or {}))
    except Exception as e:  # faiss raises RuntimeError on a corrupt file
        return None, m, f"cannot read {faiss_path}: {e}"
    if len(idx) != m.count:
        return None, m, f"index file holds {len(idx)} vectors, manifest says {m.count}"
    return idx, m, "ok"


def touch_manifest(root: str | os.PathLike, gallery: str, stream_id: str) -> bool:
    """Move an unchanged gallery's manifest forward to ``stream_id`` (its index file still holds the truth
    there), so a quiet gallery's snapshot does not fall behind the change log's trimming. False if none."""
    m = read_manifest(root, gallery)
    if m is None:
        return False
    m.stream_id = stream_id
    _write_manifest(_paths(Path(root), gallery)[1], m)
    return True


def remove_snapshot(root: str | os.PathLike, gallery: str) -> None:
    for p in _paths(Path(root), gallery):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def snapshot_galleries(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    return sorted(p.stem for p in root.glob("*.json")) if root.is_dir() else []

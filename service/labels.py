"""The one rule for an image's labels (person, camera, external id, time), whatever the way in: the fields of
``POST .../images`` (form and ``metadata`` JSON), and the names of the files of an import or of
``reid ingest --folder``.

* A value sent as a field is stored exactly as given (a string or an integer, at most 1024 characters, never
  trimmed); ``captured_at`` must be ISO 8601.
* A name is read as the path it resolves to (``a/./b`` is ``a/b``, ``a/x/../b`` is ``a/b``, leading ``..`` go),
  so ``.`` and ``..`` never name a camera. Its file name is the external id. A file name ``<pid>_c<cam>...``
  (Market-1501's convention) gives person and camera as the numbers they are (``0001_c2s1...``: person "1",
  camera "2"), as the dataset readers and the evaluator read them (models/data/datasets.py), so that a name
  labels one person the same way wherever the file comes from; otherwise the folder that holds the file is its
  camera, exactly as written.

A direct upload (``POST .../images``) is labelled by its fields only; names are read where a client has no
fields to send (an import) or by the client itself (``reid ingest --folder``), with :func:`labels_from_name`.
No FastAPI here: the client imports it.
"""

from __future__ import annotations

import errno
import json
import os
import re
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

USER_FIELDS = ("external_id", "camera_id", "person_id", "captured_at")
MAX_VALUE_CHARS = 1024
#: ``metadata`` is an array of flat objects; deeper nesting is refused before it is parsed (a recursive parse of
#: 100,000 brackets would exhaust the stack)
MAX_METADATA_DEPTH = 8
#: file types ``reid ingest --folder`` sends (the formats the service decodes)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

_MARKET = re.compile(r"^(-?\d+)_c(\d+)")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


class MetadataError(ValueError):
    pass


# ---------------------------------------------------------------------------- fields


def check_value(key: str, v: Any) -> str | None:
    """A field's value as stored: the string as given (an integer as its decimal string). Raises MetadataError."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise MetadataError(f"metadata {key!r} must be a string or an integer, got {type(v).__name__}")
    s = str(v)
    if len(s) > MAX_VALUE_CHARS:
        raise MetadataError(f"metadata {key!r} is longer than {MAX_VALUE_CHARS} characters")
    if key == "captured_at" and s:
        try:
            datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise MetadataError(f"captured_at {s!r} is not an ISO 8601 date-time") from None
    return s


def nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit`` (brackets inside strings do not count)."""
    depth = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def parse_metadata_json(text: str) -> Any:
    """The ``metadata`` form field as JSON, its nesting checked first. Raises MetadataError."""
    if nesting_exceeds(text, MAX_METADATA_DEPTH):
        raise MetadataError(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep; it must be a JSON "
                            "array of flat objects, one per file")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise MetadataError(f"metadata is not valid JSON: {e}") from None


def build_metadata(n_files: int, form: dict[str, Any], metadata_json: str | None) -> list[dict[str, str]]:
    """Per-file metadata: form-level fields, overridden by the aligned ``metadata`` JSON array."""
    if form.get("external_id") is not None and n_files > 1:
        raise MetadataError("external_id as a form field is only allowed with a single file; "
                            "use the metadata JSON array for several files")
    base = {k: check_value(k, form.get(k)) for k in USER_FIELDS}
    per_file: list[dict[str, Any]] = [{} for _ in range(n_files)]
    if metadata_json is not None and metadata_json.strip():
        arr = parse_metadata_json(metadata_json)
        if isinstance(arr, dict) and n_files == 1:
            arr = [arr]
        if not isinstance(arr, list):
            raise MetadataError("metadata must be a JSON array of objects, one per file")
        if len(arr) != n_files:
            raise MetadataError(f"metadata has {len(arr)} entries but {n_files} file(s) were sent")
        for i, obj in enumerate(arr):
            if obj is None:
                continue
            if not isinstance(obj, dict):
                raise MetadataError(f"metadata[{i}] must be an object")
            unknown = set(obj) - set(USER_FIELDS)
            if unknown:
                raise MetadataError(f"metadata[{i}] has unknown keys {sorted(unknown)}; "
                                    f"allowed: {list(USER_FIELDS)}")
            per_file[i] = {k: check_value(k, v) for k, v in obj.items()}
    out = []
    for m in per_file:
        merged = {k: v for k, v in base.items() if v is not None}
        merged.update({k: v for k, v in m.items() if v is not None})
        out.append(merged)
    return out


# ---------------------------------------------------------------------------- names


def resolved_parts(name: str) -> list[str]:
    """The folders and file of ``name`` as the path resolves: no ``.``, each ``..`` takes its folder away (and
    one above the top goes)."""
    parts: list[str] = []
    for part in PurePosixPath(name).parts:
        if part == "..":
            if parts:
                parts.pop()
        elif part not in (".", "/"):
            parts.append(part)
    return parts


def labels_from_name(name: str) -> dict[str, str]:
    """Person, camera and external id from a file's name (a relative path with ``/``), by the module's rule."""
    parts = resolved_parts(name)
    if not parts:
        return {}
    labels = {"external_id": parts[-1]}
    m = _MARKET.match(parts[-1])
    if m:
        labels.update(person_id=str(int(m.group(1))), camera_id=str(int(m.group(2))))
    elif len(parts) >= 2:
        labels["camera_id"] = parts[-2]
    return labels


def folder_labels(root: str | Path) -> list[tuple[Path, dict[str, str]]]:
    """Every image under ``root`` (by suffix; hidden files and folders and ``__MACOSX`` skipped, as in
    archives) with the labels of
    its path relative to ``root``, in path order."""
    root = Path(root)
    if not root.is_dir():
        code = errno.ENOTDIR if root.exists() else errno.ENOENT
        raise OSError(code, os.strerror(code), str(root))
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        hidden = any(s.startswith(".") or s == "__MACOSX" for s in rel.parts)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not hidden:
            out.append((p, labels_from_name(rel.as_posix())))
    return out

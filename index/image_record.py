"""An image's entry in its gallery's hash (key layout 3): its record and its vector in one Redis value.

    entry  = u16 little-endian len(record) + record + vector bytes (the gallery's vector dtype)
    record = msgpack array [created_at (ms since the epoch), external_id, camera_id, person_id, captured_at,
             filename]; "" stands for an absent field

``captured_at`` is kept as ms since the epoch when it is in the service's own form (``2024-05-01T12:34:56.789Z``,
which it reads back as exactly that string): 9 bytes instead of 25, and a record of ~100 bytes is a tenth of an
image's memory. Any other ISO 8601 spelling is kept as given, so reading returns what was written.

One value per image, rather than a hash of its own plus a field in a vectors hash, because each Redis key and each
hash field costs ~60-90 bytes of bookkeeping besides its bytes: beside a 1 KB vector that was a third of the memory.
The record is positional and msgpack so that Lua inside Redis (``cmsgpack``, ``struct``) can change a field in place
(:data:`index.store` patches metadata that way). A field added to :data:`METADATA_FIELDS` goes at the end: a shorter
record reads as having it absent.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Mapping

import msgpack

__all__ = ["METADATA_FIELDS", "EntryError", "field_position", "iso_from_ms", "ms_from_iso", "pack_entry",
           "unpack_entry", "entry_vector", "entry_metadata"]

#: user-supplied metadata fields (strings), in their record order
METADATA_FIELDS = ("external_id", "camera_id", "person_id", "captured_at", "filename")
_HEADER = 2
_CAPTURED = METADATA_FIELDS.index("captured_at")
_MAX_RECORD = 0xFFFF


class EntryError(ValueError):
    """An entry that is not of this layout (a value of another layout, or damaged)."""


def field_position(name: str) -> int:
    """The 1-based position of a metadata field in the record (as Lua indexes it)."""
    return METADATA_FIELDS.index(name) + 2


def ms_from_iso(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000 + 0.5)


def iso_from_ms(ms: int) -> str:
    return (datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"))


def pack_entry(created_ms: int, metadata: Mapping[str, str | None], vector: bytes) -> bytes:
    """The entry of one image: ``metadata`` holds strings of :data:`METADATA_FIELDS` (others are not kept)."""
    values = [metadata.get(f) or "" for f in METADATA_FIELDS]
    values[_CAPTURED] = _compact_time(values[_CAPTURED])
    record = msgpack.packb([int(created_ms), *values])
    if len(record) > _MAX_RECORD:
        raise ValueError(f"an image's metadata takes {len(record)} bytes; at most {_MAX_RECORD}")
    return len(record).to_bytes(_HEADER, "little") + record + vector


def _compact_time(text: str) -> str | int:
    """ms since the epoch if ``text`` is exactly what :func:`iso_from_ms` writes for it, else ``text``."""
    if not text.endswith("Z") or len(text) != 24:
        return text
    try:
        ms = ms_from_iso(text)
        return ms if iso_from_ms(ms) == text else text
    except (ValueError, OverflowError, OSError):  # not a date-time, or one past what the platform converts
        return text


def _split(raw: bytes) -> tuple[int, int]:
    if len(raw) < _HEADER:
        raise EntryError(f"an entry of {len(raw)} bytes")
    end = _HEADER + int.from_bytes(raw[:_HEADER], "little")
    if end > len(raw):
        raise EntryError(f"an entry of {len(raw)} bytes announces a record to byte {end}")
    return _HEADER, end


def entry_vector(raw: bytes) -> bytes:
    """The stored vector bytes of an entry."""
    return raw[_split(raw)[1]:]


def entry_metadata(raw: bytes) -> tuple[int, dict[str, str | None]]:
    """``(created_at ms, {field: value or None})`` of an entry."""
    start, end = _split(raw)
    values = msgpack.unpackb(raw[start:end], raw=False)
    created, *fields = values
    fields += [""] * (len(METADATA_FIELDS) - len(fields))
    if isinstance(fields[_CAPTURED], int):
        fields[_CAPTURED] = iso_from_ms(fields[_CAPTURED])
    return int(created), {f: (v or None) for f, v in zip(METADATA_FIELDS, fields)}


def unpack_entry(raw: bytes) -> tuple[int, dict[str, str | None], bytes]:
    """``(created_at ms, metadata, vector bytes)``."""
    created, meta = entry_metadata(raw)
    return created, meta, entry_vector(raw)

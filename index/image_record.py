"""An image's record in its gallery's hash ``…:records`` (key layout 4), and layout 3's entry (read by the migration).

    layout 4: value  = u32 little-endian slot (where its vector is: :mod:`index.vector_pages`) + record
    layout 3: entry  = u16 little-endian len(record) + record + vector bytes (the gallery's vector dtype)
              record = msgpack array [created_at (ms since the epoch), external_id, camera_id, person_id,
                       captured_at, filename]; "" stands for an absent field

The hash's field is the image id as 8 big-endian bytes (:func:`id_field`): 16 bytes of allocation where its 19
decimal digits took 32.

``captured_at`` is kept as ms since the epoch when it is in the service's own form (``2024-05-01T12:34:56.789Z``,
which it reads back as exactly that string): 9 bytes instead of 25, and a record of ~100 bytes is a tenth of an
image's memory. Any other ISO 8601 spelling is kept as given, so reading returns what was written.

One small value per image beside its vector in a page, rather than record and vector in one value (layout 3):
a value of ~1,120 bytes takes jemalloc's 1,280-byte size class, so a sixth of each image's memory was rounding.
Each hash field still costs ~60 bytes of bookkeeping, which is why the record is one value and not a hash of its
own. The record is positional and msgpack so that Lua inside Redis (``cmsgpack``, ``struct``) can change a field in
place (:data:`index.store` patches metadata that way). A field added to :data:`METADATA_FIELDS` goes at the end: a
shorter record reads as having it absent.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Mapping

import msgpack

__all__ = ["METADATA_FIELDS", "SLOT_BYTES", "EntryError", "field_position", "id_field", "field_id", "iso_from_ms",
           "ms_from_iso", "pack_record", "record_slot", "record_metadata", "pack_entry", "unpack_entry"]

#: user-supplied metadata fields (strings), in their record order
METADATA_FIELDS = ("external_id", "camera_id", "person_id", "captured_at", "filename")
_HEADER = 2
_CAPTURED = METADATA_FIELDS.index("captured_at")
_MAX_RECORD = 0xFFFF
#: bytes of the slot number in front of a layout-4 record
SLOT_BYTES = 4


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


def id_field(id_: int) -> bytes:
    """The records hash's field of an image id: 8 bytes, big endian."""
    return int(id_).to_bytes(8, "big")


def field_id(field: bytes) -> int:
    return int.from_bytes(field, "big")


def pack_record(created_ms: int, metadata: Mapping[str, str | None]) -> bytes:
    """The record of one image, without its slot (the write script puts that in front): ``metadata`` holds strings
    of :data:`METADATA_FIELDS` (others are not kept)."""
    values = [metadata.get(f) or "" for f in METADATA_FIELDS]
    values[_CAPTURED] = _compact_time(values[_CAPTURED])
    record = msgpack.packb([int(created_ms), *values])
    if len(record) > _MAX_RECORD:
        raise ValueError(f"an image's metadata takes {len(record)} bytes; at most {_MAX_RECORD}")
    return record


def record_slot(raw: bytes) -> int:
    """The slot of a layout-4 value: where the image's vector is in the gallery's pages."""
    if len(raw) <= SLOT_BYTES:
        raise EntryError(f"a record of {len(raw)} bytes")
    return int.from_bytes(raw[:SLOT_BYTES], "little")


def record_metadata(raw: bytes) -> tuple[int, dict[str, str | None]]:
    """``(created_at ms, {field: value or None})`` of a layout-4 value."""
    record_slot(raw)
    return _metadata(raw[SLOT_BYTES:])


def _metadata(record: bytes) -> tuple[int, dict[str, str | None]]:
    created, *fields = msgpack.unpackb(record, raw=False)
    fields += [""] * (len(METADATA_FIELDS) - len(fields))
    if isinstance(fields[_CAPTURED], int):
        fields[_CAPTURED] = iso_from_ms(fields[_CAPTURED])
    return int(created), {f: (v or None) for f, v in zip(METADATA_FIELDS, fields)}


def pack_entry(created_ms: int, metadata: Mapping[str, str | None], vector: bytes) -> bytes:
    """Layout 3's entry of one image (what the migration reads; tests write it to make a layout-3 store)."""
    record = pack_record(created_ms, metadata)
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


def unpack_entry(raw: bytes) -> tuple[bytes, bytes]:
    """``(record, vector bytes)`` of a layout-3 entry."""
    start, end = _split(raw)
    return raw[start:end], raw[end:]

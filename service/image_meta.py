"""Changing an image's metadata and making its thumbnail (from the kept bytes, REID_KEEP_IMAGES)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from .images import decode_image
from .ingest import MetadataError, _as_str

# Set and remove fields of an image's record only if it exists (no record resurrected by a late PATCH).
_PATCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local k, v = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if v == '' then redis.call('HDEL', KEYS[1], k) else redis.call('HSET', KEYS[1], k, v) end
end
return 1
"""


def patch_metadata(store, gallery: str, image_id: int, changes: dict[str, Any]) -> bool:
    """Apply ``changes`` (None removes a field). False if the image does not exist. Raises MetadataError."""
    args: list[str] = []
    for k, v in changes.items():
        v = _as_str(k, v)
        if v == "":
            raise MetadataError(f"{k} must not be empty (send null to remove it)")
        args += [k, v or ""]
    return bool(store.r.eval(_PATCH, 1, store.k_image(gallery, image_id), len(args) // 2, *args))


def thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """A small JPEG of ``data`` (EXIF orientation applied), longest side ``size``."""
    im = decode_image(data, max_pixels=max_pixels)
    im.thumbnail((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()

"""Changing an image's metadata and making its thumbnail (from the kept bytes, REID_KEEP_IMAGES)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from .images import decode_image
from .labels import MetadataError, check_value


def patch_metadata(store, gallery: str, image_id: int, changes: dict[str, Any]) -> bool:
    """Apply ``changes`` (None removes a field). False if the image does not exist. Raises MetadataError."""
    values: dict[str, str | None] = {}
    for k, v in changes.items():
        v = check_value(k, v)
        if v == "":
            raise MetadataError(f"{k} must not be empty (send null to remove it)")
        values[k] = v
    return store.patch_metadata(gallery, image_id, values)


def thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """A small JPEG of ``data`` (EXIF orientation applied), longest side ``size``."""
    im = decode_image(data, max_pixels=max_pixels)
    im.thumbnail((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()

"""Safe decoding of uploaded images.

* the format is sniffed from the bytes (JPEG, PNG, WebP, BMP, GIF); anything else -> 415;
* the pixel count is checked from the header *before* decoding (decompression bombs) -> 413; the limit is
  REID_MAX_IMAGE_PIXELS alone (Pillow's own bomb warning, at 89 M pixels, is silenced so it can neither refuse
  what the setting allows nor answer in its words), up to Pillow's hard bound of 179 M pixels, which no
  setting can lift;
* corrupt or truncated data -> 422 with a clear message;
* EXIF orientation is applied, the result is RGB.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "sniff_format", "decode_image", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


@dataclass
class ImageError(Exception):
    status_code: int
    code: str
    message: str

    def __str__(self) -> str:
        return self.message


def sniff_format(data: bytes) -> str | None:
    """Format name from magic bytes, or None if not a supported image type."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    return None


def _limit(max_pixels: int) -> str:
    return f"the limit is {max_pixels} (REID_MAX_IMAGE_PIXELS)"


def _over_pillows_bound(e: Image.DecompressionBombError, max_pixels: int) -> str:
    """Pillow refused at open, before our check ran: say it in the setting's words, with the pixel count Pillow
    found (its message is the only place that has it)."""
    bound = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{found.group(1)} pixels" if found else f"over {bound} pixels"
    if max_pixels < bound:
        return f"image is {size}; {_limit(max_pixels)}"
    return f"image is {size}; {_limit(max_pixels)}, but Pillow refuses any image over {bound} pixels"


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode ``data`` into an RGB PIL image, or raise :class:`ImageError`."""
    if not data:
        raise ImageError(422, "empty_file", "the file is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(415, "unsupported_media_type",
                         "not a supported image (expected JPEG, PNG, WebP, BMP or GIF)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels, next, is the limit
            im = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageError(422, "invalid_image", f"image has invalid size {w}x{h}")
            if w * h > max_pixels:
                raise ImageError(413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; {_limit(max_pixels)}")
            im.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(413, "image_too_large", _over_pillows_bound(e, max_pixels)) from e
    except UnidentifiedImageError as e:
        raise ImageError(422, "invalid_image", f"corrupt {fmt} data: cannot identify the image") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        msg = str(e) or e.__class__.__name__
        if "truncated" in msg.lower():
            raise ImageError(422, "truncated_image", f"the {fmt} image is truncated: {msg}") from e
        raise ImageError(422, "invalid_image", f"corrupt {fmt} data: {msg}") from e
    try:
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of the (usual) upright image
    except Exception:  # malformed EXIF must not reject an otherwise good image
        pass
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
        else:
            im = im.convert("RGB")
    return im

"""Uploaded images: type by content, pixel limit from the header, re-encoded before storage."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from posegen.errors import UnsupportedImage

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass(frozen=True)
class CheckedImage:
    png: bytes
    width: int
    height: int


def check_upload(data: bytes, *, max_pixels: int, field: str = "image") -> CheckedImage:
    """Decode an upload safely and return it re-encoded as PNG (RGB).

    The size is read from the header before any pixel is decoded, so a small file that
    claims 30000x30000 pixels (a decompression bomb) is refused without allocating it.
    Re-encoding drops whatever else the file carried (metadata, trailing bytes, polyglots).
    """
    if not data:
        raise UnsupportedImage(f"The {field} upload is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
            fmt, (width, height) = probe.format, probe.size
            if width * height > max_pixels:
                raise UnsupportedImage(
                    f"The {field} is {width}x{height} pixels; at most {max_pixels} are allowed."
                )
            probe.load()
            image = ImageOps.exif_transpose(probe).convert("RGB")
    except UnsupportedImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnsupportedImage(f"The {field} is not a PNG, JPEG or WebP image.") from None
    except (OSError, SyntaxError, ValueError):
        raise UnsupportedImage(f"The {field} is corrupt or truncated.") from None
    if fmt not in ALLOWED_FORMATS:  # pragma: no cover - formats= already restricts
        raise UnsupportedImage(f"The {field} is {fmt}; PNG, JPEG or WebP are accepted.")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return CheckedImage(png=out.getvalue(), width=image.width, height=image.height)

"""Uploaded images: type by content, pixel limit from the header, re-encoded before storage."""

from __future__ import annotations

import io
import math
import warnings
import zlib
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from posegen.errors import UnsupportedImage

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass(frozen=True)
class CheckedImage:
    png: bytes
    width: int
    height: int


def fit(image: Image.Image, *, width: int, height: int) -> Image.Image:
    """Fit a photo of any aspect ratio to width x height without stretching.

    Center-crop to the target aspect ratio, then resize. Cropping (not padding) keeps the
    subject large and gives img2img real pixels everywhere. A tall photo keeps its upper part,
    where faces usually are.
    """
    if image.mode != "RGB":  # uploads arrive converted already: no full-size copy for them
        image = image.convert("RGB")
    if image.size == (width, height):
        return image
    src_w, src_h = image.size
    target = width / height
    if src_w / src_h > target:  # too wide: crop the sides
        new_w = round(src_h * target)
        left = (src_w - new_w) // 2
        box = (left, 0, left + new_w, src_h)
    else:  # too tall: crop top and bottom, keeping more of the top
        new_h = round(src_w / target)
        top = min((src_h - new_h) // 4, src_h - new_h)
        box = (0, top, src_w, top + new_h)
    # Crop and resize in one pass (no cropped copy). A large downscale first shrinks by an
    # integer factor while at least REDUCING_GAP times the target is left, then filters:
    # a phone photo to 512 px in a third of the time, within a level or two of a plain
    # Lanczos (README, Performance).
    return image.resize(
        (width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP
    )


REDUCING_GAP = 3.0


def check_upload(
    data: bytes, *, max_pixels: int, field: str = "image", fit_to: tuple[int, int] | None = None
) -> CheckedImage:
    """Decode an upload safely and return it re-encoded as PNG (RGB), fitted to `fit_to`.

    The size is read from the header before any pixel is decoded, so a small file that
    claims 30000x30000 pixels (a decompression bomb) is refused without allocating it.
    Re-encoding drops whatever else the file carried (metadata, trailing bytes, polyglots).
    Fitting here, once, to the model's resolution keeps stored inputs small and saves the
    worker a full-size decode per job.
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
            if fit_to is not None and fmt == "JPEG":
                # Decode at a reduced scale (1/2, 1/4 or 1/8, in the JPEG's own DCT) that still
                # leaves the shorter side at least the target's longer one, whatever the
                # crop and the EXIF rotation: a 12 MP photo for a 512 px model decodes in a
                # quarter of the time and needs no full-size copy after.
                side = max(fit_to) / min(width, height)
                probe.draft("RGB", (math.ceil(width * side), math.ceil(height * side)))
            probe.load()
            ImageOps.exif_transpose(probe, in_place=True)
            image = probe if probe.mode == "RGB" else probe.convert("RGB")
    except UnsupportedImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnsupportedImage(f"The {field} is not a PNG, JPEG or WebP image.") from None
    except (OSError, SyntaxError, ValueError):
        raise UnsupportedImage(f"The {field} is corrupt or truncated.") from None
    if fmt not in ALLOWED_FORMATS:  # pragma: no cover - formats= already restricts
        raise UnsupportedImage(f"The {field} is {fmt}; PNG, JPEG or WebP are accepted.")
    if fit_to is not None:
        image = fit(image, width=fit_to[0], height=fit_to[1])
    return CheckedImage(png=as_png(image), width=image.width, height=image.height)


def as_png(image: Image.Image) -> bytes:
    """PNG bytes, as posegen stores inputs and outputs. Level 1 with run-length matching: a
    third of the default's CPU time, and for a photo a file no larger (astronaut, 512 px:
    29 ms / 422 KB against level 6's 85 ms / 425 KB and plain level 1's 35 ms / 466 KB on the
    2-core dev VM). On a GPU this is the engine's largest cost besides the model
    (bench.engine's engine_phases_ms_median)."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return out.getvalue()


# An output's format (`output_format`): its Pillow name, file suffix and content type.
OUTPUT_FORMATS = {
    "png": ("PNG", "png", "image/png"),
    "webp": ("WEBP", "webp", "image/webp"),
    "jpeg": ("JPEG", "jpg", "image/jpeg"),
}


def encode(image: Image.Image, *, fmt: str, quality: int) -> bytes:
    """An output in its format: PNG as `as_png` (lossless: `quality` does not apply), WebP
    and JPEG lossy at `quality` (1-100)."""
    if fmt == "png":
        return as_png(image)
    out = io.BytesIO()
    pillow, _, _ = OUTPUT_FORMATS[fmt]
    # method 4: libwebp's default; 6 compresses a little better at several times the CPU.
    options = {"method": 4} if fmt == "webp" else {"optimize": False}
    image.convert("RGB").save(out, format=pillow, quality=quality, **options)
    return out.getvalue()

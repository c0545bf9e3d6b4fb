"""Uploads fitted at submit: a phone photo decoded at a reduced scale must still come out as
the full-size decode would (the same crop, the same orientation, nearly the same pixels)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from posegen.images import check_upload


def _reference(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The plain way: full decode, crop to the aspect ratio (upper part of a tall photo),
    Lanczos resize."""
    src_w, src_h = image.size
    if src_w / src_h > width / height:
        new_w = round(src_h * width / height)
        box = ((src_w - new_w) // 2, 0, (src_w - new_w) // 2 + new_w, src_h)
    else:
        new_h = round(src_w * height / width)
        top = (src_h - new_h) // 4
        box = (0, top, src_w, top + new_h)
    fitted = image.convert("RGB").crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.float64)


def _stored(data: bytes, size: tuple[int, int]) -> np.ndarray:
    checked = check_upload(data, max_pixels=50_000_000, fit_to=size)
    stored = Image.open(io.BytesIO(checked.png))
    assert stored.format == "PNG" and stored.mode == "RGB"
    assert (checked.width, checked.height) == stored.size == size
    return np.asarray(stored, dtype=np.float64)


def _jpeg(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92, **options)
    return out.getvalue()


PHOTO = Image.fromarray(skimage.data.astronaut()).resize((4032, 3024), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("size", [(512, 512), (1024, 1024), (768, 512), (512, 768)])
def test_a_large_jpeg_fits_as_the_full_decode_would(size: tuple[int, int]) -> None:
    data = _jpeg(PHOTO)
    reference = _reference(Image.open(io.BytesIO(data)), *size)
    difference = np.abs(_stored(data, size) - reference)
    assert difference.mean() < 1.0  # of 255: the reduced-scale decode is not visible
    assert np.percentile(difference, 99) < 12


def test_exif_rotation_is_applied_before_fitting() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    sideways = PHOTO.transpose(Image.Transpose.ROTATE_90)  # 3024 x 4032 as stored
    data = _jpeg(sideways, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright.size == (4032, 3024)
    stored = _stored(data, (768, 512))
    assert np.abs(stored - _reference(upright, 768, 512)).mean() < 1.0
    # ...and not the sideways one, which differs everywhere.
    assert np.abs(stored - _reference(Image.open(io.BytesIO(data)), 768, 512)).mean() > 20


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "WEBP")]
)
def test_other_modes_and_small_images_come_out_rgb_at_the_model_size(mode: str, fmt: str) -> None:
    small = Image.fromarray(skimage.data.astronaut()).resize((300, 200)).convert(mode)
    out = io.BytesIO()
    small.save(out, format=fmt)
    stored = _stored(out.getvalue(), (512, 512))  # upscaled: no reduced decode
    reference = _reference(Image.open(io.BytesIO(out.getvalue())), 512, 512)
    assert np.abs(stored - reference).mean() < 1.0

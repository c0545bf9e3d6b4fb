"""Fit photos of any aspect ratio to a model's resolution without stretching.

Center-crop to the target aspect ratio, then resize. Cropping (not padding) keeps the
subject large and gives img2img real pixels everywhere; poses extracted from the photo are
extracted after the same crop, so skeleton and init image line up.
"""

from __future__ import annotations

from PIL import Image


def fit(image: Image.Image, *, width: int, height: int) -> Image.Image:
    image = image.convert("RGB")
    src_w, src_h = image.size
    target = width / height
    if src_w / src_h > target:  # too wide: crop the sides
        new_w = round(src_h * target)
        left = (src_w - new_w) // 2
        box = (left, 0, left + new_w, src_h)
    else:  # too tall: crop top and bottom, keeping the upper part (faces are usually there)
        new_h = round(src_w / target)
        top = min((src_h - new_h) // 4, src_h - new_h)
        box = (0, top, src_w, top + new_h)
    return image.crop(box).resize((width, height), Image.Resampling.LANCZOS)

"""Draw COCO-18 keypoints as the OpenPose skeleton the ControlNets were trained on.

Same limb order, colours and drawing (filled ellipses at 60 % colour, then joint circles)
as controlnet-aux's `draw_bodypose`, so templates, extracted poses and the models agree. In
Pillow, not OpenCV: the API draws templates too (`GET /v1/pose-templates/{id}/image`) and
installs neither OpenCV nor numpy. The limbs are OpenCV's `ellipse2Poly` polygons, computed
the same way; the fill may differ from `cv2.fillConvexPoly` on an edge pixel here and there
(tests/worker/test_engine.py compares the two).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

# 1-based COCO-18 pairs, in OpenPose's order.
LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip

Point = tuple[float, float] | None  # normalised (x, y) in 0..1, None where not visible
Keypoints = Sequence[Point]


def ellipse_polygon(
    center: tuple[int, int], axes: tuple[int, int], angle: int
) -> list[tuple[int, int]]:
    """OpenCV's `ellipse2Poly(center, axes, angle, 0, 360, 1)`: a point every degree,
    rotated by `angle`, rounded, without consecutive repeats."""
    alpha, beta = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    points: list[tuple[int, int]] = []
    for degree in range(361):
        x = axes[0] * math.cos(math.radians(degree))
        y = axes[1] * math.sin(math.radians(degree))
        point = (round(center[0] + x * alpha - y * beta), round(center[1] + x * beta + y * alpha))
        if not points or point != points[-1]:
            points.append(point)
    return points


def draw_skeleton(keypoints: Keypoints, *, width: int, height: int) -> Image.Image:
    if len(keypoints) != 18:
        raise ValueError(f"expected 18 COCO keypoints, got {len(keypoints)}")
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    # OpenPose draws 4 px limbs on ~512 px images; keep the proportion at other sizes.
    scale = min(width, height) / 512
    stick = max(1, round(4 * scale))
    radius = max(1, round(4 * scale))
    for (a, b), color in zip(LIMBS, COLORS, strict=False):
        p1, p2 = keypoints[a - 1], keypoints[b - 1]
        if p1 is None or p2 is None:
            continue
        x1, y1, x2, y2 = p1[0] * width, p1[1] * height, p2[0] * width, p2[1] * height
        length = math.hypot(x1 - x2, y1 - y2)
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        polygon = ellipse_polygon(
            (int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), stick), int(angle)
        )
        draw.polygon(polygon, fill=tuple(int(c * 0.6) for c in color))
    for point, color in zip(keypoints, COLORS, strict=False):
        if point is None:
            continue
        x, y = int(point[0] * width), int(point[1] * height)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    return canvas


def skeleton_png(keypoints: Keypoints, *, width: int, height: int) -> bytes:
    out = io.BytesIO()
    draw_skeleton(keypoints, width=width, height=height).save(out, format="PNG")
    return out.getvalue()

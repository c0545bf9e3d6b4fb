"""The pose-extractor interface."""

from __future__ import annotations

from typing import Protocol

from PIL import Image

from posegen.skeleton import Point


class NoPoseDetected(Exception):
    """No person was found where a pose was to be extracted."""


class PoseExtractor(Protocol):
    name: str

    def extract(self, image: Image.Image) -> list[Point]:
        """COCO-18 keypoints of the most prominent person, normalised to 0..1."""
        ...

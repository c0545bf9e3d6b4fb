"""MediaPipe Pose (0.10.14's `mp.solutions.pose`, offline) mapped to OpenPose's COCO-18."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from PIL import Image

from posegen.skeleton import Point
from worker.engine.pose.base import NoPoseDetected

# COCO-18 index -> MediaPipe landmark index; the neck (1) is the shoulders' midpoint.
COCO_FROM_MEDIAPIPE = {
    0: 0, 2: 12, 3: 14, 4: 16, 5: 11, 6: 13, 7: 15, 8: 24, 9: 26, 10: 28,
    11: 23, 12: 25, 13: 27, 14: 5, 15: 2, 16: 8, 17: 7,
}  # fmt: skip
MIN_VISIBILITY = 0.5


class MediaPipeExtractor:
    name = "mediapipe"

    def __init__(self, *, model_complexity: int = 1) -> None:
        import mediapipe as mp

        self._pose: Any = mp.solutions.pose.Pose(
            static_image_mode=True, model_complexity=model_complexity, min_detection_confidence=0.5
        )
        self._lock = threading.Lock()  # the graph is not re-entrant

    def extract(self, image: Image.Image) -> list[Point]:
        with self._lock:
            result = self._pose.process(np.asarray(image.convert("RGB")))
        if result.pose_landmarks is None:
            raise NoPoseDetected("MediaPipe found no person in the image.")
        marks = result.pose_landmarks.landmark

        def point(index: int) -> Point:
            mark = marks[index]
            if mark.visibility < MIN_VISIBILITY or not (0 <= mark.x <= 1 and 0 <= mark.y <= 1):
                return None
            return (float(mark.x), float(mark.y))

        keypoints: list[Point] = [None] * 18
        for coco, mp_index in COCO_FROM_MEDIAPIPE.items():
            keypoints[coco] = point(mp_index)
        left, right = keypoints[5], keypoints[2]
        if left is not None and right is not None:
            keypoints[1] = ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2)
        if sum(p is not None for p in keypoints) < 4:
            raise NoPoseDetected("MediaPipe found too few visible body keypoints.")
        return keypoints

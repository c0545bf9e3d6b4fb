"""OpenPose body keypoints through controlnet-aux (weights: lllyasviel/Annotators)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from posegen.skeleton import Point
from worker.engine.pose.base import NoPoseDetected

ANNOTATORS_REPO = "lllyasviel/Annotators"
WEIGHT_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")


def openpose_weights_dir(model_dir: Path) -> Path | None:
    """Where the annotator weights are: the model dir first, then the Hugging Face cache."""
    local = model_dir / ANNOTATORS_REPO
    if all((local / name).is_file() for name in WEIGHT_FILES):
        return local
    try:
        from huggingface_hub import snapshot_download

        cached = Path(
            snapshot_download(
                ANNOTATORS_REPO, allow_patterns=list(WEIGHT_FILES), local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - any miss in the cache means "not present"
        return None
    return cached if all((cached / n).is_file() for n in WEIGHT_FILES) else None


class OpenPoseExtractor:
    name = "openpose"

    def __init__(self, detector: Any) -> None:
        self.detector = detector

    @classmethod
    def load(cls, *, model_dir: Path, device: str = "cpu") -> OpenPoseExtractor:
        from controlnet_aux import OpenposeDetector

        weights = openpose_weights_dir(model_dir)
        if weights is None:
            raise FileNotFoundError(
                f"OpenPose weights ({ANNOTATORS_REPO}) are not in {model_dir} or the HF cache"
            )
        return cls(OpenposeDetector.from_pretrained(str(weights)).to(device))

    def extract(self, image: Image.Image) -> list[Point]:
        poses = self.detector.detect_poses(np.asarray(image.convert("RGB")))
        if not poses:
            raise NoPoseDetected("OpenPose found no person in the image.")
        # The most complete, most confident body.
        best = max(poses, key=lambda p: (p.body.total_parts, p.body.total_score))
        return [(kp.x, kp.y) if kp is not None else None for kp in best.body.keypoints]

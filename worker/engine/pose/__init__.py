"""Pose extraction: a photo in, COCO-18 keypoints (normalised) out, or NoPoseDetected."""

from __future__ import annotations

from pathlib import Path

from worker.engine.pose.base import NoPoseDetected, PoseExtractor
from worker.engine.pose.openpose import OpenPoseExtractor, openpose_weights_dir


def make_extractor(backend: str, *, model_dir: Path, device: str = "cpu") -> PoseExtractor:
    """`auto`: openpose when its weights are present, else mediapipe."""
    if backend == "auto":
        backend = "openpose" if openpose_weights_dir(model_dir) is not None else "mediapipe"
    if backend == "openpose":
        return OpenPoseExtractor.load(model_dir=model_dir, device=device)
    if backend == "mediapipe":
        from worker.engine.pose.mediapipe import MediaPipeExtractor

        return MediaPipeExtractor()
    raise ValueError(f"unknown pose backend {backend!r}")


__all__ = ["NoPoseDetected", "PoseExtractor", "make_extractor"]

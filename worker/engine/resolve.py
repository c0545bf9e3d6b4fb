"""Find a model's weights: a folder under the model dir, a .safetensors file, or the HF cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posegen.errors import JobError


class WeightsMissing(JobError):
    def __init__(self, ref: str, model_key: str) -> None:
        super().__init__(
            "model_weights_missing",
            f"Weights for {ref!r} are not on this worker; run `posegen models pull {model_key}`"
            " (or `posegen models build-tiny` for the tiny models).",
        )


@dataclass(frozen=True)
class Resolved:
    ref: str
    kind: Literal["folder", "single_file"]
    path: Path


def resolve(ref: str, *, model_dir: Path, model_key: str) -> Resolved:
    local = model_dir / ref
    if local.is_dir():
        return Resolved(ref, "folder", local)
    for candidate in (local, model_dir / f"{ref}.safetensors"):
        if candidate.is_file() and candidate.suffix == ".safetensors":
            return Resolved(ref, "single_file", candidate)
    if ref.count("/") == 1:
        cached = hub_snapshot(ref)
        if cached is not None:
            return Resolved(ref, "folder", cached)
    raise WeightsMissing(ref, model_key)


def hub_snapshot(repo_id: str) -> Path | None:
    """The repo's snapshot in the Hugging Face cache, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def is_present(ref: str, *, model_dir: Path) -> bool:
    try:
        resolve(ref, model_dir=model_dir, model_key="?")
    except WeightsMissing:
        return False
    return True


# Only what diffusers loads: no duplicate single-file checkpoints, .bin or ONNX copies.
PULL_PATTERNS = [
    "*.json",
    "*.txt",
    "*.model",
    "diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
]
PULL_IGNORE = ["*.bin", "*.ckpt", "*.onnx", "*.msgpack", "*.pb", "*.h5", "*.fp16.*"]


def pull(repo_id: str) -> Path:
    """Download a hub repo into the Hugging Face cache (with progress bars)."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(repo_id, allow_patterns=PULL_PATTERNS, ignore_patterns=PULL_IGNORE)
    )

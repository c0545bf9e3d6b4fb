"""What the engine takes and gives: a job, a job ready for the pipeline, and a job's images;
and the previews of a batch's jobs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from PIL import Image

from posegen.images import as_png
from posegen.skeleton import Keypoints
from worker.engine.preview import Schedule, latents_to_image
from worker.engine.run import Item, RunParams, items_of


@dataclass(frozen=True)
class EngineJob:
    model_key: str
    family: str
    base_model: str
    controlnet_model: str
    params: RunParams
    image: bytes
    pose_keypoints: Keypoints | None = None  # a template's keypoints
    pose_image: bytes | None = None  # a photo to extract the pose from


@dataclass(frozen=True)
class EngineResult:
    """A job's images, one per output (`num_outputs`), in the order of their seeds."""

    images: list[Image.Image]
    seconds: float  # the engine's run, without the PNGs (a batch's: the whole call)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @cached_property
    def pngs(self) -> list[bytes]:
        """Encoded on first use: in the job's record, which on a GPU runs on the worker's
        finisher thread while the next job runs (`worker.finisher.Finisher`)."""
        return [as_png(image) for image in self.images]

    @property
    def png(self) -> bytes:
        return self.pngs[0]


@dataclass(frozen=True)
class Prepared:
    """A job ready for the pipeline: its photo fitted and the skeleton it is conditioned on."""

    job: EngineJob
    subject: Image.Image
    control: Image.Image

    @property
    def items(self) -> list[Item]:
        return items_of(self.job.params, self.subject, self.control)


def preview_hook(
    batch: Sequence[Prepared],
    previews: Sequence[Callable[[int, Image.Image], None] | None],
    interval: float,
) -> Callable[[int, Any], None] | None:
    """What sees the batch's latents after each step: each job that wants previews gets
    one of its first image, at the first step, then at most every `interval` seconds."""
    wanted, at = [], 0
    for prepared, preview in zip(batch, previews, strict=False):
        if preview is not None:
            wanted.append((at, preview, prepared.job.family))
        at += prepared.job.params.num_outputs
    if not wanted:
        return None
    schedule = Schedule(interval)

    def on_latents(step: int, latents: Any) -> None:
        if schedule.due():
            for offset, preview, family in wanted:
                preview(step, latents_to_image(latents[offset : offset + 1], family))

    return on_latents

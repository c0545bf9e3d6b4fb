"""The compile's warm-up: with POSEGEN_COMPILE, a worker process runs each model it serves at
its size once for every batch size it may use (1 to POSEGEN_MAX_BATCH images), with its
guidance and without, and once with another ControlNet conditioning scale, before it takes a
job, so that torch.compile traces, generates kernels and (in the CUDA graph modes) records
its graphs then, and no job waits for it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from worker.engine.jobs import EngineJob, Prepared
from worker.engine.run import RunParams

if TYPE_CHECKING:
    from worker.engine.engine import Engine

log = logging.getLogger(__name__)

# Denoising steps of a warm-up call. A CUDA graph mode needs three calls of a shape: the
# first runs the compiled code as it is, the second records the graph, the third replays it.
WARM_STEPS = 3


@dataclass(frozen=True)
class WarmModel:
    """What a warm-up runs of one model: the catalog's weights, size and default guidance
    (guidance above 1 doubles the UNet's batch: classifier-free guidance)."""

    model_key: str
    family: str
    base_model: str
    controlnet_model: str
    width: int
    height: int
    guidance_scale: float
    prompt: str
    negative_prompt: str


@dataclass(frozen=True)
class Warmed:
    """A model warmed for these batch sizes (images per call), in so many seconds."""

    model_key: str
    sizes: tuple[int, ...]
    seconds: float


def warm_up(engine: Engine, models: Sequence[WarmModel], *, max_images: int) -> list[Warmed]:
    """Run each model once per batch size, 1 to `max_images` images, on blank inputs. The
    shapes a job then runs are compiled: the model's size at any batch size the worker
    claims."""
    warmed = []
    for model in models:
        started = time.perf_counter()
        sizes = tuple(range(1, max_images + 1))
        for images, guidance, scale in _calls(model, sizes):
            engine.run([_blank(model, images, guidance_scale=guidance, conditioning_scale=scale)])
        seconds = time.perf_counter() - started
        log.info(
            "model compiled",
            extra={"model_key": model.model_key, "batch_sizes": list(sizes), "seconds": seconds},
        )
        warmed.append(Warmed(model.model_key, sizes, seconds))
    return warmed


def _calls(model: WarmModel, sizes: Sequence[int]) -> list[tuple[int, float, float]]:
    """The warm-up's calls (images, guidance, conditioning scale): each batch size with the
    model's guidance, and without guidance (1: a UNet batch of half the size, allowed to any
    job). The second call sets another ControlNet conditioning scale: dynamo, seeing a second
    value of that float, makes it an input of the graphs it compiles from then on (its
    automatic dynamic), so that no job's scale compiles anew."""
    guidances = [model.guidance_scale] + ([1.0] if model.guidance_scale > 1 else [])
    calls = [(images, g, 1.0) for g in guidances for images in sizes]
    return [calls[0], (calls[0][0], calls[0][1], 0.5), *calls[1:]]


def _blank(
    model: WarmModel, images: int, *, guidance_scale: float, conditioning_scale: float
) -> Prepared:
    """A job of `images` outputs on a grey photo and a blank skeleton: the shapes of a real
    one (only the shapes are compiled for)."""
    params = RunParams(
        num_inference_steps=WARM_STEPS, guidance_scale=guidance_scale,
        controlnet_conditioning_scale=conditioning_scale, strength=1.0, seed=0, width=model.width,
        height=model.height, num_outputs=images, prompt=model.prompt,
        negative_prompt=model.negative_prompt,
    )  # fmt: skip
    job = EngineJob(
        model_key=model.model_key, family=model.family, base_model=model.base_model,
        controlnet_model=model.controlnet_model, params=params, image=b"",
    )  # fmt: skip
    size = (model.width, model.height)
    return Prepared(job=job, subject=Image.new("RGB", size, "grey"), control=Image.new("RGB", size))

"""One diffusers call: init image + control image + params -> image, with progress and cancel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from posegen.params import Params


class Canceled(Exception):
    """The cancel check answered true between two denoising steps."""


class RunParams(Params):
    """A job's parameters (`posegen.params`), and its prompts: everything one run needs."""

    prompt: str
    negative_prompt: str


def denoising_steps(params: RunParams) -> tuple[int, float]:
    """(steps actually run, strength to pass). img2img runs int(steps * strength) steps;
    at least one always runs, so a tiny strength becomes one step rather than an error."""
    steps = params.num_inference_steps
    effective = int(steps * params.strength)
    if effective >= 1:
        return effective, params.strength
    return 1, 1.0 / steps + 1e-6 if steps > 1 else 1.0


@dataclass(frozen=True)
class Item:
    """One image of a pipeline call: its own photo, skeleton, prompts and seed."""

    init_image: Image.Image
    control_image: Image.Image
    prompt: str
    negative_prompt: str
    seed: int


def items_of(params: RunParams, init_image: Image.Image, control_image: Image.Image) -> list[Item]:
    """A job's images: one per output, with seeds seed, seed+1, ..."""
    return [
        Item(init_image, control_image, params.prompt, params.negative_prompt, seed)
        for seed in params.seeds()
    ]


def run_pipeline(
    pipe: Any,
    *,
    init_image: Image.Image,
    control_image: Image.Image,
    params: RunParams,
    micro_conditioning: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_latents: Callable[[int, Any], None] | None = None,
) -> Image.Image:
    """One image (the job's first output): `run_batch` with one item."""
    item = items_of(params, init_image, control_image)[0]
    return run_batch(
        pipe, [item], params=params, micro_conditioning=micro_conditioning, on_step=on_step,
        should_cancel=should_cancel, on_latents=on_latents,
    )[0]  # fmt: skip


def run_batch(
    pipe: Any,
    items: Sequence[Item],
    *,
    params: RunParams,
    micro_conditioning: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_latents: Callable[[int, Any], None] | None = None,
) -> list[Image.Image]:
    """The items' images in one diffusers call, in their order. `params` gives what the call
    shares (`Params.batch_key`); each item brings its photo, skeleton, prompts and seed, and its
    image is the one a call of that item alone makes (batched kernels round differently: on
    the CPU within 2/255 per channel). `on_latents(step, latents)` sees the batch's latents
    after each step (previews)."""
    total, strength = denoising_steps(params)
    canceled = False

    def on_step_end(
        pipeline: Any, step: int, _timestep: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        nonlocal canceled
        if on_latents is not None:
            on_latents(min(step + 1, total), kwargs["latents"])
        if on_step is not None:
            on_step(min(step + 1, total), total)
        if should_cancel is not None and should_cancel():
            canceled = True
            pipeline._interrupt = True  # diffusers skips the remaining steps
        return kwargs

    result = pipe(
        **call_kwargs(items, params, strength, micro_conditioning), callback_on_step_end=on_step_end
    )
    if canceled:
        raise Canceled()
    images: list[Image.Image] = result.images
    return images


def call_kwargs(
    items: Sequence[Item], params: RunParams, strength: float, micro_conditioning: bool
) -> dict[str, Any]:
    """The diffusers call's arguments for the items (in their order) and what they share."""
    import torch

    # The generators live on the CPU: the same seed gives the same noise on any device. One
    # per image: diffusers draws each image's VAE sample and noise from its own generator, so
    # an image does not depend on what else is in the batch.
    generators = [torch.Generator(device="cpu").manual_seed(item.seed) for item in items]
    extra: dict[str, Any] = {}
    if micro_conditioning:
        size = (params.height, params.width)
        extra = {"original_size": size, "target_size": size}
    negatives = [item.negative_prompt for item in items]
    return {
        "prompt": [item.prompt for item in items],
        "negative_prompt": negatives if params.negative_prompt else None,
        "image": [item.init_image for item in items],
        "control_image": [item.control_image for item in items],
        "num_inference_steps": params.num_inference_steps,
        "strength": strength,
        "guidance_scale": params.guidance_scale,
        "controlnet_conditioning_scale": params.controlnet_conditioning_scale,
        "width": params.width,
        "height": params.height,
        "generator": generators if len(generators) > 1 else generators[0],
        "output_type": "pil",
        **extra,
    }


def steps_for(params: RunParams) -> int:
    return denoising_steps(params)[0]


__all__ = [
    "Canceled", "Item", "RunParams", "denoising_steps", "items_of", "run_batch",
    "run_pipeline",
]  # fmt: skip

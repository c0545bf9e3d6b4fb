"""One diffusers call: init image + control image + params -> image, with progress and cancel."""

from __future__ import annotations

from collections.abc import Callable
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
    """`on_latents(step, latents)` sees the latents after each step (previews)."""
    import torch

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

    # The generator lives on the CPU: the same seed gives the same noise on any device.
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    extra: dict[str, Any] = {}
    if micro_conditioning:
        size = (params.height, params.width)
        extra = {"original_size": size, "target_size": size}
    result = pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        image=init_image,
        control_image=control_image,
        num_inference_steps=params.num_inference_steps,
        strength=strength,
        guidance_scale=params.guidance_scale,
        controlnet_conditioning_scale=params.controlnet_conditioning_scale,
        width=params.width,
        height=params.height,
        generator=generator,
        callback_on_step_end=on_step_end,
        output_type="pil",
        **extra,
    )
    if canceled:
        raise Canceled()
    image: Image.Image = result.images[0]
    return image


def steps_for(params: RunParams) -> int:
    return denoising_steps(params)[0]


__all__ = ["Canceled", "RunParams", "denoising_steps", "run_pipeline"]

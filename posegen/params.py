"""The generation parameters: names, types, bounds, defaults and descriptions, in one place.

`GenerationParams` is what a caller may set: the API's form fields, their bounds in the
OpenAPI schema and the request's validation all derive from it. `GenerationParams.resolve`
fills in what the caller left to the model and adds the model's size, giving `Params`: the JSON
stored with the job, its shape in the job's answer, and what the engine runs (the engine's
`RunParams` is `Params` plus the prompts)."""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1
MAX_OUTPUTS = 4
OutputFormat = Literal["png", "webp", "jpeg"]


class GenerationParams(BaseModel):
    model_config = ConfigDict(frozen=True)

    num_inference_steps: int | None = Field(
        None, ge=1, le=150, description="Denoising steps; the model's default when left out."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=30,
        allow_inf_nan=False,
        description="How closely to follow the prompt; the model's default when left out.",
    )
    controlnet_conditioning_scale: float = Field(
        1.0, ge=0, le=2, allow_inf_nan=False, description="How closely to follow the pose."
    )
    strength: float = Field(
        0.75,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="How far from the photo the image may move (0: the photo, 1: free).",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="The noise's seed; a random one when left out."
    )
    output_format: OutputFormat = Field("png", description="The outputs' image format.")
    output_quality: int = Field(
        90, ge=1, le=100, description="WebP and JPEG quality (PNG is lossless)."
    )
    preview: bool = Field(
        False, description="Store a preview of the image while it runs (progress.preview_url)."
    )
    num_outputs: int = Field(
        1,
        ge=1,
        le=MAX_OUTPUTS,
        description="Images to make, with seeds seed, seed+1, ...; each is charged the "
        "model's credit_cost.",
    )

    def resolve(self, *, steps: int, guidance_scale: float, width: int, height: int) -> Params:
        """Every parameter set: the caller's, else the model's (`steps`, `guidance_scale`), a
        random seed, and the model's size."""
        return Params(
            **self.model_dump(exclude_none=True),
            **({} if self.num_inference_steps is not None else {"num_inference_steps": steps}),
            **({} if self.guidance_scale is not None else {"guidance_scale": guidance_scale}),
            **({} if self.seed is not None else {"seed": secrets.randbelow(MAX_SEED + 1)}),
            width=width,
            height=height,
        )


class Params(BaseModel):
    # `GenerationParams` with every value set, plus the model's size. Bounds stay with
    # `GenerationParams`: they are checked once, on the way in. Extra keys are refused, so a
    # parameter added there and not here fails every submit.
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_inference_steps: int
    guidance_scale: float
    controlnet_conditioning_scale: float
    strength: float
    seed: int
    width: int
    height: int
    # Defaults for the jobs stored before these existed.
    output_format: OutputFormat = "png"
    output_quality: int = 90
    preview: bool = False
    num_outputs: int = 1

    def batch_key(self, negative_prompt: str | None) -> tuple[Any, ...]:
        """What the jobs whose images run in one pipeline call must share: each value the
        call takes once for the whole batch. Whether there is a negative prompt too: SDXL runs
        a missing one as zeros (`force_zeros_for_empty_prompt`), which one call cannot mix
        with a text. Jobs of one model with the same key run together (POSEGEN_MAX_BATCH)."""
        return (
            self.width, self.height, self.num_inference_steps, self.guidance_scale,
            self.strength, self.controlnet_conditioning_scale, bool(negative_prompt),
        )  # fmt: skip

    def seeds(self) -> list[int]:
        """The seed of each output: output i is the image the same job would make alone with
        seed + i."""
        return [self.seed + i for i in range(self.num_outputs)]

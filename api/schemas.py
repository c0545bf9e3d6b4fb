"""Response shapes (for the OpenAPI schema and to pin the contract's fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from posegen.params import Params


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Progress(BaseModel):
    step: int
    total: int
    # What a running job waits for besides its steps: `provider_loading` while its hosted
    # model loads (the job's `eta_seconds` is the provider's estimate).
    phase: Literal["provider_loading"] | None = None
    # With `preview=true`, while the job runs: GET it for the latest preview.
    preview_url: str | None = None


class Output(BaseModel):
    index: int
    url: str
    width: int
    height: int
    content_type: Literal["image/png", "image/webp", "image/jpeg"]


class Job(BaseModel):
    id: str
    status: Literal["queued", "processing", "completed", "failed", "canceled"]
    model_key: str
    prompt: str
    negative_prompt: str
    params: Params
    pose_source: Literal["template", "pose_image", "image"]
    pose_template_id: str | None
    credit_cost: int
    progress: Progress
    queue_position: int | None
    queue_position_capped: bool
    eta_seconds: float | None
    outputs: list[Output]
    error: ErrorBody | None
    # The hosted model that ran the job, when a fallback moved it from `model_key`'s.
    routed_to: str | None
    webhook_url: str | None
    webhook_events: list[Literal["started", "progress", "completed"]]
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    # Set once the job was deleted (by its owner, or its outputs' retention ran out): its
    # photos and outputs are gone from storage, `outputs` is empty.
    deleted_at: str | None


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: str | None


class Model(BaseModel):
    model_key: str
    name: str
    # Where the model runs: `local` (the GPU workers) or a hosted inference API.
    provider: Literal["local", "huggingface"]
    # Who made the weights.
    author: str
    family: str
    base_model: str
    controlnet_model: str
    tier: str
    credit_cost: int
    resolution: str
    quality: str
    priority: int
    default_steps: int
    guidance_scale: float
    default_prompt: str
    negative_prompt: str
    processing_time: str
    enabled: bool
    coming_soon: bool
    # A hosted model's id at its provider.
    remote_model: str | None
    # The hosted model a local one's queued jobs may be routed to.
    fallback_model_key: str | None


class ModelList(BaseModel):
    items: list[Model]


class PoseTemplate(BaseModel):
    id: str
    key: str
    name: str
    description: str
    keypoints: list[list[float] | None]


class PoseTemplateList(BaseModel):
    items: list[PoseTemplate]


class Me(BaseModel):
    id: str
    email: str
    tier: str
    credits: int
    webhook_secret: str


class Check(BaseModel):
    ok: bool
    ms: float
    error: str | None = None  # why the check failed


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, Check]

"""The shapes the API answers with, as typed dicts: the client hands back the JSON as it came
(fields a newer server adds are kept), and a type checker still knows the contract's names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict

JobStatus = Literal["queued", "processing", "completed", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "canceled"})


class ErrorBody(TypedDict):
    code: str
    message: str


class Progress(TypedDict):
    step: int
    total: int
    preview_url: NotRequired[str | None]
    phase: NotRequired[str | None]


class Output(TypedDict):
    index: int
    url: str
    width: int
    height: int
    content_type: NotRequired[str]


class Params(TypedDict):
    num_inference_steps: int
    guidance_scale: float
    controlnet_conditioning_scale: float
    strength: float
    seed: int
    width: int
    height: int
    output_format: NotRequired[Literal["png", "webp", "jpeg"]]
    output_quality: NotRequired[int]
    preview: NotRequired[bool]
    num_outputs: NotRequired[int]


class Job(TypedDict):
    id: str
    status: JobStatus
    model_key: str
    prompt: str
    negative_prompt: str
    params: Params
    pose_source: Literal["template", "pose_image", "image"]
    pose_template_id: str | None
    credit_cost: int
    progress: Progress
    queue_position: int | None
    queue_position_capped: NotRequired[bool]
    eta_seconds: float | None
    outputs: list[Output]
    error: ErrorBody | None
    routed_to: NotRequired[str | None]
    created_at: str
    started_at: str | None
    finished_at: str | None
    deleted_at: str | None


class JobPage(TypedDict):
    items: list[Job]
    next_cursor: str | None


class Model(TypedDict):
    model_key: str
    name: str
    provider: NotRequired[str]
    author: NotRequired[str]
    remote_model: NotRequired[str | None]
    fallback_model_key: NotRequired[str | None]
    tier: str
    credit_cost: int
    resolution: str
    default_steps: int
    guidance_scale: float
    default_prompt: str
    enabled: bool
    coming_soon: bool


class PoseTemplate(TypedDict):
    id: str
    key: str
    name: str
    description: str
    keypoints: list[list[float] | None]


class Me(TypedDict):
    id: str
    email: str
    tier: str
    credits: int
    webhook_secret: str


@dataclass(frozen=True)
class Event:
    """One event of a job's stream: its name (`queued`, `started`, `progress`, `completed`,
    `failed`, `canceled`), its id (what a reconnect resumes from) and the job as it was."""

    event: str
    id: str | None
    job: Job

    @property
    def terminal(self) -> bool:
        return self.job["status"] in TERMINAL

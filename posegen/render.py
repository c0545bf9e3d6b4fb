"""The job object of the contract: what a poll, a list and a webhook event show of a job.

Its own module so that the webhooks, which send it, and the jobs, which answer it, both import
it without importing each other."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from sqlalchemy import Row

    from db.models import Generation

# Past this many jobs ahead, the position is reported as this number: counting a queue of
# 100,000 on every poll would make status cost grow with the queue.
POSITION_CAP = 1000

# What `render_job` reads of a job: the poll selects these and no more (decoding the other
# eight, three of them UUIDs and three timestamps, is work on the hottest path).
RENDERED_COLUMNS = (
    "id", "status", "model_key", "prompt", "negative_prompt", "params", "pose_source",
    "pose_template_id", "credit_cost", "progress_step", "progress_total", "outputs",
    "error_code", "error_message", "webhook_url", "webhook_events", "attempts", "created_at",
    "started_at", "finished_at", "deleted_at", "routed_to", "progress_phase", "phase_until",
)  # fmt: skip

# What a job is rendered from: the ORM object, or the poll's plain row of the same columns.
JobLike: TypeAlias = "Generation | Row[Any]"


def render_job(
    job: JobLike, *, queue_position: int | None = None, eta_seconds: float | None = None
) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "model_key": job.model_key,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "params": job.params,
        "pose_source": job.pose_source,
        "pose_template_id": job.pose_template_id,
        "credit_cost": job.credit_cost,
        "progress": _progress(job),
        "queue_position": queue_position,
        # True when the job has POSITION_CAP or more jobs ahead (the position is a lower bound).
        "queue_position_capped": queue_position is not None and queue_position >= POSITION_CAP,
        "eta_seconds": eta_seconds if eta_seconds is not None else _phase_eta(job),
        "outputs": [
            {
                "index": out["index"],
                "url": f"/v1/generations/{job.id}/outputs/{out['index']}",
                "width": out["width"],
                "height": out["height"],
                "content_type": out.get("content_type", "image/png"),
            }
            # A deleted job's output keys stay in the row until its files are gone.
            for out in ([] if job.deleted_at else job.outputs)
        ],
        "error": (
            {"code": job.error_code, "message": job.error_message} if job.error_code else None
        ),
        "routed_to": job.routed_to,
        "webhook_url": job.webhook_url,
        # posegen.webhooks.choices, spelled here: the webhooks import this module.
        "webhook_events": (job.webhook_events or "completed").split(","),
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "deleted_at": _iso(job.deleted_at),
    }


def preview_url(job_id: str) -> str:
    return f"/v1/generations/{job_id}/preview"


def _progress(job: JobLike) -> dict[str, Any]:
    progress: dict[str, Any] = {"step": job.progress_step, "total": job.progress_total}
    # Previews are written from the first step on, and removed when the job ends.
    if job.status == "processing" and job.progress_step and job.params.get("preview"):
        progress["preview_url"] = preview_url(job.id)
    if job.status == "processing" and job.progress_phase:
        progress["phase"] = job.progress_phase
    return progress


def _phase_eta(job: JobLike) -> float | None:
    """A running job that waits on its provider: the seconds it said it needs, counted down
    (the provider is asked again once they have passed)."""
    if job.status != "processing" or not job.progress_phase or job.phase_until is None:
        return None
    left = (job.phase_until - dt.datetime.now(dt.UTC)).total_seconds()
    return round(max(left, 0.0), 3)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None

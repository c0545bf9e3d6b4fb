"""The jobs of one pipeline call (POSEGEN_MAX_BATCH): each keeps its own heartbeat (lease,
progress, cancel), its own skeleton and previews, and its own time limit, counted for the
images of the whole call."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from db.models import Generation
from posegen import lifecycle
from posegen.queue import time_limits
from posegen.render import preview_url
from worker.context import WorkerContext
from worker.heartbeat import Heartbeat
from worker.job_images import JobImages

if TYPE_CHECKING:
    from worker.engine.engine import Prepared
    from worker.engine.run import RunParams


@dataclass
class Member:
    claim: lifecycle.Claim
    heartbeat: Heartbeat
    images: JobImages
    prepared: Prepared | None = None

    @property
    def job(self) -> Generation:
        return self.claim.job

    @property
    def params(self) -> RunParams:
        assert self.prepared is not None, "prepared before its run"
        return self.prepared.job.params

    @property
    def preview(self) -> Callable[[int, Image.Image], None] | None:
        """Stores the job's step previews while it runs; none once it has stopped (canceled
        or out of time) while the batch runs on for its other jobs."""
        if not self.job.params.get("preview"):
            return None

        def store(step: int, image: Image.Image) -> None:
            if not self.heartbeat.canceled():
                self.images.preview(step, image)

        return store


def start(ctx: WorkerContext, claims: Sequence[lifecycle.Claim]) -> list[Member]:
    """A member per claimed job, its heartbeat started."""
    total = sum(claim.job.params.get("num_outputs", 1) for claim in claims)
    first = claims[0].job
    compiling = not ctx.engine.compiled_for(
        first.model_key, images=total, guidance_scale=first.params["guidance_scale"]
    )
    members = []
    for claim in claims:
        job = claim.job
        heartbeat = Heartbeat(ctx, job.id, job)
        when, is_deadline = stop_at(ctx, job, images=total, compiling=compiling)
        heartbeat.stop_at(when, deadline=is_deadline)
        heartbeat.start()

        def stored(heartbeat: Heartbeat = heartbeat, job_id: str = job.id) -> None:
            heartbeat.preview_url = preview_url(job_id)

        members.append(Member(claim, heartbeat, JobImages(ctx.storage, job.id, on_preview=stored)))
    return members


def stop_at(
    ctx: WorkerContext, job: Generation, *, images: int, compiling: bool = False
) -> tuple[float, bool]:
    """When (time.time()) the job stops between steps, and whether that is its deadline: its
    own soft time limit from now (for the images of its call), or its deadline, whichever
    comes first. A call that compiles first (`compiling`: a shape the warm-up did not cover)
    runs under the configured limit (POSEGEN_JOB_SOFT_TIME_LIMIT): its allowance counts
    steps, not the minutes a compile takes."""
    soft, _hard = time_limits(job, ctx.settings, images=images)
    if compiling:
        soft = max(soft, ctx.settings.job_soft_time_limit)
    stop = time.time() + soft
    if job.deadline_at is not None and job.deadline_at.timestamp() < stop:
        return job.deadline_at.timestamp(), True
    return stop, False


def progress(members: Sequence[Member]) -> Callable[[int, int], None]:
    """The call's steps, as each member's progress."""

    def on_step(step: int, total: int) -> None:
        for member in members:
            member.heartbeat.progress(step, total)

    return on_step


def all_stopped(members: Sequence[Member]) -> Callable[[], bool]:
    """Whether the call is to stop before its next step: every member canceled or out of
    time (one alone stopping leaves the others running; its image is dropped at the end)."""
    return lambda: all(member.heartbeat.canceled() for member in members)

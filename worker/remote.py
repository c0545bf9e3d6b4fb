"""The remote worker: runs hosted jobs (`posegen worker --queues remote`), no GPU, no torch.

A message on the remote queue says "a hosted job is ready"; the task claims the best queued
job of every hosted model (`lifecycle.claim_next`, the scheduler's order), draws the template
or extracts the pose on the CPU (MediaPipe), sends the skeleton to the provider as the control
image (`posegen.hosted`) and records the answer as a local job's output: stored, completed,
webhooked and streamed through the same transitions; a failure is refunded.

Jobs here wait on the network, not on a GPU: Celery's thread pool runs
POSEGEN_REMOTE_CONCURRENCY of them in one process, sharing its database pool, its storage and
one httpx connection pool. A thread pool enforces no Celery time limit, so each job bounds
itself: every request and every wait ends by the job's stop time (its time limit or deadline).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from PIL import Image
from sqlalchemy import select

from db.models import AiModel, Generation
from db.session import make_engine, make_session_factory
from posegen import events, lifecycle, phases, retention, scheduler
from posegen.catalog import hosted_models
from posegen.errors import JobError, StorageUnavailable
from posegen.events import event_log
from posegen.hosted import (
    PROVIDER_LOADING,
    Busy,
    HostedRequest,
    HuggingFace,
    OutOfTime,
    Stopped,
    make_client,
    provider_error,
)
from posegen.images import OUTPUT_FORMATS, as_png, encode, fit
from posegen.metrics import job_metrics
from posegen.queue import Dispatcher, defer, make_producer, remote_message, time_limits
from posegen.render import render_job
from posegen.settings import get_settings
from posegen.skeleton import Keypoints, draw_skeleton
from posegen.storage import storage_from_settings
from posegen.storage.keys import pose_key
from worker.context import WorkerContext
from worker.heartbeat import Heartbeat

if TYPE_CHECKING:
    from worker.engine.pose.base import PoseExtractor

log = logging.getLogger(__name__)


@dataclass
class Remote:
    """What one remote worker process holds, shared by its threads."""

    ctx: WorkerContext
    provider: HuggingFace

    def __post_init__(self) -> None:
        self._pose_lock = threading.Lock()

    @cached_property
    def extractor(self) -> PoseExtractor:
        # MediaPipe on the CPU, whatever POSEGEN_POSE_BACKEND says: OpenPose needs torch.
        from worker.engine.pose.mediapipe import MediaPipeExtractor

        return MediaPipeExtractor()

    def keypoints(self, photo: Image.Image) -> Keypoints:
        with self._pose_lock:  # one graph per process, built once
            extractor = self.extractor
        return extractor.extract(photo)


_remote: Remote | None = None
_remote_lock = threading.Lock()


def remote() -> Remote:
    """This process's remote worker, built on first use by whichever thread comes first."""
    global _remote
    with _remote_lock:
        if _remote is None:
            settings = get_settings()
            # Each job in flight holds a connection at times, and its heartbeat another.
            engine = make_engine(settings.database_url, pool_size=settings.remote_concurrency)
            ctx = WorkerContext(
                settings=settings,
                sessions=make_session_factory(engine),
                storage=storage_from_settings(settings),
                dispatcher=Dispatcher(make_producer(settings), events=event_log(settings)),
            )
            client = make_client(concurrency=settings.remote_concurrency)
            provider = HuggingFace(
                base_url=settings.hf_api_url, token=settings.hf_api_token, client=client
            )
            _remote = Remote(ctx=ctx, provider=provider)
        return _remote


def run_next_remote(rw: Remote) -> str:
    """Claim the next hosted job (the scheduler's order) and run it."""
    claim = _claim(rw.ctx)
    if claim is None:
        return "nothing to run"
    return run_hosted(rw, claim)


def _claim(ctx: WorkerContext) -> lifecycle.Claim | None:
    with ctx.session() as session:
        hosted = list(hosted_models(session).values())
        claim = lifecycle.claim_next(
            session,
            worker_id=ctx.worker_id,
            models=hosted,
            lease_seconds=ctx.settings.job_lease_seconds,
            settings=ctx.settings,
        )
        # None because other claimers held the turns: the jobs they skip keep a message.
        if claim is None and any(scheduler.claimable(session, model_id=m) for m in hosted):
            defer(session, remote_message(ctx.settings))
    if claim is not None:
        job = claim.job
        assert job.started_at is not None  # the claim sets it
        wait = (job.started_at - job.created_at).total_seconds()
        job_metrics().queue_wait.labels(job.model_key).observe(wait)
        log.info("hosted job started", extra={"job_id": job.id, "attempt": claim.attempt})
    return claim


def run_hosted(rw: Remote, claim: lifecycle.Claim) -> str:
    """Run and finish one claimed hosted job; what happened, for logs and tests."""
    ctx, job = rw.ctx, claim.job
    heartbeat = Heartbeat(ctx, job.id, job)
    stop_at, is_deadline = _stop_at(job)
    heartbeat.stop_at(stop_at, deadline=is_deadline)
    heartbeat.start()
    try:
        return _run(rw, claim, heartbeat, stop_at=stop_at, is_deadline=is_deadline)
    finally:  # on every path: a heartbeat left running opens a session every beat, forever
        heartbeat.stop()


def _run(
    rw: Remote, claim: lifecycle.Claim, heartbeat: Heartbeat, *, stop_at: float, is_deadline: bool
) -> str:
    ctx, job = rw.ctx, claim.job
    started = time.monotonic()
    try:
        if job.progress_phase:  # a wait of an attempt before, whose worker was lost
            _set_phase(ctx, job, None)
        request = _request(rw, claim)
        data = rw.provider.generate(
            request,
            stop_at=stop_at,
            on_busy=lambda busy: _waiting(ctx, job, busy, heartbeat),
            on_retry=lambda busy: _waited(ctx, job, busy),
            should_stop=heartbeat.canceled,
        )
        image = _decoded(data)
    except OutOfTime as exc:
        if is_deadline:
            return _fail(ctx, job.id, "deadline_exceeded", lifecycle.DEADLINE_MESSAGE)
        return _fail(ctx, job.id, "timeout", f"{exc} The job ran past its time limit.")
    except Stopped:
        return _stopped(ctx, job.id, heartbeat.out_of_time())
    except JobError as exc:
        return _fail(ctx, job.id, exc.code, exc.message)
    except StorageUnavailable:
        return _hand_back(ctx, job.id)
    except Exception as exc:  # the last resort: record the failure, the worker goes on
        log.exception("hosted job crashed", extra={"job_id": job.id})
        return _fail(ctx, job.id, "internal_error", f"The worker failed: {type(exc).__name__}.")
    return _record(ctx, job, image, seconds=time.monotonic() - started)


def _stop_at(job: Generation) -> tuple[float, bool]:
    """When (time.time()) the job stops waiting, and whether that is its deadline: its own
    soft time limit from now, or its deadline, whichever comes first."""
    soft, _hard = time_limits(job, get_settings())
    stop = time.time() + soft
    if job.deadline_at is not None and job.deadline_at.timestamp() < stop:
        return job.deadline_at.timestamp(), True
    return stop, False


def _request(rw: Remote, claim: lifecycle.Claim) -> HostedRequest:
    """What the provider is sent: the prompts, the parameters and the control image, drawn
    from the template or from the pose found in the photo; the skeleton stored for
    `GET .../pose` as a local job's is."""
    ctx, job = rw.ctx, claim.job
    with ctx.session() as session:
        remote_model = session.scalar(
            select(AiModel.remote_model).where(AiModel.id == job.model_id)
        )
    if not remote_model:
        raise provider_error(f"The model {job.routed_to or job.model_key!r} names no remote model.")
    skeleton = _control_image(rw, claim)
    png = as_png(skeleton)
    ctx.storage.put(pose_key(job.id), png)
    params = job.params
    return HostedRequest(
        remote_model=remote_model,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        control_png=png,
        num_inference_steps=params["num_inference_steps"],
        guidance_scale=params["guidance_scale"],
        controlnet_conditioning_scale=params["controlnet_conditioning_scale"],
    )


def _control_image(rw: Remote, claim: lifecycle.Claim) -> Image.Image:
    from worker.engine.pose.base import NoPoseDetected

    job = claim.job
    width, height = job.params["width"], job.params["height"]
    if claim.pose_keypoints:
        keypoints: Keypoints = [tuple(k) if k else None for k in claim.pose_keypoints]
        return draw_skeleton(keypoints, width=width, height=height)
    key = job.pose_image_key or job.input_key
    photo = fit(_open(rw.ctx.storage.get(key)), width=width, height=height)
    try:
        keypoints = rw.keypoints(photo)
    except NoPoseDetected as exc:
        where = "pose_image" if job.pose_image_key else "image"
        raise JobError("no_pose_detected", f"No person was found in the {where}: {exc}") from exc
    return draw_skeleton(keypoints, width=width, height=height)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, ValueError) as exc:
        raise JobError("invalid_input", "A stored input image could not be decoded.") from exc


def _decoded(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, ValueError) as exc:
        raise provider_error("The provider's answer was not an image it could decode.") from exc


def _waiting(ctx: WorkerContext, job: Generation, busy: Busy, hb: Heartbeat) -> None:
    """The provider is busy: a loading model shows as the job's phase with its estimate
    (written, and sent to the job's stream); a rate limit just waits."""
    log.info(
        "provider busy; asking again",
        extra={"job_id": job.id, "in_s": round(busy.seconds, 1), "loading": busy.loading},
    )
    if not busy.loading:
        return
    ours = _set_phase(ctx, job, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=busy.seconds))
    sink = ctx.dispatcher.events
    if ours and sink is not None:
        data = render_job(job)
        data["progress"] = {**data["progress"], "phase": PROVIDER_LOADING}
        data["eta_seconds"] = round(busy.seconds, 3)
        sink.publish([events.Event(job_id=job.id, name="progress", data=data)])


def _waited(ctx: WorkerContext, job: Generation, busy: Busy) -> None:
    """The wait is over and the provider is asked again: a job that showed its model loading
    no longer does (written, and sent to its stream), while the request runs."""
    if not busy.loading:
        return
    ours = _set_phase(ctx, job, None)
    sink = ctx.dispatcher.events
    if ours and sink is not None:
        data = render_job(job)
        data["progress"] = {k: v for k, v in data["progress"].items() if k != "phase"}
        data["eta_seconds"] = None
        sink.publish([events.Event(job_id=job.id, name="progress", data=data)])


def _set_phase(ctx: WorkerContext, job: Generation, until: dt.datetime | None) -> bool:
    """The job waits for its model to load until about `until`, or (None) no longer."""
    with ctx.session() as session:
        return phases.provider_phase(
            session, job_id=job.id, worker_id=ctx.worker_id,
            phase=PROVIDER_LOADING if until else None, until=until,
            lease_seconds=ctx.settings.job_lease_seconds,
        )  # fmt: skip


def _record(ctx: WorkerContext, job: Generation, image: Image.Image, *, seconds: float) -> str:
    """Store the output and complete the job (or drop the output: no longer ours)."""
    fmt, quality = job.params.get("output_format", "png"), job.params.get("output_quality", 90)
    _, suffix, content_type = OUTPUT_FORMATS[fmt]
    key = f"outputs/{job.id}/0.{suffix}"
    data = as_png(image) if fmt == "png" else encode(image, fmt=fmt, quality=quality)
    try:
        ctx.storage.put(key, data, content_type=content_type)
    except StorageUnavailable:
        return _hand_back(ctx, job.id)
    output = {"index": 0, "width": image.width, "height": image.height}
    with ctx.session() as session:
        done = lifecycle.complete(
            session, job_id=job.id, worker_id=ctx.worker_id,
            outputs=[dict(output, key=key, content_type=content_type)],
            steps=job.params["num_inference_steps"],
        )  # fmt: skip
    if done is None:  # canceled (or lease lost) just before the end: the output is not ours
        ctx.storage.delete(key)
        return "canceled"
    retention.purge_now(ctx.sessions, storage=ctx.storage, job_id=job.id)
    metrics = job_metrics()
    metrics.finished.labels("completed", job.model_key).inc()
    metrics.run_time.labels(job.model_key).observe(seconds)
    log.info("hosted job completed", extra={"job_id": job.id, "seconds": round(seconds, 3)})
    return "completed"


def _stopped(ctx: WorkerContext, job_id: str, out_of_time: str | None) -> str:
    if out_of_time is None:
        log.info("hosted job canceled while waiting", extra={"job_id": job_id})
        return "canceled"
    if out_of_time == "deadline_exceeded":
        return _fail(ctx, job_id, out_of_time, lifecycle.DEADLINE_MESSAGE)
    return _fail(ctx, job_id, "timeout", "The provider was not done within the job's time limit.")


def _fail(ctx: WorkerContext, job_id: str, code: str, message: str) -> str:
    log.info("hosted job failed", extra={"job_id": job_id, "code": code})
    with ctx.session() as session:
        job = lifecycle.fail(
            session, job_id=job_id, code=code, message=message, worker_id=ctx.worker_id
        )
    retention.purge_now(ctx.sessions, storage=ctx.storage, job_id=job_id)
    if job is not None:
        job_metrics().finished.labels("failed", job.model_key).inc()
    return "failed"


def _hand_back(ctx: WorkerContext, job_id: str) -> str:
    """Storage is unreachable: the job goes back to the queue (published again), counted as
    an interruption; past POSEGEN_MAX_ATTEMPTS the reconciler's rule fails it."""
    with ctx.session() as session:
        job = session.get(Generation, job_id)
        if job is not None and job.attempts >= ctx.settings.max_attempts:
            message = f"Storage was unavailable in each of the job's {job.attempts} attempts."
        else:
            message = ""
    if message:
        return _fail(ctx, job_id, "internal_error", message)
    with ctx.session() as session:
        released = lifecycle.release(
            session, job_id=job_id, worker_id=ctx.worker_id, settings=ctx.settings
        )
    return "given back" if released is not None else "canceled"

"""Runs one claimed job: the cog-style runner between the Celery task and the engine.

It owns the job's state while it runs: a heartbeat thread renews the lease, writes progress
(at most a few writes a second) and turns a cancel into a flag the engine checks between
steps. Every outcome is one domain transition: complete, fail, or nothing (canceled).

On a GPU (POSEGEN_RECORD_BEHIND), the Celery task records a finished job behind the next one
(`worker.finisher.Finisher`): once the model has returned its image, the PNG, the upload and
the completion run on a thread of their own while the task returns and the worker takes its
next job, so the GPU does not wait for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from kombu.utils.functional import retry_over_time

from db.models import Generation
from posegen import batch_claim, lifecycle, retention, scheduler
from posegen.catalog import served_models
from posegen.errors import JobError, StorageUnavailable
from posegen.images import OUTPUT_FORMATS, encode
from posegen.metrics import job_metrics
from posegen.queue import defer, ready_message
from worker import batch
from worker.context import WorkerContext
from worker.finisher import Finisher

if TYPE_CHECKING:
    from worker.engine.engine import EngineJob, EngineResult

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_next(ctx: WorkerContext, *, ready_model: str | None, behind: Finisher | None = None) -> str:
    """Claim the next job among the models this worker serves (the scheduler's order), with
    the queued jobs that can run in the same pipeline call (POSEGEN_MAX_BATCH), and run them.
    `ready_model`: the model whose message started this; when no job claimed is of that
    model, its message is published again, so every queued job keeps one."""
    claims = _claim_next(ctx, ready_model)
    if not claims:
        return "nothing to run"
    return run_jobs(ctx, claims, behind=behind)


def run_job(ctx: WorkerContext, claim: lifecycle.Claim, *, behind: Finisher | None = None) -> str:
    """Run and finish one claimed job (`run_jobs`)."""
    return run_jobs(ctx, [claim], behind=behind)


def run_jobs(
    ctx: WorkerContext, claims: Sequence[lifecycle.Claim], *, behind: Finisher | None = None
) -> str:
    """Run claimed jobs in one pipeline call and finish each on its own: what fails for one
    job (its input, its pose, its cancel or time limit) ends that job alone; what fails the
    call fails its jobs. Returns what happened, for logs and tests (each job's outcome, comma
    separated): with a `behind` finisher, "finishing" once the model is done and the records
    are handed to it."""
    members = batch.start(ctx, claims)
    outcomes: dict[str, str] = {}
    running = [m for m in members if _prepare(ctx, m, outcomes)]
    results: list[EngineResult] | None = None
    try:
        results = _generate(ctx, running) if running else None
    except Exception as exc:  # noqa: BLE001 - each job's end is recorded (_call_failed logs)
        for member in running:
            outcomes[member.job.id] = _call_failed(ctx, member, exc)
    finally:
        for member in members:
            member.images.close()  # the skeleton and previews written before the end
        if results is None:  # no output to record: the leases are done with
            for member in running:
                member.heartbeat.stop()
    if results is None:
        return _outcome(members, outcomes)
    # Now, on the jobs' own thread: a finished batch's record runs beside the next one.
    done = _finished(ctx, running, results, outcomes)
    record = partial(_record_all, ctx, members, done, outcomes)
    if behind is None or not done:
        return record()
    try:
        behind.submit(record)  # waits for the record before it, if that one is still running
    except BaseException:  # a time limit while waiting: the leases, unrenewed, give them back
        for member, _ in done:
            member.heartbeat.stop()
        raise
    return "finishing"


def _finished(
    ctx: WorkerContext,
    running: Sequence[batch.Member],
    results: Sequence[EngineResult],
    outcomes: dict[str, str],
) -> list[tuple[batch.Member, EngineResult]]:
    """The members whose images are to be recorded; those stopped while the others ran end
    here, their images dropped. Should anything raise, no heartbeat is left renewing."""
    done = []
    try:
        if ctx.engine.leaked_bytes() > 256 * 1024**2:
            log.warning("GPU memory did not return to its baseline; this process will be replaced")
            ctx.restart_requested = True
        for member, result in zip(running, results, strict=True):
            if member.heartbeat.canceled():
                stopped = member.heartbeat.out_of_time()
                outcomes[member.job.id] = _stopped(ctx, member.job.id, stopped)
                member.heartbeat.stop()
            else:
                done.append((member, result))
    except BaseException:  # the leases, unrenewed, give the jobs back
        for member in running:
            member.heartbeat.stop()
        raise
    return done


def _record_all(
    ctx: WorkerContext,
    members: Sequence[batch.Member],
    done: Sequence[tuple[batch.Member, EngineResult]],
    outcomes: dict[str, str],
) -> str:
    """Record each finished job on its own: one whose record raises is left to its lease (it
    runs again once that ends, as a job alone does) and the error raised once the others are
    recorded; no heartbeat goes on renewing, whatever raises."""
    from worker.engine.run import steps_for

    errors: list[Exception] = []
    try:
        for member, result in done:
            try:
                steps = steps_for(member.params)
                outcomes[member.job.id] = _record(ctx, member.job, result, steps=steps)
            except Exception as exc:  # raised below, once the others are recorded
                log.exception("recording a job failed", extra={"job_id": member.job.id})
                errors.append(exc)
            finally:
                member.heartbeat.stop()  # after the completion: a slow upload keeps its lease
    finally:  # a time limit mid-way: the remaining leases, unrenewed, give their jobs back
        for member, _ in done:
            member.heartbeat.stop()
    if errors:
        raise errors[0]
    return _outcome(members, outcomes)


def _outcome(members: Sequence[batch.Member], outcomes: dict[str, str]) -> str:
    return ", ".join(outcomes.get(m.job.id, "lost") for m in members)


def _prepare(ctx: WorkerContext, member: batch.Member, outcomes: dict[str, str]) -> bool:
    """The member's inputs read and its skeleton drawn; False when that ended the job (its
    outcome recorded), which ends it alone."""
    job_id = member.job.id
    try:
        member.prepared = ctx.engine.prepare(
            _engine_job(ctx, member.claim), on_pose=member.images.pose
        )
        return True
    except StorageUnavailable as exc:  # an outage, not this process's fault: it stays
        outcomes[job_id] = _hand_back(ctx, job_id, attempt=member.claim.attempt, error=exc)
    except Exception as exc:  # noqa: BLE001 - the job's end is recorded (_call_failed logs)
        outcomes[job_id] = _call_failed(ctx, member, exc)
    member.heartbeat.stop()
    return False


def _call_failed(ctx: WorkerContext, member: batch.Member, exc: Exception) -> str:
    """A job's run raised (its own preparation, or the call it was in): how it ends."""
    from worker.engine.engine import Canceled

    job_id = member.job.id
    if isinstance(exc, Canceled):
        return _stopped(ctx, job_id, member.heartbeat.out_of_time())
    if isinstance(exc, JobError):
        return _fail(ctx, job_id, exc.code, exc.message)
    # The limit interrupts at any bytecode, possibly mid-way through torch or the model; and
    # state after an unknown error is not to be trusted: either way Celery replaces this
    # process before it takes another.
    ctx.restart_requested = True
    if isinstance(exc, SoftTimeLimitExceeded):
        return _fail(ctx, job_id, "timeout", "The job ran past its time limit.")
    log.exception("job crashed", extra={"job_id": job_id}, exc_info=exc)
    return _fail(ctx, job_id, "internal_error", f"The worker failed: {type(exc).__name__}.")


def _stopped(ctx: WorkerContext, job_id: str, out_of_time: str | None) -> str:
    """The engine stopped between steps: canceled by its owner, or out of time."""
    if out_of_time is None:
        log.info("job canceled while running", extra={"job_id": job_id})
        return "canceled"
    if out_of_time == "deadline_exceeded":
        return _fail(ctx, job_id, out_of_time, lifecycle.DEADLINE_MESSAGE)
    return _fail(ctx, job_id, "timeout", "The job ran past its time limit.")


def _claim_next(ctx: WorkerContext, ready_model: str | None) -> list[lifecycle.Claim]:
    """The next job for this worker and the jobs that run in its call, claimed (empty: none
    of its models has one queued), their waits observed."""
    with ctx.session() as session:
        served = served_models(session, ctx.settings.worker_models)
        claims = batch_claim.claim_batch(
            session,
            worker_id=ctx.worker_id,
            models=list(served.values()),
            warm=[served[key] for key in ctx.warm_models() if key in served],
            lease_seconds=ctx.settings.job_lease_seconds,
            settings=ctx.settings,
            max_images=ctx.max_batch,
        )
        # The message stood for a job of `ready_model`. Claimed another model's jobs, or none
        # because other claimers held the turns: that model's job still needs a message.
        if ready_model is not None and ready_model in served:
            taken = any(claim.job.model_key == ready_model for claim in claims)
            if not taken and scheduler.claimable(session, model_id=served[ready_model]):
                defer(session, ready_message(ready_model, ctx.settings))
    metrics = job_metrics()
    for claim in claims:
        job = claim.job
        assert job.started_at is not None  # the claim sets it
        wait = (job.started_at - job.created_at).total_seconds()
        metrics.queue_wait.labels(job.model_key).observe(wait)
        log.info("job started", extra={"job_id": job.id, "attempt": claim.attempt})
    if claims:
        images = sum(scheduler.images(claim.job.params) for claim in claims)
        metrics.batch_images.labels(claims[0].job.model_key).observe(images)
        log.info(
            "batch started",
            extra={"job_ids": [c.job.id for c in claims], "jobs": len(claims), "images": images},
        )
    return claims


def _engine_job(ctx: WorkerContext, claim: lifecycle.Claim) -> EngineJob:
    """What the engine runs: the claimed job's model, parameters and inputs (read from
    storage patiently: an outage is waited out, then raised as StorageUnavailable)."""
    from worker.engine.engine import EngineJob
    from worker.engine.run import RunParams

    job = claim.job
    return EngineJob(
        model_key=job.model_key,
        family=claim.family,
        base_model=claim.base_model,
        controlnet_model=claim.controlnet_model,
        params=RunParams(prompt=job.prompt, negative_prompt=job.negative_prompt, **job.params),
        image=_read(ctx, job.id, job.input_key),
        pose_keypoints=(
            [tuple(k) if k else None for k in claim.pose_keypoints]
            if claim.pose_keypoints
            else None
        ),
        pose_image=_read(ctx, job.id, job.pose_image_key) if job.pose_image_key else None,
    )


def _generate(ctx: WorkerContext, running: Sequence[batch.Member]) -> list[EngineResult]:
    """The engine's call for the prepared members, their steps and cancel through their
    heartbeats, their step previews stored on threads of their own (the progress events link
    a job's latest preview once one is stored)."""
    results = ctx.engine.run(
        [member.prepared for member in running if member.prepared is not None],
        on_step=batch.progress(running),
        should_cancel=batch.all_stopped(running),
        previews=[member.preview for member in running],
        preview_interval=ctx.settings.preview_interval,
    )
    first = running[0].prepared
    assert first is not None
    ctx.held(first.job.model_key, ctx.engine.cache_keys(first.job))
    return results


def _read(ctx: WorkerContext, job_id: str, key: str) -> bytes:
    return _patiently(ctx, job_id, lambda: ctx.storage.get(key))


def _record(ctx: WorkerContext, job: Generation, result: EngineResult, *, steps: int) -> str:
    """Store the outputs and complete the job (or drop the outputs: no longer ours)."""
    fmt, quality = job.params.get("output_format", "png"), job.params.get("output_quality", 90)
    _, suffix, content_type = OUTPUT_FORMATS[fmt]
    outputs: list[dict[str, Any]] = []
    for index, image in enumerate(result.images):
        key = f"outputs/{job.id}/{index}.{suffix}"
        data = result.pngs[index] if fmt == "png" else encode(image, fmt=fmt, quality=quality)
        try:
            _patiently(ctx, job.id, partial(ctx.storage.put, key, data, content_type=content_type))
        except StorageUnavailable as exc:  # the images go with this attempt; it runs again
            return _hand_back(ctx, job.id, attempt=job.attempts, error=exc)
        outputs.append(
            {"index": index, "width": image.width, "height": image.height, "key": key,
             "content_type": content_type}
        )  # fmt: skip
    with ctx.session() as session:
        done = lifecycle.complete(
            session, job_id=job.id, worker_id=ctx.worker_id, outputs=outputs, steps=steps
        )
    if done is None:  # canceled (or lease lost) just before the end: the outputs are not ours
        for output in outputs:
            ctx.storage.delete(output["key"])
        log.info("job canceled while finishing", extra={"job_id": job.id})
        return "canceled"
    retention.purge_now(ctx.sessions, storage=ctx.storage, job_id=job.id)  # its inputs
    metrics = job_metrics()
    metrics.finished.labels("completed", job.model_key).inc()
    metrics.run_time.labels(job.model_key).observe(result.seconds)
    log.info("job completed", extra={"job_id": job.id, "seconds": round(result.seconds, 3)})
    return "completed"


def _fail(ctx: WorkerContext, job_id: str, code: str, message: str) -> str:
    log.info("job failed", extra={"job_id": job_id, "code": code})
    with ctx.session() as session:
        job = lifecycle.fail(
            session, job_id=job_id, code=code, message=message, worker_id=ctx.worker_id
        )
    retention.purge_now(ctx.sessions, storage=ctx.storage, job_id=job_id)  # its inputs
    if job is not None:
        job_metrics().finished.labels("failed", job.model_key).inc()
    return "failed"


def _patiently(ctx: WorkerContext, job_id: str, call: Callable[[], T]) -> T:
    """A storage read or write, tried again with backoff while storage is unreachable (each
    try is botocore's own retries first) for up to POSEGEN_STORAGE_RETRY_SECONDS; then the
    StorageUnavailable propagates. The job's heartbeat keeps its lease meanwhile."""
    patience = ctx.settings.storage_retry_seconds
    if not patience:  # kombu's loop reads no timeout as "forever"
        return call()

    def waiting(error: Exception, intervals: Iterator[float], retries: int) -> float:
        delay = next(intervals)
        log.warning(
            "storage unavailable; retrying",
            extra={"job_id": job_id, "retry": retries + 1, "in_s": delay, "error": str(error)},
        )
        return delay

    result: T = retry_over_time(
        call, StorageUnavailable, errback=waiting,
        interval_start=0.5, interval_step=1.0, interval_max=5.0, timeout=patience,
    )  # fmt: skip
    return result


def _hand_back(ctx: WorkerContext, job_id: str, *, attempt: int, error: StorageUnavailable) -> str:
    """Storage stayed unreachable: give the job back to the queue (published again), an
    interruption counted against POSEGEN_MAX_ATTEMPTS as a lost worker is; at the limit, fail
    it, refunded, as the reconciler does. Neither replaces this process."""
    if attempt >= ctx.settings.max_attempts:
        message = f"Storage was unavailable in each of the job's {attempt} attempts; giving up."
        return _fail(ctx, job_id, "internal_error", message)
    with ctx.session() as session:
        released = lifecycle.release(
            session, job_id=job_id, worker_id=ctx.worker_id, settings=ctx.settings
        )
    if released is None:  # canceled meanwhile: nothing to give back
        return "canceled"
    log.warning(
        "storage unavailable; job given back to the queue",
        extra={"job_id": job_id, "attempt": attempt, "error": error.message},
    )
    return "given back"

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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from kombu.utils.functional import retry_over_time

from db.models import Generation
from posegen import lifecycle, retention, scheduler
from posegen.catalog import served_models
from posegen.errors import JobError, StorageUnavailable
from posegen.metrics import job_metrics
from posegen.queue import defer, ready_message, time_limits
from worker.context import WorkerContext
from worker.finisher import Finisher

if TYPE_CHECKING:
    from worker.engine.engine import EngineJob, EngineResult

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Heartbeat:
    """Lease renewal, progress and cancel, on its own thread and database session."""

    ctx: WorkerContext
    job_id: str

    def __post_init__(self) -> None:
        self._stop_at = float("inf")
        self._deadline = False
        self._step: tuple[int, int] | None = None
        self._written: tuple[int, int] | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{self.job_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def progress(self, step: int, total: int) -> None:
        self._step = (step, total)

    def stop_at(self, when: float, *, deadline: bool) -> None:
        """Stop the job between steps at this time (time.time()): its time limit, or its
        deadline (`deadline`)."""
        self._stop_at, self._deadline = when, deadline

    def canceled(self) -> bool:
        """Whether the engine is to stop before its next step: the job is no longer ours
        (canceled), or out of time."""
        return self._lost.is_set() or time.time() >= self._stop_at

    def out_of_time(self) -> str | None:
        """Why a job that stopped between steps did: `deadline_exceeded` or `timeout` when it
        ran out of time (and was not canceled meanwhile), None when canceled."""
        if self._lost.is_set() or time.time() < self._stop_at:
            return None
        return "deadline_exceeded" if self._deadline else "timeout"

    def _loop(self) -> None:
        interval = self.ctx.settings.heartbeat_seconds
        while not self._stop.wait(interval):
            self.beat()

    def beat(self) -> None:
        step = self._step
        try:
            with self.ctx.session() as session:
                ours = lifecycle.heartbeat(
                    session,
                    job_id=self.job_id,
                    worker_id=self.ctx.worker_id,
                    lease_seconds=self.ctx.settings.job_lease_seconds,
                    step=step[0] if step and step != self._written else None,
                    total=step[1] if step and step != self._written else None,
                )
        except Exception:
            log.warning("heartbeat failed", extra={"job_id": self.job_id}, exc_info=True)
            return
        self._written = step
        if not ours:
            self._lost.set()


def run_next(ctx: WorkerContext, *, ready_model: str | None, behind: Finisher | None = None) -> str:
    """Claim the next job among the models this worker serves (the scheduler's order) and
    run it. `ready_model`: the model whose message started this; when the job claimed is of
    another model, that model's message is published again, so every queued job keeps one."""
    claim = _claim_next(ctx, ready_model)
    if claim is None:
        return "nothing to run"
    return run_job(ctx, claim, behind=behind)


def run_job(ctx: WorkerContext, claim: lifecycle.Claim, *, behind: Finisher | None = None) -> str:
    """Run and finish one claimed job. Returns what happened, for logs and tests: with a
    `behind` finisher, "finishing" once the model is done and the record is handed to it."""
    from worker.engine.engine import Canceled
    from worker.engine.run import steps_for

    job: Generation = claim.job
    job_id = job.id
    heartbeat = Heartbeat(ctx, job_id)
    when, is_deadline = _stop_at(ctx, job)
    heartbeat.stop_at(when, deadline=is_deadline)
    heartbeat.start()
    result: EngineResult | None = None
    try:
        engine_job = _engine_job(ctx, claim)
        result = ctx.engine.generate(
            engine_job, on_step=heartbeat.progress, should_cancel=heartbeat.canceled
        )
        ctx.held(job.model_key, ctx.engine.cache_keys(engine_job))
    except Canceled:
        return _stopped(ctx, job_id, heartbeat.out_of_time())
    except JobError as exc:
        return _fail(ctx, job_id, exc.code, exc.message)
    except StorageUnavailable as exc:  # an outage, not this process's fault: it stays
        return _hand_back(ctx, job_id, attempt=claim.attempt, error=exc)
    except SoftTimeLimitExceeded:
        # The limit interrupts at any bytecode, possibly mid-way through torch or the model:
        # fail the job, then let Celery replace this process before it takes another.
        ctx.restart_requested = True
        return _fail(ctx, job_id, "timeout", "The job ran past its time limit.")
    except Exception as exc:  # the last resort: record the failure, then let the worker go on
        log.exception("job crashed", extra={"job_id": job_id})
        ctx.restart_requested = True  # state after an unknown error is not to be trusted
        return _fail(ctx, job_id, "internal_error", f"The worker failed: {type(exc).__name__}.")
    finally:
        if result is None:  # no output to record: the lease is done with
            heartbeat.stop()

    # Now, on the job's own thread: a finished job's record runs beside the next job.
    if ctx.engine.leaked_bytes() > 256 * 1024**2:
        log.warning("GPU memory did not return to its baseline; this process will be replaced")
        ctx.restart_requested = True

    def record() -> str:
        assert result is not None
        try:
            return _record(ctx, job, result, steps=steps_for(engine_job.params))
        finally:
            heartbeat.stop()  # after the completion: a slow upload keeps its lease

    if behind is None:
        return record()
    try:
        behind.submit(record)  # waits for the record before it, if that one is still running
    except BaseException:  # a time limit while waiting: the lease, unrenewed, gives the job back
        heartbeat.stop()
        raise
    return "finishing"


def _stop_at(ctx: WorkerContext, job: Generation) -> tuple[float, bool]:
    """When (time.time()) the job stops between steps, and whether that is its deadline: its
    own soft time limit from now, or its deadline, whichever comes first."""
    soft, _hard = time_limits(job, ctx.settings)
    stop = time.time() + soft
    if job.deadline_at is not None and job.deadline_at.timestamp() < stop:
        return job.deadline_at.timestamp(), True
    return stop, False


def _stopped(ctx: WorkerContext, job_id: str, out_of_time: str | None) -> str:
    """The engine stopped between steps: canceled by its owner, or out of time."""
    if out_of_time is None:
        log.info("job canceled while running", extra={"job_id": job_id})
        return "canceled"
    if out_of_time == "deadline_exceeded":
        return _fail(ctx, job_id, out_of_time, lifecycle.DEADLINE_MESSAGE)
    return _fail(ctx, job_id, "timeout", "The job ran past its time limit.")


def _claim_next(ctx: WorkerContext, ready_model: str | None) -> lifecycle.Claim | None:
    """The next job for this worker, claimed (None: none of its models has one queued), its
    wait observed."""
    with ctx.session() as session:
        served = served_models(session, ctx.settings.worker_models)
        claim = lifecycle.claim_next(
            session,
            worker_id=ctx.worker_id,
            models=list(served.values()),
            warm=[served[key] for key in ctx.warm_models() if key in served],
            lease_seconds=ctx.settings.job_lease_seconds,
            settings=ctx.settings,
        )
        # The message stood for a job of `ready_model`. Claimed another model's job, or none
        # because other claimers held the turns: that model's job still needs a message.
        if ready_model is not None and ready_model in served:
            taken = claim is not None and claim.job.model_key == ready_model
            if not taken and scheduler.claimable(session, model_id=served[ready_model]):
                defer(session, ready_message(ready_model, ctx.settings))
    if claim is None:
        return None
    job = claim.job
    assert job.started_at is not None  # the claim sets it
    job_metrics().queue_wait.labels(job.model_key).observe(
        (job.started_at - job.created_at).total_seconds()
    )
    log.info("job started", extra={"job_id": job.id, "attempt": claim.attempt})
    return claim


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


def _read(ctx: WorkerContext, job_id: str, key: str) -> bytes:
    return _patiently(ctx, job_id, lambda: ctx.storage.get(key))


def _record(ctx: WorkerContext, job: Generation, result: EngineResult, *, steps: int) -> str:
    """Store the output and complete the job (or drop the output: no longer ours)."""
    key = f"outputs/{job.id}/0.png"
    try:
        _patiently(ctx, job.id, lambda: ctx.storage.put(key, result.png))
    except StorageUnavailable as exc:  # the image goes with this attempt; the job runs again
        return _hand_back(ctx, job.id, attempt=job.attempts, error=exc)
    with ctx.session() as session:
        done = lifecycle.complete(
            session,
            job_id=job.id,
            worker_id=ctx.worker_id,
            outputs=[{"index": 0, "key": key, "width": result.width, "height": result.height}],
            steps=steps,
        )
    if done is None:  # canceled (or lease lost) just before the end: the output is not ours
        ctx.storage.delete(key)
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

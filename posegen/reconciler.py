"""The reconciler: the database is the truth, the broker is a hint that can be lost.

Swept by beat every POSEGEN_RECONCILE_INTERVAL seconds:
- queued jobs whose message may be lost (broker restart, crash between commit and publish)
  are published again: per model, as many as its queued jobs outnumber the messages waiting
  on its queue, in run order (the head of the queue first);
- processing jobs whose lease ran out (their worker died) go back to the queue;
- jobs interrupted more times than the attempt limit fail, refunded;
- jobs past their deadline that no worker stopped (queued, or their worker gone) fail with
  `deadline_exceeded`, refunded;
- queued jobs of a model with a hosted fallback that waited longer than
  POSEGEN_FALLBACK_AFTER_SECONDS are routed to it (posegen.routing);
- scheduler turns whose count drifted from the jobs are counted again.
A duplicate message is harmless: a worker's claim only takes a job that is queued.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Select, and_, delete, func, select
from sqlalchemy.orm import Session

from db.models import LOCAL, Generation, IdempotencyKey, status_is
from db.types import utcnow
from posegen import lifecycle, routing, scheduler
from posegen.jobs import QUEUE_ORDER
from posegen.queue import GENERATION_QUEUE, REMOTE_QUEUE, defer, generate_message, model_queue
from posegen.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    republished: int
    requeued: int
    # The model of each job failed, for the job metrics (counted once the sweep commits).
    failed_models: tuple[str, ...] = ()
    repaired: int = 0
    routed: int = 0

    @property
    def failed(self) -> int:
        return len(self.failed_models)

    def counts(self) -> dict[str, int]:
        return {
            "republished": self.republished,
            "requeued": self.requeued,
            "failed": self.failed,
            "repaired": self.repaired,
            "routed": self.routed,
        }


def stale_queued(
    stale: dt.datetime, batch: int, model_key: str | None = None, *, hosted: bool = False
) -> Select[Generation]:
    """Queued jobs (of one local model, or `hosted`: of every hosted provider) last published
    before `stale`, in run order (ix_generations_queue)."""
    where = [status_is(Generation.status, "queued"), Generation.published_at < stale]
    if hosted:
        where.append(Generation.provider != LOCAL)
    elif model_key is not None:
        where += [Generation.model_key == model_key, Generation.provider == LOCAL]
    return select(Generation).where(*where).order_by(*QUEUE_ORDER).limit(batch)


def queued_by_model() -> Select[str, str, int]:
    """How many jobs of each model and provider are queued (ix_generations_queue)."""
    return (
        select(Generation.model_key, Generation.provider, func.count())
        .where(status_is(Generation.status, "queued"))
        .group_by(Generation.model_key, Generation.provider)
    )


def queued_by_queue(session: Session) -> dict[str, int]:
    """How many queued jobs each broker queue stands for: a local model's own, and the
    remote queue for every hosted job."""
    counts: dict[str, int] = {}
    for model_key, provider, queued in session.execute(queued_by_model()).all():
        queue = REMOTE_QUEUE if provider != LOCAL else model_queue(model_key)
        counts[queue] = counts.get(queue, 0) + int(queued)
    return counts


def past_deadline(now: dt.datetime, batch: int) -> Select[Generation]:
    """Live jobs past their deadline (ix_generations_deadline) that no worker is stopping:
    queued ones, and running ones whose lease ran out."""
    return (
        select(Generation)
        .where(
            status_is(Generation.status, "queued", "processing"),
            Generation.deadline_at.is_not(None),
            Generation.deadline_at < now,
            (Generation.status == "queued")
            | and_(Generation.status == "processing", Generation.lease_expires_at < now),
        )
        .limit(batch)
    )


def expired_leases(now: dt.datetime, batch: int) -> Select[Generation]:
    """Running jobs whose worker stopped renewing the lease (ix_generations_active)."""
    return (
        select(Generation)
        .where(status_is(Generation.status, "processing"), Generation.lease_expires_at < now)
        .limit(batch)
    )


def reconcile(
    session: Session,
    *,
    settings: Settings,
    count_waiting: Callable[[str], int | None] | None = None,
    batch: int = 1000,
) -> Sweep:
    """One sweep. `count_waiting`: the generation messages waiting on a queue of the broker,
    where it can tell (`Dispatcher.waiting`); without it, every queued job whose last message
    is older than POSEGEN_REQUEUE_AFTER_SECONDS is published again."""
    now = utcnow()
    failed_models = _fail_past_deadline(session, now=now, batch=batch)
    republished = _republish(
        session, now=now, settings=settings, count_waiting=count_waiting, batch=batch
    )
    requeued = 0
    # The failures first: a refund locks the user's row, which must come before any turn
    # row a requeue locks (posegen.scheduler).
    expired = session.scalars(expired_leases(now, batch)).all()
    expired = sorted(expired, key=lambda job: job.attempts < settings.max_attempts)
    for job in expired:
        if job.attempts >= settings.max_attempts:
            done = lifecycle.fail(
                session,
                job_id=job.id,
                code="internal_error",
                message=f"The job was interrupted {job.attempts} times (worker lost); giving up.",
            )
            if done is not None:
                failed_models.append(job.model_key)
            continue
        back = lifecycle.requeue_expired(session, job_id=job.id, now=now, settings=settings)
        if back is not None:
            requeued += 1
    # After the refunds above (user rows) and before the repairs: routing locks turn rows.
    routed = routing.route_waiting(session, settings=settings, now=now, batch=batch)
    repaired = 0
    for user_id, model_id in scheduler.drifted(session):
        scheduler.repair(session, user_id=user_id, model_id=model_id)
        repaired += 1
    session.flush()
    return Sweep(
        republished=republished, requeued=requeued, failed_models=tuple(failed_models),
        repaired=repaired, routed=routed,
    )  # fmt: skip


def _fail_past_deadline(session: Session, *, now: dt.datetime, batch: int) -> list[str]:
    """Fail the jobs past their deadline that no worker stops; their models."""
    failed: list[str] = []
    for job in session.scalars(past_deadline(now, batch)).all():
        done = lifecycle.fail(
            session, job_id=job.id, code="deadline_exceeded", message=lifecycle.DEADLINE_MESSAGE
        )
        if done is not None:
            failed.append(job.model_key)
    return failed


def _republish(
    session: Session,
    *,
    now: dt.datetime,
    settings: Settings,
    count_waiting: Callable[[str], int | None] | None,
    batch: int,
) -> int:
    """Publish again the queued jobs whose message may be lost, model by model."""
    stale = now - dt.timedelta(seconds=settings.requeue_after_seconds)
    republished = 0
    for queue, queued_jobs in queued_by_queue(session).items():
        lost = batch
        if count_waiting is not None:
            try:
                waiting = count_waiting(queue)
            except Exception:  # the broker is unreachable: nothing could be published anyway
                log.warning("could not count the broker's messages", exc_info=True)
                return republished  # and the expired leases are still swept
            if waiting is not None:
                # A message can only be lost where the queued jobs outnumber the messages. By
                # age alone, a backlog older than the requeue age got up to `batch` duplicates
                # a sweep, each costing a worker a claim. The broker is counted after the jobs:
                # a job submitted in between makes this err towards publishing fewer, and only
                # a job claimed in between (a few a sweep) towards one more.
                lost = min(batch, queued_jobs - waiting)
        if lost <= 0:
            continue
        model_key = queue.removeprefix(f"{GENERATION_QUEUE}.")
        hosted = queue == REMOTE_QUEUE
        for job in session.scalars(stale_queued(stale, lost, model_key, hosted=hosted)).all():
            job.published_at = now
            defer(session, generate_message(job, settings))
            republished += 1
    return republished


def purge_expired_idempotency_keys(session: Session) -> int:
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow()))
    return int(result.rowcount)  # type: ignore[attr-defined]

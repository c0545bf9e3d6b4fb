"""The reconciler: the database is the truth, the broker is a hint that can be lost.

Swept by beat every POSEGEN_RECONCILE_INTERVAL seconds:
- queued jobs whose message may be lost (broker restart, crash between commit and publish)
  are published again: as many as the queued jobs outnumber the messages waiting on the
  broker, in run order (the head of the queue first);
- processing jobs whose lease ran out (their worker died) go back to the queue;
- jobs interrupted more times than the attempt limit fail, refunded.
A duplicate message is harmless: the worker's claim only takes a job that is queued.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from db.models import Generation, IdempotencyKey, status_is
from db.types import utcnow
from posegen import lifecycle
from posegen.jobs import QUEUE_ORDER
from posegen.queue import defer, generate_message
from posegen.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    republished: int
    requeued: int
    # The model of each job failed, for the job metrics (counted once the sweep commits).
    failed_models: tuple[str, ...] = ()

    @property
    def failed(self) -> int:
        return len(self.failed_models)

    def counts(self) -> dict[str, int]:
        return {"republished": self.republished, "requeued": self.requeued, "failed": self.failed}


def stale_queued(stale: dt.datetime, batch: int) -> Select[Generation]:
    """Queued jobs last published before `stale`, in run order (ix_generations_queue)."""
    return (
        select(Generation)
        .where(status_is(Generation.status, "queued"), Generation.published_at < stale)
        .order_by(*QUEUE_ORDER)
        .limit(batch)
    )


def queued_count() -> Select[int]:
    """How many jobs are queued (ix_generations_queue)."""
    return select(func.count()).where(status_is(Generation.status, "queued"))


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
    count_waiting: Callable[[], int | None] | None = None,
    batch: int = 1000,
) -> Sweep:
    """One sweep. `count_waiting`: the generation messages waiting on the broker, where it
    can tell (`Dispatcher.waiting`); without it, every queued job whose last message is older
    than POSEGEN_REQUEUE_AFTER_SECONDS is published again."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=settings.requeue_after_seconds)
    lost = batch
    if count_waiting is not None:
        queued_jobs = session.scalar(queued_count()) or 0
        try:
            waiting = count_waiting()
        except Exception:  # the broker is unreachable: nothing could be published anyway
            log.warning("could not count the broker's messages; none re-published", exc_info=True)
            waiting = queued_jobs  # and the expired leases below are still swept
        if waiting is not None:
            # A message can only be lost where the queued jobs outnumber the messages. By
            # age alone, a backlog older than the requeue age got up to `batch` duplicates a
            # sweep (120,000 an hour), each costing a worker a claim. The broker is counted
            # after the jobs: a job submitted in between makes this err towards publishing
            # fewer, and only a job claimed in between (a few a sweep) towards one more.
            lost = min(batch, queued_jobs - waiting)
    queued = session.scalars(stale_queued(stale, lost)).all() if lost > 0 else []
    for job in queued:
        job.published_at = now
        defer(session, generate_message(job, settings))

    expired = session.scalars(expired_leases(now, batch)).all()
    requeued = 0
    failed_models: list[str] = []
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
    session.flush()
    return Sweep(republished=len(queued), requeued=requeued, failed_models=tuple(failed_models))


def purge_expired_idempotency_keys(session: Session) -> int:
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow()))
    return int(result.rowcount)  # type: ignore[attr-defined]

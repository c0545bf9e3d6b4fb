"""A job's life: claim, heartbeat, complete, fail, release (the worker), cancel (the
caller), requeue (the reconciler). Every change of `generations.status` is here and nowhere
else (tests/test_layout.py holds it so).

Every transition is one conditional UPDATE, so a duplicate delivery, a canceled job or a
worker whose lease ran out changes nothing. The boundary (task, request) commits.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, true, update
from sqlalchemy.orm import Session, aliased

from db.models import AiModel, Generation, PoseTemplate
from db.types import utcnow
from posegen import credits, scheduler
from posegen.announce import announce
from posegen.queue import defer, generate_message
from posegen.settings import Settings

DEADLINE_MESSAGE = "The job did not complete within its deadline_seconds."


@dataclass(frozen=True)
class Claim:
    """A claimed job and what its run needs from the catalog: the model's pipeline and the
    pose template's keypoints (None without a template)."""

    job: Generation
    attempt: int
    family: str
    base_model: str
    controlnet_model: str
    pose_keypoints: list[Any] | None


# Claim and complete are most of what a worker does a job besides the model (bench.overhead
# --bookkeeping). Each UPDATE answers its row (RETURNING): no second statement reads it back,
# and the ORM makes no pass over the session's objects. The statements are built once, with
# bound parameters: building them was a third of the two transitions' CPU.
_RETURNING: dict[str, Any] = {"synchronize_session": False, "populate_existing": True}
# The job is still running on this worker (not canceled, not taken over): bind job_id, worker.
_OURS = (
    Generation.id == bindparam("job_id"),
    Generation.status == "processing",
    Generation.worker_id == bindparam("worker"),
)
_CLAIM_VALUES: dict[str, Any] = {
    "status": "processing",
    "worker_id": bindparam("worker"),
    "lease_expires_at": bindparam("lease_until"),
    "attempts": Generation.attempts + 1,
    "started_at": bindparam("now"),
    "progress_step": 0,
}
_CLAIM = (
    update(Generation)
    .where(Generation.id == bindparam("job_id"), Generation.status == "queued")
    .values(**_CLAIM_VALUES)
    .returning(Generation)
)
# A claim whose turn moved under it (scheduler.MOVED) runs again, this many times in all,
# before it goes on turn by turn.
_MOVED_TRIES = 3
# The claim in one statement (Postgres): the next turn, its head, the job claimed as _CLAIM
# does, the user's turns moved to the back (scheduler.left) and the catalog's row, all in one
# round trip. A row with no job: the turn's head was not free (the caller goes on turn by turn).
_CLAIMED = (
    update(Generation)
    # The head's id as a scalar subquery: the job by its key (a join to the CTE gets a
    # generic plan that hashes the whole table).
    .where(
        Generation.id == select(scheduler.HEAD.c.id).scalar_subquery(),
        Generation.status == "queued",
    )
    .values(**_CLAIM_VALUES)
    .returning(*Generation.__table__.c)
    .cte("claimed")
)
_CLAIMED_JOB = aliased(Generation, _CLAIMED)
_CLAIM_NEXT = (
    select(
        scheduler.NEXT_TURN.c.user_id,
        scheduler.NEXT_TURN.c.model_id,
        scheduler.MOVED,
        _CLAIMED_JOB,
        AiModel.family,
        AiModel.base_model,
        AiModel.controlnet_model,
        PoseTemplate.keypoints,
    )
    .select_from(scheduler.NEXT_TURN)
    .outerjoin(_CLAIMED, true())
    .outerjoin(AiModel, AiModel.id == _CLAIMED.c.model_id)
    .outerjoin(PoseTemplate, PoseTemplate.id == _CLAIMED.c.pose_template_id)
    .add_cte(*scheduler.moved_to_back(_CLAIMED))
)
# The model and the template in one statement: an outer join on the template's id, which
# matches nothing when the job has none.
_CATALOG = (
    select(AiModel.family, AiModel.base_model, AiModel.controlnet_model, PoseTemplate.keypoints)
    .outerjoin(PoseTemplate, PoseTemplate.id == bindparam("template_id"))
    .where(AiModel.id == bindparam("model_id"))
)
_COMPLETE = (
    update(Generation)
    .where(*_OURS)
    .values(
        status="completed",
        outputs=bindparam("done_outputs"),
        finished_at=bindparam("now"),
        lease_expires_at=None,
        # A fast job can finish before any heartbeat wrote progress: set it here.
        progress_step=bindparam("steps"),
        progress_total=bindparam("steps"),
    )
    .returning(Generation)
)

# The worker gives its job back (release), published again: bind job_id, worker, now.
_RELEASE = (
    update(Generation)
    .where(*_OURS)
    .values(status="queued", worker_id=None, lease_expires_at=None, published_at=bindparam("now"))
    .returning(Generation)
)
# The reconciler takes back a job whose lease ran out (requeue_expired): bind job_id, now.
_REQUEUE_EXPIRED = (
    update(Generation)
    .where(
        Generation.id == bindparam("job_id"),
        Generation.status == "processing",
        Generation.lease_expires_at < bindparam("now"),
    )
    .values(status="queued", worker_id=None, lease_expires_at=None, published_at=bindparam("now"))
    .returning(Generation)
)


def claim_next(
    session: Session,
    *,
    worker_id: str,
    models: Sequence[str],
    warm: Sequence[str] = (),
    lease_seconds: float,
    settings: Settings,
) -> Claim | None:
    """The next job by the scheduler's order among these models (ids), claimed for this
    worker; with `warm` (the models it holds loaded) first among the jobs of the highest
    priority waiting, unless another model's job has waited past POSEGEN_AFFINITY_MAX_WAIT.
    A job past its deadline is not taken (the reconciler fails it). None: nothing of these
    models is queued (or free to take)."""
    late = utcnow() - dt.timedelta(seconds=settings.affinity_max_wait)
    single = session.bind.dialect.name == "postgresql"  # type: ignore[union-attr]
    for choice in scheduler.preferred(session, served=models, warm=warm, overdue_before=late):
        skipped: list[scheduler.Turn] = []
        if single:
            for _ in range(_MOVED_TRIES):  # again, on a fresh snapshot, if the turn moved
                claimed, first, moved = _claim_first(session, choice, worker_id, lease_seconds)
                if not moved:
                    break
            if claimed is not None:
                return claimed
            if first is None:  # no turn of these models free to take
                continue
            skipped.append(first)  # its head is not free: on to the next turns, one by one
        while (turn := scheduler.next_turn(session, models=choice, skip=skipped)) is not None:
            job_id = scheduler.head_of(session, turn)
            if job_id is None:  # the count drifted, or a cancel holds the job: the next turn
                skipped.append(turn)
                continue
            claimed = claim(
                session, job_id=job_id, worker_id=worker_id, lease_seconds=lease_seconds
            )
            if claimed is None:
                skipped.append(turn)
                continue
            return claimed
    return None


def _claim_first(
    session: Session, models: Sequence[str], worker_id: str, lease_seconds: float
) -> tuple[Claim | None, scheduler.Turn | None, bool]:
    """The claim as one statement (pick, head, claim, turns, catalog): the claim, or None
    and the turn picked whose head was not free to take (None: no turn was free), and
    whether that turn had moved to the back (scheduler.MOVED: a concurrent claim took it)."""
    now = utcnow()
    params = {
        "models": list(models), "now": now, "worker": worker_id,
        "lease_until": now + dt.timedelta(seconds=lease_seconds),
    }  # fmt: skip
    row = session.execute(_CLAIM_NEXT, params, execution_options=_RETURNING).first()
    if row is None:
        return None, None, False
    user_id, model_id, moved, job, family, base_model, controlnet_model, keypoints = row
    if job is None:
        return None, scheduler.Turn(user_id=str(user_id), model_id=str(model_id)), bool(moved)
    announce(session, job, "started")
    claimed = Claim(
        job=job, attempt=job.attempts, family=family, base_model=base_model,
        controlnet_model=controlnet_model, pose_keypoints=keypoints,
    )  # fmt: skip
    return claimed, None, False


def claim(session: Session, *, job_id: str, worker_id: str, lease_seconds: float) -> Claim | None:
    """queued -> processing for this worker, or None (not queued: a duplicate, or canceled);
    the user's turn moves to the back."""
    now = utcnow()
    lease_until = now + dt.timedelta(seconds=lease_seconds)
    job = session.scalars(
        _CLAIM,
        {"job_id": job_id, "worker": worker_id, "lease_until": lease_until, "now": now},
        execution_options=_RETURNING,
    ).one_or_none()
    if job is None:
        return None
    scheduler.left(session, user_id=job.user_id, model_id=job.model_id, started=now)
    announce(session, job, "started")
    family, base_model, controlnet_model, keypoints = session.execute(
        _CATALOG, {"template_id": job.pose_template_id, "model_id": job.model_id}
    ).one()
    return Claim(
        job=job, attempt=job.attempts, family=family, base_model=base_model,
        controlnet_model=controlnet_model, pose_keypoints=keypoints,
    )  # fmt: skip


def heartbeat(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    step: int | None = None,
    total: int | None = None,
) -> bool:
    """Renew the lease and record progress. False: the job is no longer ours (canceled)."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + dt.timedelta(seconds=lease_seconds)}
    if step is not None:
        values["progress_step"] = step
    if total is not None:
        values["progress_total"] = total
    result = session.execute(
        update(Generation).where(*_OURS).values(**values),
        {"job_id": job_id, "worker": worker_id},
        execution_options={"synchronize_session": False},
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def complete(
    session: Session, *, job_id: str, worker_id: str, outputs: list[dict[str, Any]], steps: int
) -> Generation | None:
    """processing -> completed with its outputs; None if the job stopped being ours."""
    job = session.scalars(
        _COMPLETE,
        {
            "job_id": job_id,
            "worker": worker_id,
            "done_outputs": outputs,
            "steps": steps,
            "now": utcnow(),
        },
        execution_options=_RETURNING,
    ).one_or_none()
    if job is None:
        return None
    announce(session, job, "completed")
    return job


def fail(
    session: Session, *, job_id: str, code: str, message: str, worker_id: str | None = None
) -> Generation | None:
    """-> failed with an error, refunded once. `worker_id` None: fail from any live state."""
    values = {
        "error_code": code,
        "error_message": message[:2000],
        "finished_at": utcnow(),
        "lease_expires_at": None,
    }
    turn = None if worker_id is not None else _from_queued(session, job_id, "failed", values)
    changed = turn is not None
    if not changed:
        conditions = [Generation.id == job_id, Generation.status == "processing"]
        if worker_id is not None:
            conditions.append(Generation.worker_id == worker_id)
        result = session.execute(
            update(Generation).where(*conditions).values(status="failed", **values)
        )
        changed = result.rowcount == 1  # type: ignore[attr-defined]
    job = session.get_one(Generation, job_id, populate_existing=True)
    if job.status == "failed":
        # The refund is guarded by the ledger's unique key, and the event by the deliveries'
        # unique key: running this path twice changes nothing the second time.
        credits.refund(session, generation_id=job.id)
        announce(session, job, "failed")
    if turn is not None:
        scheduler.left(session, user_id=turn[0], model_id=turn[1])
    return job if changed else None


def release(
    session: Session, *, job_id: str, worker_id: str, settings: Settings
) -> Generation | None:
    """processing -> queued, published again once the caller commits: a retryable
    interruption (storage unreachable). The claim that takes it next counts its attempt, as
    for a job whose worker was lost; None if the job was no longer ours (canceled)."""
    params = {"job_id": job_id, "worker": worker_id, "now": utcnow()}
    return _queued_again(session, _RELEASE, params, settings)


def cancel(session: Session, *, job_id: str) -> Generation | None:
    """queued or processing -> canceled, refunded once; None if the job had ended already
    (the job, read again, is in the session either way)."""
    values = {"finished_at": utcnow(), "lease_expires_at": None}
    turn = _from_queued(session, job_id, "canceled", values)
    changed = turn is not None
    if not changed:
        result = session.execute(
            update(Generation)
            .where(Generation.id == job_id, Generation.status == "processing")
            .values(status="canceled", **values)
        )
        changed = result.rowcount == 1  # type: ignore[attr-defined]
    job = session.get_one(Generation, job_id, populate_existing=True)
    if not changed:
        return None
    credits.refund(session, generation_id=job.id)
    announce(session, job, "canceled")
    if turn is not None:
        scheduler.left(session, user_id=turn[0], model_id=turn[1])
    return job


def requeue_expired(
    session: Session, *, job_id: str, now: dt.datetime, settings: Settings
) -> Generation | None:
    """processing -> queued for a job whose lease ran out before `now` (its worker was lost),
    published again once the caller commits; None if it is no longer so (its worker renewed
    the lease, or it ended)."""
    return _queued_again(session, _REQUEUE_EXPIRED, {"job_id": job_id, "now": now}, settings)


def _from_queued(
    session: Session, job_id: str, status: str, values: dict[str, Any]
) -> tuple[str, str] | None:
    """queued -> an end (canceled, failed): the job's (user, model), whose turn counts one
    less once the caller has refunded it (`scheduler.left`: the user's row before the turn's,
    the order every transaction takes them in); None if the job was not queued."""
    row = session.execute(
        update(Generation)
        .where(Generation.id == job_id, Generation.status == "queued")
        .values(status=status, **values)
        .returning(Generation.user_id, Generation.model_id),
        execution_options={"synchronize_session": False},
    ).first()
    return None if row is None else (str(row[0]), str(row[1]))


def _queued_again(
    session: Session, statement: Any, params: dict[str, Any], settings: Settings
) -> Generation | None:
    """Run a processing -> queued UPDATE; the job, its message deferred to the commit, or
    None when its conditions no longer held."""
    job = session.scalars(statement, params, execution_options=_RETURNING).one_or_none()
    if job is not None:
        scheduler.joined(
            session, user_id=job.user_id, model_id=job.model_id, priority=job.priority,
            since=job.created_at,
        )  # fmt: skip
        defer(session, generate_message(job, settings))
        announce(session, job, "queued")
    return job

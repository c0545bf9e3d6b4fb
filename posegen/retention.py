"""What is kept of a job, and for how long: its inputs until it ends, its outputs until deleted.

A job's files live in storage: `inputs/<id>/...` (the photos, uploaded at submit),
`outputs/<id>/...` (written by the worker), `poses/<id>.png` (the skeleton the worker drew,
kept as long as the outputs) and, with `preview=true`, `previews/<id>.png` (the latest step
preview). The job's row says which of
them may still exist:
- a job that ended (completed, failed, canceled) keeps no inputs and no preview; a queued or
  processing one keeps them, since a job interrupted by a lost worker runs again from them;
- a deleted job (`DELETE /v1/generations/{id}`, or outputs older than
  POSEGEN_OUTPUT_RETENTION_DAYS) keeps no outputs either. It stays listed, with `deleted_at`
  and no outputs; its ledger entries and the rest of the row stay.

Storage takes no part in a transaction, so the intent is committed first and the files are
removed after it; `purged_at` is set once they are gone. A finished job with `purged_at` NULL
still has files to remove: the worker purges a job right after recording its end, the API right
after a delete, and beat's `sweep` takes whatever a crash or a storage outage left behind.
Removing a file that is already gone is no error, so each step can run again.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import TERMINAL_STATUSES, Generation, User, status_is
from db.types import utcnow
from posegen import jobs
from posegen.errors import AlreadyFinished
from posegen.settings import Settings
from posegen.storage import Storage
from posegen.storage.keys import pose_key, preview_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deleted:
    job: Generation
    canceled: bool  # it was still queued or processing: canceled (and refunded) first


def delete(session: Session, *, job_id: str, user: User) -> Deleted:
    """Mark the caller's job deleted, canceling it first if it still runs. Deleting a deleted
    job changes nothing. The files go once this commits (`purge`)."""
    job = jobs.get_for_user(session, job_id=job_id, user=user)
    canceled = False
    if job.status not in TERMINAL_STATUSES:
        try:
            job = jobs.cancel(session, job_id=job_id, user=user)
            canceled = True
        except AlreadyFinished:  # it ended in the meantime: delete it as it is
            pass
    now = utcnow()
    session.execute(
        update(Generation)
        .where(Generation.id == job.id, Generation.deleted_at.is_(None))
        .values(deleted_at=now, purged_at=None),
        execution_options={"synchronize_session": False},
    )
    session.refresh(job)
    return Deleted(job=job, canceled=canceled)


def purge(session: Session, *, storage: Storage, job_id: str) -> bool:
    """Remove the files a finished job no longer keeps and record it; False when there was
    nothing to do (the job runs, was purged already, or another sweep holds it). The caller
    commits. The row stays locked while its files are removed, so two sweeps do not both
    remove them, and a delete meanwhile waits for the record rather than being lost."""
    row = session.execute(
        select(
            Generation.status,
            Generation.deleted_at,
            Generation.purged_at,
            Generation.input_key,
            Generation.pose_image_key,
            Generation.outputs,
            Generation.params,
        )
        .where(Generation.id == job_id)
        .with_for_update(skip_locked=True)
    ).one_or_none()
    if row is None or row.status not in TERMINAL_STATUSES or row.purged_at is not None:
        return False
    keys = [row.input_key, row.pose_image_key]
    if row.params.get("preview"):
        keys.append(preview_key(job_id))
    if row.deleted_at is not None:
        keys += [out["key"] for out in row.outputs] + [pose_key(job_id)]
    for key in keys:
        if key:
            storage.delete(key)
    values: dict[str, object] = {"purged_at": utcnow()}
    if row.deleted_at is not None:
        values["outputs"] = []  # their keys are kept until the files are gone
    session.execute(
        update(Generation).where(Generation.id == job_id).values(**values),
        execution_options={"synchronize_session": False},
    )
    return True


def purge_now(sessions: sessionmaker[Session], *, storage: Storage, job_id: str) -> bool:
    """`purge` in a transaction of its own, right after the commit that ended or deleted the
    job. Best effort: a failure (storage down) is logged, and the sweep retries."""
    try:
        with sessions.begin() as session:
            return purge(session, storage=storage, job_id=job_id)
    except Exception:
        log.warning("removing a job's files failed; the sweep retries", exc_info=True,
                    extra={"job_id": job_id})  # fmt: skip
        return False


def unpurged(batch: int) -> Select[str]:
    """Finished jobs with files still to remove, oldest first (ix_generations_unpurged)."""
    return (
        select(Generation.id)
        .where(status_is(Generation.status, *TERMINAL_STATUSES), Generation.purged_at.is_(None))
        .order_by(Generation.finished_at)
        .limit(batch)
    )


def expired_outputs(cutoff: dt.datetime, batch: int) -> Select[str]:
    """Completed jobs still keeping outputs that finished before `cutoff`, oldest first
    (ix_generations_kept_outputs)."""
    return (
        select(Generation.id)
        .where(
            status_is(Generation.status, "completed"),
            Generation.deleted_at.is_(None),
            Generation.finished_at < cutoff,
        )
        .order_by(Generation.finished_at)
        .limit(batch)
    )


def expire_outputs(session: Session, *, retention_days: int, batch: int) -> int:
    """Mark up to `batch` jobs whose outputs are older than the retention deleted (their
    files go with the next purge); how many. The caller commits."""
    now = utcnow()
    cutoff = now - dt.timedelta(days=retention_days)
    ids = session.scalars(expired_outputs(cutoff, batch)).all()
    if not ids:
        return 0
    result = session.execute(
        update(Generation)
        .where(Generation.id.in_(ids), Generation.deleted_at.is_(None))
        .values(deleted_at=now, purged_at=None),
        execution_options={"synchronize_session": False},
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Sweep:
    expired: int  # jobs whose outputs' retention ran out, now deleted
    purged: int  # jobs whose files were removed
    failed: int  # jobs whose files could not be removed (left for the next sweep)

    def counts(self) -> dict[str, int]:
        return {"expired": self.expired, "purged": self.purged, "failed": self.failed}


def sweep(
    sessions: sessionmaker[Session],
    *,
    storage: Storage,
    settings: Settings,
    batch: int = 200,
    budget_seconds: float = 60.0,
) -> Sweep:
    """One run of beat's storage sweep: expire outputs past their retention, then remove the
    files of every finished job that still has some, a batch (and a transaction a job) at a
    time, until none is left, a batch removes nothing (storage down: the next run retries) or
    the run has taken `budget_seconds` (a backlog is taken over several runs)."""
    started = time.monotonic()
    expired = purged = failed = 0
    while time.monotonic() - started < budget_seconds:
        if settings.output_retention_days is not None:
            with sessions.begin() as session:
                expired += expire_outputs(
                    session, retention_days=settings.output_retention_days, batch=batch
                )
        with sessions() as session:
            ids = session.scalars(unpurged(batch)).all()
        removed, errors = _purge_each(sessions, storage=storage, ids=ids)
        purged, failed = purged + removed, failed + errors
        if len(ids) < batch or removed == 0:
            break
    return Sweep(expired=expired, purged=purged, failed=failed)


def _purge_each(
    sessions: sessionmaker[Session], *, storage: Storage, ids: Sequence[str]
) -> tuple[int, int]:
    """Purge each job in a transaction of its own: (purged, failed). One that fails is
    skipped, so it cannot hold up the others; only the first failure is logged in full (a
    storage outage fails them all)."""
    removed = errors = 0
    for job_id in ids:
        try:
            with sessions.begin() as session:
                removed += purge(session, storage=storage, job_id=job_id)
        except Exception:
            errors += 1
            log.warning("removing a job's files failed; the next sweep retries",
                        exc_info=errors == 1, extra={"job_id": job_id})  # fmt: skip
    return removed, errors

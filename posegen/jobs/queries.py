"""What reads jobs: one job, a page of them, a queued job's position and ETA, and the job's
JSON with both. The position and the run-time estimate behind the ETA are cached per process
for a second or a few; the poll (`api/poll.py`) reads through the same caches."""

from __future__ import annotations

import base64
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Select,
    and_,
    bindparam,
    literal_column,
    or_,
    select,
)
from sqlalchemy.orm import Session

from db.fast import DriverQuery
from db.models import TERMINAL_STATUSES, Generation, User, status_is
from posegen import catalog, scheduler
from posegen.errors import InvalidRequest, NotFound
from posegen.render import POSITION_CAP, render_job

# -- one job -------------------------------------------------------------------------------


def get_for_user(session: Session, *, job_id: str, user: User) -> Generation:
    job = session.get(Generation, job_id) if catalog.is_uuid(job_id) else None
    # Another user's job is indistinguishable from a missing one.
    if job is None or job.user_id != user.id:
        raise NotFound(f"No generation {job_id!r}.")
    return job


def output_key(session: Session, *, job_id: str, index: int, user: User) -> str:
    job = get_for_user(session, job_id=job_id, user=user)
    for out in [] if job.deleted_at else job.outputs:
        if out["index"] == index:
            return str(out["key"])
    raise NotFound(f"Generation {job_id} has no output {index}.")


# -- a page of jobs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    items: list[Generation]
    next_cursor: str | None


def list_for_user(
    session: Session, *, user: User, status: str | None, limit: int, cursor: str | None
) -> Page:
    rows = list(session.scalars(list_statement(user.id, status=status, limit=limit, cursor=cursor)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return Page(items=rows[:limit], next_cursor=next_cursor)


def list_statement(
    user_id: str, *, status: str | None, limit: int, cursor: str | None
) -> Select[Generation]:
    """A user's jobs, newest first, one more than `limit` (to know whether a page follows)."""
    stmt = select(Generation).where(Generation.user_id == user_id)
    if status:
        statuses = [s.strip() for s in status.split(",") if s.strip()]
        unknown = set(statuses) - {"queued", "processing", *TERMINAL_STATUSES}
        if unknown:
            raise InvalidRequest(f"Unknown status {sorted(unknown)[0]!r}.")
        stmt = stmt.where(Generation.status.in_(statuses))
    if cursor:
        created_at, last_id = _decode_cursor(cursor)
        # The first condition is implied by the second; it is what starts the index scan at
        # the cursor (Postgres takes no bound from the OR, and read every newer job first).
        stmt = stmt.where(
            Generation.created_at <= created_at,
            or_(
                Generation.created_at < created_at,
                and_(Generation.created_at == created_at, Generation.id < last_id),
            ),
        )
    return stmt.order_by(Generation.created_at.desc(), Generation.id.desc()).limit(limit + 1)


def encode_cursor(job: Generation) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, job_id = raw.partition("|")
        created_at = dt.datetime.fromisoformat(created)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("Invalid cursor.") from None
    if not catalog.is_uuid(job_id) or created_at.tzinfo is None:
        raise InvalidRequest("Invalid cursor.")
    return created_at, job_id


# -- queue position ------------------------------------------------------------------------

# The queue's order as the index `ix_generations_queue` spells it, priority high to low, then
# oldest (a literal 9, not a bound parameter, so the planner matches the indexed expression):
# how the reconciler re-publishes a backlog, head first. Within a priority the scheduler's
# turns decide (posegen.scheduler).
QUEUE_ORDER: tuple[Any, ...] = (literal_column("9 - generations.priority"), Generation.created_at)
POSITION = DriverQuery(scheduler.POSITION)


def queue_position(session: Session, job: Generation) -> int | None:
    """How many queued jobs will start before this one if nothing else arrived (0: next),
    counted up to POSITION_CAP (`posegen.scheduler`)."""
    if job.status != "queued":
        return None
    return capped(session.scalar(scheduler.POSITION, scheduler.position_params(job)))


def capped(ahead: int | None) -> int:
    return min(int(ahead or 0), POSITION_CAP)


# -- ETA -----------------------------------------------------------------------------------

# Per model: when its median run time was read, and the median (None: no history yet).
_RUN_SECONDS: dict[str, tuple[float, float | None]] = {}
RUN_SECONDS_TTL = 5.0
RUN_TIME_SAMPLE = 20


def recent_runs(model_key: Any) -> Select[dt.datetime | None, dt.datetime | None]:
    """A model's latest completed jobs (ix_generations_model_finished)."""
    return (
        select(Generation.started_at, Generation.finished_at)
        .where(Generation.model_key == model_key, status_is(Generation.status, "completed"))
        .order_by(Generation.finished_at.desc())
        .limit(RUN_TIME_SAMPLE)
    )


RECENT_RUNS = DriverQuery(recent_runs(bindparam("model_key")))


def cached_run_seconds(model_key: str) -> tuple[float, float | None] | None:
    """(when read, median run time) while younger than RUN_SECONDS_TTL, else None: the
    caller reads `RECENT_RUNS` and hands the rows to `remember_run_seconds`."""
    cached = _RUN_SECONDS.get(model_key)
    if cached is not None and time.monotonic() - cached[0] < RUN_SECONDS_TTL:
        return cached
    return None


def remember_run_seconds(model_key: str, rows: Any) -> float | None:
    durations = sorted(
        (finished - started).total_seconds() for started, finished in rows if started and finished
    )
    value = durations[len(durations) // 2] if durations else None
    _RUN_SECONDS[model_key] = (time.monotonic(), value)
    return value


def recent_run_seconds(db: Session | Connection, model_key: str) -> float | None:
    """Median run time of the model's latest completed jobs, for the ETA. An estimate, so
    each process keeps it for a few seconds instead of asking on every poll, "no history yet"
    (None) included: a model whose first job is still running would otherwise cost every
    poll of its queue a second query."""
    cached = cached_run_seconds(model_key)
    if cached is not None:
        return cached[1]
    rows = db.execute(RECENT_RUNS.statement, {"model_key": model_key}).all()
    return remember_run_seconds(model_key, rows)


def eta(per_job: float | None, position: int | None) -> float | None:
    """Seconds until a queued job finishes: the jobs ahead and itself, at the recent pace."""
    if per_job is None or position is None:
        return None
    return round(per_job * (position + 1), 3)


# -- the job's JSON ------------------------------------------------------------------------


def job_json(session: Session, job: Generation) -> dict[str, Any]:
    """The contract's job object (also the `data` of webhook events)."""
    position = queue_position(session, job)
    per_job = recent_run_seconds(session, job.model_key) if position is not None else None
    return render_job(job, queue_position=position, eta_seconds=eta(per_job, position))

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
    Integer,
    Select,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from db.fast import DriverQuery
from db.models import TERMINAL_STATUSES, Generation, User, status_is
from posegen import catalog
from posegen.errors import InvalidRequest, NotFound
from posegen.render import POSITION_CAP, render_job

# -- one job -------------------------------------------------------------------------------


def get_for_user(session: Session, *, job_id: str, user: User) -> Generation:
    job = session.get(Generation, job_id) if catalog.is_uuid(job_id) else None
    # Another user's job is indistinguishable from a missing one.
    if job is None or job.user_id != user.id:
        raise NotFound(f"No generation {job_id!r}.")
    return job


def output_key(session: Session, *, job_id: str, index: int, user: User) -> tuple[str, str]:
    """The storage key of the caller's output and its content type."""
    job = get_for_user(session, job_id=job_id, user=user)
    for out in [] if job.deleted_at else job.outputs:
        if out["index"] == index:
            return str(out["key"]), str(out.get("content_type", "image/png"))
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

# The queue's run order as the index `ix_generations_queue` spells it (a literal 9, not a bound
# parameter, so the planner matches the indexed expression).
QUEUE_ORDER: tuple[Any, ...] = (literal_column("9 - generations.priority"), Generation.created_at)
# A position is counted up to POSITION_CAP (posegen.render) and reported as the cap beyond.
# Even the capped count reads POSITION_CAP index entries for a job deep in a long queue
# (measurable on every poll of a long queue: `python -m bench.scale`). So each process
# remembers, for a second, where the queue's POSITION_CAP-th job stands (the cut-off): a job
# behind it has POSITION_CAP or more ahead and is answered without counting. Jobs before it
# are counted exactly. A job the queue moved past the cut-off within the second still reads
# as capped until the next refresh.
CUTOFF_TTL = 1.0


def count_ahead(order: Any, created_at: Any) -> Any:
    """SQL: how many queued jobs run before one at (order, created_at), read in run order
    through `ix_generations_queue` (the table itself, never an alias), up to POSITION_CAP in
    each of two parts (the caller caps the sum: `capped`).

    The parts are the jobs of higher priority, then the older ones of the same priority. Each
    bounds its index scan where it must stop, so a job near the head reads as many entries as it
    has jobs ahead. A single row comparison, `(9 - priority, created_at) < (order, created_at)`,
    does not stop a Postgres 15 index scan at the job: it read the whole queue for a job near
    its head (`bench.scale`). Behind the cut-off (the `cutoff_order` and `cutoff_created_at`
    parameters, NULL when fewer than POSITION_CAP jobs are queued), POSITION_CAP without reading
    the queue."""
    queue_order = QUEUE_ORDER[0]
    queued = Generation.__table__

    def capped_count(*where: Any, order_by: Any) -> Any:
        # ORDER BY the index's order, so the planner never prefers scanning the table for
        # the first rows that match (with most rows queued, a LIMIT makes that look cheap).
        ahead = (
            select(literal_column("1"))
            .select_from(queued)
            .where(status_is(Generation.status, "queued"), *where)
            .correlate_except(queued)
            .order_by(*order_by)
            .limit(POSITION_CAP)
            .subquery()
        )
        return select(func.count()).select_from(ahead).scalar_subquery()

    counted = capped_count(queue_order < order, order_by=QUEUE_ORDER) + capped_count(
        queue_order == order, Generation.created_at < created_at, order_by=QUEUE_ORDER[1:]
    )
    cutoff = tuple_(
        bindparam("cutoff_order", type_=Integer),
        bindparam("cutoff_created_at", type_=Generation.__table__.c.created_at.type),
    )
    return case(
        (tuple_(order, created_at) > cutoff, literal_column(str(POSITION_CAP), Integer)),
        else_=counted,
    )


AHEAD = select(
    count_ahead(
        bindparam("order", type_=Integer),
        bindparam("created_at", type_=Generation.__table__.c.created_at.type),
    )
)

CUTOFF = DriverQuery(
    select(literal_column("9 - generations.priority", Integer), Generation.created_at)
    .select_from(Generation.__table__)
    .where(status_is(Generation.status, "queued"))
    .order_by(*QUEUE_ORDER)
    .offset(POSITION_CAP - 1)
    .limit(1)
)
_CUTOFF_CACHE: dict[str, Any] = {}
NO_CUTOFF = {"cutoff_order": None, "cutoff_created_at": None}


def cached_cutoff() -> dict[str, Any] | None:
    """This process's cut-off parameters, or None when the caller is to read them afresh
    (`CUTOFF`, then `remember_cutoff`). Once they are CUTOFF_TTL old, the first caller to see
    it refreshes them and the callers meanwhile use the old ones."""
    params: dict[str, Any] | None = _CUTOFF_CACHE.get("params")
    if params is not None and time.monotonic() - _CUTOFF_CACHE["at"] >= CUTOFF_TTL:
        _CUTOFF_CACHE["at"] = time.monotonic()
        return None
    return params


def remember_cutoff(row: Any) -> dict[str, Any]:
    """The cut-off parameters of `CUTOFF`'s row, kept for CUTOFF_TTL."""
    params = NO_CUTOFF if row is None else {"cutoff_order": row[0], "cutoff_created_at": row[1]}
    _CUTOFF_CACHE.update(at=time.monotonic(), params=params)
    return params


def queue_cutoff(db: Session | Connection) -> dict[str, Any]:
    """The cut-off parameters of `count_ahead`, read again every CUTOFF_TTL seconds."""
    return cached_cutoff() or remember_cutoff(db.execute(CUTOFF.statement).first())


def queue_position(session: Session, job: Generation) -> int | None:
    """How many queued jobs will start before this one (0: next), counted up to POSITION_CAP."""
    if job.status != "queued":
        return None
    params = {"order": 9 - job.priority, "created_at": job.created_at}
    return capped(session.scalar(AHEAD, params | queue_cutoff(session)))


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

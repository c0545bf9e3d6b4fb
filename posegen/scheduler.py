"""Who runs next, and how much may wait.

The order: a higher model priority first; within a priority, users with queued jobs take
turns, the next job going to the user whose latest job started longest ago (never: first; ties
by the oldest queued job); FIFO within a user. The database decides: a generation message only
says "a job of model M is ready", and the worker that takes it claims the best queued job of
the models it serves (`pick`, then `lifecycle.claim`).

The state is `queue_turns` (one row per user and model with how many jobs are queued, since
when the oldest waits, and when the user's latest job started) and `user_turns` (that last
start per user). The claim reads the first turn in order from an index of the rows with
queued jobs, then that turn's oldest job: its cost stays flat with the queue's length and the
number of users waiting. Rows a concurrent claim holds are skipped (`SKIP LOCKED`), so
claimers take different users' turns.
`joined` and `left` keep the rows in step with the jobs; posegen.lifecycle calls them in the
transaction that changes a job's status, and the reconciler repairs a row that drifted
(`repair`).

Locks are taken in one order everywhere, the user's row (a charge, a refund) before a turn
row, and a claim never takes the user's row (`user_turns` is its own), so that a submit, a
claim and a cancel of the same user's jobs never wait for each other in a circle.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Integer,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import NEVER_STARTED, Generation, QueueTurn, User, UserTurn, status_is
from db.types import utcnow
from posegen.errors import Overloaded, QueueFull
from posegen.render import POSITION_CAP
from posegen.settings import Settings

_TURNS = QueueTurn.__table__
# The turns with queued jobs, the predicate of the partial indexes on `queue_turns`: written
# into the SQL, not bound, so that a prepared statement's plan can use them (db.models.status_is).
_WAITING = QueueTurn.queued > literal_column("0", Integer)
_JOBS = Generation.__table__


# -- keeping the turns in step -------------------------------------------------------------


def _insert(session: Session, table: Any) -> Any:
    """INSERT with ON CONFLICT, in the session's dialect (Postgres, or SQLite embedded)."""
    dialect = session.bind.dialect.name  # type: ignore[union-attr]
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def joined(
    session: Session, *, user_id: str, model_id: str, priority: int, since: dt.datetime
) -> None:
    """A job of this user and model entered the queue (submitted, or given back to it)."""
    insert = _insert(session, QueueTurn)
    last_start = func.coalesce(
        select(UserTurn.last_started_at).where(UserTurn.user_id == user_id).scalar_subquery(),
        NEVER_STARTED,
    )
    statement = insert.values(
        user_id=user_id,
        model_id=model_id,
        priority=priority,
        queued=1,
        waiting_since=since,
        last_started_at=last_start,
    ).on_conflict_do_update(
        index_elements=[QueueTurn.user_id, QueueTurn.model_id],
        set_={
            "queued": QueueTurn.queued + 1,
            "priority": insert.excluded.priority,
            "last_started_at": insert.excluded.last_started_at,
            "waiting_since": case(
                (QueueTurn.queued == 0, insert.excluded.waiting_since),
                (
                    QueueTurn.waiting_since > insert.excluded.waiting_since,
                    insert.excluded.waiting_since,
                ),
                else_=QueueTurn.waiting_since,
            ),
        },
    )
    session.execute(statement)


# The oldest job this turn still has queued (ix_generations_turn), after one left.
_OLDEST_QUEUED = (
    select(func.min(Generation.created_at))
    .where(
        status_is(Generation.status, "queued"),
        Generation.user_id == bindparam("turn_user"),
        Generation.model_id == bindparam("turn_model"),
    )
    .scalar_subquery()
)
_LEFT = (
    update(QueueTurn)
    .where(
        QueueTurn.user_id == bindparam("turn_user"), QueueTurn.model_id == bindparam("turn_model")
    )
    .values(
        # Never below zero: a row that drifted is repaired, not a transition refused.
        queued=case((_WAITING, QueueTurn.queued - 1), else_=0),
        waiting_since=func.coalesce(_OLDEST_QUEUED, QueueTurn.waiting_since),
    )
)


def left(
    session: Session, *, user_id: str, model_id: str, started: dt.datetime | None = None
) -> None:
    """A job of this user and model left the queue (after its status changed): claimed
    (`started`: the user's turn moves to the back), canceled or failed while queued."""
    params = {"turn_user": user_id, "turn_model": model_id}
    session.execute(_LEFT, params, execution_options={"synchronize_session": False})
    if started is not None:
        insert = _insert(session, UserTurn)
        session.execute(
            insert.values(user_id=user_id, last_started_at=started).on_conflict_do_update(
                index_elements=[UserTurn.user_id],
                set_={"last_started_at": insert.excluded.last_started_at},
            )
        )
        # The copy on each of the user's turns, for the claim's index. A turn another
        # transaction holds (a claim or a submit of the same user) is skipped rather than
        # waited for, which could deadlock two claims; it keeps an older start (a turn a
        # little early) until its next claim or submit copies the value again.
        others = (
            select(QueueTurn.model_id)
            .where(QueueTurn.user_id == user_id)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        session.execute(
            update(QueueTurn)
            .where(QueueTurn.user_id == user_id, QueueTurn.model_id.in_(others))
            .values(last_started_at=started),
            execution_options={"synchronize_session": False},
        )


def repair(session: Session, *, user_id: str, model_id: str) -> None:
    """Count a turn's queued jobs again, under the turn row's lock (a submit or a cancel of
    this turn waits for it meanwhile)."""
    locked = session.scalar(
        select(QueueTurn.queued)
        .where(QueueTurn.user_id == user_id, QueueTurn.model_id == model_id)
        .with_for_update()
    )
    if locked is None:
        return
    queued = session.scalar(
        select(func.count()).where(
            status_is(Generation.status, "queued"),
            Generation.user_id == user_id,
            Generation.model_id == model_id,
        )
    )
    session.execute(
        update(QueueTurn)
        .where(QueueTurn.user_id == user_id, QueueTurn.model_id == model_id)
        .values(
            queued=queued, waiting_since=func.coalesce(_OLDEST_QUEUED, QueueTurn.waiting_since)
        ),
        {"turn_user": user_id, "turn_model": model_id},
        execution_options={"synchronize_session": False},
    )


def drifted(session: Session, *, limit: int = 100) -> list[tuple[str, str]]:
    """Turns whose count disagrees with the jobs: queued jobs without a counted turn (they
    would never be picked) or a count with no job behind it. Read without locks, so a
    transition in flight can show up here; `repair` settles it under the lock."""
    counted = (
        select(
            Generation.user_id.label("user_id"),
            Generation.model_id.label("model_id"),
            func.count().label("jobs"),
        )
        .where(status_is(Generation.status, "queued"))
        .group_by(Generation.user_id, Generation.model_id)
        .subquery()
    )
    missing = (
        select(counted.c.user_id, counted.c.model_id)
        .outerjoin(
            QueueTurn,
            and_(QueueTurn.user_id == counted.c.user_id, QueueTurn.model_id == counted.c.model_id),
        )
        .where(func.coalesce(QueueTurn.queued, 0) != counted.c.jobs)
    )
    stale = (
        select(QueueTurn.user_id, QueueTurn.model_id)
        .outerjoin(
            counted,
            and_(QueueTurn.user_id == counted.c.user_id, QueueTurn.model_id == counted.c.model_id),
        )
        .where(_WAITING, counted.c.jobs.is_(None))
    )
    rows = session.execute(missing.union(stale).limit(limit)).all()
    return [(str(u), str(m)) for u, m in rows]


# -- limits --------------------------------------------------------------------------------


def _model_lock(session: Session, model_id: str) -> None:
    """Serialise submits to one model until they commit, so that the depth they read is
    exact. SQLite serialises every write transaction already."""
    if session.bind.dialect.name == "postgresql":  # type: ignore[union-attr]
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"queue:{model_id}"}
        )


def check_depth(
    session: Session, *, model_id: str, model_key: str, settings: Settings, retry_after: int
) -> None:
    """503 `overloaded` when the model's queue is at POSEGEN_MAX_QUEUE_DEPTH. Taken before the
    job joins its turn, and held (the lock) until the submit commits."""
    limit = settings.max_queue_depth
    if not limit:
        return
    _model_lock(session, model_id)
    depth = session.scalar(
        select(func.coalesce(func.sum(QueueTurn.queued), 0)).where(
            QueueTurn.model_id == model_id, _WAITING
        )
    )
    if int(depth or 0) >= limit:
        raise Overloaded(
            f"The queue of {model_key!r} is full ({limit} jobs); retry later.",
            retry_after=retry_after,
        )


def check_user_queue(session: Session, *, user: User, settings: Settings, retry_after: int) -> None:
    """429 `queue_full` when the user has as many queued jobs as the tier allows, counting the
    job being submitted. Exact when the caller holds the user's row (the charge locks it)."""
    limit = settings.max_queued_per_user.get(user.tier, 0)
    if not limit:
        return
    queued = session.scalar(
        select(func.coalesce(func.sum(QueueTurn.queued), 0)).where(QueueTurn.user_id == user.id)
    )
    if int(queued or 0) > limit:
        raise QueueFull(
            f"You have {limit} queued jobs, the most your tier ({user.tier}) may queue; "
            "retry when one has started.",
            retry_after=retry_after,
        )


def retry_after(run_seconds: float | None) -> int:
    """Retry-After for a refused submit: about one job's run time, at least a second."""
    return max(1, math.ceil(run_seconds or 5))


# -- the pick ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    user_id: str
    model_id: str


def _turn_order(models: Sequence[str], skip: Sequence[Turn]) -> Any:
    statement = (
        select(QueueTurn.user_id, QueueTurn.model_id)
        .where(_WAITING, QueueTurn.model_id.in_(list(models)))
        .order_by(  # ix_queue_turns_next
            QueueTurn.priority.desc(),
            QueueTurn.last_started_at,
            QueueTurn.waiting_since,
        )
        .limit(1)
        .with_for_update(of=QueueTurn, skip_locked=True)
    )
    for turn in skip:
        statement = statement.where(
            or_(QueueTurn.user_id != turn.user_id, QueueTurn.model_id != turn.model_id)
        )
    return statement


# A job past its deadline is not taken: the reconciler fails it (a claim holding the turn row
# must not wait for the user's row, which the refund locks).
_TURN_HEAD = (
    select(Generation.id)
    .where(
        status_is(Generation.status, "queued"),
        Generation.user_id == bindparam("turn_user"),
        Generation.model_id == bindparam("turn_model"),
        or_(Generation.deadline_at.is_(None), Generation.deadline_at > bindparam("now")),
    )
    .order_by(Generation.created_at)
    .limit(1)
    .with_for_update(skip_locked=True)
)


def next_turn(session: Session, *, models: Sequence[str], skip: Sequence[Turn] = ()) -> Turn | None:
    """The turn whose job runs next among these models (ids), locked until the caller's
    transaction ends; None when none of them has a queued job free to take."""
    if not models:
        return None
    row = session.execute(_turn_order(models, skip)).first()
    return None if row is None else Turn(user_id=str(row[0]), model_id=str(row[1]))


def head_of(session: Session, turn: Turn) -> str | None:
    """The oldest queued job of a turn, locked; None when it has none free (a concurrent
    cancel holds it, the rest are past their deadline, or the count drifted)."""
    params = {"turn_user": turn.user_id, "turn_model": turn.model_id, "now": utcnow()}
    job_id = session.scalar(_TURN_HEAD, params)
    return None if job_id is None else str(job_id)


def claimable(session: Session, *, model_id: str) -> bool:
    """Whether a job of this model is queued and not past its deadline, locked or not: a
    claim that found none free (another claimer held the turns) must not drop the message
    that stands for it."""
    job = (
        select(literal_column("1"))
        .select_from(_JOBS)
        .where(
            status_is(Generation.status, "queued"),
            Generation.user_id == QueueTurn.user_id,
            Generation.model_id == QueueTurn.model_id,
            or_(Generation.deadline_at.is_(None), Generation.deadline_at > utcnow()),
        )
        .correlate(_TURNS)
        .exists()
    )
    found = session.scalar(
        select(literal_column("1"))
        .select_from(_TURNS)
        .where(QueueTurn.model_id == model_id, _WAITING, job)
        .limit(1)
    )
    return found is not None


def overdue(session: Session, *, models: Sequence[str], before: dt.datetime) -> bool:
    """Whether a job of one of these models has waited since before `before`."""
    if not models:
        return False
    found = session.scalar(
        select(literal_column("1"))
        .select_from(_TURNS)
        .where(
            _WAITING,
            QueueTurn.model_id.in_(list(models)),
            QueueTurn.waiting_since < before,
        )
        .limit(1)
    )
    return found is not None


def preferred(
    *, served: Sequence[str], warm: Sequence[str], overdue_cold: bool
) -> list[Sequence[str]]:
    """The model sets to pick from, in turn: the warm ones first unless a cold model's job
    is overdue (POSEGEN_AFFINITY_MAX_WAIT), then every served model."""
    warm_served = [m for m in served if m in warm]
    if not warm_served or len(warm_served) == len(served) or overdue_cold:
        return [served]
    return [warm_served, served]


# -- position ------------------------------------------------------------------------------


def _position_statement() -> Any:
    """How many queued jobs start before a job of user `user_id`, priority `priority`,
    submitted at `created_at`, if nothing else arrived: every job of a higher priority, the
    user's own older jobs (k of them), and of each other user V with n_V jobs at this
    priority, min(n_V, k) from the turns before this job's, plus one more when V's turn comes
    before the user's in the round this job starts in. Counts stop at POSITION_CAP."""
    u: Any = bindparam("user_id", type_=QueueTurn.__table__.c.user_id.type)
    p: Any = bindparam("priority", type_=Integer)
    c: Any = bindparam("created_at", type_=Generation.__table__.c.created_at.type)
    order: Any = literal_column("9 - generations.priority")

    def capped_count(*where: Any, order_by: Sequence[Any]) -> Any:
        rows = (
            select(literal_column("1"))
            .select_from(_JOBS)
            .where(status_is(Generation.status, "queued"), *where)
            .order_by(*order_by)
            .limit(POSITION_CAP)
            .subquery()
        )
        return select(func.count().label("n")).select_from(rows)

    higher = capped_count(order < 9 - p, order_by=(order, Generation.created_at)).cte("higher")
    mine = capped_count(
        Generation.user_id == u, Generation.priority == p, Generation.created_at < c,
        order_by=(Generation.created_at,),
    ).cte("mine")  # fmt: skip
    me = select(
        select(UserTurn.last_started_at).where(UserTurn.user_id == u).scalar_subquery().label("ls"),
        select(func.min(QueueTurn.waiting_since))
        .where(QueueTurn.user_id == u, QueueTurn.priority == p, _WAITING)
        .scalar_subquery()
        .label("ws"),
    ).cte("me")
    others = (
        select(
            func.sum(QueueTurn.queued).label("n"),
            func.min(QueueTurn.waiting_since).label("ws"),
            UserTurn.last_started_at.label("ls"),
        )
        .outerjoin(UserTurn, UserTurn.user_id == QueueTurn.user_id)
        .where(QueueTurn.priority == p, _WAITING, QueueTurn.user_id != u)
        .group_by(QueueTurn.user_id, UserTurn.last_started_at)
        .cte("others")
    )
    k, n = mine.c.n, others.c.n
    before = or_(
        and_(others.c.ls.is_(None), me.c.ls.is_not(None)),
        and_(others.c.ls.is_(None), me.c.ls.is_(None), others.c.ws < me.c.ws),
        and_(
            others.c.ls.is_not(None),
            me.c.ls.is_not(None),
            or_(others.c.ls < me.c.ls, and_(others.c.ls == me.c.ls, others.c.ws < me.c.ws)),
        ),
    )
    # The outer join gives one row of NULLs when no other user waits: it counts nothing.
    turns = case(
        (n.is_(None), 0),
        else_=case((n < k, n), else_=k) + case((and_(before, n > k), 1), else_=0),
    )
    return (
        select(func.max(higher.c.n) + func.max(k) + func.coalesce(func.sum(turns), 0))
        .select_from(higher)
        .join(mine, true())
        .join(me, true())
        .outerjoin(others, true())
    )


POSITION = _position_statement()


def position_params(job: Any) -> dict[str, Any]:
    return {"user_id": job.user_id, "priority": job.priority, "created_at": job.created_at}

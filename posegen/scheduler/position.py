"""A queued job's position in the scheduler's order."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, bindparam, case, func, literal_column, or_, select, true

from db.models import Generation, QueueTurn, UserTurn, status_is
from posegen.render import POSITION_CAP
from posegen.scheduler.tables import JOBS, TURNS, WAITING


def _own_older(c: Any) -> Any:
    """SQL, per turn row: how many of its jobs are older than `c`, through ix_generations_turn
    (user, model, age), whose index conditions hold the scan to them (at most POSITION_CAP)."""
    return (
        select(func.count())
        .select_from(
            select(literal_column("1"))
            .select_from(JOBS)
            .where(
                status_is(Generation.status, "queued"),
                Generation.user_id == QueueTurn.user_id,
                Generation.model_id == QueueTurn.model_id,
                Generation.created_at < c,
            )
            .order_by(Generation.user_id, Generation.model_id, Generation.created_at)
            .limit(POSITION_CAP)
            .correlate(TURNS)
            .subquery()
        )
        .scalar_subquery()
    )


def _comes_before(others: Any, me: Any) -> Any:
    """SQL: another user's turn comes before this user's (the claim's order: the latest start
    longest ago, never started first, then the oldest waiting job)."""
    return or_(
        and_(others.c.ls.is_(None), me.c.ls.is_not(None)),
        and_(others.c.ls.is_(None), me.c.ls.is_(None), others.c.ws < me.c.ws),
        and_(
            others.c.ls.is_not(None),
            me.c.ls.is_not(None),
            or_(others.c.ls < me.c.ls, and_(others.c.ls == me.c.ls, others.c.ws < me.c.ws)),
        ),
    )


def _position_statement() -> Any:
    """How many queued jobs start before a job of user `user_id` and model `model_id`
    submitted at `created_at`, if nothing else arrived, in the claim's order. The job's
    priority is its turn's (P): every job in turns of a higher priority; the user's own older
    jobs in their turns of priority P (k of them); and of each other user V with n_V jobs
    at P, min(n_V, k) from the rounds before this job's, plus one when V's turn comes before
    the user's in the round this job starts in. Read from the turns, and the user's own jobs
    through ix_generations_turn: the cost follows the users waiting, not the queue."""
    u: Any = bindparam("user_id", type_=QueueTurn.__table__.c.user_id.type)
    m: Any = bindparam("model_id", type_=QueueTurn.__table__.c.model_id.type)
    c: Any = bindparam("created_at", type_=Generation.__table__.c.created_at.type)
    p: Any = (
        select(QueueTurn.priority)
        .where(QueueTurn.user_id == u, QueueTurn.model_id == m)
        .scalar_subquery()
    )
    at_p = (QueueTurn.priority == p, WAITING)
    higher = (
        select(func.coalesce(func.sum(QueueTurn.queued), 0).label("n"))
        .where(WAITING, QueueTurn.priority > p)
        .cte("higher")
    )
    mine = (
        select(func.coalesce(func.sum(_own_older(c)), 0).label("n"))
        .select_from(TURNS)
        .where(QueueTurn.user_id == u, *at_p)
        .cte("mine")
    )
    me = select(
        select(UserTurn.last_started_at).where(UserTurn.user_id == u).scalar_subquery().label("ls"),
        select(func.min(QueueTurn.waiting_since))
        .where(QueueTurn.user_id == u, *at_p)
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
        .where(*at_p, QueueTurn.user_id != u)
        .group_by(QueueTurn.user_id, UserTurn.last_started_at)
        .cte("others")
    )
    k, n = mine.c.n, others.c.n
    # The outer join gives one row of NULLs when no other user waits: it counts nothing.
    turns = case(
        (n.is_(None), 0),
        else_=case((n < k, n), else_=k)
        + case((and_(_comes_before(others, me), n > k), 1), else_=0),
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
    return {"user_id": job.user_id, "model_id": job.model_id, "created_at": job.created_at}

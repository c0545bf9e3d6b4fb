"""The pick: the next turn in the claim's order among the models a worker serves, the
turn's oldest job, and the preference for models a worker holds loaded."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, literal_column, or_, select
from sqlalchemy.orm import Session

from db.models import Generation, QueueTurn, status_is
from db.types import utcnow
from posegen.scheduler.tables import JOBS, TURNS, WAITING


@dataclass(frozen=True)
class Turn:
    user_id: str
    model_id: str


def turn_order(models: Sequence[str], skip: Sequence[Turn]) -> Any:
    statement = (
        select(QueueTurn.user_id, QueueTurn.model_id)
        .where(WAITING, QueueTurn.model_id.in_(list(models)))
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


def _head(user_id: Any, model_id: Any) -> Any:
    """A turn's oldest queued job not past its deadline, locked. A job past its deadline is
    not taken: the reconciler fails it (a claim holding the turn row must not wait for the
    user's row, which the refund locks)."""
    return (
        select(Generation.id)
        .where(
            status_is(Generation.status, "queued"),
            Generation.user_id == user_id,
            Generation.model_id == model_id,
            or_(Generation.deadline_at.is_(None), Generation.deadline_at > bindparam("now")),
        )
        .order_by(Generation.created_at)
        .limit(1)
        .with_for_update(of=Generation, skip_locked=True)
    )


TURN_HEAD = _head(bindparam("turn_user"), bindparam("turn_model"))
# The pick as CTEs of the claim's single statement (`lifecycle.claim_next`, on Postgres):
# the first turn in order among the models bound as `models` (a list), locked, and its head.
NEXT_TURN = (
    select(QueueTurn.user_id, QueueTurn.model_id, QueueTurn.last_started_at)
    .where(WAITING, QueueTurn.model_id.in_(bindparam("models", expanding=True)))
    .order_by(QueueTurn.priority.desc(), QueueTurn.last_started_at, QueueTurn.waiting_since)
    .limit(1)
    .with_for_update(of=QueueTurn, skip_locked=True)
    .cte("turn")
)
_TURN_USER = select(NEXT_TURN.c.user_id).scalar_subquery()
_TURN_MODEL = select(NEXT_TURN.c.model_id).scalar_subquery()
# Whether the turn moved to the back after the statement's snapshot was taken: a claim of the
# same turn committed while this one waited to lock it. The lock then returns the row as
# that claim left it (Postgres rechecks the WHERE on the new row, not the ORDER BY), while a
# plain read in the same statement still sees the row as it was: the two starts differ.
MOVED = (
    select(NEXT_TURN.c.last_started_at).scalar_subquery()
    != select(QueueTurn.last_started_at)
    .where(QueueTurn.user_id == _TURN_USER, QueueTurn.model_id == _TURN_MODEL)
    .scalar_subquery()
)
# The turn's columns as scalar subqueries, which the plan evaluates once and looks up in
# ix_generations_turn: a join to the CTE gets a generic plan that scans the whole queue. No
# head for a turn that moved: its user's job just started, the turn is no longer first.
HEAD = _head(_TURN_USER, _TURN_MODEL).where(~MOVED).cte("head")


def next_turn(session: Session, *, models: Sequence[str], skip: Sequence[Turn] = ()) -> Turn | None:
    """The turn whose job runs next among these models (ids), locked until the caller's
    transaction ends; None when none of them has a queued job free to take."""
    if not models:
        return None
    row = session.execute(turn_order(models, skip)).first()
    return None if row is None else Turn(user_id=str(row[0]), model_id=str(row[1]))


def head_of(session: Session, turn: Turn) -> str | None:
    """The oldest queued job of a turn, locked; None when it has none free (a concurrent
    cancel holds it, the rest are past their deadline, or the count drifted)."""
    params = {"turn_user": turn.user_id, "turn_model": turn.model_id, "now": utcnow()}
    job_id = session.scalar(TURN_HEAD, params)
    return None if job_id is None else str(job_id)


def claimable(session: Session, *, model_id: str) -> bool:
    """Whether a job of this model is queued and not past its deadline, locked or not: a
    claim that found none free (another claimer held the turns) must not drop the message
    that stands for it."""
    job = (
        select(literal_column("1"))
        .select_from(JOBS)
        .where(
            status_is(Generation.status, "queued"),
            Generation.user_id == QueueTurn.user_id,
            Generation.model_id == QueueTurn.model_id,
            or_(Generation.deadline_at.is_(None), Generation.deadline_at > utcnow()),
        )
        .correlate(TURNS)
        .exists()
    )
    found = session.scalar(
        select(literal_column("1"))
        .select_from(TURNS)
        .where(QueueTurn.model_id == model_id, WAITING, job)
        .limit(1)
    )
    return found is not None


def overdue(session: Session, *, models: Sequence[str], before: dt.datetime) -> bool:
    """Whether a job of one of these models has waited since before `before`."""
    if not models:
        return False
    found = session.scalar(
        select(literal_column("1"))
        .select_from(TURNS)
        .where(
            WAITING,
            QueueTurn.model_id.in_(list(models)),
            QueueTurn.waiting_since < before,
        )
        .limit(1)
    )
    return found is not None


def top_priority(session: Session, *, models: Sequence[str]) -> int | None:
    """The highest priority with a job queued among these models (None: none queued)."""
    if not models:
        return None
    return session.scalar(
        select(func.max(QueueTurn.priority)).where(WAITING, QueueTurn.model_id.in_(list(models)))
    )


def preferred(
    session: Session, *, served: Sequence[str], warm: Sequence[str], overdue_before: dt.datetime
) -> list[Sequence[str]]:
    """The model sets to pick from, in turn: the warm ones first, when a job of theirs is of
    the highest priority waiting and no cold model's job has waited since before
    `overdue_before` (POSEGEN_AFFINITY_MAX_WAIT); then every served model."""
    warm_served = [m for m in served if m in warm]
    cold = [m for m in served if m not in warm]
    if not warm_served or not cold:
        return [served]
    top_warm = top_priority(session, models=warm_served)
    if top_warm is None or top_warm < (top_priority(session, models=cold) or 0):
        return [served]
    if overdue(session, models=cold, before=overdue_before):
        return [served]
    return [warm_served, served]

"""Keeping the turns in step with the jobs: a job joins its turn when it is queued and
leaves it when it is claimed, canceled or failed while queued (posegen.lifecycle calls these in
the transaction that changes the job's status); the reconciler repairs a turn that drifted."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, bindparam, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import NEVER_STARTED, Generation, QueueTurn, UserTurn, status_is
from posegen.scheduler.tables import WAITING


def insert_for(session: Session, table: Any) -> Any:
    """INSERT with ON CONFLICT, in the session's dialect (Postgres, or SQLite embedded)."""
    return insert_for_dialect(session.bind.dialect.name, table)  # type: ignore[union-attr]


def insert_for_dialect(dialect: str, table: Any) -> Any:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def later(table: Any, start: Any) -> Any:
    """The later of a row's latest start and this one: two claims of one user commit in
    either order, and the user's turn follows the start that came last."""
    return case((table.last_started_at > start, table.last_started_at), else_=start)


def joined(
    session: Session, *, user_id: str, model_id: str, priority: int, since: dt.datetime
) -> None:
    """A job of this user and model entered the queue (submitted, or given back to it)."""
    insert = insert_for(session, QueueTurn)
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
            # The later of the two: a claim of this user that committed while this waited
            # for the row has written a newer start than the one read for the insert.
            "last_started_at": case(
                (
                    QueueTurn.last_started_at > insert.excluded.last_started_at,
                    QueueTurn.last_started_at,
                ),
                else_=insert.excluded.last_started_at,
            ),
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
        queued=case((WAITING, QueueTurn.queued - 1), else_=0),
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
        insert = insert_for(session, UserTurn)
        session.execute(
            insert.values(user_id=user_id, last_started_at=started).on_conflict_do_update(
                index_elements=[UserTurn.user_id],
                set_={"last_started_at": later(UserTurn, insert.excluded.last_started_at)},
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
            .values(last_started_at=later(QueueTurn, started)),
            execution_options={"synchronize_session": False},
        )


def repair(session: Session, *, user_id: str, model_id: str) -> None:
    """Count a turn's queued jobs again, under the turn row's lock (a submit or a cancel of
    this turn waits for it meanwhile); a turn missing for queued jobs is made."""
    jobs = select(Generation).where(
        status_is(Generation.status, "queued"),
        Generation.user_id == user_id,
        Generation.model_id == model_id,
    )
    oldest = session.execute(
        jobs.with_only_columns(func.min(Generation.created_at), func.max(Generation.priority))
    ).one()
    if oldest[0] is not None:  # the row, made if missing, then locked
        session.execute(
            insert_for(session, QueueTurn)
            .values(
                user_id=user_id, model_id=model_id, priority=oldest[1], queued=0,
                waiting_since=oldest[0], last_started_at=func.coalesce(
                    select(UserTurn.last_started_at)
                    .where(UserTurn.user_id == user_id)
                    .scalar_subquery(),
                    NEVER_STARTED,
                ),
            )
            .on_conflict_do_nothing()
        )  # fmt: skip
    locked = session.scalar(
        select(QueueTurn.queued)
        .where(QueueTurn.user_id == user_id, QueueTurn.model_id == model_id)
        .with_for_update()
    )
    if locked is None:
        return
    queued = session.scalar(jobs.with_only_columns(func.count()))
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
        .where(WAITING, counted.c.jobs.is_(None))
    )
    rows = session.execute(missing.union(stale).limit(limit)).all()
    return [(str(u), str(m)) for u, m in rows]


def moved_to_back(claimed: Any) -> tuple[Any, Any]:
    """`left(..., started=now)` as two CTEs of the claim's single statement, for the job the
    CTE `claimed` (columns id, user_id, model_id) took: the user's latest start, and the
    user's turns (the claimed one counts one less; the others, unless another transaction
    holds them, get the copy of the start). Bind `now`."""
    now = bindparam("now", type_=UserTurn.last_started_at.type)
    started = insert_for_dialect("postgresql", UserTurn).from_select(
        ["user_id", "last_started_at"], select(claimed.c.user_id, now)
    )
    started = started.on_conflict_do_update(
        index_elements=[UserTurn.user_id],
        set_={"last_started_at": later(UserTurn, started.excluded.last_started_at)},
    ).cte("user_turn")
    # The claimed job's columns as scalar subqueries, looked up in the turns' primary key (a
    # join to the CTE gets a generic plan that scans every turn).
    user_id = select(claimed.c.user_id).scalar_subquery()
    free = (
        select(QueueTurn.model_id)
        .where(QueueTurn.user_id == user_id)
        .with_for_update(of=QueueTurn, skip_locked=True)
        .cte("free_turns")
    )
    this_turn = QueueTurn.model_id == select(claimed.c.model_id).scalar_subquery()
    # The turn's oldest queued job after the claimed one (the statement's snapshot still
    # sees the claimed job queued).
    oldest_after = (
        select(func.min(Generation.created_at))
        .where(
            status_is(Generation.status, "queued"),
            Generation.user_id == user_id,
            Generation.model_id == select(claimed.c.model_id).scalar_subquery(),
            Generation.id != select(claimed.c.id).scalar_subquery(),
        )
        .scalar_subquery()
    )
    turns = (
        update(QueueTurn)
        .where(
            QueueTurn.user_id == user_id,
            or_(this_turn, QueueTurn.model_id.in_(select(free.c.model_id))),
        )
        .values(
            queued=case((and_(this_turn, WAITING), QueueTurn.queued - 1), (this_turn, 0),
                        else_=QueueTurn.queued),
            waiting_since=case(
                (this_turn, func.coalesce(oldest_after, QueueTurn.waiting_since)),
                else_=QueueTurn.waiting_since,
            ),
            last_started_at=later(QueueTurn, now),
        )
        .cte("turns")
    )  # fmt: skip
    return started, turns

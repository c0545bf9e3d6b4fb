"""The bounded queue: queued jobs per user (429 queue_full) and per model (503 overloaded),
counted exactly under locks."""

from __future__ import annotations

import math

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from db.models import QueueTurn, User
from posegen.errors import Overloaded, QueueFull
from posegen.scheduler.tables import WAITING
from posegen.settings import Settings


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
            QueueTurn.model_id == model_id, WAITING
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

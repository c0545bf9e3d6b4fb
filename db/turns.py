"""The scheduler's tables (posegen.scheduler): whose turn it is, per user and per user and
model. Re-exported by db.models."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base
from db.types import UTCDateTime

NEVER_STARTED = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class UserTurn(Base):
    """When a user's latest job started (posegen.scheduler: the longest ago goes first; no
    row: never). Apart from `users`, so that a claim never waits for the user's row a submit
    or a refund holds."""

    __tablename__ = "user_turns"

    user_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    last_started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class QueueTurn(Base):
    """Whose turn it is (posegen.scheduler): one row per user and model that has had queued
    jobs, kept in step with the jobs by posegen.lifecycle. The claim and the depth limit read
    the rows with queued jobs, so their cost follows the users waiting, not the queue's length."""

    __tablename__ = "queue_turns"
    __table_args__ = (
        CheckConstraint("queued >= 0", name="queued_not_negative"),
        # The claim's order: priority, the user's latest start, the oldest job.
        Index(
            "ix_queue_turns_next",
            text("priority DESC"),
            "last_started_at",
            "waiting_since",
            postgresql_where=text("queued > 0"),
            sqlite_where=text("queued > 0"),
        ),
        Index(
            "ix_queue_turns_model",
            "model_id",
            postgresql_where=text("queued > 0"),
            sqlite_where=text("queued > 0"),
        ),
    )

    user_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("ai_models.id"), primary_key=True
    )
    # The model's priority when the jobs were queued (higher runs first).
    priority: Mapped[int] = mapped_column(Integer)
    queued: Mapped[int] = mapped_column(Integer, default=0)
    # When the oldest of these queued jobs was submitted.
    waiting_since: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # When the user's latest job started (`user_turns`' value, copied for the claim's index;
    # never: NEVER_STARTED, which sorts first on every database).
    last_started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())

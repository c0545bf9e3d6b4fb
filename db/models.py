"""The tables of the contract. Ids are UUID strings; money (credits) is an integer.

The scheduler's turns live in db.turns and the declarative base in db.base; both are
re-exported here, so every table is imported from db.models."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    literal_column,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from db.base import NAMING_CONVENTION as NAMING_CONVENTION
from db.base import Base as Base
from db.base import new_id as new_id
from db.base import uuid_pk
from db.turns import NEVER_STARTED as NEVER_STARTED
from db.turns import QueueTurn as QueueTurn
from db.turns import UserTurn as UserTurn
from db.types import UTCDateTime, utcnow

TIERS = ("free", "basic", "pro", "enterprise")
# Where a model runs: the GPU workers, or a hosted inference API (posegen.hosted).
LOCAL = "local"
PROVIDERS = (LOCAL, "huggingface")
JOB_STATUSES = ("queued", "processing", "completed", "failed", "canceled")
TERMINAL_STATUSES = ("completed", "failed", "canceled")
DELIVERY_STATUSES = ("pending", "delivered", "failed", "skipped")


def status_is(column: Any, *values: str) -> ColumnElement[bool]:
    """`status = 'queued'` (`IN (...)` for several) with the values written into the SQL, not
    sent as parameters. For the queries meant to use a partial index (`WHERE status = ...`
    below): Postgres matches a predicate to such an index only when it sees the value while
    planning, and the drivers run statements prepared (psycopg after a statement's fifth run,
    asyncpg from the first), so a bound status gets either a plan made afresh on every
    execution (much of the poll's Postgres CPU was planning) or a generic plan that cannot
    use the index. Written into the compiled (and cached) SQL once, not rendered per execution
    as a `literal_execute` parameter would be."""
    if not all(value in JOB_STATUSES + DELIVERY_STATUSES for value in values):
        raise ValueError(f"not a status: {values}")
    literals = [literal_column(f"'{value}'", String()) for value in values]
    return column == literals[0] if len(literals) == 1 else column.in_(literals)  # type: ignore[no-any-return]


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("credits >= 0", name="credits_non_negative"),
        CheckConstraint(f"tier IN {TIERS!r}", name="tier_known"),
    )

    id: Mapped[str] = uuid_pk()
    email: Mapped[str] = mapped_column(String(320), unique=True)
    tier: Mapped[str] = mapped_column(String(16), default="free")
    credits: Mapped[int] = mapped_column(Integer, default=0)
    webhook_secret: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = uuid_pk()
    user_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100), default="default")
    # The first characters of the key, shown in listings so a key can be recognised.
    prefix: Mapped[str] = mapped_column(String(24))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AiModel(Base):
    __tablename__ = "ai_models"
    __table_args__ = (
        CheckConstraint("family IN ('sd15', 'sdxl', 'sd35')", name="family_known"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority_range"),
        CheckConstraint("credit_cost >= 0", name="credit_cost_non_negative"),
    )

    id: Mapped[str] = uuid_pk()
    model_key: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    # Where the model runs: `local` (the GPU workers) or a hosted provider (PROVIDERS).
    provider: Mapped[str] = mapped_column(String(100), default=LOCAL)
    # Who made the weights.
    author: Mapped[str] = mapped_column(String(100), default="")
    # A hosted model's id in its provider's API path.
    remote_model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    # A local model's hosted twin, which its jobs may be routed to (posegen.routing).
    fallback_model_key: Mapped[str | None] = mapped_column(String(100), nullable=True)
    family: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(300))
    controlnet_model: Mapped[str] = mapped_column(String(300))
    tier: Mapped[str] = mapped_column(String(16))
    credit_cost: Mapped[int] = mapped_column(Integer)
    resolution: Mapped[str] = mapped_column(String(16))
    quality: Mapped[str] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(Integer, default=5)
    default_steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    default_prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    processing_time: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    coming_soon: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def width(self) -> int:
        return int(self.resolution.lower().split("x")[0])

    @property
    def height(self) -> int:
        return int(self.resolution.lower().split("x")[1])


class PoseTemplate(Base):
    __tablename__ = "pose_templates"

    id: Mapped[str] = uuid_pk()
    key: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    # COCO-18 order; each entry [x, y] in 0..1, or null where the keypoint is not visible.
    keypoints: Mapped[list[Any]] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (
        CheckConstraint(f"status IN {JOB_STATUSES!r}", name="status_known"),
        # The caller's jobs, newest first (list endpoint, keyset pagination).
        Index("ix_generations_user_created", "user_id", "created_at", "id"),
        # The queue: position, the reconciler's sweeps. Partial so finished jobs cost nothing.
        Index(
            "ix_generations_active",
            "status",
            "priority",
            "created_at",
            postgresql_where=text("status IN ('queued', 'processing')"),
            sqlite_where=text("status IN ('queued', 'processing')"),
        ),
        # The queue in run order (priority high to low, then oldest): position and reconciler.
        Index(
            "ix_generations_queue",
            text("(9 - priority)"),
            "created_at",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        # The ETA reads a model's latest completed jobs.
        Index(
            "ix_generations_model_finished",
            "model_key",
            "finished_at",
            postgresql_where=text("status = 'completed'"),
            sqlite_where=text("status = 'completed'"),
        ),
        # Finished jobs whose files are still to be removed (posegen.retention): a handful.
        Index(
            "ix_generations_unpurged",
            "finished_at",
            postgresql_where=text(f"status IN {TERMINAL_STATUSES!r} AND purged_at IS NULL"),
            sqlite_where=text(f"status IN {TERMINAL_STATUSES!r} AND purged_at IS NULL"),
        ),
        # A user's queued jobs of one model, oldest first: the claim's pick within a turn.
        Index(
            "ix_generations_turn",
            "user_id",
            "model_id",
            "created_at",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        # Live jobs with a deadline: the reconciler fails those past it.
        Index(
            "ix_generations_deadline",
            "deadline_at",
            postgresql_where=text("status IN ('queued', 'processing') AND deadline_at IS NOT NULL"),
            sqlite_where=text("status IN ('queued', 'processing') AND deadline_at IS NOT NULL"),
        ),
        # Outputs still kept, oldest first: what POSEGEN_OUTPUT_RETENTION_DAYS expires.
        Index(
            "ix_generations_kept_outputs",
            "finished_at",
            postgresql_where=text("status = 'completed' AND deleted_at IS NULL"),
            sqlite_where=text("status = 'completed' AND deleted_at IS NULL"),
        ),
    )

    id: Mapped[str] = uuid_pk()
    user_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("users.id", ondelete="CASCADE")
    )
    model_id: Mapped[str] = mapped_column(Uuid(as_uuid=False), ForeignKey("ai_models.id"))
    model_key: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    pose_source: Mapped[str] = mapped_column(String(16))
    pose_template_id: Mapped[str | None] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("pose_templates.id"), nullable=True
    )
    input_key: Mapped[str] = mapped_column(String(500))
    pose_image_key: Mapped[str | None] = mapped_column(String(500), nullable=True)
    credit_cost: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The webhook events its owner chose, a comma list of `posegen.webhooks.CHOICES` in their
    # order; NULL: "completed" (every terminal event).
    webhook_events: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    outputs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the job's message was last handed to the broker (the reconciler re-publishes).
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the job was deleted (by its owner, or its outputs' retention ran out): it stays
    # listed, without outputs; its files go (`purged_at`).
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When storage last held no more of the job than it keeps: no inputs once it finished, no
    # outputs either once deleted. NULL on a finished job: files still to remove (the
    # database commits the intent first; storage follows, and the sweep retries).
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Submit time plus the caller's `deadline_seconds`: not completed by then, the job fails
    # with `deadline_exceeded` (queued: it never runs; running: it stops between steps).
    deadline_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Where the job runs (its model's `provider`, or its fallback's once routed): which broker
    # queue its messages go to (posegen.queue.generate_message).
    provider: Mapped[str] = mapped_column(String(32), default=LOCAL, server_default=LOCAL)
    # The hosted model a fallback moved the job to (posegen.routing); `model_key` stays the
    # one asked for, `model_id` becomes the fallback's (the turn it waits in).
    routed_to: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # What a running job waits for besides its steps (`provider_loading`), and until when
    # its provider said it would (the job's `eta_seconds` while it waits).
    progress_phase: Mapped[str | None] = mapped_column(String(32), nullable=True)
    phase_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class CreditLedger(Base):
    __tablename__ = "credit_ledger"
    __table_args__ = (
        CheckConstraint("kind IN ('grant', 'charge', 'refund')", name="kind_known"),
        # A job is charged once and refunded at most once: the database says so, not Python.
        UniqueConstraint("generation_id", "kind"),
        Index("ix_credit_ledger_user_created", "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    user_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("users.id", ondelete="CASCADE")
    )
    generation_id: Mapped[str | None] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("generations.id", ondelete="SET NULL"), nullable=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(f"status IN {DELIVERY_STATUSES!r}", name="status_known"),
        # One delivery per job, event type and `seq`: a transition's event is recorded once
        # however often its transition runs.
        UniqueConstraint("generation_id", "event_type", "seq"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    # Also the `webhook-id` header: stable across retries.
    id: Mapped[str] = uuid_pk()
    generation_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("generations.id", ondelete="CASCADE")
    )
    user_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("users.id", ondelete="CASCADE")
    )
    event_type: Mapped[str] = mapped_column(String(64))
    # 0, but for progress events: the step they report.
    seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    url: Mapped[str] = mapped_column(Text)
    # The exact body, frozen at the event: every retry sends the same bytes.
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # [{"at", "status_code", "error", "duration_ms"}, ...]
    attempt_log: Mapped[list[Any]] = mapped_column(JSON, default=list)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("user_id", "key"),
        Index("ix_idempotency_keys_expires_at", "expires_at"),
    )

    id: Mapped[str] = uuid_pk()
    user_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("users.id", ondelete="CASCADE")
    )
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    generation_id: Mapped[str] = mapped_column(
        Uuid(as_uuid=False), ForeignKey("generations.id", ondelete="CASCADE")
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())

"""The scheduler's state: turns (who runs next within a priority) and a job's deadline.

`queue_turns` holds one row per (user, model) that has had queued jobs: how many are queued,
since when the oldest has waited, and (a copy, for the claim's index) when the user's latest
job started; `user_turns` says that for each user (a table of its own, written by claims only,
so a claim never waits for the user's row that a submit or a refund holds). The claim and the depth limit read the rows with queued jobs (partial indexes, so
their cost follows the users waiting, not the jobs). posegen.lifecycle keeps the rows in step,
in the transaction that changes a job's status; this revision fills them from the jobs queued
when it runs.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = "status = 'queued'"


def upgrade() -> None:
    op.add_column("generations", sa.Column("deadline_at", sa.DateTime(timezone=True)))
    op.create_table(
        "user_turns",
        sa.Column("user_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_user_turns_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_turns")),
    )
    op.create_table(
        "queue_turns",
        sa.Column("user_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("model_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("queued", sa.Integer(), nullable=False),
        sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("queued >= 0", name=op.f("ck_queue_turns_queued_not_negative")),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_queue_turns_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["ai_models.id"], name=op.f("fk_queue_turns_model_id_ai_models")
        ),
        sa.PrimaryKeyConstraint("user_id", "model_id", name=op.f("pk_queue_turns")),
    )  # fmt: skip
    op.create_index(
        "ix_queue_turns_next",
        "queue_turns",
        [sa.text("priority DESC"), "last_started_at", "waiting_since"],
        postgresql_where=sa.text("queued > 0"),
        sqlite_where=sa.text("queued > 0"),
    )
    op.create_index(
        "ix_queue_turns_model",
        "queue_turns",
        ["model_id"],
        postgresql_where=sa.text("queued > 0"),
        sqlite_where=sa.text("queued > 0"),
    )
    # A user's queued jobs of one model, oldest first: the claim's pick within a turn.
    op.create_index(
        "ix_generations_turn",
        "generations",
        ["user_id", "model_id", "created_at"],
        postgresql_where=sa.text(QUEUED),
        sqlite_where=sa.text(QUEUED),
    )
    # Queued jobs by deadline: the ones that ran out of time (the reconciler's sweep).
    op.create_index(
        "ix_generations_deadline",
        "generations",
        ["deadline_at"],
        postgresql_where=sa.text("status IN ('queued', 'processing') AND deadline_at IS NOT NULL"),
        sqlite_where=sa.text("status IN ('queued', 'processing') AND deadline_at IS NOT NULL"),
    )
    op.execute(
        "INSERT INTO queue_turns (user_id, model_id, priority, queued, waiting_since,"
        " last_started_at) SELECT user_id, model_id, max(priority), count(*), min(created_at),"
        " '1970-01-01T00:00:00+00:00' FROM generations "
        "WHERE status = 'queued' GROUP BY user_id, model_id"
    )


def downgrade() -> None:
    op.drop_index("ix_generations_deadline", table_name="generations")
    op.drop_index("ix_generations_turn", table_name="generations")
    op.drop_index("ix_queue_turns_model", table_name="queue_turns")
    op.drop_index("ix_queue_turns_next", table_name="queue_turns")
    op.drop_table("queue_turns")
    # Not in batch mode: see 0004.
    op.drop_table("user_turns")
    op.drop_column("generations", "deadline_at")

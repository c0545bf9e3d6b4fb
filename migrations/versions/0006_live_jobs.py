"""Live jobs: the webhook events a job's owner chose (`generations.webhook_events`), and
several deliveries of one event type per job (`webhook_deliveries.seq`: progress events, one
per step reported), with `skipped` for a progress delivery that a later event of its job made
moot before it was sent.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "status IN ('pending', 'delivered', 'failed', 'skipped')"
OLD_STATUSES = "status IN ('pending', 'delivered', 'failed')"
DUE = "status = 'pending'"


def _deliveries(*, seq: bool, statuses: str) -> None:
    # SQLite alters a constraint by copying the table (batch mode); the copy's partial index
    # is made again below, with its WHERE clause, which reflection may not carry over.
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_constraint(op.f("ck_webhook_deliveries_status_known"), type_="check")
        batch.create_check_constraint(op.f("ck_webhook_deliveries_status_known"), statuses)
        if seq:
            batch.add_column(sa.Column("seq", sa.Integer(), nullable=False, server_default="0"))
            batch.drop_constraint(
                op.f("uq_webhook_deliveries_generation_id_event_type"), type_="unique"
            )
            batch.create_unique_constraint(
                op.f("uq_webhook_deliveries_generation_id_event_type_seq"),
                ["generation_id", "event_type", "seq"],
            )
        else:
            batch.drop_constraint(
                op.f("uq_webhook_deliveries_generation_id_event_type_seq"), type_="unique"
            )
            batch.create_unique_constraint(
                op.f("uq_webhook_deliveries_generation_id_event_type"),
                ["generation_id", "event_type"],
            )
            batch.drop_column("seq")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP INDEX IF EXISTS ix_webhook_deliveries_due")
        op.create_index(
            "ix_webhook_deliveries_due",
            "webhook_deliveries",
            ["next_attempt_at"],
            sqlite_where=sa.text(DUE),
        )


def upgrade() -> None:
    # Not in batch mode: SQLite adds a column in place (a batch would copy the table and lose
    # its expression index, ix_generations_queue).
    op.add_column("generations", sa.Column("webhook_events", sa.String(64), nullable=True))
    _deliveries(seq=True, statuses=STATUSES)


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE seq <> 0 OR status = 'skipped'")
    _deliveries(seq=False, statuses=OLD_STATUSES)
    op.drop_column("generations", "webhook_events")

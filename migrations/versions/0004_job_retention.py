"""What is kept of a job: `deleted_at` (deleted by its owner or by output retention) and
`purged_at` (its files removed as far as its state asks), with the two sweeps' indexes.

Jobs that finished before this revision have `purged_at` NULL: the first sweeps remove the
inputs they kept.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNPURGED = "status IN ('completed', 'failed', 'canceled') AND purged_at IS NULL"
KEPT_OUTPUTS = "status = 'completed' AND deleted_at IS NULL"


def upgrade() -> None:
    op.add_column("generations", sa.Column("deleted_at", sa.DateTime(timezone=True)))
    op.add_column("generations", sa.Column("purged_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_generations_unpurged",
        "generations",
        ["finished_at"],
        unique=False,
        postgresql_where=sa.text(UNPURGED),
        sqlite_where=sa.text(UNPURGED),
    )
    op.create_index(
        "ix_generations_kept_outputs",
        "generations",
        ["finished_at"],
        unique=False,
        postgresql_where=sa.text(KEPT_OUTPUTS),
        sqlite_where=sa.text(KEPT_OUTPUTS),
    )


def downgrade() -> None:
    op.drop_index("ix_generations_kept_outputs", table_name="generations")
    op.drop_index("ix_generations_unpurged", table_name="generations")
    # Not in batch mode: SQLite (3.35+) drops a column in place, where a batch would copy
    # the table and lose its expression index (ix_generations_queue).
    op.drop_column("generations", "purged_at")
    op.drop_column("generations", "deleted_at")

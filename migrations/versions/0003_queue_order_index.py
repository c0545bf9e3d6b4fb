"""The queue in its run order (priority high to low, then oldest first), queued jobs only.

`9 - priority` makes both keys ascending, so "jobs ahead of this one" is one row-value range
`(9 - priority, created_at) < (9 - p, c)` that the index answers in order.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_generations_queue",
        "generations",
        [sa.text("(9 - priority)"), "created_at"],
        unique=False,
        postgresql_where=sa.text("status = 'queued'"),
        sqlite_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_generations_queue", table_name="generations")

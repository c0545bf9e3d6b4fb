"""An index for the ETA: a model's latest completed jobs, without sorting all of them.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_generations_model_finished",
        "generations",
        ["model_key", "finished_at"],
        unique=False,
        postgresql_where=sa.text("status = 'completed'"),
        sqlite_where=sa.text("status = 'completed'"),
    )


def downgrade() -> None:
    op.drop_index("ix_generations_model_finished", table_name="generations")

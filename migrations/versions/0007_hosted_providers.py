"""Hosted providers: `ai_models.provider` says where a model runs (`local`, or a hosted
inference API such as `huggingface`); the weights' author, which `provider` held until now,
moves to `author`; a hosted model names its id in the provider's API (`remote_model`) and a
local one may name a hosted twin to fall back to (`fallback_model_key`). A job records where
it runs (`generations.provider`), the model a fallback moved it to (`routed_to`) and what it
waits for besides its steps (`progress_phase`, until `phase_until`).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Not in batch mode: SQLite adds and drops columns in place (a batch would copy `generations`
# and lose its expression index, ix_generations_queue).
# Functions, not Column objects: a column is attached to the table it is added to, and a
# round trip (upgrade, downgrade, upgrade) in one process adds it twice.


def _model_columns() -> list[sa.Column[str]]:
    return [
        sa.Column("author", sa.String(100), nullable=False, server_default=""),
        sa.Column("remote_model", sa.String(300), nullable=True),
        sa.Column("fallback_model_key", sa.String(100), nullable=True),
    ]


def _job_columns() -> list[sa.Column[str]]:
    return [
        sa.Column("provider", sa.String(32), nullable=False, server_default="local"),
        sa.Column("routed_to", sa.String(100), nullable=True),
        sa.Column("progress_phase", sa.String(32), nullable=True),
        sa.Column("phase_until", sa.DateTime(timezone=True), nullable=True),
    ]


def upgrade() -> None:
    for column in _model_columns():
        op.add_column("ai_models", column)
    op.execute("UPDATE ai_models SET author = provider, provider = 'local'")
    for column in _job_columns():
        op.add_column("generations", column)


def downgrade() -> None:
    for column in reversed(_job_columns()):
        op.drop_column("generations", column.name)
    # Hosted models keep their rows (jobs refer to them), named by their author as before.
    op.execute("UPDATE ai_models SET provider = author")
    for column in reversed(_model_columns()):
        op.drop_column("ai_models", column.name)

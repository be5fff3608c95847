"""Dead letters keep a bounded prefix of their body: record the whole body's size and SHA-256 beside it.

Revision ID: 0002_dead_letter_bounds
Revises: 0001
Create Date: 2026-12-02

Rows written before this migration hold their whole body; their size and digest stay NULL and are computed from
the stored value when read.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_dead_letter_bounds"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.add_column(sa.Column("size", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("sha256")
        batch.drop_column("size")

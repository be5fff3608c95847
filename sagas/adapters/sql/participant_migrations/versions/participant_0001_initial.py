"""A participant's tables: dedup records (adopting the table earlier releases made without alembic) and dead letters.

Revision ID: participant_0001
Revises:
Create Date: 2026-12-02

Before this chain, the participant helper made `participant_dedup` with ``create_all`` and added later columns by
hand; such a table is kept, given what it lacks (the ``reason`` column of the second release, the ``at`` index),
and stamped. Written out in full rather than imported from `participant_tables.py`: a migration is frozen in time.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "participant_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("participant_dedup"):
        op.create_table(
            "participant_dedup",
            sa.Column("key", sa.String(300), primary_key=True),
            sa.Column("command_id", sa.String(300), nullable=False),
            sa.Column("outcome", sa.String(20), nullable=False),
            sa.Column("type", sa.String(200), nullable=False),
            sa.Column("data", sa.JSON, nullable=False),
            sa.Column("at", sa.Float, nullable=False),
            sa.Column("reason", sa.Text, nullable=True),
        )
    elif "reason" not in {column["name"] for column in inspector.get_columns("participant_dedup")}:
        op.add_column("participant_dedup", sa.Column("reason", sa.Text, nullable=True))
    if "ix_participant_dedup_at" not in {index["name"] for index in inspector.get_indexes("participant_dedup")}:
        op.create_index("ix_participant_dedup_at", "participant_dedup", ["at"])
    op.create_table(
        "participant_dead_letters",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("topic", sa.String(300), nullable=False),
        sa.Column("key", sa.String(300), nullable=True),
        sa.Column("headers", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("complete", sa.Boolean, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("replayed_at", sa.Float, nullable=True),
    )
    op.create_index("ix_participant_dead_letters_at", "participant_dead_letters", ["at"])


def downgrade() -> None:
    op.drop_table("participant_dead_letters")
    op.drop_index("ix_participant_dedup_at", "participant_dedup")

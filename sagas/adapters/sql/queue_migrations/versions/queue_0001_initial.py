"""The `db://` queue's tables: the log of every topic and the groups' positions and leases.

Revision ID: queue_0001
Revises:
Create Date: 2026-12-02

Before this chain, `SqlQueueBroker.start` made these tables with ``create_all``: tables found are kept as they are
(the same definition) and stamped. Written out in full rather than imported from `sqlqueue.py`: a migration is
frozen in time.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "queue_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("broker_messages"):
        op.create_table(
            "broker_messages",
            # AUTOINCREMENT on SQLite: ids must never be reused after rows are pruned, or cursors would skip messages.
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                      autoincrement=True),
            sa.Column("topic", sa.String(255), nullable=False),
            sa.Column("key", sa.String(255), nullable=True),
            sa.Column("headers", sa.JSON, nullable=False),
            sa.Column("value", sa.LargeBinary, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sqlite_autoincrement=True,
        )
        op.create_index("ix_broker_messages_topic_id", "broker_messages", ["topic", "id"])
    if not inspector.has_table("broker_groups"):
        op.create_table(
            "broker_groups",
            sa.Column("group_name", sa.String(255), primary_key=True),
            sa.Column("topic", sa.String(255), primary_key=True),
            sa.Column("committed", sa.BigInteger, nullable=False),
            sa.Column("holder", sa.String(64), nullable=True),
            sa.Column("lease_until", sa.Float, nullable=False),
        )


def downgrade() -> None:
    op.drop_table("broker_groups")
    op.drop_table("broker_messages")

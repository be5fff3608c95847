"""The initial schema: instances, history, outbox, inbox, timers, dead letters, definitions.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written out in full rather than imported from `tables.py`: a migration is frozen in time, the tables module is
not. A contract test checks that upgrading to head yields exactly `tables.metadata`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.Double[float]()


def upgrade() -> None:
    op.create_table(
        "saga_instances",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("definition", sa.String(100), nullable=False),
        sa.Column("definition_version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("snapshot", Json, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_saga_instances"),
        sa.UniqueConstraint("definition", "idempotency_key", name="uq_saga_instances_definition_idempotency_key"),
    )
    op.create_index("ix_saga_instances_created_at", "saga_instances", ["created_at"])
    op.create_index("ix_saga_instances_status_created_at", "saga_instances", ["status", "created_at"])
    op.create_index("ix_saga_instances_definition_created_at", "saga_instances", ["definition", "created_at"])
    op.create_index("ix_saga_instances_status_updated_at", "saga_instances", ["status", "updated_at"])

    op.create_table(
        "saga_events",
        sa.Column("id", RowId, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("at", Time, nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("step", sa.String(100), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("detail", Json, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_saga_events"),
    )
    op.create_index("ix_saga_events_saga_id_id", "saga_events", ["saga_id", "id"])

    op.create_table(
        "outbox",
        sa.Column("seq", RowId, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(300), nullable=False),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("topic", sa.String(300), nullable=False),
        sa.Column("key", sa.String(300), nullable=True),
        sa.Column("headers", Json, nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("sent_at", Time, nullable=True),
        sa.Column("claimed_until", Time, nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_outbox"),
        sa.UniqueConstraint("id", name="uq_outbox_id"),
    )
    op.create_index(
        "ix_outbox_pending",
        "outbox",
        ["created_at", "seq"],
        sqlite_where=sa.text("sent_at IS NULL"),
        postgresql_where=sa.text("sent_at IS NULL"),
    )
    op.create_index("ix_outbox_sent_at", "outbox", ["sent_at"])

    op.create_table(
        "inbox",
        sa.Column("message_id", sa.String(300), nullable=False),
        sa.Column("saga_id", sa.String(200), nullable=True),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("at", Time, nullable=False),
        sa.PrimaryKeyConstraint("message_id", name="pk_inbox"),
    )
    op.create_index("ix_inbox_at", "inbox", ["at"])

    op.create_table(
        "timers",
        sa.Column("id", sa.String(300), nullable=False),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("step", sa.String(100), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("due_at", Time, nullable=False),
        sa.Column("claimed_until", Time, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_timers"),
    )
    op.create_index("ix_timers_due_at", "timers", ["due_at"])
    op.create_index("ix_timers_saga_id", "timers", ["saga_id"])

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.String(300), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("saga_id", sa.String(200), nullable=True),
        sa.Column("topic", sa.String(300), nullable=False),
        sa.Column("key", sa.String(300), nullable=True),
        sa.Column("headers", Json, nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("at", Time, nullable=False),
        sa.Column("replayed_at", Time, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
    )
    op.create_index("ix_dead_letters_at", "dead_letters", ["at"])

    op.create_table(
        "definitions",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("body", Json, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_definitions"),
    )


def downgrade() -> None:
    for table in (
        "definitions",
        "dead_letters",
        "timers",
        "inbox",
        "outbox",
        "saga_events",
        "saga_instances",
    ):
        op.drop_table(table)

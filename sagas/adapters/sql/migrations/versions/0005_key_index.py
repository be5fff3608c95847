"""An index on `saga_instances.idempotency_key`: the list's key filter without a definition.

Revision ID: 0005_key_index
Revises: 0004_step_deadlines
Create Date: 2026-12-02

The unique (definition, idempotency_key) constraint serves a start's lookup, which names the definition. `GET
/api/sagas?key=...` (and `sagas list --key`) names only the key: PostgreSQL then walked the created_at index from
the newest saga and filtered, about 0.2 s with a million sagas stored (bench/list_page.py); SQLite's skip-scan
over the few definitions hid it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_key_index"
down_revision: str | Sequence[str] | None = "0004_step_deadlines"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_saga_instances_idempotency_key", "saga_instances", ["idempotency_key"])


def downgrade() -> None:
    op.drop_index("ix_saga_instances_idempotency_key", table_name="saga_instances")

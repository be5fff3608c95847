"""`saga_instances.has_reason` and an index on (has_reason, created_at): the list's reason filter.

Revision ID: 0006_reason_index
Revises: 0005_key_index
Create Date: 2026-12-02

`GET /api/sagas?reason=...` (and `sagas list --reason`) looks for a word in the failure reason, inside each saga's
snapshot. With no other filter it read every snapshot, newest first, until it had a page: 0.6 to 0.8 s with a million
sagas stored, almost all of them without a reason (bench/list_page.py). The flag, kept by every write of the row,
lets it read only the sagas that have a reason. Existing rows get it from their snapshots.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_reason_index"
down_revision: str | Sequence[str] | None = "0005_key_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("saga_instances") as batch:
        batch.add_column(sa.Column("has_reason", sa.Boolean(), nullable=False, server_default=sa.false()))
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE saga_instances SET has_reason = 1 WHERE json_extract(snapshot, '$.failure') IS NOT NULL")
    else:
        op.execute("UPDATE saga_instances SET has_reason = true WHERE (snapshot ->> 'failure') IS NOT NULL")
    op.create_index("ix_saga_instances_has_reason_created_at", "saga_instances", ["has_reason", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_saga_instances_has_reason_created_at", table_name="saga_instances")
    with op.batch_alter_table("saga_instances") as batch:
        batch.drop_column("has_reason")

"""Order is data: a saga's snapshot, its history details and the definitions' bodies keep their key order.

Revision ID: 0003_order
Revises: 0002_dead_letter_bounds
Create Date: 2026-12-02

On PostgreSQL these columns become `json` (the text as written) instead of `jsonb`, which stores keys sorted by
length: a saga's input, its steps and the replies came back reordered. Rows written before keep the order JSONB
gave them (it is lost); `SagaAdmin` lists steps in definition order whatever the stored order. SQLite stores JSON
as text already: nothing changes there.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003_order"
down_revision: str | Sequence[str] | None = "0002_dead_letter_bounds"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (("saga_instances", "snapshot"), ("saga_events", "detail"), ("definitions", "body"))


def upgrade() -> None:
    _retype("json")


def downgrade() -> None:
    _retype("jsonb")


def _retype(kind: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in _COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {kind} USING {column}::{kind}")

"""Step timeouts on the saga's row: `step_deadline` (indexed where set), `step_timeouts`, `deadline_claimed_until`.

Revision ID: 0004_step_deadlines
Revises: 0003_order
Create Date: 2026-12-02

A step's timeout was a timers row, upserted when the step started and deleted when it ended; it is now kept on the
instance's row, which every step rewrites anyway (`sagas/adapters/sql/deadlines.py`). The pending timeouts of the
timers table (kinds ``step_timeout`` and ``compensation_timeout``) move onto their sagas' rows, their claims
dropped (an engine of this version fires them again; a stale one is ignored). Downgrade moves them back.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_step_deadlines"
down_revision: str | Sequence[str] | None = "0003_order"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS = ("step_timeout", "compensation_timeout")
_instances = sa.table(
    "saga_instances",
    sa.column("id", sa.String),
    sa.column("step_deadline", sa.Double),
    sa.column("step_timeouts", sa.Text),
    sa.column("deadline_claimed_until", sa.Double),
)
_timers = sa.table(
    "timers",
    sa.column("id", sa.String),
    sa.column("saga_id", sa.String),
    sa.column("kind", sa.String),
    sa.column("step", sa.String),
    sa.column("attempt", sa.Integer),
    sa.column("due_at", sa.Double),
    sa.column("claimed_until", sa.Double),
)


def upgrade() -> None:
    with op.batch_alter_table("saga_instances") as batch:
        batch.add_column(sa.Column("step_deadline", sa.Double, nullable=True))
        batch.add_column(sa.Column("step_timeouts", sa.Text, nullable=True))
        batch.add_column(sa.Column("deadline_claimed_until", sa.Double, nullable=True))
    op.create_index(
        "ix_saga_instances_step_deadline",
        "saga_instances",
        ["step_deadline"],
        sqlite_where=sa.text("step_deadline IS NOT NULL"),
        postgresql_where=sa.text("step_deadline IS NOT NULL"),
    )
    bind = op.get_bind()
    pending: dict[str, list[list[object]]] = defaultdict(list)
    moved = sa.select(_timers.c.saga_id, _timers.c.kind, _timers.c.step, _timers.c.attempt, _timers.c.due_at).where(
        _timers.c.kind.in_(_KINDS)
    )
    for saga_id, kind, step, attempt, due_at in bind.execute(moved):
        pending[saga_id].append([kind, step, attempt, due_at])
    for saga_id, entries in pending.items():
        entries.sort(key=lambda e: (e[3], str(e[1])))
        bind.execute(
            _instances.update()
            .where(_instances.c.id == saga_id)
            .values(step_deadline=entries[0][3], step_timeouts=json.dumps(entries, separators=(",", ":")))
        )
    bind.execute(_timers.delete().where(_timers.c.kind.in_(_KINDS)))


def downgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_instances.c.id, _instances.c.step_timeouts).where(_instances.c.step_timeouts.is_not(None))
    ).all()
    for saga_id, text in rows:
        for kind, step, attempt, due_at in json.loads(text):
            timer_id = f"{saga_id}/timer/{kind}/{step or '-'}/{attempt}"
            bind.execute(_timers.delete().where(_timers.c.id == timer_id))
            bind.execute(_timers.insert().values(id=timer_id, saga_id=saga_id, kind=kind, step=step, attempt=attempt,
                                                 due_at=due_at, claimed_until=None))
    op.drop_index("ix_saga_instances_step_deadline", table_name="saga_instances")
    with op.batch_alter_table("saga_instances") as batch:
        batch.drop_column("deadline_claimed_until")
        batch.drop_column("step_timeouts")
        batch.drop_column("step_deadline")

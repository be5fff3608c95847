"""A participant's own tables, in its own database: dedup records and dead letters (`sagas.participant`).

The migrations in `participant_migrations/versions/` create exactly these (a test compares them); their version
table is ``sagas_participant_version``, so a participant's database may also be the engine's or hold the
application's own alembic history.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from sagas.definitions.limits import REPLY_TYPE_CHARS

metadata = sa.MetaData()

Time = sa.Float()

dedup_table = sa.Table(
    "participant_dedup",
    metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("command_id", sa.String(300), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    # A reply type as a definition may name it (a step's `success`/`failure` lists): the limit is the one bound.
    sa.Column("type", sa.String(REPLY_TYPE_CHARS), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("at", Time, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Index("ix_participant_dedup_at", "at"),  # retention deletes by age
)

dead_letters_table = sa.Table(
    "participant_dead_letters",
    metadata,
    # The SHA-256 of the whole message (topic, key, headers, body): the same bytes delivered again are one letter.
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("topic", sa.String(300), nullable=False),
    sa.Column("key", sa.String(300), nullable=True),
    sa.Column("headers", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=True),  # None: the broker never read the body whole
    sa.Column("complete", sa.Boolean, nullable=False),
    sa.Column("at", Time, nullable=False),
    sa.Column("replayed_at", Time, nullable=True),
    sa.Index("ix_participant_dead_letters_at", "at"),
)

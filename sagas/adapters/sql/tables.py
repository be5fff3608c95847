"""The schema shared by SQLite and PostgreSQL, as SQLAlchemy Core tables.

The migrations in `migrations/versions/` create exactly this; a contract test compares the two with alembic's
autogenerate so they cannot drift. Times are epoch seconds stored as double precision. Message bodies are
bytes; headers are JSON in the compact form described in `rows.py` (older rows: lists of ``[name, base64 value]``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from sagas.definitions.limits import (
    IDEMPOTENCY_KEY_CHARS,
    MESSAGE_ID_CHARS,
    NAME_CHARS,
    STORED_SAGA_ID_CHARS,
)

TOPIC_COLUMN_CHARS = 300
"""The topic columns: wider than any topic a definition may name (`TOPIC_CHARS`, 249), since a dead letter keeps
the topic a message came from, whatever the broker allowed."""

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# JSONB on PostgreSQL (indexable, compact); TEXT holding JSON on SQLite.
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# JSON as written: PostgreSQL's `json` keeps the text, so the order of keys survives (JSONB sorts keys by length,
# and a saga's input, its steps and the replies would come back reordered); TEXT holding JSON on SQLite.
OrderedJson = sa.JSON()
# INTEGER PRIMARY KEY is SQLite's rowid alias (autoincrementing); BIGSERIAL on PostgreSQL.
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.Double[float]()

saga_instances = sa.Table(
    "saga_instances",
    metadata,
    sa.Column("id", sa.String(STORED_SAGA_ID_CHARS), primary_key=True),
    sa.Column("definition", sa.String(NAME_CHARS), nullable=False),
    sa.Column("definition_version", sa.Integer, nullable=False),  # VERSION_MAX fits
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("idempotency_key", sa.String(IDEMPOTENCY_KEY_CHARS), nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("snapshot", OrderedJson, nullable=False),
    # Whether the snapshot holds a failure reason: the list's reason filter reads only those sagas, through the
    # index below, instead of every snapshot (migration 0006).
    sa.Column("has_reason", sa.Boolean, nullable=False, server_default=sa.false()),
    # The saga's pending step timeouts (`deadlines.py`): the soonest due time, all of them as JSON text, and the
    # claim's lease (as `timers.claimed_until`). Migration 0004.
    sa.Column("step_deadline", Time, nullable=True),
    sa.Column("step_timeouts", sa.Text, nullable=True),
    sa.Column("deadline_claimed_until", Time, nullable=True),
    # NULL keys are distinct in both databases: sagas started without a key never collide.
    sa.UniqueConstraint("definition", "idempotency_key"),
    sa.Index(None, "created_at"),
    sa.Index(None, "status", "created_at"),
    sa.Index(None, "definition", "created_at"),
    sa.Index(None, "status", "updated_at"),  # purge of finished sagas
    sa.Index(
        "ix_saga_instances_step_deadline",
        "step_deadline",
        sqlite_where=sa.text("step_deadline IS NOT NULL"),
        postgresql_where=sa.text("step_deadline IS NOT NULL"),
    ),
    sa.Index(None, "idempotency_key"),  # the list's key filter, which names no definition (0005)
    sa.Index(None, "has_reason", "created_at"),  # the list's reason filter (0006)
)

saga_events = sa.Table(
    "saga_events",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("saga_id", sa.String(STORED_SAGA_ID_CHARS), nullable=False),
    sa.Column("at", Time, nullable=False),
    sa.Column("type", sa.String(100), nullable=False),
    sa.Column("step", sa.String(NAME_CHARS), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=True),
    sa.Column("detail", OrderedJson, nullable=False),
    sa.Index(None, "saga_id", "id"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    # `seq` keeps the insertion order of messages created at one instant (a saga's commands stay ordered).
    sa.Column("seq", RowId, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(MESSAGE_ID_CHARS), nullable=False, unique=True),
    sa.Column("saga_id", sa.String(STORED_SAGA_ID_CHARS), nullable=False),
    sa.Column("topic", sa.String(TOPIC_COLUMN_CHARS), nullable=False),
    sa.Column("key", sa.String(MESSAGE_ID_CHARS), nullable=True),
    sa.Column("headers", Json, nullable=False),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("sent_at", Time, nullable=True),
    sa.Column("claimed_until", Time, nullable=True),
    sa.Index(
        "ix_outbox_pending",
        "created_at",
        "seq",
        sqlite_where=sa.text("sent_at IS NULL"),
        postgresql_where=sa.text("sent_at IS NULL"),
    ),
    sa.Index(None, "sent_at"),
)

inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("message_id", sa.String(MESSAGE_ID_CHARS), primary_key=True),
    sa.Column("saga_id", sa.String(STORED_SAGA_ID_CHARS), nullable=True),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("at", Time, nullable=False),
    sa.Index(None, "at"),
)

timers = sa.Table(
    "timers",
    metadata,
    sa.Column("id", sa.String(MESSAGE_ID_CHARS), primary_key=True),
    sa.Column("saga_id", sa.String(STORED_SAGA_ID_CHARS), nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("step", sa.String(NAME_CHARS), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("due_at", Time, nullable=False),
    sa.Column("claimed_until", Time, nullable=True),
    sa.Index(None, "due_at"),
    sa.Index(None, "saga_id"),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.String(MESSAGE_ID_CHARS), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("saga_id", sa.String(STORED_SAGA_ID_CHARS), nullable=True),
    sa.Column("topic", sa.String(TOPIC_COLUMN_CHARS), nullable=False),
    sa.Column("key", sa.String(MESSAGE_ID_CHARS), nullable=True),
    sa.Column("headers", Json, nullable=False),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("at", Time, nullable=False),
    sa.Column("replayed_at", Time, nullable=True),
    # `value` may be a prefix of the body (the engine keeps a bounded one): these describe the whole body.
    # NULL in rows from before migration 0002, which hold the whole body.
    sa.Column("size", sa.BigInteger, nullable=True),
    sa.Column("sha256", sa.String(64), nullable=True),
    sa.Index(None, "at"),
)

definitions = sa.Table(
    "definitions",
    metadata,
    sa.Column("name", sa.String(NAME_CHARS), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("body", OrderedJson, nullable=False),
    sa.Column("created_at", Time, nullable=False),
)

VERSION_TABLE = "sagas_schema_version"
"""Alembic's version table, named so that it does not collide with an application's own `alembic_version`."""

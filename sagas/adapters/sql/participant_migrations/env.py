"""Alembic environment of a participant's own tables: dedup records, dead letters (see
`sagas.adapters.sql.alembic_env`)."""

from __future__ import annotations

from sagas.adapters.sql.alembic_env import run
from sagas.adapters.sql.participant_tables import metadata

run(metadata)

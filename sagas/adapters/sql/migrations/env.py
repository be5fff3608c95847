"""Alembic environment of the `sagas` store schema (see `sagas.adapters.sql.alembic_env`)."""

from __future__ import annotations

from sagas.adapters.sql.alembic_env import run
from sagas.adapters.sql.tables import metadata

run(metadata)

"""Alembic environment of the `db://` queue's tables (see `sagas.adapters.sql.alembic_env`)."""

from __future__ import annotations

from sagas.adapters.sql.alembic_env import run
from sagas.adapters.sqlqueue import metadata

run(metadata)

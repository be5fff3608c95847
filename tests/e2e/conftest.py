"""A database per test on each store: a SQLite file, or a new PostgreSQL database (the CLI takes a URL, not a
schema, so a test of its own database cannot meet another test's rows)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=STORES)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database on SQLite, then on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
        return
    import asyncpg

    pg_url: str = request.getfixturevalue("pg_url")
    database = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
        yield sa.make_url(pg_url).set(database=database).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()

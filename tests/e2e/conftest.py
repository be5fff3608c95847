"""A database per test on each store: a SQLite file, or a new PostgreSQL database (the CLI takes a URL, not a
schema, so a test of its own database cannot meet another test's rows)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import pg_database

STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=STORES)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database on SQLite, then on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
        return
    pg_url: str = request.getfixturevalue("pg_url")
    async with pg_database(pg_url) as url:
        yield url

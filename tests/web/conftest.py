"""The served stack of tests/web/served.py, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import service_url
from tests.web.served import Stack, pg_schema, stack


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "sqlite":
        async with stack(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}", tmp_path) as s:
            yield s
        return
    pg_url = service_url("SAGAS_TEST_PG_URL")
    async with pg_schema(pg_url) as schema, stack(pg_url, tmp_path, schema=schema) as s:
        yield s

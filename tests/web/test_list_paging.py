"""The list's keyset pages stay index seeks with many sagas stored (bench/list_page.py measures them with a
million): checked on the query plan, not on timings."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from bench.list_page import fill
from sagas.adapters.sql import SqlStore, queries, upgrade
from sagas.engine.admin import SagaAdmin
from sagas.engine.ports import SagaQuery
from sagas.engine.state import SagaStatus
from sagas.web.operations import Operations, decode_cursor, encode_cursor

ROWS = 5000


class _Capture:
    """Stands in for a connection: keeps the statement `queries.instances` builds."""

    statement: sa.Select[tuple[str]]

    def execute(self, statement: sa.Select[tuple[str]]) -> sa.Result[tuple[str]]:
        self.statement = statement
        raise _Captured


class _Captured(Exception):
    pass


def plan(db: Path, query: SagaQuery) -> list[str]:
    import sqlite3

    capture = _Capture()
    with pytest.raises(_Captured):
        queries.instances(capture, query)  # type: ignore[arg-type]
    compiled = capture.statement.compile(dialect=sqlite.dialect())
    with sqlite3.connect(db) as conn:
        rows = conn.execute("EXPLAIN QUERY PLAN " + str(compiled), list(compiled.params.values())).fetchall()
    return [str(row[3]) for row in rows]


@pytest.mark.parametrize("filters", [{}, {"status": SagaStatus.FAILED}, {"definition": "shipping"},
                                     {"status": SagaStatus.COMPENSATED, "definition": "billing"}])
async def test_a_deep_page_seeks_the_index_and_pages_cover_every_saga(tmp_path: Path,
                                                                      filters: dict[str, object]) -> None:
    """With a cursor deep in the list, SQLite searches an index by range (never scans it from the newest entry),
    and the pages of a filter, followed to the end, hold each of its sagas once."""
    db = tmp_path / "sagas.db"
    url = f"sqlite+aiosqlite:///{db}"
    await upgrade(url)
    await fill(url, ROWS, chunk=ROWS)
    store = SqlStore(url)
    try:
        ops = Operations(SagaAdmin(store))
        query = SagaQuery(limit=500, **filters)  # type: ignore[arg-type]
        seen: list[str] = []
        cursor = None
        while True:
            page = await ops.page(query, cursor=cursor, total=False)
            seen += [i.id for i in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert len(seen) == len(set(seen)) == await store.count_instances(query)
        oldest = (await store.query_instances(SagaQuery(limit=ROWS, **filters)))[-3]  # type: ignore[arg-type]
        deep = SagaQuery(limit=51, before=decode_cursor(encode_cursor(oldest)), **filters)  # type: ignore[arg-type]
        steps = plan(db, deep)
        assert any(s.startswith("SEARCH") and "created_at<" in s for s in steps), steps
        assert not any(s.startswith("SCAN") for s in steps), steps
    finally:
        await store.close()

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


async def test_the_reason_filter_reads_only_the_sagas_that_have_a_reason(tmp_path: Path) -> None:
    """A reason filter with no other filter searches the (has_reason, created_at) index instead of scanning every
    snapshot, and finds exactly the sagas whose stored reason holds the word."""
    import json
    import sqlite3

    db = tmp_path / "sagas.db"
    url = f"sqlite+aiosqlite:///{db}"
    await upgrade(url)
    await fill(url, ROWS, chunk=ROWS)
    steps = plan(db, SagaQuery(limit=50, reason="gateway"))
    assert any(s.startswith("SEARCH") and "has_reason" in s for s in steps), steps
    assert not any(s.startswith("SCAN") for s in steps), steps
    with sqlite3.connect(db) as conn:
        snapshots = [json.loads(s) for (s,) in conn.execute("SELECT snapshot FROM saga_instances")]
        flagged = conn.execute("SELECT count(*) FROM saga_instances WHERE has_reason").fetchone()[0]
    assert flagged == sum(1 for s in snapshots if s.get("failure") is not None) > 0
    expected = {s["id"] for s in snapshots if "gateway" in (s.get("failure") or "").lower()}
    store = SqlStore(url)
    try:
        found = await store.query_instances(SagaQuery(limit=ROWS, reason="GATEWAY"))
        assert {i.id for i in found} == expected
        assert len(expected) == ROWS // 1000
    finally:
        await store.close()


async def test_migration_0006_flags_the_stored_sagas_that_have_a_reason(tmp_path: Path) -> None:
    """A database at 0005 with sagas with and without a reason: after the upgrade only the first are flagged, and
    the reason filter finds them."""
    import json
    import sqlite3

    db = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{db}"
    await upgrade(url, revision="0005_key_index")
    reasons = {"s-1": "step ship: SHIP declined", "s-2": None, "s-3": "refund gateway down", "s-4": None}
    with sqlite3.connect(db) as conn:
        assert "has_reason" not in [c[1] for c in conn.execute("PRAGMA table_info(saga_instances)")]
        conn.executemany(
            "INSERT INTO saga_instances (id, definition, definition_version, status, stage, version, created_at, "
            "updated_at, snapshot) VALUES (?, 'order', 1, 'failed', 0, 1, 1.0, 1.0, ?)",
            [(i, json.dumps({"id": i, "failure": r})) for i, r in reasons.items()])
    await upgrade(url)
    with sqlite3.connect(db) as conn:
        flagged = {i for (i,) in conn.execute("SELECT id FROM saga_instances WHERE has_reason")}
    assert flagged == {i for i, r in reasons.items() if r is not None}
    assert 0 < len(flagged) < len(reasons)

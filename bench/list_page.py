"""List-page latency with a million sagas stored: the API's `GET /api/sagas` and the console's `/sagas`.

The sagas are inserted directly with SQL (one INSERT ... SELECT over a recursive CTE on SQLite, generate_series on
PostgreSQL), each row with a real snapshot (a started saga's JSON with its id, status, times, key and reason set),
so the app reads and parses rows exactly as it reads its own. The mix: three definitions; 0.1% parked (failed,
"refund gateway down ..."), 0.5% running, 2.5% compensated ("SHIP declined"), the rest completed; one saga every
50 ms of creation time (about 14 hours for a million); every saga has an idempotency key.

Every page is asked through the ASGI app in this process (httpx's ASGITransport: the app, the store and the
database, not the network), interleaved round-robin so that the machine's load falls on all cases alike; the first
round of each is a warm-up and not counted.

    .venv/bin/python bench/list_page.py [--rows 1000000] [--rounds 100] [--db postgresql+asyncpg://...]

With --db the database must be empty (a new one: this inserts a million rows into it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from sagas.adapters.sql import SqlStore, upgrade
from sagas.adapters.sql.connection import open_async_engine
from sagas.definitions.loader import load_file
from sagas.engine import machine
from sagas.engine.admin import SagaAdmin
from sagas.engine.ports import SagaQuery
from sagas.engine.state import SagaStatus
from sagas.web.operations import Operations, encode_cursor
from sagas.web.security import Security
from sagas.web.site import operator_app

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "order_payment" / "saga.yaml"
TOKEN = "bench-token-0123456789"
T0 = 1_780_000_000.0
STEP = 0.05
TARGET_P99_MS = 200.0

# Sentinels in the template snapshot, replaced per row in SQL.
_ID, _KEY, _STATUS, _FAILURE = "@@ID@@", "@@KEY@@", "running", "@@FAILURE@@"
_CREATED, _UPDATED = 111111111.25, 222222222.25


def template() -> str:
    """A started saga's snapshot, with sentinels where each row differs."""
    definition = load_file(SAMPLE)
    decision = machine.start(definition, saga_id=_ID, input={"order_id": "o-@@ID@@", "amount": 10},
                             now=_CREATED, idempotency_key=_KEY)
    instance = decision.instance.model_copy(update={"updated_at": _UPDATED, "failure": _FAILURE})
    text = instance.model_dump_json()
    for sentinel in (_ID, _KEY, f'"status":"{_STATUS}","stage"', repr(_CREATED), repr(_UPDATED), f'"{_FAILURE}"'):
        assert sentinel in text, sentinel
    return text


def _status_sql(i: str) -> str:
    return (f"CASE WHEN {i} % 1000 = 0 THEN 'failed' WHEN {i} % 1000 < 6 THEN 'running' "
            f"WHEN {i} % 1000 < 31 THEN 'compensated' ELSE 'completed' END")


def _failure_sql(i: str) -> str:
    return (f"CASE WHEN {i} % 1000 = 0 THEN '\"refund gateway down (' || ({i} % 7) || ')\"' "
            f"WHEN {i} % 1000 >= 6 AND {i} % 1000 < 31 THEN '\"step ship: SHIP declined\"' ELSE 'null' END")


def insert_sql(dialect: str) -> str:
    """One statement inserting rows [:lo, :hi) from the snapshot template :tpl, with ids ordered by creation time,
    as UUIDv7 are."""
    if dialect == "sqlite":
        source = ("WITH RECURSIVE n(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :hi) "
                  "SELECT i FROM n")
        saga_id = "printf('%08x-%04x-7000-8000-%012x', i / 65536, i % 65536, (i * 2654435761) % 281474976710656)"
    else:
        source = "SELECT i FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint) - 1) AS i"
        saga_id = ("lpad(to_hex(i / 65536), 8, '0') || '-' || lpad(to_hex(i % 65536), 4, '0') || '-7000-8000-' "
                   "|| lpad(to_hex((i * 2654435761) % 281474976710656), 12, '0')")
    definition = "CASE i % 3 WHEN 0 THEN 'order_payment' WHEN 1 THEN 'shipping' ELSE 'billing' END"
    created = f"({T0} + i * {STEP})"
    snapshot_sql = (f"replace(replace(replace(replace(replace(replace(replace(:tpl, '{_ID}', sid), "
                    f"'{_KEY}', 'key-' || i), "
                    f"'\"status\":\"{_STATUS}\",\"stage\"', '\"status\":\"' || st || '\",\"stage\"'), "
                    f"'{_CREATED!r}', CAST({created} AS TEXT)), '{_UPDATED!r}', CAST({created} + 1 AS TEXT)), "
                    f"'\"{_FAILURE}\"', fail), '\"definition\":\"order_payment\"', '\"definition\":\"' || def || '\"')")
    if dialect != "sqlite":
        snapshot_sql = f"CAST({snapshot_sql} AS json)"
    return (
        "INSERT INTO saga_instances (id, definition, definition_version, status, stage, idempotency_key, version, "
        "created_at, updated_at, snapshot, has_reason) "
        f"SELECT sid, def, 1, st, 0, 'key-' || i, 1, {created}, {created} + 1, {snapshot_sql}, fail <> 'null' FROM ("
        f"SELECT i, {saga_id} AS sid, {_status_sql('i')} AS st, {_failure_sql('i')} AS fail, {definition} AS def "
        f"FROM ({source}) AS numbers) AS r"
    )


async def fill(url: str, rows: int, chunk: int = 100_000) -> float:
    """Insert `rows` sagas; the seconds it took."""
    engine = open_async_engine(url)
    started = time.perf_counter()
    try:
        async with engine.connect() as conn:
            statement = sa.text(insert_sql(conn.dialect.name))
            snapshot = template()
            for lo in range(0, rows, chunk):
                await conn.execute(statement, {"lo": lo, "hi": min(rows, lo + chunk), "tpl": snapshot})
                await conn.commit()
                print(f"  inserted {min(rows, lo + chunk):,}", flush=True)
            if conn.dialect.name == "sqlite":
                await conn.exec_driver_sql("ANALYZE")
            else:
                await conn.exec_driver_sql("ANALYZE saga_instances")
            await conn.commit()
    finally:
        await engine.dispose()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(url: str, rows: int, rounds: int) -> list[tuple[str, list[float], int]]:
    store = SqlStore(url)
    await store.initialize()
    await store.save_definition(load_file(SAMPLE))
    admin = SagaAdmin(store)
    app = operator_app(Operations(admin), Security(tokens={"bench": TOKEN}, open_reads=True))
    deep_id = f"{10 // 65536:08x}-{10 % 65536:04x}-7000-8000-{(10 * 2654435761) % 281474976710656:012x}"
    deep = encode_cursor(await admin.get(deep_id))  # the page after the 11th oldest saga: the very end
    middle = T0 + rows // 2 * STEP
    second = encode_cursor((await admin.query(SagaQuery(limit=50)))[-1])
    second_failed = encode_cursor((await admin.query(SagaQuery(status=SagaStatus.FAILED, limit=50)))[-1])
    api: dict[str, dict[str, Any]] = {
        "API first page": {},
        "API status=failed": {"status": "failed"},
        "API definition=shipping": {"definition": "shipping"},
        "API status=compensated&definition=billing": {"status": "compensated", "definition": "billing"},
        "API time window (1 h, middle)": {"created_from": middle, "created_to": middle + 3600},
        f"API key=key-{rows // 2 + 1}": {"key": f"key-{rows // 2 + 1}"},
        "API status=running": {"status": "running"},
        "API reason=gateway (no status)": {"reason": "gateway"},
        "API status=failed&reason=gateway": {"status": "failed", "reason": "gateway"},
        "API second page": {"cursor": second},
        "API status=failed, second page": {"status": "failed", "cursor": second_failed},
        "API deep keyset page (the oldest)": {"cursor": deep},
    }
    console = {
        "console first page": {},
        "console status=failed": {"status": "failed"},
        "console second page": {"cursor": second},
        "console deep keyset page": {"cursor": deep},
    }
    cases: list[tuple[str, str, dict[str, Any]]] = [
        *((name, "/api/sagas", params) for name, params in api.items()),
        *((name, "/sagas", params) for name, params in console.items()),
    ]
    timings: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    items: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        for round_ in range(rounds + 1):
            for name, path, params in cases:
                started = time.perf_counter()
                response = await client.get(path, params=params, headers=headers)
                elapsed = time.perf_counter() - started
                assert response.status_code == 200, (name, response.status_code, response.text[:300])
                if round_ == 0:
                    items[name] = (len(response.json()["items"]) if path.startswith("/api")
                                   else response.text.count('class="saga '))
                    continue
                timings[name].append(elapsed)
        started = time.perf_counter()
        total = (await client.get("/api/sagas", params={"total": "true", "limit": 1}, headers=headers)).json()["total"]
        count_s = time.perf_counter() - started
    await store.close()
    assert total == rows, total
    print(f"  (total=true, a COUNT over all {total:,} rows, once: {count_s * 1000:.0f} ms; not asked by the "
          "console)")
    return [(name, timings[name], items[name]) for name, _, _ in cases]


def report(results: list[tuple[str, list[float], int]], rows: int) -> None:
    print(f"\nlist-page latency, {rows:,} sagas stored (ms; target p99 <= {TARGET_P99_MS:.0f})")
    print(f"{'case':44} {'rows':>5} {'p50':>8} {'p99':>8} {'max':>8}")
    for name, values, shown in results:
        ms = [v * 1000 for v in values]
        flag = "" if percentile(ms, 0.99) <= TARGET_P99_MS else "  over target"
        print(f"{name:44} {shown:>5} {statistics.median(ms):8.1f} {percentile(ms, 0.99):8.1f} {max(ms):8.1f}{flag}")


async def bench(url: str, rows: int, rounds: int, fill_first: bool) -> None:
    if fill_first:
        await upgrade(url)
        print(f"filling {url.split('@')[-1]} with {rows:,} sagas")
        print(f"  {await fill(url, rows):.1f} s")
    report(await measure(url, rows, rounds), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--db", help="an empty database's URL (default: a new SQLite file)")
    parser.add_argument("--keep", type=Path, help="with SQLite: the file to fill (kept, and reused if filled)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        path: Path = args.keep or Path(tmp) / "sagas.db"
        url: str = args.db or f"sqlite+aiosqlite:///{path}"
        reuse = args.db is None and args.keep is not None and path.exists()
        asyncio.run(bench(url, args.rows, args.rounds, fill_first=not reuse))
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

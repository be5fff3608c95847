"""The benchmark's three-step saga on DBOS Transact, for a side-by-side figure (`saga_throughput.py --peers`).

The shape of `bench/saga_throughput.py`'s order saga: one durable workflow per order, three steps (reserve ->
charge -> ship), each step doing the same trivial work as the benchmark's participants (it returns
``{"by": <command>}``), each step's result checkpointed in DBOS's system database before the next step starts,
as a participant's dedup record and the engine's state are committed in sagas. No compensation runs (every step
succeeds), as in the sagas run.

- `--db` is a SQLite file path or a ``postgresql[+driver]://`` URL. On SQLite, every connection gets WAL and
  ``synchronous=NORMAL``, the settings of sagas' stores (DBOS as shipped keeps SQLite's rollback journal and
  ``synchronous=FULL``: `--sqlite-as-shipped`). On PostgreSQL, DBOS's tables go in a schema made for the run
  (``dbos_system_schema``), dropped at the end.
- workflows are started with `DBOS.start_workflow` from `--concurrency` threads (`--api sync`, the default: the
  faster of the two here, ~75 against ~65/s) or with `DBOS.start_workflow_async` on one event loop (`--api
  async`), and awaited with the handle's `get_result`: `--concurrency` in flight, a new one as one ends (closed
  loop, like the sagas run); each latency runs from the start call until the result is back; 50 warm-up
  workflows are not counted.
- CPU: this process (every thread: DBOS runs its database calls on its executor threads), the machine
  (`/proc/stat`) and PostgreSQL's processes (`/proc`), over the measured window only.

Run alone it prints the figures; with `--json` one JSON object (what `saga_throughput.py --peers` reads, since
DBOS is one instance per process and installs its own logging, it runs there as a child process).

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/peers/dbos_saga.py --db /tmp/dbos.db [--sagas 3000] [--concurrency 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench.peers.compare import Background, Servers, pg_wal_position
from bench.saga_throughput import machine_busy

COMMANDS = ("Reserve", "Charge", "Ship")
WARM_UP = 50


def sqlite_like_sagas() -> None:
    """Give every SQLite connection of this process the journal settings of sagas' SQLite stores."""
    import sqlalchemy as sa
    from sqlalchemy import event

    @event.listens_for(sa.engine.Engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        if type(dbapi_connection).__module__.startswith("sqlite3"):
            dbapi_connection.execute("PRAGMA journal_mode = WAL")
            dbapi_connection.execute("PRAGMA synchronous = NORMAL")


def dbos_url(db: str) -> tuple[str, bool]:
    """DBOS's system database URL for `db` (a SQLite path or a PostgreSQL URL), and whether it is PostgreSQL."""
    if db.startswith("postgresql"):
        rest = db.partition("://")[2]
        return f"postgresql+psycopg://{rest}", True  # DBOS's own driver, whatever the engine's URL names
    return f"sqlite:///{Path(db).resolve()}", False


def drop_schema(url: str, schema: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()


def register() -> tuple[Callable[[str, int], Coroutine[Any, Any, list[dict[str, str]]]],
                        Callable[[str, int], list[dict[str, str]]]]:
    """The order workflow, async and sync (each with its steps), registered with DBOS before it launches."""
    from dbos import DBOS

    @DBOS.step()
    async def participant_step(command: str, order_id: str, amount: int) -> dict[str, str]:
        return {"by": command}  # the benchmark's participants' whole handler

    @DBOS.workflow()
    async def order(order_id: str, amount: int) -> list[dict[str, str]]:
        return [await participant_step(command, order_id, amount) for command in COMMANDS]

    @DBOS.step()
    def participant_step_sync(command: str, order_id: str, amount: int) -> dict[str, str]:
        return {"by": command}

    @DBOS.workflow()
    def order_sync(order_id: str, amount: int) -> list[dict[str, str]]:
        return [participant_step_sync(command, order_id, amount) for command in COMMANDS]

    return order, order_sync


def drive(sagas: int, concurrency: int, api: str, postgres_url: str | None = None,
          background_seconds: float = 2.0) -> dict[str, Any]:
    """Launch DBOS, run the warm-up, then `sagas` workflows measured; `api`: "async" (start_workflow_async on one
    event loop) or "sync" (start_workflow from `concurrency` threads)."""
    from dbos import DBOS

    order, order_sync = register()
    latencies: list[float] = []

    async def one_async(index: int, gate: asyncio.Semaphore) -> int:
        async with gate:
            started = time.perf_counter()
            handle = await DBOS.start_workflow_async(order, f"o-{index}", 10)
            result = await handle.get_result()
            latencies.append(time.perf_counter() - started)
            return len(result) == len(COMMANDS)

    def one_sync(index: int) -> int:
        started = time.perf_counter()
        result = DBOS.start_workflow(order_sync, f"o-{index}", 10).get_result()
        latencies.append(time.perf_counter() - started)  # list.append is atomic under the GIL
        return len(result) == len(COMMANDS)

    async def batch_async(indexes: range) -> int:
        gate = asyncio.Semaphore(concurrency)
        return sum(await asyncio.gather(*(one_async(i, gate) for i in indexes)))

    DBOS.launch()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="bench-driver") as threads:
        def batch(indexes: range) -> int:
            if api == "async":
                return asyncio.run(batch_async(indexes))
            return sum(threads.map(one_sync, indexes))

        batch(range(WARM_UP))
        latencies.clear()
        background = Background.measure(background_seconds, postgres_url)
        wal = asyncio.run(pg_wal_position(postgres_url)) if postgres_url else None
        servers, busy = Servers(), machine_busy()
        started, cpu = time.perf_counter(), time.process_time()
        completed = batch(range(WARM_UP, WARM_UP + sagas))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        spent, busy = servers.spent(), machine_busy() - busy
        wal_end = asyncio.run(pg_wal_position(postgres_url)) if postgres_url else None
    wal_bytes = None if wal is None or wal_end is None else wal_end - wal
    return {"sagas": sagas, "completed": completed, "seconds": seconds, "latencies": latencies, "cpu": cpu,
            "machine": busy, "servers": spent, "servers_net": background.net(spent, seconds), "api": api,
            "wal_bytes": wal_bytes, "wal_net": None if wal_bytes is None else background.net_wal(wal_bytes, seconds)}


def run(db: str, sagas: int, concurrency: int, *, api: str = "sync", as_shipped: bool = False) -> dict[str, Any]:
    """Run `sagas` workflows on a fresh system database at `db`; the measured figures."""
    from dbos import DBOS

    url, postgres = dbos_url(db)
    schema = f"dbos_bench_{uuid.uuid4().hex[:10]}"
    if not postgres and not as_shipped:
        sqlite_like_sagas()
    config: dict[str, Any] = {"name": "sagas-bench-peer", "system_database_url": url, "log_level": "WARNING",
                              "run_admin_server": False}
    if postgres:
        config["dbos_system_schema"] = schema
    DBOS(config=config)  # type: ignore[arg-type]  # a TypedDict: the keys above are DBOSConfig's
    try:
        result = drive(sagas, concurrency, api, db if postgres else None, 2.0 if postgres else 0.0)
    finally:
        DBOS.destroy()
        if postgres:
            drop_schema(url, schema)
    journal = "PostgreSQL" if postgres else ("as shipped (rollback journal, synchronous=FULL)" if as_shipped
                                             else "WAL, synchronous=NORMAL")
    return {**result, "store": f"{journal}, {api} API", "version": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("dbos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", help="a SQLite file (default: one in a temporary directory) or a postgresql:// URL")
    parser.add_argument("--sagas", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--api", choices=("sync", "async"), default="sync", help="sync: start_workflow from "
                        "--concurrency threads (the faster here); async: start_workflow_async on one event loop")
    parser.add_argument("--sqlite-as-shipped", action="store_true", help="leave DBOS's SQLite journal settings "
                        "as they are (rollback journal, synchronous=FULL) instead of sagas' (WAL, NORMAL)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for saga_throughput.py)")
    args = parser.parse_args()
    logging.getLogger("dbos").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="sagas-bench-dbos-") as directory:
        db = args.db or str(Path(directory) / "dbos.db")
        result = run(db, args.sagas, args.concurrency, api=args.api, as_shipped=args.sqlite_as_shipped)
    if args.json:
        print(json.dumps(result))
        return
    latencies = sorted(result["latencies"])
    print(f"DBOS Transact {result['version']} on {result['store']}: {result['completed']} of {result['sagas']} "
          f"workflows in {result['seconds']:.2f}s: {result['completed'] / result['seconds']:,.0f}/s, "
          f"p50 {statistics.median(latencies) * 1000:,.1f} ms, p99 "
          f"{latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000:,.1f} ms, "
          f"CPU per saga {result['cpu'] / result['sagas'] * 1000:.2f} ms (machine "
          f"{result['machine'] / result['sagas'] * 1000:.2f} ms)")


if __name__ == "__main__":
    main()

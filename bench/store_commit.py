"""Commit throughput of the SQL store on SQLite, side by side with plain sqlite3.

A unit of work of size N is what a group commit of N replies for N different sagas writes: N instance updates
(version-checked), N history rows, N outbox messages and N inbox ids, so 4N rows. Three ways are timed:

- ``SqlStore``: the store as shipped (SQLAlchemy Core on a dedicated sqlite3 thread, one hop per commit);
- ``SA async+aiosqlite``: the same Core statements through SQLAlchemy's async engine over aiosqlite;
- ``raw sqlite3``: the same statements, parameters prepared in advance, on a plain sqlite3 connection in this
  thread: the floor, with no event loop, no serialization and no SQLAlchemy.

Every database is a fresh file in WAL mode with synchronous=NORMAL. Only the commit calls are timed.

``--steps`` times instead what the engine commits for a reply that moves each of N sagas to its next step: the
instance update, two history rows, the next command in the outbox, the reply's inbox id, the previous commands'
sent marks, the step timeout of the new step set and the previous one's cancelled; commits/s, wall and CPU time
(every thread of the process) per saga step, over `--repeat` rounds, median [min..max]. It uses only the store's
public API, so another version of the package can be timed side by side (``PYTHONPATH=<its root>``).

    .venv/bin/python bench/store_commit.py [--seconds 1.5] [--sizes 1,10,100,500]
    .venv/bin/python bench/store_commit.py --steps [--sizes 200] [--repeat 5] [--saga-count 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from sagas.adapters.sql import SqlStore, upgrade
from sagas.engine.ports import BrokerMessage, HistoryRecord, InboxRecord, OutboxMessage, UnitOfWork
from sagas.engine.state import HistoryEntry, SagaInstance, StepState, StepStatus, TimerKind, TimerSpec, timer_id

T = TypeVar("T")


def saga(index: int) -> SagaInstance:
    return SagaInstance(
        id=f"saga-{index:06}",
        definition="order",
        definition_version=1,
        steps={"reserve": StepState(), "charge": StepState(), "ship": StepState()},
        input={"order_id": index, "amount": 99.5, "items": [{"sku": "A1", "qty": 2}]},
        created_at=1.0,
        updated_at=1.0,
    )


def unit(sagas: list[SagaInstance], serial: int) -> UnitOfWork:
    work = UnitOfWork()
    for instance in sagas:
        mid = f"{instance.id}/{serial}"
        work.updates.append(instance.model_copy(update={"stage": serial % 3, "updated_at": float(serial)}))
        work.history.append(
            HistoryRecord(instance.id, HistoryEntry(at=float(serial), type="step.succeeded", step="reserve"))
        )
        value = json.dumps({"order_id": instance.id, "serial": serial}).encode()
        message = BrokerMessage("payments.commands", value, instance.id, (("ce_id", mid.encode()),))
        work.outbox.append(OutboxMessage(mid, instance.id, message, float(serial)))
        work.inbox.append(InboxRecord(f"reply/{mid}", instance.id, "applied", float(serial)))
    return work


_STEPS = ("reserve", "charge", "ship")


def _at_step(instance: SagaInstance, serial: int) -> SagaInstance:
    """`instance` with step `serial % 3` running at attempt `serial` (the others succeeded)."""
    running = _STEPS[serial % 3]
    steps = {
        name: StepState(status=StepStatus.RUNNING, attempt=serial) if name == running
        else StepState(status=StepStatus.SUCCEEDED, attempt=1)
        for name in _STEPS
    }
    return instance.model_copy(update={"steps": steps, "stage": serial % 3, "updated_at": float(serial)})


def _timeout(saga_id: str, serial: int) -> TimerSpec:
    step = _STEPS[serial % 3]
    return TimerSpec(id=timer_id(saga_id, TimerKind.STEP_TIMEOUT, step, serial), saga_id=saga_id,
                     timer=TimerKind.STEP_TIMEOUT, step=step, attempt=serial, due_at=float(serial) + 30.0)


def step_unit(sagas: list[SagaInstance], serial: int, sent: list[str]) -> UnitOfWork:
    """What a reply moving each saga to its next step commits (see the module's docstring)."""
    work = UnitOfWork(sent=list(sent))
    for instance in sagas:
        mid = f"{instance.id}/{serial}"
        work.updates.append(_at_step(instance, serial))
        work.history.append(HistoryRecord(instance.id, HistoryEntry(at=float(serial), type="step.succeeded",
                                                                    step=_STEPS[(serial - 1) % 3])))
        work.history.append(HistoryRecord(instance.id, HistoryEntry(at=float(serial), type="step.started",
                                                                    step=_STEPS[serial % 3], attempt=serial)))
        value = json.dumps({"order_id": instance.id, "serial": serial}).encode()
        message = BrokerMessage("payments.commands", value, instance.id, (("ce_id", mid.encode()),))
        work.outbox.append(OutboxMessage(mid, instance.id, message, float(serial)))
        work.inbox.append(InboxRecord(f"reply/{mid}", instance.id, "applied", float(serial)))
        work.timers.append(_timeout(instance.id, serial))
        work.cancel_timers.append(_timeout(instance.id, serial - 1).id)
    return work


async def bench_steps(
    path: Path, size: int, seconds: float, saga_count: int, *, tag: str = ""
) -> tuple[float, float, float]:
    """Commits/s, wall and CPU µs per saga step of `SqlStore.commit` for `step_unit`s of `size` sagas, cycling
    through `saga_count` sagas of their own (ids ``saga-<tag><n>``, so the indexes hold that many more)."""
    store = SqlStore(f"sqlite+aiosqlite:///{path}")
    await store.initialize()
    everyone = [saga(i).model_copy(update={"id": f"saga-{tag}{i:06}"}) for i in range(saga_count)]
    for start in range(0, saga_count, 500):
        chunk = [_at_step(s, 1) for s in everyone[start : start + 500]]
        await store.commit(UnitOfWork(inserts=chunk, timers=[_timeout(s.id, 1) for s in chunk]))
    versions = dict.fromkeys((s.id for s in everyone), 1)
    blocks = [everyone[i : i + size] for i in range(0, saga_count - size + 1, size)]
    serials = [1] * len(blocks)
    commits, spent, cpu, sent = 0, 0.0, 0.0, []
    checkpoints = asyncio.create_task(_checkpoints(store))  # what the engine's loop does (a store that has it)
    while spent < seconds:
        block = commits % len(blocks)
        group = blocks[block]
        serials[block] += 1
        serial = serials[block]
        current = [s.model_copy(update={"version": versions[s.id]}) for s in group]
        work = step_unit(current, serial, sent)
        started, started_cpu = time.perf_counter(), time.process_time()
        await store.commit(work)
        spent += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
        commits += 1
        sent = [m.id for m in work.outbox]
        for s in group:
            versions[s.id] += 1
    checkpoints.cancel()
    await store.close()
    steps = commits * size
    return commits / spent, spent / steps * 1e6, cpu / steps * 1e6


async def _checkpoints(store: SqlStore) -> None:
    checkpoint = getattr(store, "checkpoint", None)
    while checkpoint is not None:
        await checkpoint()
        await asyncio.sleep(0.1)


def main_steps(sizes: list[int], seconds: float, repeat: int, saga_count: int) -> None:
    print(f"SQLite {sqlite3.sqlite_version}; SqlStore commits of saga steps (update, 2 history rows, outbox, inbox,"
          f" sent marks, a timeout set and one cancelled per saga); {saga_count:,} sagas stored; {seconds}s x {repeat}")
    print(f"{'sagas/commit':>12} | {'commits/s':>26} | {'wall us/step':>24} | {'CPU us/step':>24}")
    with tempfile.TemporaryDirectory() as directory:
        for size in sizes:
            runs = [asyncio.run(bench_steps(Path(directory, f"st{size}-{r}.db"), size, seconds, saga_count))
                    for r in range(repeat)]

            def spread(index: int, runs: list[tuple[float, float, float]] = runs) -> str:
                values = sorted(r[index] for r in runs)
                return f"{statistics.median(values):,.1f} [{values[0]:,.1f}..{values[-1]:,.1f}]"

            print(f"{size:>12} | {spread(0):>26} | {spread(1):>24} | {spread(2):>24}")


class AiosqliteRunner:
    """The same Core functions through SQLAlchemy's async engine over aiosqlite (BEGIN IMMEDIATE recipe)."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

        @event.listens_for(self.engine.sync_engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

        @event.listens_for(self.engine.sync_engine, "begin")
        def _begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    async def write(self, work: Callable[[Connection], T]) -> T:
        async with self.engine.begin() as connection:
            return await connection.run_sync(work)

    read = write

    async def close(self) -> None:
        await self.engine.dispose()


async def bench_store(path: Path, size: int, seconds: float, *, aiosqlite: bool) -> float:
    """Commits per second of `SqlStore.commit` for units of `size` events."""
    store = SqlStore(f"sqlite+aiosqlite:///{path}")
    await store.initialize()
    if aiosqlite:
        await store.close()
        store._runner = AiosqliteRunner(path)
    sagas = [saga(i) for i in range(size)]
    await store.commit(UnitOfWork(inserts=sagas))
    sagas = [s.model_copy(update={"version": 1}) for s in sagas]
    commits, spent, serial = 0, 0.0, 0
    while spent < seconds:
        serial += 1
        work = unit(sagas, serial)
        started = time.perf_counter()
        await store.commit(work)
        spent += time.perf_counter() - started
        commits += 1
        sagas = [s.model_copy(update={"version": s.version + 1}) for s in work.updates]
    await store.close()
    return commits / spent


def bench_raw(path: Path, size: int, seconds: float) -> float:
    """Commits per second of the same statements on plain sqlite3 and the same schema, parameters prepared in
    advance."""
    asyncio.run(upgrade(f"sqlite+aiosqlite:///{path}"))
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = NORMAL")
    ids = [f"saga-{i:06}" for i in range(size)]
    snapshot = saga(0).model_dump_json()
    db.executemany(
        "INSERT INTO saga_instances (id, definition, definition_version, status, stage, idempotency_key, version,"
        " created_at, updated_at, snapshot) VALUES (?, 'order', 1, 'running', 0, NULL, 1, 1.0, 1.0, ?)",
        [(i, snapshot) for i in ids],
    )
    marks = ",".join("?" * size)
    commits, spent, serial = 0, 0.0, 0
    while spent < seconds:
        serial += 1
        version = serial
        updates = [
            ("order", 1, "running", serial % 3, None, version + 1, 1.0, float(serial), snapshot, i, version)
            for i in ids
        ]
        events = [(i, float(serial), "step.succeeded", "reserve", None, "{}") for i in ids]
        messages = [
            (f"{i}/{serial}", i, "payments.commands", i, '[["ce_id","eA=="]]', b"{}", float(serial)) for i in ids
        ]
        replies = [(f"reply/{i}/{serial}", i, "applied", float(serial)) for i in ids]
        started = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        versions = dict(db.execute(f"SELECT id, version FROM saga_instances WHERE id IN ({marks})", ids).fetchall())
        assert all(versions[i] == version for i in ids)
        db.executemany(
            "UPDATE saga_instances SET definition=?, definition_version=?, status=?, stage=?, idempotency_key=?, "
            "version=?, created_at=?, updated_at=?, snapshot=? WHERE id=? AND version=?",
            updates,
        )
        db.executemany(
            "INSERT INTO saga_events (saga_id, at, type, step, attempt, detail) VALUES (?,?,?,?,?,?)", events
        )
        db.executemany(
            "INSERT INTO outbox (id, saga_id, topic, key, headers, value, created_at) VALUES (?,?,?,?,?,?,?)",
            messages,
        )
        db.executemany("INSERT INTO inbox VALUES (?,?,?,?)", replies)
        db.execute("COMMIT")
        spent += time.perf_counter() - started
        commits += 1
    db.close()
    return commits / spent


def bench_trivial(path: Path, seconds: float) -> float:
    """Commits per second of plain sqlite3 inserting one tiny row per transaction: the machine's floor."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    commits, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t (v) VALUES ('x')")
        db.execute("COMMIT")
        commits += 1
    db.close()
    return commits / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.5, help="time spent committing per measurement")
    parser.add_argument("--sizes", default=None, help="unit-of-work sizes (events per commit; 1,10,100,500, or 200"
                        " with --steps)")
    parser.add_argument("--steps", action="store_true", help="time saga-step units of the store alone (see above)")
    parser.add_argument("--repeat", type=int, default=5, help="--steps: rounds per size")
    parser.add_argument("--saga-count", type=int, default=10_000, help="--steps: sagas stored and cycled through")
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("200" if args.steps else "1,10,100,500")).split(",")]
    if args.steps:
        main_steps(sizes, args.seconds, args.repeat, args.saga_count)
        return
    with tempfile.TemporaryDirectory() as directory:
        trivial = bench_trivial(Path(directory, "trivial.db"), args.seconds)
        print(f"SQLite {sqlite3.sqlite_version}, WAL, synchronous=NORMAL; {args.seconds}s per cell; 4 rows/event")
        print(f"raw sqlite3, one 1-row insert per transaction: {trivial:,.0f} commits/s")
        header = (
            f"{'events/commit':>13} | {'SqlStore c/s':>12} {'rows/s':>8} | {'SA+aiosqlite c/s':>16} {'rows/s':>8}"
            f" | {'raw sqlite3 c/s':>15} {'rows/s':>8} | {'SqlStore/raw':>12} | {'SqlStore/aiosqlite':>18}"
        )
        print(header)
        print("-" * len(header))
        for size in sizes:
            store = asyncio.run(bench_store(Path(directory, f"s{size}.db"), size, args.seconds, aiosqlite=False))
            slow = asyncio.run(bench_store(Path(directory, f"a{size}.db"), size, args.seconds, aiosqlite=True))
            raw = bench_raw(Path(directory, f"r{size}.db"), size, args.seconds)
            rows = 4 * size
            print(
                f"{size:>13} | {store:>12,.0f} {store * rows:>8,.0f} | {slow:>16,.0f} {slow * rows:>8,.0f}"
                f" | {raw:>15,.0f} {raw * rows:>8,.0f} | {store / raw:>12.2f} | {store / slow:>17.1f}x"
            )


if __name__ == "__main__":
    main()

"""End-to-end saga throughput on the embedded default, side by side with the raw sqlite3 commit rate.

N three-step sagas (reserve → charge → ship, all succeed) run on a SQLite FILE store and the in-memory broker, with
three in-process participants (`sagas.participant.Participant`), each on its own SQLite file, so their dedup records
are as durable as the engine's state. Sagas are started with bounded concurrency (`--concurrency` in flight); each
one's latency runs from the `start_saga` call until `Engine.wait` returns it settled.

In the same run, plain `sqlite3` (WAL, synchronous=NORMAL, one small insert per transaction) gives the machine's
commit rate: a design that commits once per event cannot beat it, divided by the four events of a saga.

    .venv/bin/python bench/saga_throughput.py [--sagas 5000] [--concurrency 200] [--db DIR] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import os
import pstats
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore
from sagas.definitions.model import SagaDefinition
from sagas.engine.runtime import Engine
from sagas.engine.state import SagaStatus
from sagas.engine.wire import CommandMessage
from sagas.logs import configure_logging
from sagas.participant import Participant

STEPS = (("reserve", "inventory", "Reserve"), ("charge", "payment", "Charge"), ("ship", "shipping", "Ship"))


def definition() -> SagaDefinition:
    """The three-step order saga of the engine tests (tests/engine/support.py `three_steps`)."""
    retry = {"max_attempts": 3, "initial_backoff": 1.0, "multiplier": 2.0, "max_backoff": 10.0, "jitter": 0.0}
    steps = [
        {"name": name, "participant": participant, "command": command, "timeout": 30.0, "retry": retry,
         "payload": {"order": "input.order_id", "amount": "input.amount"},
         "compensation": {"command": f"Undo{command}", "payload": {"order": "input.order_id"}}}
        for name, participant, command in STEPS
    ]
    return SagaDefinition.model_validate({
        "name": "order", "version": 1,
        "compensation_retry": {"max_attempts": 3, "initial_backoff": 1.0, "max_backoff": 5.0, "jitter": 0.0},
        "steps": steps,
    })


def participant(name: str, command: str) -> Participant:
    """A participant whose handlers succeed at once; its dedup record is its only write."""
    service = Participant(name)

    async def handle(message: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
        return {"by": message.type}

    service.command(command)(handle)
    service.compensation(f"Undo{command}")(handle)
    return service


class GcTimer:
    """CPU time spent in the cyclic garbage collector (on whichever thread allocates: mostly the loop's)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self.by_generation = [0.0, 0.0, 0.0]
        self.threshold = gc.get_threshold()
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            spent = time.thread_time() - self._started
            self.seconds += spent
            self.collections[info["generation"]] += 1
            self.by_generation[info["generation"]] += spent


@dataclass
class SagaRun:
    sagas: int
    seconds: float
    latencies: list[float]
    completed: int
    stats: dict[str, int]
    cpu: float
    """CPU seconds of the whole process (every thread) during the run."""
    loop_cpu: float
    """CPU seconds of the event loop's thread: engine, participants, broker (the GIL-bound part)."""
    gc: GcTimer


@contextlib.asynccontextmanager
async def running(directory: Path) -> AsyncIterator[Engine]:
    broker = MemoryBroker()
    store = SqlStore(f"sqlite+aiosqlite:///{directory / 'engine.db'}")
    engine = Engine(store=store, broker=broker, definitions=[definition()])
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)  # exits run last-in first-out: after the engine stopped
        await stack.enter_async_context(engine)
        for _, service, command in STEPS:
            url = f"sqlite+aiosqlite:///{directory / f'{service}.db'}"
            await stack.enter_async_context(participant(service, command).serve(broker=broker, database_url=url))
        yield engine


async def run_sagas(directory: Path, sagas: int, concurrency: int, *, gc_freeze: bool = False) -> SagaRun:
    async with running(directory) as engine:
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        completed = 0

        async def one(index: int) -> None:
            nonlocal completed
            async with gate:
                started = time.perf_counter()
                saga_id = await engine.start_saga("order", {"order_id": f"o-{index}", "amount": 10})
                instance = await engine.wait(saga_id, timeout=120)
                latencies.append(time.perf_counter() - started)
                completed += instance.status == SagaStatus.COMPLETED

        await asyncio.gather(*(one(i) for i in range(min(50, sagas))))  # warm-up: caches, statement compilation
        engine.stats = dict.fromkeys(engine.stats, 0)
        if gc_freeze:
            gc.collect()
            gc.freeze()
        latencies.clear()
        completed = 0
        collector = GcTimer()
        gc.callbacks.append(collector)
        started, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        try:
            await asyncio.gather(*(one(i) for i in range(50, 50 + sagas)))
        finally:
            gc.callbacks.remove(collector)
        seconds = time.perf_counter() - started
        cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
        return SagaRun(sagas, seconds, latencies, completed, dict(engine.stats), cpu, loop_cpu, collector)


def raw_commit_rate(path: Path, seconds: float) -> float:
    """Commits per second of plain sqlite3 inserting one small row per transaction."""
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
    elapsed = time.perf_counter() - started
    db.close()
    return commits / elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(run: SagaRun, raw: float) -> None:
    rate = run.completed / run.seconds
    batches = max(run.stats["batches"], 1)
    print(f"sagas: {run.sagas} (3 steps each), completed {run.completed} in {run.seconds:.2f}s")
    print(f"completed sagas/s:      {rate:,.0f}")
    print(f"saga latency p50 / p99: {percentile(run.latencies, 0.5) * 1000:,.1f} ms / "
          f"{percentile(run.latencies, 0.99) * 1000:,.1f} ms (mean {statistics.fmean(run.latencies) * 1000:,.1f} ms)")
    print(f"engine commits:         {run.stats['batches']:,} ({run.stats['batches'] / run.seconds:,.0f}/s), "
          f"{run.stats['items'] / batches:,.1f} events per commit")
    print(f"CPU:                    {run.cpu:.2f}s ({run.cpu / run.sagas * 1000:.2f} ms per saga), of which the event "
          f"loop's thread {run.loop_cpu:.2f}s ({run.loop_cpu / run.seconds:.0%} busy)")
    print(f"garbage collector:      {run.gc.seconds:.2f}s in {sum(run.gc.collections):,} collections at thresholds "
          f"{'/'.join(str(n) for n in run.gc.threshold)} "
          f"(gen0/1/2: {'/'.join(str(n) for n in run.gc.collections)}, taking "
          f"{'/'.join(f'{t:.2f}' for t in run.gc.by_generation)}s)")
    print(f"raw sqlite3 commits/s:  {raw:,.0f} (WAL, synchronous=NORMAL, one 1-row insert per commit)")
    print(f"sagas/s ÷ raw commits/s: {rate / raw:.3f}  (one commit per event would cap it at 0.25)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sagas", type=int, default=5000, help="sagas to run (after 50 warm-up sagas)")
    parser.add_argument("--concurrency", type=int, default=200, help="sagas in flight at once")
    parser.add_argument("--db", type=Path, help="directory for the database files (default: a temporary one)")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="time spent measuring raw sqlite3")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once the engine is up, so that "
                        "full collections skip everything allocated at start-up")
    parser.add_argument("--profile", action="store_true", help="profile the saga run with cProfile (event loop "
                        "thread only: SQLite work on the store's thread shows as waiting)")
    args = parser.parse_args()
    configure_logging(level="WARNING")  # what `sagas serve` sets up, quieter: a debug line per command is noise
    with contextlib.ExitStack() as stack:
        if args.db is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sagas-bench-")))
        else:
            directory = args.db
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("*.db*"):
                stale.unlink()
        print(f"python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
              f"concurrency {args.concurrency}, files in {directory}")
        raw = raw_commit_rate(directory / "raw.db", args.raw_seconds)
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        run = asyncio.run(run_sagas(directory, args.sagas, args.concurrency, gc_freeze=args.gc_freeze))
        if profiler is not None:
            profiler.disable()
        report(run, raw)
        if profiler is not None:
            for key in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(25)
                print(f"\n---- top 25 by {key} ----")
                print(out.getvalue())


if __name__ == "__main__":
    main()

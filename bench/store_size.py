"""Per-saga cost against the store's size: the embedded figure on an empty store and on one already holding
`--prefill` settled sagas, side by side in one run (issue 15, acceptance 4).

The prefilled store is built once per run with plain sqlite3, fast: one real saga is run through the engine on a
scratch file, and its rows (the instance's snapshot, its history, its three sent outbox messages, its inbox ids)
are copied N times under new time-ordered ids (`sagas.engine.ids.new_id`, as the engine mints them), with times
spread over the week before the run, so every table and index holds what N settled sagas leave behind. Each
repetition then runs `bench/saga_throughput.py`'s embedded mode (SQLite file store, in-memory broker, three
in-process participants) on that file (the runs share it: each adds its few thousand sagas) and, alternately
before or after it, on a fresh empty store. Then the store's writer alone, the same way: `bench/store_commit.py
--steps` units (200 saga steps a commit, over 10,000 sagas of their own) on the prefilled file and on an empty one,
interleaved, CPU per saga step.

    .venv/bin/python bench/store_size.py [--prefill 1000000] [--sagas 3000] [--concurrency 200] [--repeat 3]
        [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.saga_throughput import SagaRun, Setup, run_sagas
from bench.store_commit import bench_steps
from sagas.engine.ids import new_id
from sagas.logs import configure_logging

_TABLES = {  # table: (its columns holding the saga id or an id built from it, the columns copied as they are)
    "saga_instances": ("id", "snapshot"),
    "saga_events": ("saga_id", "detail"),
    "outbox": ("id", "saga_id", "key", "headers", "value"),
    "inbox": ("message_id", "saga_id"),
}
_TIMES = {"saga_instances": ("created_at", "updated_at"), "saga_events": ("at",), "outbox": ("created_at", "sent_at"),
          "inbox": ("at",)}


def _template(directory: Path) -> tuple[str, dict[str, tuple[list[str], list[tuple[object, ...]]]]]:
    """Run one saga on a scratch store; its id and its rows per table (columns, rows)."""
    setup = Setup(directory)
    asyncio.run(run_sagas(setup, 1, 1))
    db = sqlite3.connect(directory / "engine.db")
    saga_id = db.execute("SELECT id FROM saga_instances ORDER BY created_at DESC LIMIT 1").fetchone()[0]
    found: dict[str, tuple[list[str], list[tuple[object, ...]]]] = {}
    for table in _TABLES:
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        key = "id" if table == "saga_instances" else "saga_id"
        rows = db.execute(f"SELECT * FROM {table} WHERE {key} = ?", (saga_id,)).fetchall()
        found[table] = (columns, rows)
    db.close()
    return saga_id, found


def build(path: Path, count: int, scratch: Path) -> float:
    """A migrated store at `path` holding `count` settled sagas copied from a real one; seconds it took. The copies
    are made by SQLite itself (``INSERT ... SELECT`` with ``replace()`` of the template's id), from a table of new
    ids made here."""
    started = time.perf_counter()
    saga_id, template = _template(scratch)
    shutil.copyfile(scratch / "engine.db", path)  # migrated, with the definition stored
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")  # a file built for the benchmark: nothing to lose
    db.execute("PRAGMA cache_size = -400000")
    db.execute("PRAGMA temp_store = MEMORY")
    week = 7 * 24 * 3600.0
    first = time.time() - week
    db.execute("CREATE TEMP TABLE fill (n INTEGER PRIMARY KEY, id TEXT NOT NULL, shift REAL NOT NULL)")
    for table, (columns, rows) in template.items():
        db.execute(f"CREATE TEMP TABLE t_{table} AS SELECT * FROM main.{table} WHERE 0")
        db.executemany(f"INSERT INTO t_{table} VALUES ({', '.join('?' * len(columns))})", rows)
    base = min(row[template["saga_instances"][0].index("created_at")] for row in template["saga_instances"][1])
    batch = 100_000
    for start in range(0, count, batch):
        db.execute("BEGIN")
        db.execute("DELETE FROM fill")
        ids = range(start, min(start + batch, count))
        fill = ((n, new_id(), first + week * n / count - base) for n in ids)
        db.executemany("INSERT INTO fill VALUES (?, ?, ?)", fill)
        for table, (columns, _) in template.items():
            skip = {"seq"} if table == "outbox" else {"id"} if table == "saga_events" else set()
            kept = [c for c in columns if c not in skip]
            chosen = []
            for column in kept:
                if column in _TABLES[table]:
                    if column == "value":
                        chosen.append("CAST(replace(CAST(t.value AS TEXT), :old, f.id) AS BLOB)")
                    else:
                        chosen.append(f"replace(t.{column}, :old, f.id)")
                elif column in _TIMES[table]:
                    chosen.append(f"t.{column} + f.shift")
                else:
                    chosen.append(f"t.{column}")
            order = "f.n, t.id" if table == "saga_events" else "f.n"
            db.execute(f"INSERT INTO main.{table} ({', '.join(kept)}) SELECT {', '.join(chosen)} "
                       f"FROM fill AS f CROSS JOIN t_{table} AS t ORDER BY {order}", {"old": saga_id})
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("ANALYZE")
    db.close()
    return time.perf_counter() - started


def _spread(values: list[float], digits: int = 2) -> str:
    ordered = sorted(values)
    return f"{statistics.median(ordered):,.{digits}f} [{ordered[0]:,.{digits}f}..{ordered[-1]:,.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prefill", type=int, default=1_000_000, help="settled sagas already in the store")
    parser.add_argument("--sagas", type=int, default=3000, help="sagas per run (after 50 warm-up sagas)")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each store, interleaved")
    parser.add_argument("--step-seconds", type=float, default=3.0, help="time spent committing per writer-alone run")
    parser.add_argument("--dir", type=Path, help="where the files go (default: a temporary directory)")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    with tempfile.TemporaryDirectory(prefix="sagas-size-", dir=args.dir) as name:
        base = Path(name)
        (base / "scratch").mkdir()
        (base / "prefilled").mkdir()
        template = base / "prefilled" / "engine.db"
        seconds = build(template, args.prefill, base / "scratch")
        size = template.stat().st_size
        print(f"python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, load average "
              f"{'/'.join(f'{n:.1f}' for n in os.getloadavg())}; concurrency {args.concurrency}, {args.sagas} sagas")
        print(f"prefilled store: {args.prefill:,} settled sagas, {size / 2**20:,.0f} MiB, built in {seconds:.0f} s")
        runs: dict[str, list[SagaRun]] = {"empty": [], "prefilled": []}
        for index in range(args.repeat):
            order = ("empty", "prefilled") if index % 2 == 0 else ("prefilled", "empty")
            for kind in order:
                # The prefilled runs share the one file (each adds its few thousand sagas to the million).
                directory = base / "prefilled" if kind == "prefilled" else base / f"empty-{index}"
                directory.mkdir(exist_ok=True)
                run = asyncio.run(run_sagas(Setup(directory), args.sagas, args.concurrency))
                runs[kind].append(run)
                per = 1000 / run.sagas
                print(f"{kind:>9} {index + 1}: {run.completed / run.seconds:,.0f} sagas/s, CPU per saga "
                      f"{run.cpu * per:.3f} ms (loop {run.threads.get('event loop', 0.0) * per:.3f}, writer "
                      f"{run.threads.get('store writer', 0.0) * per:.3f}, reader "
                      f"{run.threads.get('store reader', 0.0) * per:.3f}), load "
                      f"{os.getloadavg()[0]:.1f}")
                if kind == "empty":
                    shutil.rmtree(directory)
        print(f"\n==== median [min..max] over {args.repeat} interleaved runs (load average now "
              f"{'/'.join(f'{n:.1f}' for n in os.getloadavg())}) ====")
        for kind, done in runs.items():

            def per_saga(role: str, done: list[SagaRun] = done) -> str:
                return _spread([r.threads.get(role, 0.0) * 1000 / r.sagas for r in done], 3)

            print(f"{kind:>9}: {_spread([r.completed / r.seconds for r in done], 0)} sagas/s; CPU per saga "
                  f"{_spread([r.cpu * 1000 / r.sagas for r in done], 3)} ms; loop {per_saga('event loop')}; "
                  f"writer {per_saga('store writer')}; reader {per_saga('store reader')}")
        ratios = [p.cpu / e.cpu for e, p in zip(runs["empty"], runs["prefilled"], strict=True)]
        writer = [p.threads.get("store writer", 0.0) / max(e.threads.get("store writer", 0.0), 1e-9)
                  for e, p in zip(runs["empty"], runs["prefilled"], strict=True)]
        print(f"prefilled / empty, per pair: CPU per saga {_spread(ratios, 3)}, writer CPU {_spread(writer, 3)}")
        steps: dict[str, list[tuple[float, float, float]]] = {"empty": [], "prefilled": []}
        for index in range(args.repeat):
            for kind in ("empty", "prefilled") if index % 2 == 0 else ("prefilled", "empty"):
                path = template if kind == "prefilled" else base / f"steps-{index}.db"
                steps[kind].append(asyncio.run(bench_steps(path, 200, args.step_seconds, 10_000, tag=f"{index}-")))
                if kind == "empty":
                    for leftover in base.glob(f"steps-{index}.db*"):
                        leftover.unlink()
        print(f"\n==== the store's writer alone (store_commit.py --steps units, 200 a commit), {args.repeat} "
              f"interleaved runs of {args.step_seconds} s ====")
        for kind, done in steps.items():
            print(f"{kind:>9}: {_spread([d[0] for d in done], 1)} commits/s; wall {_spread([d[1] for d in done], 1)}"
                  f" us, CPU {_spread([d[2] for d in done], 1)} us per saga step")
        cpu_ratios = [p[2] / e[2] for e, p in zip(steps["empty"], steps["prefilled"], strict=True)]
        print(f"prefilled / empty, per pair: CPU per saga step {_spread(cpu_ratios, 3)}")


if __name__ == "__main__":
    main()

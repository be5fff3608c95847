"""The SQLite store's instance updates with a busy Python thread beside them: one statement per row or 64 a statement.

Python's sqlite3 gives the GIL back around every step of a statement and must take it again after. When another
thread holds it (in an engine: the event loop, deciding or running participants), each take waits up to the
interpreter's switch interval (5 ms). One statement per updated saga pays that wait per saga; `writes._update_rows`
pays it per 64 sagas. Each cell commits units of 200 instance updates for `--seconds`, on a fresh SQLite file, with
and without a thread spinning in Python beside the store's writer; both ways are measured in the same run.

    .venv/bin/python bench/gil_convoy.py [--seconds 3] [--updates 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.store_commit import saga
from sagas.adapters.sql import SqlStore, writes
from sagas.engine.ports import UnitOfWork


async def commit_rate(directory: Path, *, multi_row: bool, busy: bool, updates: int, seconds: float) -> float:
    """Units of `updates` instance updates committed per second."""
    saved = writes._UPDATE_FROM
    writes._UPDATE_FROM = multi_row
    store = SqlStore(f"sqlite+aiosqlite:///{directory / f'{multi_row}-{busy}.db'}")
    stop = threading.Event()

    def spin() -> None:  # pure Python: holds the GIL but for the interpreter's forced switches
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin, daemon=True)
    try:
        await store.initialize()
        sagas = [saga(i) for i in range(updates)]
        await store.commit(UnitOfWork(inserts=sagas))
        current = list((await store.load([s.id for s in sagas])).values())
        if busy:
            spinner.start()
        commits, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            await store.commit(UnitOfWork(updates=current))
            current = [s.model_copy(update={"version": s.version + 1}) for s in current]
            commits += 1
        return commits / (time.perf_counter() - started)
    finally:
        stop.set()
        if busy:
            spinner.join()
        writes._UPDATE_FROM = saved
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--updates", type=int, default=200, help="instance updates per commit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sagas-convoy-") as folder:
        rates = {
            (multi, busy): asyncio.run(commit_rate(Path(folder), multi_row=multi, busy=busy, updates=args.updates,
                                                   seconds=args.seconds))
            for busy in (False, True) for multi in (False, True)
        }
    print(f"commits/s of {args.updates} instance updates (ms per commit), switch interval "
          f"{sys.getswitchinterval() * 1000:.0f} ms")
    for busy in (False, True):
        row, multi = rates[(False, busy)], rates[(True, busy)]
        print(f"  {'busy thread beside' if busy else 'nothing beside     '}: one statement per row {row:8.1f} "
              f"({1000 / row:7.1f} ms) | 64 rows per statement {multi:8.1f} ({1000 / multi:7.1f} ms) | "
              f"ratio {multi / row:5.1f}x")


if __name__ == "__main__":
    main()

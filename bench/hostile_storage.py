"""What 10,000 hostile messages of 1 MB leave in the engine's database: the dead-letter cap at work.

Someone who can write to the reply topic writes N messages of about 1 MB each into the `db://` queue of an engine
running on SQLite (queue and store in one file, the embedded default). Half are 1,000,000 bytes of random bytes (at
the message-size limit: read whole, refused as not JSON), half are 1 MiB (over the limit: the queue reads only a
prefix of each). Every one becomes a dead letter that keeps `dead_letter_max_bytes` of the body (64 KiB by default)
with the whole body's size and SHA-256. The writer sends them in chunks and lets the engine keep up (at most
`--lag` messages unread), as a queue's own retention would otherwise be what bounds the file.

It prints, side by side: the bytes written; the database's size afterwards (the main file and its WAL, after a
checkpoint), and the largest it was during the run; what the dead letters hold (rows, bytes of kept bodies); what
the file would need if every body were kept whole (the bytes written); the rate. Target: the database under 1 GiB.

    .venv/bin/python bench/hostile_storage.py [--messages 10000] [--max-bytes 65536] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagas.adapters.sql import SqlStore
from sagas.adapters.sqlqueue import SqlQueueBroker
from sagas.engine.ports import BrokerMessage
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.wire import MAX_MESSAGE_BYTES
from sagas.logs import configure_logging

MiB = 2**20
GiB = 2**30


def hostile(index: int, reply_topic: str) -> BrokerMessage:
    size = MAX_MESSAGE_BYTES if index % 2 else MiB
    headers = (("ce_specversion", b"1.0"), ("ce_id", f"hostile-{index}".encode()), ("ce_sagakind", b"reply"))
    # Fresh bytes for each message: nothing compresses or deduplicates them.
    return BrokerMessage(topic=reply_topic, value=os.urandom(size), key=f"h{index}", headers=headers)


@dataclass
class Figures:
    written: int = 0
    elapsed: float = 0.0
    truncated: int = 0
    peak: int = 0
    """The largest main file + WAL seen during the run (SQLite resets its WAL only when no reader holds it)."""


def on_disk(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return (path.stat().st_size if path.exists() else 0) + (wal.stat().st_size if wal.exists() else 0)


async def run(messages: int, max_bytes: int, path: Path, lag: int, chunk: int) -> Figures:
    url = f"sqlite+aiosqlite:///{path}"
    settings = EngineSettings(dead_letter_max_bytes=max_bytes, fetch_max=64, batch_max=64)
    store = SqlStore(url)
    broker = SqlQueueBroker(url)
    engine = Engine(store=store, broker=broker, settings=settings)
    figures = Figures()
    began = time.monotonic()
    async with engine:
        for start in range(0, messages, chunk):
            batch = [hostile(i, settings.reply_topic) for i in range(start, min(start + chunk, messages))]
            await broker.publish(batch)
            figures.written += sum(len(m.value) for m in batch)
            # The engine's item counter has no event to wait on: poll it.
            while start + len(batch) - engine.stats["items"] > lag:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            figures.peak = max(figures.peak, on_disk(path))  # a stat() a chunk: cheap beside 20 MB of writes
        while engine.stats["items"] < messages:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        letters = await store.dead_letters(limit=messages + 10, include_replayed=True)
        figures.elapsed = time.monotonic() - began
    await store.close()
    figures.truncated = sum(d.truncated for d in letters)
    return figures


def report(messages: int, max_bytes: int, path: Path, figures: Figures) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    kept = connection.execute("SELECT count(*), coalesce(sum(length(value)), 0) FROM dead_letters").fetchone()
    queued = connection.execute("SELECT count(*) FROM broker_messages").fetchone()[0]
    connection.close()
    main = path.stat().st_size
    wal = on_disk(path) - main
    written, elapsed = figures.written, figures.elapsed
    print(f"hostile messages written      {messages:>12,}   ({written / GiB:.2f} GiB, half at the "
          f"{MAX_MESSAGE_BYTES:,}-byte limit, half 1 MiB)")
    print(f"dead letters                  {kept[0]:>12,}   ({figures.truncated:,} truncated to {max_bytes:,} bytes)")
    print(f"dead-letter bodies kept       {kept[1] / MiB:>12,.1f} MiB")
    print(f"engine database after         {(main + wal) / MiB:>12,.1f} MiB   (file {main / MiB:,.1f} MiB + WAL "
          f"{wal / MiB:,.1f} MiB; {queued} queue rows left)   target < {GiB / MiB:,.0f} MiB: "
          f"{'met' if main + wal < GiB else 'MISSED'}")
    print(f"largest on disk during the run {figures.peak / MiB:>11,.1f} MiB   (file + WAL, before the final "
          "checkpoint)")
    print(f"the same bodies kept whole    {written / MiB:>12,.1f} MiB   (what the database would hold uncapped)")
    print(f"rate                          {messages / elapsed:>12,.0f} messages/s   ({elapsed:.0f} s, "
          f"{written / MiB / elapsed:,.0f} MiB/s through the queue)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--max-bytes", type=int, default=EngineSettings().dead_letter_max_bytes,
                        help="the engine's dead_letter_max_bytes")
    parser.add_argument("--lag", type=int, default=50, help="messages the writer lets the engine fall behind")
    parser.add_argument("--chunk", type=int, default=20, help="messages per publish")
    parser.add_argument("--dir", type=Path, default=None, help="where the database goes (default: a temp dir)")
    args = parser.parse_args()
    configure_logging(level="ERROR")  # 10,000 `dead letter` warnings would drown the figures
    with tempfile.TemporaryDirectory(prefix="sagas-hostile-") as scratch:
        directory = args.dir or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "engine.db"
        figures = asyncio.run(run(args.messages, args.max_bytes, path, args.lag, args.chunk))
        report(args.messages, args.max_bytes, path, figures)

if __name__ == "__main__":
    main()

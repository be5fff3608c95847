"""One participant alone: CPU per command and round trips to aiosqlite's thread per batch, one command at a time and
in batches.

Commands go through the in-memory broker to a `sagas.participant.Participant` whose handler only returns data (its
dedup record is its only write), on a SQLite file as `Participant.serve` opens it; the replies are read back as
an engine would. No engine, no store. Every call that aiosqlite runs on its thread is counted (each is a wake-up of
the event loop when it answers), by the name of what it runs.

    .venv/bin/python bench/participant_hops.py [--commands 1000] [--batch 1 100]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosqlite.core

from sagas.adapters.memory import MemoryBroker
from sagas.engine.state import MessageKind, OutgoingCommand
from sagas.engine.wire import CommandMessage, encode_command
from sagas.participant import Participant

CALLS: collections.Counter[str] = collections.Counter()
_execute = aiosqlite.core.Connection._execute


async def _counted(self: aiosqlite.core.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
    CALLS[getattr(fn, "__name__", repr(fn))] += 1
    return await _execute(self, fn, *args, **kwargs)


async def run(commands: int, batch: int, directory: str) -> str:
    participant = Participant("inventory")

    @participant.command("Reserve")
    async def reserve(message: CommandMessage, tx: Any) -> dict[str, Any]:
        return {"by": message.type}

    broker = MemoryBroker()
    await broker.start()
    replies = await broker.subscribe(["sagas.replies"], "engine")
    async with participant.serve(broker=broker, database_url=f"{directory}/p-{batch}.db"):

        async def send(count: int, first: int) -> None:
            for start in range(first, first + count, batch):
                outgoing = [
                    OutgoingCommand(id=f"s{n}/reserve/command/1", saga_id=f"s{n}", saga_name="order", step="reserve",
                                    kind=MessageKind.COMMAND, attempt=1, type="Reserve", topic="inventory.commands",
                                    payload={"order_id": f"o-{n}"})
                    for n in range(start, start + batch)
                ]
                await broker.publish([encode_command(c, reply_topic="sagas.replies", at=time.time()) for c in outgoing])
                got = 0
                while got < batch:
                    deliveries = await replies.fetch(batch, timeout=5)
                    got += len(deliveries)
                    await replies.commit(deliveries)

        await send(100, 10**7)  # warm-up
        CALLS.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        await send(commands, 0)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await broker.close()
    per_batch = sum(CALLS.values()) / (commands / batch)
    return (f"batch {batch}: {commands} commands, CPU {1e3 * cpu / commands:.3f} ms per command, wall "
            f"{1e3 * wall / commands:.3f} ms per command; calls to aiosqlite's thread per batch {per_batch:.1f} "
            f"({', '.join(f'{name} {n / (commands / batch):.1f}' for name, n in CALLS.most_common())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000, help="commands per batch size (a multiple of each)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 100], help="commands published at once")
    args = parser.parse_args()
    aiosqlite.core.Connection._execute = _counted  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="sagas-hops-") as directory:
        for batch in args.batch:
            print(asyncio.run(run(args.commands, batch, directory)))


if __name__ == "__main__":
    main()

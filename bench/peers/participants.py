"""The benchmark's three participants in a process of their own (`saga_throughput.py --participants-process`).

So that the engine's process can be measured alone: the benchmark starts this as a child process, waits for its
``ready`` line, and reads both processes' CPU from ``/proc/<pid>/stat`` over the measured window. The participants
are those of the in-process mode (`saga_throughput.participant`: handlers that return data, durable dedup records
in SQLite files in `--dir`), on one broker of their own: ``kafka://...``, or a SQLite URL for the engine's
``db://`` queue (the engine's own file). SIGTERM stops them; the last line printed is a JSON object with each
participant's counters, which the benchmark checks.

    .venv/bin/python bench/peers/participants.py --broker URL --dir DIR [--prefix P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

READY_TIMEOUT = 120.0
"""Seconds the child may take to start (imports, dedup tables, joining Kafka's consumer groups)."""


class ParticipantsProcess:
    """The parent's side: start the child, wait until it is ready, stop it and read its counters."""

    def __init__(self, broker_url: str, directory: Path, prefix: str) -> None:
        self.args = [sys.executable, str(Path(__file__).resolve()), "--broker", broker_url, "--dir", str(directory),
                     "--prefix", prefix]
        self.process: asyncio.subprocess.Process | None = None
        self.stats: dict[str, dict[str, int]] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def __aenter__(self) -> ParticipantsProcess:
        self.process = await asyncio.create_subprocess_exec(*self.args, stdout=asyncio.subprocess.PIPE)
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), READY_TIMEOUT)
        if line.strip() != b"ready":
            await self.process.wait()
            raise RuntimeError(f"participants' process did not start (exit {self.process.returncode}): {line!r}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        out = await asyncio.wait_for(self.process.stdout.read(), READY_TIMEOUT)
        await self.process.wait()
        lines = out.decode().strip().splitlines()
        if self.process.returncode == 0 and lines:
            self.stats = json.loads(lines[-1])

    def handled(self) -> int:
        """Commands the participants handled (the child's counters, read once it stopped)."""
        return sum(stats["handled"] for stats in self.stats.values())


async def serve(broker_url: str, directory: Path, prefix: str) -> dict[str, dict[str, int]]:
    from bench.saga_throughput import STEPS, participant  # the child's: the parent imports this module too
    from sagas.adapters import open_broker

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    broker = open_broker(broker_url)
    workers = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(broker.close)  # after the workers: exits run last-in first-out
        for _, service, command in STEPS:
            url = f"sqlite+aiosqlite:///{directory / f'{service}.db'}"
            workers.append(await stack.enter_async_context(
                participant(service, command, prefix).serve(broker=broker, database_url=url)))
        print("ready", flush=True)
        parent = os.getppid()
        while not stopped.is_set():  # a benchmark that died without stopping us must not leave us running
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), 1.0)
            if os.getppid() != parent:
                break
    return {worker.participant.name: dict(worker.participant.stats) for worker in workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--broker", required=True, help="kafka://... or the engine's SQLite URL (its db:// queue)")
    parser.add_argument("--dir", required=True, type=Path, help="where the participants' SQLite files go")
    parser.add_argument("--prefix", default="", help="before the command topics and groups (Kafka runs)")
    args = parser.parse_args()
    from sagas.logs import configure_logging

    configure_logging(level="WARNING")
    print(json.dumps(asyncio.run(serve(args.broker, args.dir, args.prefix))), flush=True)


if __name__ == "__main__":
    main()

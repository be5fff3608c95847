"""Start -> first command published, through the HTTP API and through the CLI, with an engine running.

A real `sagas serve --http` runs as a subprocess over a SQLite file (or --db) with the db:// broker; the
participant of the saga's first step runs in this process on the same queue and notes when each saga's first
command reaches it. Starts are made one after another (each waits for its first command before the next):

- ``API``: `POST /api/sagas` over TCP (httpx): the serving engine starts the saga in memory and publishes its first
  command itself, right after the commit;
- ``CLI --url``: `sagas start --url` (a new process each time: imports, then the same API call);
- ``CLI --db``: `sagas start --db` (a new process: it commits the saga and its outbox row; the engine's outbox relay
  publishes the row once it is `relay_grace` old, polling every `relay_interval`);
- ``CLI --db, relay_interval 0.05``: the same against a second server with `SAGAS_RELAY_INTERVAL=0.05` (a
  setting today);
- ``CLI --db, relay_grace+interval 0.05``: the same against an engine in this process whose `relay_grace` is also
  0.05 s (`EngineSettings.relay_grace` is not a `sagas serve` setting today): what making the relay prompt gives.

For each: start->first command p50/p99 (from just before the call to the participant's receipt), and the call's
own wall time (the HTTP request; for the CLI the whole process: what `sagas start` costs the caller).

    .venv/bin/python bench/web_start.py [--api 100] [--cli 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from sagas.adapters import normalize_db_url, open_broker
from sagas.adapters.sql import SqlStore
from sagas.definitions.loader import load_file
from sagas.engine.admin import SagaAdmin
from sagas.engine.ports import Broker
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.wire import CommandMessage
from sagas.logs import configure_logging
from sagas.participant import Participant

SAGAS = str(Path(sys.executable).parent / "sagas")
TOKEN = "bench-token-0123456789"
DEFINITION = {
    "name": "bench", "version": 1,
    "steps": [{"name": "go", "participant": "bench", "command": "bench.go", "timeout": 60, "kind": "retriable",
               "payload": {"n": "input.n"}}],
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Receipts:
    """When each saga's first command arrived."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.arrived = asyncio.Condition()

    async def note(self, saga_id: str) -> None:
        async with self.arrived:
            self.at.setdefault(saga_id, time.time())
            self.arrived.notify_all()

    async def wait(self, saga_id: str, timeout: float = 30.0) -> float:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: saga_id in self.at)
        return self.at[saga_id]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def server(db_url: str, definition: Path, log: Path, **env: str) -> AsyncIterator[str]:
    port = _free_port()
    environ = {**os.environ, "SAGAS_HTTP_TOKENS": f"bench={TOKEN}", **env}
    command = [SAGAS, "serve", "--definitions", str(definition), "--db", db_url, "--broker", "db://",
               "--http", f"127.0.0.1:{port}", "--json-logs"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=environ, stdout=out, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"sagas serve exited: its output is in {log}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("sagas serve never became ready")
                await asyncio.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)


async def cli_start(args: list[str]) -> tuple[str, float]:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(SAGAS, "start", "bench", *args, "--json",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(err.decode())
    return str(json.loads(out)["id"]), wall


Row = tuple[str, list[float], list[float], list[float]]
"""(path, start -> first command, the call's wall time, creation -> first command), in seconds."""


async def cli_series(name: str, extra: list[str], count: int, receipts: Receipts, reader: SagaAdmin) -> Row:
    latencies, walls, after = [], [], []
    for n in range(count):
        started = time.time()
        saga_id, wall = await cli_start([*extra, "--input", json.dumps({"n": n})])
        arrived = await receipts.wait(saga_id)
        latencies.append(arrived - started)
        walls.append(wall)
        after.append(arrived - (await reader.get(saga_id)).created_at)
    return name, latencies, walls, after


async def run(args: argparse.Namespace, tmp: Path) -> list[Row]:
    definition = tmp / "bench.yaml"
    definition.write_text(json.dumps(DEFINITION))
    db_url = args.db or f"sqlite+aiosqlite:///{tmp / 'sagas.db'}"
    receipts = Receipts()
    participant = Participant("bench")

    @participant.command("bench.go")
    async def go(command: CommandMessage, tx: Any) -> dict[str, Any]:
        await receipts.note(command.saga_id)
        return {}

    results: list[Row] = []
    broker: Broker = open_broker("db://", db_url=normalize_db_url(db_url))
    store = SqlStore(db_url)
    reader = SagaAdmin(store)
    async with server(db_url, definition, tmp / "serve.log") as url:
        await broker.start()
        try:
            async with participant.serve(broker=broker, database_url=f"sqlite+aiosqlite:///{tmp / 'p.db'}"):
                headers = {"Authorization": f"Bearer {TOKEN}"}
                api: list[float] = []
                api_walls: list[float] = []
                api_after: list[float] = []
                async with httpx.AsyncClient(base_url=url, headers=headers) as client:
                    for n in range(args.api + 5):
                        started = time.time()
                        response = await client.post("/api/sagas", json={"definition": "bench", "input": {"n": n}})
                        answered = time.time()
                        response.raise_for_status()
                        arrived = await receipts.wait(response.json()["id"])
                        if n >= 5:  # warm-up
                            api.append(arrived - started)
                            api_walls.append(answered - started)
                            api_after.append(arrived - (await reader.get(response.json()["id"])).created_at)
                results.append(("API", api, api_walls, api_after))
                for name, extra in (("CLI --url", ["--url", url, "--token", TOKEN]), ("CLI --db", ["--db", db_url])):
                    results.append(await cli_series(name, extra, args.cli, receipts, reader))
        finally:
            await broker.close()
    # A second server with a short relay interval: what that setting alone changes for `sagas start --db`.
    async with server(db_url, definition, tmp / "serve2.log", SAGAS_RELAY_INTERVAL="0.05"):
        await broker.start()
        try:
            async with participant.serve(broker=broker, database_url=f"sqlite+aiosqlite:///{tmp / 'p.db'}"):
                results.append(await cli_series("CLI --db, relay_interval 0.05", ["--db", db_url], args.cli,
                                                receipts, reader))
        finally:
            await broker.close()
    engine = Engine(store=store, broker=broker, definitions=[load_file(definition)],
                    settings=EngineSettings(relay_grace=0.05, relay_interval=0.05))
    try:
        async with engine, participant.serve(broker=broker, database_url=f"sqlite+aiosqlite:///{tmp / 'p.db'}"):
            results.append(await cli_series("CLI --db, relay_grace+interval 0.05", ["--db", db_url], args.cli,
                                            receipts, reader))
    finally:
        await store.close()
    return results


def report(results: list[Row]) -> None:
    def figures(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:8.1f} {percentile(values, 0.99) * 1000:8.1f}"

    print("\nms, one start at a time, engine running; p50 and p99 of each")
    print(f"{'path':36} {'n':>4} {'start->1st command':>17} {'call wall time':>17} {'created->1st cmd':>17}")
    for name, latencies, walls, after in results:
        print(f"{name:36} {len(latencies):>4} {figures(latencies)} {figures(walls)} {figures(after)}")
    print("target: API p50 <= 50 ms (start -> first command)")


async def main() -> None:
    configure_logging(json=False, level="WARNING")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", type=int, default=100, help="starts through the API")
    parser.add_argument("--cli", type=int, default=15, help="starts through each CLI path")
    parser.add_argument("--db", help="a database URL (default: a new SQLite file)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        results = await run(args, Path(tmp))
    report(results)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    asyncio.run(main())

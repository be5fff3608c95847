"""The broker's floor: three command -> reply exchanges per saga through a broker, with no engine and no database.

A saga of the throughput benchmark moves six messages: three commands, each answered by a reply. This measures what
that traffic alone costs on the same broker and client settings (`sagas.adapters`' `KafkaBroker` or
`MemoryBroker`), so that a saga rate can be read against what the messaging alone costs here, as the raw commit
rate is for the database. It is the cost at one batch size, not a ceiling: more sagas in flight make bigger
batches, which cost less per saga.

- a driver keeps `concurrency` "sagas" in flight; each publishes its step's command and waits for its reply before
  the next step. Commands queued meanwhile go out in one `publish` call, as the engine's do after a commit;
- three echo consumers (one consumer group per command topic, like the participants) answer each command batch with
  one `publish` of replies, then commit the batch's offsets;
- the messages are the engine's own: commands from `wire.encode_command`, replies from `wire.encode_reply`, built
  once per step and re-keyed per saga, so sizes and headers match a real run. Nothing decodes a body.

Besides the rate, it reports CPU per saga: this process (the driver included: ~0.1 ms per saga with the in-memory
broker), and the broker's server process (the Kafka JVM: any process whose command line runs ``kafka.Kafka``; or
RabbitMQ's beam, ``-s rabbit boot``; whoever else uses it), read from /proc.

    .venv/bin/python bench/broker_floor.py [--sagas 3000] [--concurrency 200] [--broker kafka://...|amqp://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagas.adapters.kafka import KafkaBroker
from sagas.adapters.memory import MemoryBroker
from sagas.engine.ports import Broker, BrokerMessage, Consumer
from sagas.engine.state import MessageKind, Outcome, OutgoingCommand
from sagas.engine.wire import decode_command, encode_command, encode_reply

STEPS = (("reserve", "inventory", "Reserve"), ("charge", "payment", "Charge"), ("ship", "shipping", "Ship"))


def server_pids(marker: str = "kafka.Kafka", *, name: str | None = None) -> list[int]:
    """Processes whose command line contains `marker`, or with `name` as their command name (Linux /proc; empty
    elsewhere). PostgreSQL's backends: ``name="postgres"``."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            if name is not None:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            elif marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes `pids` have used so far; ended ones count 0."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


class ServerClock:
    """CPU seconds of the servers on this machine since construction: the Kafka JVM and PostgreSQL's processes
    (backends started meanwhile count whole; ones that ended meanwhile are lost)."""

    KINDS = (("Kafka JVM", {"marker": "kafka.Kafka"}), ("PostgreSQL", {"name": "postgres"}),
             ("RabbitMQ", {"marker": "\0rabbit\0boot"}))  # the node's beam: `erl ... -s rabbit boot`

    def __init__(self) -> None:
        self._start = {kind: self._sample(kind) for kind, _ in self.KINDS}

    def _sample(self, kind: str) -> dict[int, float]:
        where = dict(self.KINDS)[kind]
        return {pid: process_cpu([pid]) for pid in server_pids(**where)}

    def spent(self) -> dict[str, float]:
        """CPU seconds per server kind, for the kinds running now."""
        spent = {}
        for kind, _ in self.KINDS:
            now, before = self._sample(kind), self._start[kind]
            if now:
                spent[kind] = sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())
        return spent


@dataclass
class FloorRun:
    sagas: int
    seconds: float
    cpu: float
    """CPU seconds of this process during the run."""
    server_cpu: float | None
    """CPU seconds of the broker's server process (Kafka JVM, RabbitMQ's beam) during the run; None for the
    in-memory broker."""
    server: str = "Kafka JVM"

    @property
    def rate(self) -> float:
        return self.sagas / self.seconds

    def describe(self) -> str:
        server = "" if self.server_cpu is None else f", {self.server} {self.server_cpu / self.sagas * 1000:.2f}"
        return (f"{self.rate:,.0f} sagas/s ({self.sagas} sagas of 3 command -> reply exchanges, no engine, no "
                f"database); CPU per saga: this process {self.cpu / self.sagas * 1000:.2f}{server} ms")


def _templates(prefix: str, reply_topic: str) -> list[tuple[BrokerMessage, BrokerMessage]]:
    """Per step, a command as the engine encodes it and the reply a participant would send to it."""
    pairs = []
    for step, service, command_type in STEPS:
        command = OutgoingCommand(
            id=f"floor-saga/{step}/command/1", saga_id="floor-saga", saga_name="order", step=step,
            kind=MessageKind.COMMAND, attempt=1, topic=f"{prefix}{service}.commands", type=command_type,
            payload={"order": "o-000000", "amount": 10},
        )
        message = encode_command(command, reply_topic=reply_topic, at=time.time())
        reply = encode_reply(decode_command(message), outcome=Outcome.SUCCESS, type=f"{command_type}Succeeded",
                             data={"by": command_type}, source=service, at=time.time())
        pairs.append((message, reply))
    return pairs


async def _echo(broker: Broker, consumer: Consumer, replies: dict[str, BrokerMessage]) -> None:
    """A participant reduced to its traffic: each command batch answered by one publish, then committed."""
    while True:
        deliveries = await consumer.fetch(500, 0.2)
        if not deliveries:
            continue
        answers = [dataclasses.replace(replies[d.message.topic], key=d.message.key) for d in deliveries]
        await broker.publish(answers)
        await consumer.commit(deliveries)


async def _settle(consumer: Consumer, waiting: dict[str, asyncio.Future[None]]) -> None:
    while True:
        deliveries = await consumer.fetch(500, 0.2)
        for delivery in deliveries:
            future = waiting.pop(delivery.message.key or "", None)
            if future is not None and not future.done():
                future.set_result(None)
        if deliveries:
            await consumer.commit(deliveries)


async def _send(broker: Broker, queue: asyncio.Queue[BrokerMessage]) -> None:
    while True:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        await broker.publish(batch)


@contextlib.asynccontextmanager
async def _tasks(*coroutines: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run `coroutines` as tasks for the block; then cancel them and wait until they have stopped (so that no
    fetch is still running when its consumer closes)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def broker_floor(broker: Broker, *, sagas: int, concurrency: int, prefix: str = "",
                       warmup: int = 50) -> FloorRun:
    """Run `warmup` then `sagas` saga-shaped exchanges on `broker` (started and closed here) with topics and groups
    named from `prefix`; the figures cover the `sagas` only."""
    reply_topic = f"{prefix}replies"
    templates = _templates(prefix, reply_topic)
    replies = {command.topic: reply for command, reply in templates}
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[None]] = {}
    outgoing: asyncio.Queue[BrokerMessage] = asyncio.Queue()
    await broker.start()
    try:
        consumers = [await broker.subscribe([f"{prefix}{service}.commands"], f"{prefix}{service}-floor")
                     for _, service, _ in STEPS]
        settled = await broker.subscribe([reply_topic], f"{prefix}floor-engine")
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            key = f"floor-{index:07d}"
            async with gate:
                for command, _ in templates:
                    future = loop.create_future()
                    waiting[key] = future
                    outgoing.put_nowait(dataclasses.replace(command, key=key))
                    await asyncio.wait_for(future, 120)

        async with _tasks(*(_echo(broker, c, replies) for c in consumers), _settle(settled, waiting),
                    _send(broker, outgoing)):
            await asyncio.gather(*(one(i) for i in range(warmup)))
            servers, cpu, started = ServerClock(), time.process_time(), time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(warmup, warmup + sagas)))
            seconds = time.perf_counter() - started
            server = server_of(broker)
            cpu, server_cpu = time.process_time() - cpu, servers.spent().get(server or "")
        for consumer in (*consumers, settled):
            await consumer.close()
        return FloorRun(sagas, seconds, cpu, server_cpu if server else None, server or "")
    finally:
        await broker.close()


def server_of(broker: Broker) -> str | None:
    """The `ServerClock` kind of the broker's server process; None for the in-memory broker."""
    if isinstance(broker, KafkaBroker):
        return "Kafka JVM"
    if type(broker).__name__ == "RabbitBroker":  # not imported: aio-pika is an optional extra
        return "RabbitMQ"
    return None


def open_bench_broker(url: str | None) -> Broker:
    """The broker of a benchmark run: in-memory without a URL, else what `sagas.adapters.open_broker` makes."""
    if url is None:
        return MemoryBroker()
    from sagas.adapters import open_broker

    return open_broker(url)


def floor_topics(prefix: str) -> list[str]:
    return [f"{prefix}{service}.commands" for _, service, _ in STEPS] + [f"{prefix}replies"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sagas", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--broker", help="a kafka:// or amqp:// URL (default: the in-memory broker)")
    args = parser.parse_args()
    prefix = f"floor-{uuid.uuid4().hex[:10]}." if args.broker else ""
    broker = open_bench_broker(args.broker)
    try:
        run = asyncio.run(broker_floor(broker, sagas=args.sagas, concurrency=args.concurrency, prefix=prefix))
        print(f"broker floor ({args.broker or 'in-memory'}): {run.describe()}")
    finally:
        if args.broker:
            asyncio.run(delete_floor_topics(args.broker, prefix))


async def delete_floor_topics(url: str, prefix: str) -> None:
    """Delete a floor run's topics (Kafka), or its exchanges and queues (RabbitMQ)."""
    from bench.saga_throughput import delete_rabbit, delete_topics

    if url.startswith(("amqp://", "amqps://")):
        await delete_rabbit(url, [(f"{prefix}{service}.commands", f"{prefix}{service}-floor") for _, service, _ in
                                  STEPS] + [(f"{prefix}replies", f"{prefix}floor-engine")])
    else:
        await delete_topics(url, floor_topics(prefix))


if __name__ == "__main__":
    main()

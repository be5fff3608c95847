"""End-to-end saga throughput, side by side with the raw commit rate of the database measured in the same run.

N three-step sagas (reserve → charge → ship, all succeed) run on a SQLite FILE store and the in-memory broker, with
three in-process participants (`sagas.participant.Participant`), each on its own SQLite file, so their dedup records
are as durable as the engine's state. Sagas are started with bounded concurrency (`--concurrency` in flight); each
one's latency runs from the `start_saga` call until `Engine.wait` returns it settled.

In the same run, plain `sqlite3` (WAL, synchronous=NORMAL, one small insert per transaction) gives the machine's
commit rate: a design that commits once per event cannot beat it, divided by the four events of a saga.

With ``--db postgresql+asyncpg://...`` the engine's store is a fresh PostgreSQL schema (created, then dropped), and
the raw rate is asyncpg's (one small INSERT per transaction, sequential); with ``--broker kafka://...`` messages go
through Kafka, on topics and consumer groups named for this run (the topics are deleted at the end); ``amqp://...``
the same through RabbitMQ (its exchanges and queues deleted at the end); ``db://`` through the SQL queue in the
engine's SQLite file. The participants stay in-process unless ``--participants-process`` puts them in a child process
(bench/peers/participants.py), and their dedup databases stay SQLite files in every case. ``--peers`` runs the same
saga on DBOS Transact in the same run (bench/peers/), ``--repeat`` repetitions of each, interleaved.

    .venv/bin/python bench/saga_throughput.py [--sagas 5000] [--concurrency 200] [--db DIR|URL] [--broker URL]
        [--participants-process] [--peers] [--repeat N] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import io
import os
import pstats
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.broker_floor import FloorRun, broker_floor, floor_topics, process_cpu
from bench.peers.compare import (
    Background,
    Figures,
    Servers,
    percentile,
    pg_wal_position,
    run_dbos,
    server_figures,
    summary,
)
from bench.peers.participants import ParticipantsProcess
from bench.store_commit import bench_trivial as raw_commit_rate  # the same floor, measured the same way
from sagas.adapters.kafka import KafkaBroker, parse_kafka_url
from sagas.adapters.memory import MemoryBroker
from sagas.adapters.rabbitmq import RabbitBroker, parse_amqp_url
from sagas.adapters.sql import SqlStore
from sagas.adapters.sqlqueue import SqlQueueBroker
from sagas.definitions.model import SagaDefinition
from sagas.engine.ports import Broker
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import SagaStatus
from sagas.engine.wire import CommandMessage
from sagas.logs import configure_logging
from sagas.participant import Participant

STEPS = (("reserve", "inventory", "Reserve"), ("charge", "payment", "Charge"), ("ship", "shipping", "Ship"))


def definition(prefix: str = "") -> SagaDefinition:
    """The three-step order saga of the engine tests (tests/engine/support.py `three_steps`); `prefix` goes before
    its command topics (``<prefix><participant>.commands``)."""
    retry = {"max_attempts": 3, "initial_backoff": 1.0, "multiplier": 2.0, "max_backoff": 10.0, "jitter": 0.0}
    steps = [
        {"name": name, "participant": participant, "command": command, "timeout": 30.0, "retry": retry,
         "payload": {"order": "input.order_id", "amount": "input.amount"},
         "compensation": {"command": f"Undo{command}", "payload": {"order": "input.order_id"}},
         **({"topic": f"{prefix}{participant}.commands"} if prefix else {})}
        for name, participant, command in STEPS
    ]
    return SagaDefinition.model_validate({
        "name": "order", "version": 1,
        "compensation_retry": {"max_attempts": 3, "initial_backoff": 1.0, "max_backoff": 5.0, "jitter": 0.0},
        "steps": steps,
    })


def participant(name: str, command: str, prefix: str = "") -> Participant:
    """A participant whose handlers succeed at once; its dedup record is its only write."""
    service = Participant(name, topic=f"{prefix}{name}.commands", group=f"{prefix}{name}-participant")

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


class ThreadClock:
    """CPU seconds per thread (Linux: each thread's CPU-time clock), summed by role."""

    ROLES = (
        ("sagas-sqlite-write", "store writer"),
        ("sagas-sqlite-read", "store reader"),
        ("sagas-sqlite-checkpoint", "store checkpoints"),
        ("MainThread", "event loop"),
    )

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> dict[int, tuple[str, float]]:
        found: dict[int, tuple[str, float]] = {}
        for thread in threading.enumerate():
            if thread.ident is None:
                continue
            try:
                clock = time.pthread_getcpuclockid(thread.ident)
                found[thread.ident] = (thread.name, time.clock_gettime(clock))
            except (OSError, AttributeError):  # the thread ended meanwhile, or not Linux
                continue
        return found

    def spent(self) -> dict[str, float]:
        """CPU seconds since construction, per role (threads that ended meanwhile are not counted)."""
        by_role: dict[str, float] = {}
        for ident, (name, now) in self._sample().items():
            role = next((r for prefix, r in self.ROLES if name.startswith(prefix)), "other threads")
            before = self._start.get(ident, (name, 0.0))[1]
            by_role[role] = by_role.get(role, 0.0) + now - before
        return by_role


def machine_busy() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (Linux /proc/stat; 0 elsewhere): the
    database server and the broker included, and whatever else runs."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(n) for n in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


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
    threads: dict[str, float]
    """CPU seconds per thread role."""
    machine: float
    """CPU seconds the whole machine was busy during the run (every process)."""
    servers: dict[str, float]
    """CPU seconds of the Kafka JVM and of PostgreSQL's processes during the run (those running)."""
    gc: GcTimer
    participants_cpu: float | None = None
    """CPU seconds of the participants' process during the run (`--participants-process`), else None."""
    participants_handled: int = 0
    """Commands the participants' process handled, warm-up included (its own counters)."""
    wal_bytes: int | None = None
    """PostgreSQL's WAL written during the run, server-wide (other clients' writes count too); None on SQLite."""
    background: Background | None = None
    """What the servers did in the seconds before the run, with the engine idle (`--background-seconds`)."""

    def servers_net(self) -> dict[str, float]:
        """The servers' CPU seconds less their background's (as measured when there is no background)."""
        return self.servers if self.background is None else self.background.net(self.servers, self.seconds)

    def wal_net(self) -> float | None:
        if self.wal_bytes is None:
            return None
        return self.wal_bytes if self.background is None else self.background.net_wal(self.wal_bytes, self.seconds)

    def figures(self, servers: Sequence[str]) -> Figures:
        """What the side-by-side summary prints; `servers`: which of `self.servers` belong to this mode."""
        per_saga = 1000 / self.sagas
        extra = server_figures(self.servers, self.servers_net(), servers, per_saga)
        if self.participants_cpu is not None:
            extra["participants' process"] = self.participants_cpu * per_saga
        return Figures(self.completed / self.seconds, percentile(self.latencies, 0.5) * 1000,
                       percentile(self.latencies, 0.99) * 1000, self.cpu * per_saga, self.machine * per_saga, extra,
                       None if (wal := self.wal_net()) is None else wal / self.sagas / 1024)


@dataclass
class Setup:
    """Where the engine runs: database, broker, and the names that keep this run apart from others."""

    directory: Path
    """The participants' SQLite files (and the engine's in the default mode)."""
    db_url: str | None = None
    """PostgreSQL URL, or None for the SQLite file store in `directory`."""
    schema: str | None = None
    broker_url: str | None = None
    """kafka://, amqp:// or db://, or None for the in-memory broker."""
    prefix: str = ""
    """Before every topic and group name (Kafka, RabbitMQ)."""
    batch_max: int | None = None
    """`EngineSettings.batch_max` (None: the default)."""
    participants_process: bool = False
    """The participants in a child process of their own (bench/peers/participants.py), not in this one."""

    def engine_db(self) -> str:
        return f"sqlite+aiosqlite:///{self.directory / 'engine.db'}"

    def store(self) -> SqlStore:
        if self.db_url is None:
            return SqlStore(self.engine_db())
        return SqlStore(self.db_url, schema=self.schema)

    def broker(self) -> Broker:
        if self.broker_url is None:
            return MemoryBroker()
        if self.broker_url == "db://":
            return SqlQueueBroker(self.engine_db())  # the store's own file, as `sagas serve --broker db://` does
        if self.broker_url.startswith(("amqp://", "amqps://")):
            return RabbitBroker.from_url(self.broker_url)
        return KafkaBroker.from_url(self.broker_url)

    def participants_broker(self) -> str:
        """The broker URL the participants' process opens: the same server, or the engine's file for db://."""
        assert self.broker_url is not None
        return self.engine_db() if self.broker_url == "db://" else self.broker_url

    def settings(self) -> EngineSettings:
        settings = EngineSettings()
        if self.prefix:
            settings = dataclasses.replace(settings, reply_topic=f"{self.prefix}replies", group=f"{self.prefix}engine")
        if self.batch_max is not None:
            settings = dataclasses.replace(settings, batch_max=self.batch_max)
        return settings

    def topics(self) -> list[str]:
        return [f"{self.prefix}{service}.commands" for _, service, _ in STEPS] + [self.settings().reply_topic]

    def groups(self) -> list[tuple[str, str]]:
        """(topic, consumer group) of every consumer of the run: the participants' and the engine's."""
        participants = [(f"{self.prefix}{service}.commands", f"{self.prefix}{service}-participant")
                        for _, service, _ in STEPS]
        return [*participants, (self.settings().reply_topic, self.settings().group)]


@contextlib.asynccontextmanager
async def running(setup: Setup) -> AsyncIterator[tuple[Engine, ParticipantsProcess | None]]:
    broker = setup.broker()  # shared by the engine and the participants: one producer, one consumer each
    store = setup.store()
    engine = Engine(store=store, broker=broker, definitions=[definition(setup.prefix)], settings=setup.settings())
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)  # exits run last-in first-out: after the engine stopped
        await stack.enter_async_context(engine)
        if setup.participants_process:  # started once the engine has made its tables (db://: the same file)
            remote = ParticipantsProcess(setup.participants_broker(), setup.directory, setup.prefix)
            yield engine, await stack.enter_async_context(remote)
            return
        for _, service, command in STEPS:
            url = f"sqlite+aiosqlite:///{setup.directory / f'{service}.db'}"
            worker = participant(service, command, setup.prefix).serve(broker=broker, database_url=url)
            await stack.enter_async_context(worker)
        yield engine, None


async def run_sagas(
    setup: Setup, sagas: int, concurrency: int, *, gc_freeze: bool = False, rate: float | None = None,
    background_seconds: float = 0.0,
) -> SagaRun:
    async with running(setup) as (engine, remote):
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        completed = 0
        first_start = 0.0

        async def one(index: int) -> None:
            nonlocal completed
            if rate is not None and index >= 50:  # open loop: saga i starts at i / rate, whatever is in flight
                await asyncio.sleep(max(0.0, first_start + (index - 50) / rate - time.perf_counter()))
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
        background = await asyncio.to_thread(Background.measure, background_seconds, setup.db_url)
        collector = GcTimer()
        gc.callbacks.append(collector)
        threads, servers = ThreadClock(), Servers()
        remote_cpu = process_cpu([remote.pid]) if remote is not None else 0.0
        wal = await pg_wal_position(setup.db_url) if setup.db_url is not None else 0
        busy, started, cpu, loop_cpu = machine_busy(), time.perf_counter(), time.process_time(), time.thread_time()
        first_start = started
        try:
            await asyncio.gather(*(one(i) for i in range(50, 50 + sagas)))
        finally:
            gc.callbacks.remove(collector)
        seconds = time.perf_counter() - started
        cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
        spent, busy = threads.spent(), machine_busy() - busy
        run = SagaRun(sagas, seconds, latencies, completed, dict(engine.stats), cpu, loop_cpu, spent, busy,
                      servers.spent(), collector, background=background)
        if remote is not None:
            run.participants_cpu = process_cpu([remote.pid]) - remote_cpu
        if setup.db_url is not None:
            run.wal_bytes = await pg_wal_position(setup.db_url) - wal
    if remote is not None:  # its counters come once it has stopped
        run.participants_handled = remote.handled()
    return run


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def pg_schema(url: str, schema: str, *, create: bool) -> str:
    """Create (or drop, with everything in it) `schema`; the server's version."""
    import asyncpg

    connection = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        if create:
            await connection.execute(f'CREATE SCHEMA "{schema}"')
        else:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


async def pg_raw_commit_rate(url: str, schema: str, seconds: float) -> tuple[float, str]:
    """Commits per second of asyncpg inserting one small row per transaction (BEGIN, INSERT, COMMIT), sequential,
    in `schema`; and the server's synchronous_commit setting."""
    import asyncpg

    connection = await asyncpg.connect(_asyncpg_dsn(url), server_settings={"search_path": f'"{schema}"'})
    try:
        await connection.execute("CREATE TABLE raw_commits (id BIGSERIAL PRIMARY KEY, v TEXT)")
        insert = await connection.prepare("INSERT INTO raw_commits (v) VALUES ('x')")
        synchronous = str(await connection.fetchval("SHOW synchronous_commit"))
        commits, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            async with connection.transaction():
                await insert.fetch()
            commits += 1
        elapsed = time.perf_counter() - started
        await connection.execute("DROP TABLE raw_commits")
        return commits / elapsed, synchronous
    finally:
        await connection.close()


async def delete_topics(url: str, topics: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=",".join(parse_kafka_url(url).bootstrap_servers))
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


async def delete_rabbit(url: str, groups: list[tuple[str, str]]) -> None:
    """Delete what `RabbitBroker` declared for these (topic, group) pairs: each topic's exchange and its unrouted
    exchange and queue, each group's hash exchange, partition queues and dead-letter exchange and queue."""
    import aio_pika

    settings = parse_amqp_url(url)
    partitions = int(settings.options.get("partitions", 3))
    connection = await aio_pika.connect(settings.url)
    try:
        channel = await connection.channel()
        for topic, group in groups:
            at = f"{topic}@{group}"
            for queue in [*(f"{at}.{n}" for n in range(partitions)), f"{at}.dead", f"{topic}.unrouted"]:
                await channel.queue_delete(queue)
            for exchange in (at, f"{at}.dead", topic, f"{topic}.unrouted"):
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def report(run: SagaRun, raw: float, raw_label: str, floor: FloorRun) -> None:
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
    per_thread = ", ".join(f"{role} {seconds / run.sagas * 1000:.2f}"
                           for role, seconds in sorted(run.threads.items(), key=lambda kv: -kv[1]))
    print(f"CPU per saga by thread: {per_thread} ms")
    print(f"machine CPU (all processes: database server, broker, anything else running): {run.machine:.2f}s, "
          f"{run.machine / run.sagas * 1000:.2f} ms per saga, {run.machine / run.seconds / (os.cpu_count() or 1):.0%} "
          f"of {os.cpu_count()} CPUs")
    if run.participants_cpu is not None:
        print(f"engine process alone:   {run.cpu / run.sagas * 1000:.2f} ms of CPU per saga (the figure above); the "
              f"participants' process {run.participants_cpu / run.sagas * 1000:.2f} ms per saga (from /proc; it "
              f"handled {run.participants_handled:,} commands, warm-up included)")
    net = run.servers_net()
    background = (f"; less the background measured over {run.background.seconds:.1f} s before the run, with the "
                  f"engine idle" if run.background is not None and run.background.seconds > 0 else "")
    if run.wal_bytes is not None:
        print(f"PostgreSQL WAL:         {run.wal_bytes / run.sagas / 1024:.1f} KiB per saga (server-wide: other "
              f"clients' writes count too){background}: {(run.wal_net() or 0.0) / run.sagas / 1024:.1f} KiB")
    if run.servers:
        print("servers' CPU per saga:  " + ", ".join(f"{kind} {seconds / run.sagas * 1000:.2f} ms"
                                                    for kind, seconds in run.servers.items())
              + (f"{background}: " + ", ".join(f"{kind} {seconds / run.sagas * 1000:.2f} ms"
                                               for kind, seconds in net.items()) if background else ""))
    print(f"garbage collector:      {run.gc.seconds:.2f}s in {sum(run.gc.collections):,} collections at thresholds "
          f"{'/'.join(str(n) for n in run.gc.threshold)} "
          f"(gen0/1/2: {'/'.join(str(n) for n in run.gc.collections)}, taking "
          f"{'/'.join(f'{t:.2f}' for t in run.gc.by_generation)}s)")
    print(f"raw commits/s:          {raw:,.0f} ({raw_label})")
    print(f"sagas/s ÷ raw commits/s: {rate / raw:.3f}  (one commit per event would cap it at 0.25)")
    print(f"broker floor:           {floor.describe()}")
    print(f"sagas/s ÷ broker floor: {rate / floor.rate:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sagas", type=int, default=5000, help="sagas to run (after 50 warm-up sagas)")
    parser.add_argument("--concurrency", type=int, default=200, help="sagas in flight at once")
    parser.add_argument("--db", help="a directory for the SQLite files (default: a temporary one), or a "
                        "postgresql+asyncpg:// URL: the engine's store then goes in a schema created for the run")
    parser.add_argument("--broker", help="a kafka:// or amqp:// URL, or db:// (the SQL queue in the engine's SQLite "
                        "file); default: the in-memory broker")
    parser.add_argument("--batch-max", type=int, help="EngineSettings.batch_max: events per engine commit at most "
                        "(default: the engine's)")
    parser.add_argument("--rate", type=float, help="open loop: start sagas at this many per second, whatever "
                        "is in flight (--concurrency still caps it); default: closed loop, a new saga as one ends")
    parser.add_argument("--floor-sagas", type=int, default=3000, help="saga-shaped exchanges for the broker's "
                        "floor (bench/broker_floor.py), measured before the sagas on the same kind of broker")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="time spent measuring the raw commit rate")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once the engine is up, so that "
                        "full collections skip everything allocated at start-up")
    parser.add_argument("--profile", action="store_true", help="profile the saga runs with cProfile (event loop "
                        "thread only: SQLite work on the store's thread shows as waiting)")
    parser.add_argument("--participants-process", action="store_true", help="run the participants in a child "
                        "process (bench/peers/participants.py), so that the engine's process is measured alone "
                        "(needs --broker kafka://..., amqp://... or db://)")
    parser.add_argument("--peers", action="store_true", help="also run the same saga on DBOS Transact "
                        "(bench/peers/dbos_saga.py; pip install -e '.[bench]') on the same kind of database, "
                        "interleaved with the sagas runs, and print both side by side")
    parser.add_argument("--dbos-api", choices=("sync", "async"), default="sync", help="how the DBOS run starts "
                        "its workflows (bench/peers/dbos_saga.py --api): sync, from threads, is the faster here")
    parser.add_argument("--background-seconds", type=float, default=2.0, help="with a server (PostgreSQL, Kafka, "
                        "RabbitMQ): seconds spent before each run measuring what the servers do without it (other "
                        "clients of a shared server), taken off the servers' figures; 0: none")
    parser.add_argument("--repeat", type=int, help="repetitions of each system, each on a fresh store "
                        "(default: 3 with --peers, else 1); a summary gives median [min..max]")
    args = parser.parse_args()
    configure_logging(level="WARNING")  # what `sagas serve` sets up, quieter: a debug line per command is noise
    # SIGTERM unwinds like an error, so that the schemas, topics and queues made for the run are still dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    postgres = args.db is not None and args.db.startswith("postgresql")
    if args.db is not None and "://" in args.db and not postgres:
        parser.error("--db takes a directory or a postgresql+asyncpg:// URL")
    if args.broker == "db://" and postgres:
        parser.error("--broker db:// is measured on the SQLite store only")
    if args.participants_process and args.broker is None:
        parser.error("--participants-process needs a broker another process can reach: --broker kafka://..., "
                     "amqp://... or db://")
    repeat = args.repeat or (3 if args.peers else 1)
    kafka = args.broker is not None and args.broker.startswith("kafka://")
    rabbit = args.broker is not None and args.broker.startswith(("amqp://", "amqps://"))
    named = kafka or rabbit  # a server shared with others: names of this run, deleted at the end
    run_id = uuid.uuid4().hex[:10]
    with contextlib.ExitStack() as stack:
        if args.db is None or postgres:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sagas-bench-")))
        else:
            base = Path(args.db)
            base.mkdir(parents=True, exist_ok=True)
            for stale in base.glob("**/*.db*"):
                stale.unlink()

        def prepare(index: int) -> Setup:
            """A fresh store (directory or schema) and topics for one repetition, dropped at the end."""
            directory = base / f"run-{index}"
            directory.mkdir(exist_ok=True)
            setup = Setup(directory, db_url=args.db if postgres else None,
                          schema=f"sagas_bench_{run_id}_{index}" if postgres else None, broker_url=args.broker,
                          prefix=f"bench-{run_id}-{index}." if named else "", batch_max=args.batch_max,
                          participants_process=args.participants_process)
            if setup.schema is not None:
                asyncio.run(pg_schema(args.db, setup.schema, create=True))
                stack.callback(lambda: asyncio.run(pg_schema(args.db, setup.schema or "", create=False)))
            if kafka:
                stack.callback(lambda: asyncio.run(delete_topics(args.broker, setup.topics())))
            if rabbit:
                stack.callback(lambda: asyncio.run(delete_rabbit(args.broker, setup.groups())))
            return setup

        setups = [prepare(index) for index in range(repeat)]
        print(f"python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
              f"load average {'/'.join(f'{n:.1f}' for n in os.getloadavg())}, concurrency {args.concurrency}")
        if postgres:
            raw_schema = f"sagas_bench_{run_id}_raw"
            version = asyncio.run(pg_schema(args.db, raw_schema, create=True))
            stack.callback(lambda: asyncio.run(pg_schema(args.db, raw_schema, create=False)))
            raw, synchronous = asyncio.run(pg_raw_commit_rate(args.db, raw_schema, args.raw_seconds))
            print(f"engine store: PostgreSQL {version}, a schema per repetition "
                  f"({', '.join(str(setup.schema) for setup in setups)}; dropped at the end)")
            raw_label = (f"PostgreSQL through asyncpg: BEGIN, one 1-row INSERT, COMMIT, sequential; "
                         f"synchronous_commit={synchronous}")
        else:
            raw = raw_commit_rate(base / "raw.db", args.raw_seconds)
            print(f"engine store: SQLite file in {base}/run-N")
            raw_label = "sqlite3: WAL, synchronous=NORMAL, one 1-row insert per commit"
        if kafka:
            print(f"broker: Kafka {args.broker}, topics {', '.join(setups[0].topics())}... (deleted at the end)")
        elif rabbit:
            print(f"broker: RabbitMQ {args.broker.split('@')[-1]}, topics {', '.join(setups[0].topics())}... "
                  f"(exchanges and queues deleted at the end)")
        elif args.broker == "db://":
            print("broker: db://, the SQL queue in the engine's SQLite file")
        else:
            print("broker: in-memory")
        where = "in a process of their own" if args.participants_process else "in-process"
        print(f"participants: {where}, dedup records in SQLite files in {base}/run-N")
        floor_prefix = f"bench-{run_id}.floor." if named else ""
        if kafka:
            stack.callback(lambda: asyncio.run(delete_topics(args.broker, floor_topics(floor_prefix))))
        if rabbit:
            floor_groups = [(topic, f"{topic.removesuffix('.commands')}-floor") for topic in floor_topics(floor_prefix)]
            floor_groups[-1] = (floor_groups[-1][0], f"{floor_prefix}floor-engine")  # bench/broker_floor.py's names
            stack.callback(lambda: asyncio.run(delete_rabbit(args.broker, floor_groups)))
        floor_broker = setups[0].broker() if args.broker != "db://" else MemoryBroker()
        if args.broker == "db://":
            print("broker floor: on the in-memory broker (bench/broker_floor.py does not run on db://)")
        floor = asyncio.run(broker_floor(floor_broker, sagas=args.floor_sagas, concurrency=args.concurrency,
                                         prefix=floor_prefix))
        profiler = cProfile.Profile() if args.profile else None
        if args.rate:
            print(f"arrivals: open loop, {args.rate:,.0f} sagas/s offered")
        broker_name = "Kafka" if kafka else "RabbitMQ" if rabbit else "db://" if args.broker else "memory broker"
        mode = ("PostgreSQL" if postgres else "SQLite") + f" + {broker_name}" + (
            ", participants in another process" if args.participants_process else "")
        ours, peer = f"sagas ({mode})", "DBOS"
        peer_label = peer
        rows: dict[str, list[Figures]] = {ours: [], peer: []} if args.peers else {ours: []}
        used = (("PostgreSQL", postgres), ("Kafka JVM", kafka), ("RabbitMQ", rabbit))
        servers = [kind for kind, on in used if on]
        for index, setup in enumerate(setups):
            order = (ours, peer) if index % 2 == 0 else (peer, ours)  # alternate who goes first
            for system in order if args.peers else (ours,):
                if repeat > 1 or args.peers:
                    print(f"\n---- {system}, repetition {index + 1} of {repeat} ----")
                if system == peer:
                    figures, what = run_dbos(args.db if postgres else str(setup.directory / "dbos.db"),
                                             args.sagas, args.concurrency, [k for k in servers if k == "PostgreSQL"],
                                             args.dbos_api)
                    rows[peer].append(figures)
                    peer_label = what
                    print(f"{what}: {figures.rate:,.0f} workflows/s, p50 / p99 {figures.p50_ms:,.1f} / "
                          f"{figures.p99_ms:,.1f} ms, CPU per saga {figures.cpu_ms:.2f} ms (its process), machine "
                          f"{figures.machine_ms:.2f} ms" + "".join(f", {kind} {ms:.2f} ms"
                                                                 for kind, ms in figures.extra.items()))
                    continue
                if profiler is not None:
                    profiler.enable()
                run = asyncio.run(run_sagas(setup, args.sagas, args.concurrency, gc_freeze=args.gc_freeze,
                                            rate=args.rate, background_seconds=args.background_seconds
                                            if postgres or named else 0.0))
                if profiler is not None:
                    profiler.disable()
                report(run, raw, raw_label, floor)
                rows[ours].append(run.figures(servers))
        if repeat > 1 or args.peers:
            print(f"\n==== side by side: median [min..max] over {repeat} interleaved repetitions; CPU per saga of "
                  f"each system's own process, then of what else it used (from /proc), then the whole machine's "
                  f"(load average now {'/'.join(f'{n:.1f}' for n in os.getloadavg())}: a shared machine) ====")
            if args.peers:
                rows[peer_label] = rows.pop(peer)
            for line in summary(rows, baseline=ours, peers=[peer_label] if args.peers else []):
                print(line)
        if profiler is not None:
            for key in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(25)
                print(f"\n---- top 25 by {key} ----")
                print(out.getvalue())


if __name__ == "__main__":
    main()

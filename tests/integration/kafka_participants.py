"""Participant services on Kafka, run as their own OS process, and the harness the Kafka process tests share.

    python tests/integration/kafka_participants.py --kafka kafka://HOST:PORT --prefix P --ledger LEDGER.db \
        --names inventory,payment,shipping [--seed 1] [--transient 0.05] [--ready FILE] [--stats FILE]

The participants are those of the crash test (tests/integration/crash_participants.py: every effect is a row in
a ledger table without a unique constraint; payment declines amounts over 100, shipping amounts ending in 7;
transient failures with probability ``--transient``), moved to Kafka: each consumes ``P.<name>.commands`` in
consumer group ``P-<name>`` and replies on the topic each command names. Runs until SIGTERM or SIGINT, then
writes its stats as JSON.

Imported by tests/integration/test_multi_engine.py and test_outages.py for the harness below the script:
a scratch PostgreSQL database, per-run topics, `sagas serve` processes and participant processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a script

from ruamel.yaml import YAML

from sagas.adapters import open_broker
from sagas.adapters.kafka import KafkaBroker
from tests.integration.crash_participants import (
    COMMANDS,
    add_participant_arguments,
    build,
    declined_by,
    serve_until_stopped,
)

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "multi_saga.yaml"
SCRIPT = Path(__file__).resolve()
STEPS = ("reserve", "charge", "ship")
STEP_OF = {"Reserve": "reserve", "Charge": "charge", "Ship": "ship"}
PARTITIONS = 6
_CONSOLE_SCRIPT = Path(sys.executable).with_name("sagas")
SAGAS_CLI = [str(_CONSOLE_SCRIPT)] if _CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "sagas"]


# ---- the participant process ----------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    unknown = set(names) - set(COMMANDS)
    if unknown:
        raise SystemExit(f"unknown participant(s): {sorted(unknown)}; choose from {sorted(COMMANDS)}")
    rng = random.Random(args.seed)
    participants = [build(name, rng, args.transient) for name in names]
    for participant in participants:
        participant.topic = command_topic(args.prefix, participant.name)
        participant.group = f"{args.prefix}-{participant.name}"
    # Any broker URL: the RabbitMQ process tests run these participants too (tests/integration/test_rabbitmq_*.py).
    broker = open_broker(args.kafka, partitions=PARTITIONS)
    await serve_until_stopped(participants, broker, args.ledger, args,
                              banner=f"participants {names} serving on {args.prefix}.*; ledger {args.ledger}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kafka", required=True, help="kafka://host:port (or any broker URL: amqp://...)")
    parser.add_argument("--prefix", required=True, help="Topic and group prefix of this test run.")
    add_participant_arguments(parser, transient=0.05)
    asyncio.run(run(parser.parse_args()))


# ---- harness for the tests ------------------------------------------------------------------------------


def command_topic(prefix: str, participant: str) -> str:
    return f"{prefix}.{participant}.commands"


def run_topics(prefix: str) -> list[str]:
    """Every topic a run with this prefix uses: the participants' command topics and the engines' replies."""
    return [command_topic(prefix, name) for name in COMMANDS] + [f"{prefix}.replies"]


def write_definition(directory: Path, prefix: str) -> Path:
    """multi_saga.yaml with every step's command topic moved to this run's prefix."""
    yaml = YAML()
    data = yaml.load(TEMPLATE.read_text())
    for step in data["steps"]:
        step["topic"] = command_topic(prefix, step["participant"])
    path = directory / "multi_saga.yaml"
    with path.open("w") as out:
        yaml.dump(data, out)
    return path


def expected_declined_step(amount: int) -> str | None:
    decliner = declined_by(amount)
    return STEP_OF[COMMANDS[decliner][0]] if decliner else None


async def poll(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str, interval: float = 0.2
) -> float:
    """Wait until `condition()` holds; the seconds it took. Fails with `what` after `timeout` seconds."""
    began = time.monotonic()

    async def holds() -> bool:
        result = condition()
        return await result if inspect.isawaitable(result) else bool(result)

    while not await holds():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)  # polling: the condition lives in another process or the database
    return time.monotonic() - began


@contextlib.asynccontextmanager
async def scratch_database(pg_url: str) -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test (the role has CREATEDB), dropped afterwards; yields its URL."""
    import asyncpg  # the postgres extra: only the tests marked `postgres` get here
    from sqlalchemy.engine import make_url

    admin_url = make_url(pg_url)
    name = f"sagas_{uuid.uuid4().hex[:12]}"
    dsn = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            # FORCE ends our own leftover sessions, but not an autovacuum worker (busy after a server restart):
            # the role may not signal it, so try again until it has moved on.
            async def dropped() -> bool:
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                except (asyncpg.InsufficientPrivilegeError, asyncpg.ObjectInUseError):
                    return False
                return True

            await poll(dropped, 60, f"database {name} to be dropped", interval=0.5)
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def run_topics_created(kafka_url: str, prefix: str) -> AsyncIterator[list[str]]:
    """Create this run's topics up front (PARTITIONS partitions each) and delete them at the end."""
    from aiokafka.admin import AIOKafkaAdminClient

    topics = run_topics(prefix)
    broker = KafkaBroker.from_url(kafka_url, partitions=PARTITIONS)
    await broker.start()
    try:
        await broker.ensure_topics(topics)
    finally:
        await broker.close()
    try:
        yield topics
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=KafkaBroker.from_url(kafka_url).bootstrap_servers)
        await admin.start()
        try:
            await admin.delete_topics(topics)
        finally:
            await admin.close()


class KafkaProbe:
    """Reads consumer-group lag: how many messages of a topic a group has not committed yet."""

    def __init__(self, kafka_url: str) -> None:
        self.servers = KafkaBroker.from_url(kafka_url).bootstrap_servers
        self._admin: Any = None
        self._consumer: Any = None

    async def __aenter__(self) -> KafkaProbe:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.servers)
        await self._admin.start()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.servers, enable_auto_commit=False)
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def lag(self, group: str, topic: str) -> int:
        from aiokafka import TopicPartition

        described = await self._admin.describe_topics([topic])
        partitions = [TopicPartition(topic, p["partition"]) for p in described[0]["partitions"]]
        ends = await self._consumer.end_offsets(partitions)
        committed = await self._admin.list_consumer_group_offsets(group, partitions=partitions)
        return sum(max(0, ends[tp] - (committed[tp].offset if tp in committed else 0)) for tp in partitions)

    async def assignment(self, group: str) -> list[int]:
        """Partitions assigned to each member of a stable consumer group (empty while it rebalances)."""
        from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

        (response,) = await self._admin.describe_consumer_groups([group])
        (_, _, state, _, _, members, *_) = response.groups[0]
        if state != "Stable":
            return []
        counts = []
        for *_, member_assignment in members:
            decoded = ConsumerProtocolMemberAssignment.decode(member_assignment)
            counts.append(sum(len(partitions) for _, partitions in decoded.assignment))
        return sorted(counts)

    async def participants_behind(self, prefix: str) -> int:
        """Commands published to this run's participants and not yet handled and committed by them."""
        return sum([await self.lag(f"{prefix}-{name}", command_topic(prefix, name)) for name in COMMANDS])


@dataclass
class EngineProcess:
    """One `sagas serve` process; its JSON log lines (stderr) go to `log`."""

    proc: subprocess.Popen[bytes]
    log: Path
    _checked: int = 0

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for raw in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(raw))
        return found

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]

    def errors(self) -> Counter[str]:
        return Counter(str(line.get("event")) for line in self.lines() if line.get("level") in ("error", "critical"))

    def check_alive(self) -> None:
        """Fail at once if the process exited or one of its loops died (the process may live on without it)."""
        assert self.proc.poll() is None, f"engine exited with {self.proc.returncode}: see {self.log}"
        with self.log.open("rb") as log:
            log.seek(self._checked)
            fresh = log.read()
        self._checked += len(fresh)
        assert b'"engine loop crashed"' not in fresh, f"an engine loop crashed: see {self.log}"

    def has_started(self) -> bool:
        assert self.proc.poll() is None, f"engine exited with {self.proc.returncode}: see {self.log}"
        return '"engine started"' in self.log.read_text(errors="replace")

    async def started(self, timeout: float) -> None:
        await poll(self.has_started, timeout, f"the engine to start (log {self.log})")

    async def end(self, sig: signal.Signals, timeout: float) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, timeout)


@dataclass
class Fleet:
    """The processes of one test; `close` kills whatever is left."""

    tmp: Path
    kafka_url: str
    db_url: str
    prefix: str
    definition: Path
    engine_env: dict[str, str] = field(default_factory=dict)
    engines: list[EngineProcess] = field(default_factory=list)
    participants: list[tuple[subprocess.Popen[bytes], Path, Path]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAS_")}
        return {**env, **extra}

    def spawn_engine(self, name: str) -> EngineProcess:
        log = self.tmp / f"engine-{name}.log"
        env = self.env(
            SAGAS_REPLY_TOPIC=f"{self.prefix}.replies", SAGAS_GROUP=f"{self.prefix}-engine",
            SAGAS_KAFKA__PARTITIONS=str(PARTITIONS), SAGAS_RELAY_INTERVAL="0.5", **self.engine_env,
        )
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*SAGAS_CLI, "serve", "--definitions", str(self.definition), "--db", self.db_url,
                 "--broker", self.kafka_url, "--json-logs"],
                stdout=subprocess.DEVNULL, stderr=out, env=env, start_new_session=True,
            )
        engine = EngineProcess(proc, log)
        self.engines.append(engine)
        return engine

    async def start_participants(self, groups: Iterable[Iterable[str]], *, seed: int, transient: float,
                                 timeout: float) -> None:
        self.spawn_participants(groups, seed=seed, transient=transient)
        for index, (proc, ready, _) in enumerate(self.participants):
            def is_ready(proc: subprocess.Popen[bytes] = proc, ready: Path = ready, index: int = index) -> bool:
                assert proc.poll() is None, f"participants-{index} exited: see {self.tmp}/participants-{index}.log"
                return ready.exists()

            await poll(is_ready, timeout, f"participants-{index} to be ready")

    def spawn_participants(self, groups: Iterable[Iterable[str]], *, seed: int, transient: float) -> None:
        for index, names in enumerate(groups):
            ready, stats = self.tmp / f"participants-{index}.ready", self.tmp / f"participants-{index}.stats"
            with (self.tmp / f"participants-{index}.log").open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, str(SCRIPT), "--kafka", self.kafka_url, "--prefix",
                     self.prefix, "--ledger", str(self.ledger(index)), "--names", ",".join(names),
                     "--seed", str(seed + index), "--transient", str(transient), "--ready", str(ready),
                     "--stats", str(stats)],
                    stdout=out, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
                )
            self.participants.append((proc, ready, stats))

    def ledger(self, index: int) -> Path:
        return self.tmp / f"ledger-{index}.db"

    def participant_log(self, index: int) -> str:
        return (self.tmp / f"participants-{index}.log").read_text(errors="replace")

    def stop_participants(self, timeout: float) -> dict[str, dict[str, int]]:
        stats: dict[str, dict[str, int]] = {}
        for index, (proc, _, stats_file) in enumerate(self.participants):
            assert proc.poll() is None, f"participants-{index} died: see {self.tmp}/participants-{index}.log"
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout)
            assert code == 0, f"participants-{index} exited with {code}: see {self.tmp}/participants-{index}.log"
            stats.update(json.loads(stats_file.read_text()))
        return stats

    def ledger_counts(self) -> Counter[tuple[str, str, str]]:
        """(saga, step, kind) -> effect rows, across every participant process's ledger."""
        counts: Counter[tuple[str, str, str]] = Counter()
        for index in range(len(self.participants)):
            with contextlib.closing(sqlite3.connect(self.ledger(index), timeout=30)) as conn:
                for saga_id, step, kind in conn.execute("SELECT saga_id, step, kind FROM ledger"):
                    counts[(saga_id, step, kind)] += 1
        return counts

    def close(self) -> None:
        procs = [e.proc for e in self.engines] + [p for p, _, _ in self.participants]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def effect_problems(instances: Iterable[Any], ledger: Counter[tuple[str, str, str]]) -> list[str]:
    """What is wrong with the participants' effects, given every saga (settled) and the ledgers."""
    problems = [f"{key} applied {n} times" for key, n in ledger.items() if n > 1]
    for instance in instances:
        sid = instance.id
        applied = {step for step in STEPS if ledger[(sid, step, "command")]}
        undone = {step for step in STEPS if ledger[(sid, step, "compensation")]}
        declined = expected_declined_step(instance.input["amount"])
        expected = "compensated" if declined else "completed"
        if str(instance.status) != expected:
            problems.append(f"{sid}: {instance.status}, expected {expected} ({instance.failure})")
        elif declined is None and (applied != set(STEPS) or undone):
            problems.append(f"{sid}: completed with effects {sorted(applied)}, compensations {sorted(undone)}")
        elif declined is not None and (declined in applied or undone != applied):
            problems.append(f"{sid}: declined at {declined}; effects {sorted(applied)}, undone {sorted(undone)}")
    return problems


if __name__ == "__main__":
    main()

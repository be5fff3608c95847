"""Crash test: the engine process is SIGKILLed again and again while 200 sagas run; nothing is lost or doubled.

Set-up (every piece a separate OS process except the test itself):
- one SQLite file holds the engine's store AND the durable ``db://`` queue;
- three participant processes (tests/integration/crash_participants.py: inventory, payment, shipping), each
  with its own ledger database, consume their commands from that queue and keep running throughout;
- the engine is ``sagas serve --definitions crash_saga.yaml --db FILE --broker db://``; it is killed with
  SIGKILL at seeded random moments (mostly while serving, some during its start-up) and started again;
- the test process starts the sagas through `SagaAdmin` (instance + outbox in one transaction; the serving
  engine's relay publishes them), in batches between kills.

See docs/crash-test.md for what is asserted and the figures of typical runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from structlog.testing import capture_logs

from sagas.adapters import open_store
from sagas.definitions import load_file
from sagas.engine.admin import SagaAdmin
from sagas.engine.state import SagaInstance, SagaStatus
from tests.integration.crash_participants import COMMANDS, declined_by

HERE = Path(__file__).resolve().parent
DEFINITION = HERE / "crash_saga.yaml"
PARTICIPANT_SCRIPT = HERE / "crash_participants.py"
_CONSOLE_SCRIPT = Path(sys.executable).with_name("sagas")  # the venv's console script, as users run it
SAGAS_CLI = [str(_CONSOLE_SCRIPT)] if _CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "sagas"]

SEED = 20240611
SAGAS = 200
KILLS = 24
START_BATCHES = 20  # sagas are started in this many batches, one per engine life, while the kills go on
STARTUP_KILL_SHARE = 0.2  # share of kills aimed at the engine's start-up (imports, migrations, first relay)
SERVING_DELAY = (0.2, 3.0)  # seconds after "engine started" for the other kills
STARTUP_DELAY = (0.3, 2.5)  # seconds after spawning, for start-up kills
STEPS = ("reserve", "charge", "ship")
STEP_OF = {"Reserve": "reserve", "Charge": "charge", "Ship": "ship"}
SETTLE_DEADLINE = 120.0
PHASE_DEADLINE = 60.0  # start-up of a process, quiescence of the queues, graceful stops


@dataclass
class EngineRun:
    """One life of the engine process: stderr is copied to a log file and watched for its start."""

    proc: asyncio.subprocess.Process
    log: IO[bytes]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    errors: Counter[str] = field(default_factory=Counter)
    reader: asyncio.Task[None] | None = None

    async def copy_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.write(line)
            if b'"engine started"' in line:
                self.started.set()
            if b'"level": "error"' in line or b'"level": "critical"' in line:
                with contextlib.suppress(ValueError):
                    self.errors[str(json.loads(line).get("event"))] += 1

    async def wait_started(self, timeout: float) -> None:
        exited = asyncio.ensure_future(self.proc.wait())
        started = asyncio.ensure_future(self.started.wait())
        try:
            await asyncio.wait({exited, started}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            started.cancel()
        if not self.started.is_set():
            raise AssertionError(f"engine did not start within {timeout}s (exit code {self.proc.returncode}); "
                                 f"see {self.log.name}")

    async def end(self, sig: signal.Signals, timeout: float) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self.reader is not None:
            await self.reader
        self.log.close()
        return code


class Fleet:
    """The processes of one test: participants and the successive engines. `close` kills whatever is left."""

    def __init__(self, tmp: Path, db: Path) -> None:
        self.tmp = tmp
        self.db = db
        self.participants: list[tuple[asyncio.subprocess.Process, Path, Path]] = []
        self.engines: list[EngineRun] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAS_")}
        self.env["SAGAS_RELAY_INTERVAL"] = "0.2"

    async def start_participants(self, groups: list[list[str]]) -> None:
        for index, names in enumerate(groups):
            ready, stats = self.tmp / f"participants-{index}.ready", self.tmp / f"participants-{index}.stats"
            log = await asyncio.to_thread(open, self.tmp / f"participants-{index}.log", "wb")
            with log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, str(PARTICIPANT_SCRIPT), "--db", str(self.db),
                    "--ledger", str(self.tmp / f"ledger-{index}.db"), "--names", ",".join(names),
                    "--seed", str(SEED + index), "--transient", "0.1", "--ready", str(ready), "--stats", str(stats),
                    stdout=log, stderr=asyncio.subprocess.STDOUT, env=self.env,
                )
            self.participants.append((proc, ready, stats))
        deadline = time.monotonic() + PHASE_DEADLINE
        for index, (proc, ready, _) in enumerate(self.participants):
            while not ready.exists():
                assert proc.returncode is None, f"participants-{index} exited: see participants-{index}.log"
                assert time.monotonic() < deadline, f"participants-{index} not ready in {PHASE_DEADLINE}s"
                await asyncio.sleep(0.05)  # polling the ready file

    async def spawn_engine(self) -> EngineRun:
        log = await asyncio.to_thread(open, self.tmp / f"engine-{len(self.engines):02d}.log", "wb")
        proc = await asyncio.create_subprocess_exec(
            *SAGAS_CLI, "serve", "--definitions", str(DEFINITION), "--db", str(self.db), "--broker", "db://",
            "--json-logs", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=self.env,
        )
        run = EngineRun(proc, log)
        run.reader = asyncio.ensure_future(run.copy_stderr())
        self.engines.append(run)
        return run

    async def stop_participants(self) -> dict[str, dict[str, int]]:
        stats: dict[str, dict[str, int]] = {}
        for index, (proc, _, stats_file) in enumerate(self.participants):
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), PHASE_DEADLINE)
            assert code == 0, f"participants-{index} exited with {code}: see participants-{index}.log"
            stats.update(json.loads(stats_file.read_text()))
        return stats

    async def close(self) -> None:
        for run in self.engines:
            if run.proc.returncode is None:
                run.proc.kill()
                await run.proc.wait()
            if run.reader is not None:
                with contextlib.suppress(Exception):
                    await run.reader
            run.log.close()
        for proc, _, _ in self.participants:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def query(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        return conn.execute(sql, params).fetchall()


def queues_drained(db: Path) -> bool:
    """True when every participant group has committed every command published to its topic."""
    behind = query(db, """
        SELECT g.group_name FROM broker_groups g
        WHERE g.group_name LIKE '%-participant'
          AND g.committed < COALESCE((SELECT MAX(m.id) FROM broker_messages m WHERE m.topic = g.topic), 0)""")
    return not behind


def expected_status(instance: SagaInstance) -> SagaStatus:
    return SagaStatus.COMPENSATED if declined_by(instance.input["amount"]) else SagaStatus.COMPLETED


@dataclass
class Evidence:
    """What one run leaves behind, read once every process has stopped."""

    instances: list[SagaInstance]
    dead_letters: int
    ledger: Counter[tuple[str, str, str]]  # (saga, step, kind) -> effect rows in the participants' ledgers
    events: Counter[tuple[str, str, str]]  # (saga, step, history event type) -> count
    participant_stats: dict[str, dict[str, int]]
    kills: dict[str, int]
    settled_after_kill: list[int]
    engine_lives: int
    engine_errors: Counter[str]
    participant_batch_failures: int
    timings: dict[str, float]

    def summary(self) -> str:
        types: Counter[str] = Counter()
        for (_, _, type_), n in self.events.items():
            types[type_] += n
        statuses = Counter(i.status for i in self.instances)
        stats = self.participant_stats
        return (
            f"crash test: {len(self.instances)} sagas, {sum(self.kills.values())} SIGKILLs "
            f"({self.kills['startup']} during start-up, {self.kills['serving']} while serving), "
            f"{self.engine_lives} engine lives\n"
            f"  settled after each kill: {self.settled_after_kill}\n"
            f"  final: {statuses[SagaStatus.COMPLETED]} completed, {statuses[SagaStatus.COMPENSATED]} compensated, "
            f"{self.dead_letters} dead letters\n"
            f"  engine: {types['step.sent']} commands sent for {types['step.succeeded']} step successes, "
            f"{types['compensation.sent']} compensations sent for {types['compensation.succeeded']} done; "
            f"replies dropped by the inbox: {types['message.duplicate']} duplicates, "
            f"{types['message.ignored']} stale/late; error log lines: {dict(self.engine_errors)}\n"
            f"  participants: effects {sum(s['handled'] for s in stats.values())}, "
            f"deduplicated {sum(s['deduplicated'] for s in stats.values())}, "
            f"declined {sum(s['failed'] for s in stats.values())}, "
            f"transient {sum(s['retryable'] for s in stats.values())}, "
            f"failed batches {self.participant_batch_failures}; ledger rows {sum(self.ledger.values())}\n"
            f"  elapsed: {self.timings['total']:.1f}s (kill phase {self.timings['kills']:.1f}s, "
            f"settling {self.timings['settle']:.1f}s)"
        )


async def run_scenario(tmp_path: Path) -> Evidence:
    """Participants up; KILLS engine lives each ended by SIGKILL while sagas start; a last life settles them all."""
    began = time.monotonic()
    rng = random.Random(SEED)
    db = tmp_path / "engine.db"
    store = open_store(str(db))
    await store.initialize()
    await store.save_definition(load_file(DEFINITION))
    admin = SagaAdmin(store)
    orders = [(f"order-{i:03d}", rng.randint(1, 130)) for i in range(SAGAS)]
    batches = [orders[i::START_BATCHES] for i in range(START_BATCHES)]
    fleet = Fleet(tmp_path, db)
    kills = {"startup": 0, "serving": 0}
    settled_after_kill: list[int] = []
    try:
        await fleet.start_participants([[name] for name in COMMANDS])

        # ---- kill phase ----------------------------------------------------------------------------
        for life in range(KILLS):
            engine = await fleet.spawn_engine()
            for order_id, amount in batches[life] if life < len(batches) else []:
                await admin.start("crash_order", {"order_id": order_id, "amount": amount}, key=order_id)
            if rng.random() < STARTUP_KILL_SHARE:
                await asyncio.sleep(rng.uniform(*STARTUP_DELAY))  # deliberate: a random moment of the start-up
                kills["startup" if not engine.started.is_set() else "serving"] += 1
            else:
                await engine.wait_started(PHASE_DEADLINE)
                await asyncio.sleep(rng.uniform(*SERVING_DELAY))  # deliberate: a random moment while serving
                kills["serving"] += 1
            assert engine.proc.returncode is None, f"engine died on its own: see {engine.log.name}"
            assert await engine.end(signal.SIGKILL, PHASE_DEADLINE) == -signal.SIGKILL
            counts = await store.count_by_status()
            settled_after_kill.append(counts[SagaStatus.COMPLETED] + counts[SagaStatus.COMPENSATED])
        kill_phase = time.monotonic() - began

        # ---- recovery: one last life runs until every saga is settled ---------------------------------
        engine = await fleet.spawn_engine()
        await engine.wait_started(PHASE_DEADLINE)
        deadline = time.monotonic() + SETTLE_DEADLINE
        while True:
            counts = await store.count_by_status()
            if counts[SagaStatus.RUNNING] + counts[SagaStatus.COMPENSATING] == 0:
                break
            assert engine.proc.returncode is None, f"engine died on its own: see {engine.log.name}"
            assert time.monotonic() < deadline, f"not settled after {SETTLE_DEADLINE}s: {dict(counts)}"
            await asyncio.sleep(0.2)  # polling the store
        settle_phase = time.monotonic() - began - kill_phase
        again = [await admin.start("crash_order", {"order_id": o, "amount": a}, key=o) for o, a in orders[:10]]
        assert not any(created for _, created in again), "a repeated idempotency key started a second saga"
        assert await engine.end(signal.SIGTERM, PHASE_DEADLINE) == 0, f"unclean stop: see {engine.log.name}"

        deadline = time.monotonic() + PHASE_DEADLINE
        while not queues_drained(db):  # late duplicates must reach the participants before the ledgers are read
            assert time.monotonic() < deadline, "participants did not drain their queues"
            await asyncio.sleep(0.1)  # polling the queue positions
        participant_stats = await fleet.stop_participants()

        instances = await store.list_instances(limit=10 * SAGAS)
        dead_letters = await store.dead_letters(limit=1000, include_replayed=True)
    finally:
        await fleet.close()
        await store.close()

    ledger: Counter[tuple[str, str, str]] = Counter()
    batch_failures = 0
    for index in range(len(fleet.participants)):
        for saga_id, step, kind in query(tmp_path / f"ledger-{index}.db", "SELECT saga_id, step, kind FROM ledger"):
            ledger[(saga_id, step, kind)] += 1
        log = await asyncio.to_thread((tmp_path / f"participants-{index}.log").read_text)
        batch_failures += log.count("participant batch failed")
    events: Counter[tuple[str, str, str]] = Counter()
    for saga_id, step, type_, n in query(
        db, "SELECT saga_id, step, type, COUNT(*) FROM saga_events GROUP BY saga_id, step, type"
    ):
        events[(saga_id, step or "", type_)] += n
    engine_errors: Counter[str] = Counter()
    for run in fleet.engines:
        engine_errors.update(run.errors)
    return Evidence(
        instances=instances, dead_letters=len(dead_letters), ledger=ledger, events=events,
        participant_stats=participant_stats, kills=kills, settled_after_kill=settled_after_kill,
        engine_lives=len(fleet.engines), engine_errors=engine_errors, participant_batch_failures=batch_failures,
        timings={"total": time.monotonic() - began, "kills": kill_phase, "settle": settle_phase},
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_engine_survives_sigkill_with_every_effect_applied_once(tmp_path: Path) -> None:
    """After 24 SIGKILLs of the engine during 200 sagas, every saga ends as its participants decided, each step
    effect is applied exactly once (compensations at most once, every effect of a compensated saga undone
    exactly once) and the engine applied each step's outcome once."""
    with capture_logs():  # the in-process SagaAdmin logs every command it queues; keep -s output readable
        run = await run_scenario(tmp_path)
    print("\n" + run.summary())

    assert sum(run.kills.values()) >= 20
    assert len(run.instances) == SAGAS
    assert run.dead_letters == 0
    failures = {"batch failed; processing its items one by one", "item failed", "engine loop crashed"}
    assert not run.engine_errors.keys() & failures, run.engine_errors
    wrong = {i.input["order_id"]: (str(i.status), i.failure) for i in run.instances if i.status != expected_status(i)}
    assert not wrong, f"sagas not in the status their participants decided: {wrong}"
    doubled = {key: n for key, n in run.ledger.items() if n > 1}
    assert not doubled, f"effects applied more than once: {doubled}"
    assert {saga_id for saga_id, _, _ in run.ledger} <= {i.id for i in run.instances}, "effect of an unknown saga"
    for instance in run.instances:
        sid = instance.id
        applied = {step for step in STEPS if run.ledger[(sid, step, "command")]}
        undone = {step for step in STEPS if run.ledger[(sid, step, "compensation")]}
        succeeded = {step for step in STEPS if run.events[(sid, step, "step.succeeded")]}
        for step in STEPS:
            for outcome in ("step.succeeded", "step.failed", "compensation.succeeded"):
                assert run.events[(sid, step, outcome)] <= 1, f"{sid}/{step}: {outcome} applied twice by the engine"
        assert succeeded <= applied, f"{sid}: the engine recorded {succeeded - applied} done without an effect"
        if instance.status == SagaStatus.COMPLETED:
            assert applied == succeeded == set(STEPS), f"{sid}: completed with effects {applied}, done {succeeded}"
            assert not undone, f"{sid}: completed but {undone} compensated"
        else:
            decliner = declined_by(instance.input["amount"])
            declined_step = STEP_OF[COMMANDS[decliner][0]] if decliner else None
            assert declined_step not in applied, f"{sid}: the declined step {declined_step} took effect"
            assert applied == succeeded, f"{sid}: effects {applied}, engine saw successes {succeeded}"
            assert undone == applied, f"{sid}: effects {applied} but compensations {undone}"

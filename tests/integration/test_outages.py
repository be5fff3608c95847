"""Outages: Kafka, and separately PostgreSQL, stopped for 10 s while one `sagas serve` process runs 300 sagas.

Set-up (a fresh PostgreSQL database and fresh topics per test): participant processes on Kafka
(tests/integration/kafka_participants.py) with ledgers; one engine process with JSON logs; the test process starts
the sagas through `SagaAdmin` at a steady pace, retrying a start that fails because the database is down (the same
idempotency key, as a client would). Once a third of them are started, the service is stopped with
`scripts/services.sh pause`, left down for 10 s and started again with `resume` (which waits until it is ready).
The engine must log the outage and its end, and settle every saga without being restarted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sagas.adapters.sql import SqlStore
from sagas.definitions import load_file
from sagas.engine.admin import SagaAdmin
from sagas.engine.state import SagaStatus
from sagas.errors import StoreError
from tests.integration.crash_participants import COMMANDS
from tests.integration.kafka_participants import (
    EngineProcess,
    Fleet,
    KafkaProbe,
    effect_problems,
    poll,
    run_topics_created,
    scratch_database,
    write_definition,
)

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "scripts" / "services.sh"
SEED = 20240613
SAGAS = 300
START_RATE = 10.0  # sagas per second: the run lasts ~30 s, so the outage falls in its middle
OUTAGE_AFTER = SAGAS // 3  # sagas started before the service is stopped
OUTAGE = 10.0
PROCESS_START = 90.0
SERVICE_DEADLINE = 180.0  # pause (graceful stop) and resume (start until ready) of a service
SETTLE_DEADLINE = 180.0


@dataclass
class OutageRun:
    engine: EngineProcess
    pid: int
    instances: list[Any]
    dead_letters: int
    problems: list[str]
    start_retries: int
    timings: dict[str, float]
    errors: Counter[str] = field(default_factory=Counter)


async def services(action: str, service: str) -> float:
    """`scripts/services.sh ACTION SERVICE`; the seconds it took."""
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(SERVICES), action, service, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), SERVICE_DEADLINE)
    assert proc.returncode == 0, f"services.sh {action} {service} failed:\n{out.decode(errors='replace')}"
    return time.monotonic() - began


async def settled(store: SqlStore) -> int | None:
    """Settled sagas, or None while the database is unreachable."""
    try:
        counts = await store.count_by_status()
    except StoreError as exc:
        if not exc.retriable:
            raise
        return None
    return counts[SagaStatus.COMPLETED] + counts[SagaStatus.COMPENSATED] + counts[SagaStatus.FAILED]


async def run_outage(service: str, pg_url: str, kafka_url: str, tmp_path: Path) -> OutageRun:
    prefix = f"outage{uuid.uuid4().hex[:8]}"
    orders = [(f"order-{i:03d}", 1 + (i * 37) % 130) for i in range(SAGAS)]
    timings: dict[str, float] = {}
    async with scratch_database(pg_url) as db_url, run_topics_created(kafka_url, prefix):
        definition = write_definition(tmp_path, prefix)
        store = SqlStore(db_url)
        await store.initialize()
        await store.save_definition(load_file(definition))
        fleet = Fleet(tmp_path, kafka_url, db_url, prefix, definition)
        starting: asyncio.Future[None] | None = None
        service_down = False
        try:
            await fleet.start_participants([[name] for name in COMMANDS], seed=SEED, transient=0.05,
                                           timeout=PROCESS_START)
            engine = fleet.spawn_engine("0")
            pid = engine.proc.pid
            await engine.started(PROCESS_START)

            admin = SagaAdmin(store, reply_topic=f"{prefix}.replies")
            started = 0
            retries = 0

            async def start_all() -> None:
                nonlocal started, retries
                began = time.monotonic()
                for index, (order_id, amount) in enumerate(orders):
                    await asyncio.sleep(max(0.0, began + index / START_RATE - time.monotonic()))  # pacing
                    while True:
                        try:
                            await admin.start("multi_order", {"order_id": order_id, "amount": amount}, key=order_id)
                            break
                        except StoreError as exc:  # the database is down: try again, same key
                            if not exc.retriable:
                                raise
                            retries += 1
                            await asyncio.sleep(0.5)  # client back-off
                    started += 1

            run_began = time.monotonic()
            starting = asyncio.ensure_future(start_all())
            await poll(lambda: started >= OUTAGE_AFTER or starting.done(), SETTLE_DEADLINE, "sagas to start")

            # ---- the outage ------------------------------------------------------------------------------
            service_down = True
            timings["pause"] = await services("pause", service)
            down_at = time.monotonic()
            await asyncio.sleep(OUTAGE)  # deliberate: the outage window
            timings["resume"] = await services("resume", service)
            service_down = False
            timings["down"] = time.monotonic() - down_at
            up_at = time.monotonic()

            at_resume: list[int] = []

            async def counted() -> bool:  # the test's own pooled connections may need a retry after a restart
                value = await settled(store)
                if value is not None:
                    at_resume.append(value)
                return value is not None

            async def progressed() -> bool:
                engine.check_alive()
                now = await settled(store)
                return now is not None and now > at_resume[0]

            await poll(counted, SETTLE_DEADLINE, "the database to answer the test")
            await poll(progressed, SETTLE_DEADLINE, "progress after the outage")
            timings["first progress"] = time.monotonic() - up_at
            await asyncio.wait_for(starting, SETTLE_DEADLINE)

            async def all_settled() -> bool:
                engine.check_alive()
                return await settled(store) == SAGAS

            await poll(all_settled, SETTLE_DEADLINE, f"all {SAGAS} sagas to settle after the outage")
            timings["settled after resume"] = time.monotonic() - up_at
            timings["run"] = time.monotonic() - run_began
            assert engine.proc.poll() is None, "the engine process exited"
            assert engine.proc.pid == pid

            # ---- graceful stop, drain, evidence ----------------------------------------------------------
            assert await engine.end(signal.SIGTERM, 60) == 0, f"unclean stop: see {engine.log}"
            async with KafkaProbe(kafka_url) as probe:
                async def drained() -> bool:
                    return await probe.participants_behind(prefix) == 0

                await poll(drained, SETTLE_DEADLINE, "the participants to drain their command topics")
            fleet.stop_participants(60)
            instances = await store.list_instances(limit=10 * SAGAS)
            dead_letters = await store.dead_letters(limit=1000, include_replayed=True)
            ledger = fleet.ledger_counts()
        finally:
            if starting is not None:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            if service_down:  # never leave the shared service stopped
                await services("resume", service)
            fleet.close()
            await store.close()
    return OutageRun(engine, pid, instances, len(dead_letters), effect_problems(instances, ledger), retries,
                     timings, engine.errors())


def outage_lines(engine: EngineProcess) -> tuple[list[str], list[str]]:
    """The engine log's lines about the outage: its own JSON events at warning level and above, and the
    plain-text lines of libraries that log through the standard `logging` module (aiokafka)."""
    own, library = [], []
    for raw in engine.log.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            library.append(raw)
            continue
        if line.get("level") in ("warning", "error", "critical"):
            detail = {k: v for k, v in line.items() if k not in ("event", "level", "timestamp", "exception")}
            own.append(f"{line.get('level')}: {line.get('event')} {detail}")
    return own, library


def report(service: str, run: OutageRun) -> str:
    own, library = outage_lines(run.engine)
    statuses = Counter(str(i.status) for i in run.instances)
    t = run.timings
    own_summary = Counter(line[:160] for line in own)
    library_summary = Counter(line[:90] for line in library)
    return (
        f"\n{service} outage: {SAGAS} sagas, engine pid {run.pid} never restarted; final {dict(statuses)}\n"
        f"  pause {t['pause']:.1f}s, down {t['down']:.1f}s (resume took {t['resume']:.1f}s); first saga settled "
        f"{t['first progress']:.1f}s after the service was back, all {t['settled after resume']:.1f}s after; "
        f"run {t['run']:.1f}s; start retries {run.start_retries}\n"
        f"  engine events at warning and above ({len(own)}):\n    "
        + "\n    ".join(f"{n} x {text}" for text, n in own_summary.most_common(10))
        + f"\n  plain-text library lines ({len(library)}), most frequent:\n    "
        + "\n    ".join(f"{n} x {text}" for text, n in library_summary.most_common(3))
    )


def check(run: OutageRun) -> None:
    assert len(run.instances) == SAGAS
    assert run.dead_letters == 0
    assert not run.problems, f"{len(run.problems)} problems, first: {run.problems[:10]}"
    assert "engine loop crashed" not in run.errors, run.errors
    assert len(run.engine.events("engine started")) == 1, "the engine was restarted"


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_engine_rides_out_a_kafka_outage(pg_url: str, kafka_url: str, tmp_path: Path) -> None:
    """Kafka stopped for 10 s during 300 sagas: the engine logs the outage and its end, keeps running (same
    process) and every saga ends as its participants decided, with every effect applied once."""
    with capture_logs():
        run = await run_outage("kafka", pg_url, kafka_url, tmp_path)
    print(report("kafka", run))
    check(run)
    assert run.engine.events("broker unavailable; retrying publish"), "no outage line in the engine log"
    assert run.engine.events("broker available again"), "no recovery line in the engine log"


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_engine_rides_out_a_postgres_outage(pg_url: str, kafka_url: str, tmp_path: Path) -> None:
    """PostgreSQL stopped for 10 s during 300 sagas: the engine logs the outage and its end, keeps running (same
    process) and every saga ends as its participants decided, with every effect applied once."""
    with capture_logs():
        run = await run_outage("postgres", pg_url, kafka_url, tmp_path)
    print(report("postgres", run))
    check(run)
    assert run.engine.events("store unavailable; retrying"), "no outage line in the engine log"
    assert run.engine.events("store available again"), "no recovery line in the engine log"


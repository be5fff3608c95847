"""`sagas serve` processes on PostgreSQL and RabbitMQ, with the participant processes of the Kafka process tests
(tests/integration/kafka_participants.py, given an amqp:// URL) and their ledgers without a unique constraint.

- Three engines run 1,000 sagas while the one that is the active consumer of the reply queues is SIGKILLed and
  restarted a few seconds later: every saga ends as its participants decided, each effect exactly once, each
  compensation at most once (exactly once where one was due).
- One engine runs 300 sagas while RabbitMQ is stopped for 10 s (`scripts/services.sh pause`), and separately
  while the server closes every connection (`rabbitmqctl close_all_connections`): nothing lost or duplicated, the
  same engine process throughout, one line for the lost connection and one for its recovery.

Each test gets its own PostgreSQL database and its own exchanges and queues (a per-run prefix).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sagas.adapters.sql import SqlStore
from sagas.definitions import load_file
from sagas.engine.admin import SagaAdmin
from sagas.errors import StoreError
from tests.integration.crash_participants import COMMANDS
from tests.integration.kafka_participants import (
    PARTITIONS,
    EngineProcess,
    Fleet,
    effect_problems,
    poll,
    scratch_database,
    write_definition,
)
from tests.integration.rabbitmq_support import active_consumer_pids, participants_behind, queue_report
from tests.integration.test_multi_engine import history_counts, settled_count
from tests.integration.test_outages import services as service_action

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]

SEED = 20241202
PROCESS_START = 90.0
SETTLE_DEADLINE = 240.0
DRAIN_DEADLINE = 60.0


async def services(action: str) -> float:
    """`scripts/services.sh ACTION rabbitmq`; the seconds it took."""
    return await service_action(action, "rabbitmq")


def broker_url(amqp_url: str) -> str:
    return f"{amqp_url.rstrip('/')}/?partitions={PARTITIONS}"


def check_outcomes(instances: list[Any], ledger: Counter[tuple[str, str, str]], events: Counter[Any],
                   sagas: int) -> None:
    assert len(instances) == sagas
    problems = effect_problems(instances, ledger)
    assert not problems, f"{len(problems)} problems, first: {problems[:10]}"
    assert {saga_id for saga_id, _, _ in ledger} <= {i.id for i in instances}, "effect of an unknown saga"
    twice = [key for key, n in events.items()
             if key[2] in ("step.succeeded", "step.failed", "compensation.succeeded") and n > 1]
    assert not twice, f"outcomes applied twice by the engines: {twice[:10]}"


@pytest.mark.timeout(600)
async def test_three_engines_on_rabbitmq_one_killed_run_1000_sagas_with_every_effect_once(
    pg_url: str, amqp_url: str, amqp_management_url: str, tmp_path: Path
) -> None:
    """Three engines share PostgreSQL and RabbitMQ; the one consuming the replies is SIGKILLed mid-run and
    restarted; another takes its queues over, and all 1,000 sagas end as their participants decided, with every
    step effect and compensation applied exactly once."""
    sagas = 1000
    prefix = f"rmulti{uuid.uuid4().hex[:8]}"
    rng = random.Random(SEED)
    orders = [(f"order-{i:04d}", rng.randint(1, 130)) for i in range(sagas)]
    figures: dict[str, float] = {}
    began = time.monotonic()
    replies_queues = f"{prefix}.replies@{prefix}-engine."
    with capture_logs():
        async with scratch_database(pg_url) as db_url:
            definition = write_definition(tmp_path, prefix)
            store = SqlStore(db_url)
            await store.initialize()
            await store.save_definition(load_file(definition))
            fleet = Fleet(tmp_path, broker_url(amqp_url), db_url, prefix, definition)
            starting: asyncio.Future[None] | None = None
            try:
                await fleet.start_participants([[name] for name in COMMANDS], seed=SEED, transient=0.05,
                                               timeout=PROCESS_START)
                engines = [fleet.spawn_engine(str(i)) for i in range(3)]
                for engine in engines:
                    await engine.started(PROCESS_START)
                pids = {engine.proc.pid: engine for engine in engines}

                async def owner() -> set[int]:
                    return await active_consumer_pids(amqp_management_url, replies_queues)

                async def owned() -> bool:
                    active = await owner()
                    return bool(active) and active <= pids.keys()

                await poll(owned, PROCESS_START, "an engine to consume the reply queues")
                figures["set-up"] = time.monotonic() - began

                admin = SagaAdmin(store, reply_topic=f"{prefix}.replies")
                limit = asyncio.Semaphore(16)

                async def start(order_id: str, amount: int) -> None:
                    async with limit:
                        _, created = await admin.start("multi_order", {"order_id": order_id, "amount": amount},
                                                       key=order_id)
                    assert created

                async def start_all() -> None:
                    await asyncio.gather(*(start(o, a) for o, a in orders))

                run_began = time.monotonic()
                starting = asyncio.ensure_future(start_all())

                async def enough_settled() -> bool:
                    return await settled_count(store) >= sagas // 4

                await poll(enough_settled, SETTLE_DEADLINE, f"{sagas // 4} settled sagas")
                victim = pids[min(await owner())]
                assert await victim.end(signal.SIGKILL, 10) == -signal.SIGKILL
                killed_at, settled_at_kill = time.monotonic(), await settled_count(store)
                await asyncio.sleep(5.0)  # deliberate: the engine stays dead for a while
                restarted = fleet.spawn_engine("restarted")
                await restarted.started(PROCESS_START)
                alive = [e for e in engines if e is not victim] + [restarted]
                assert (await owner()) <= {e.proc.pid for e in alive}, "the killed engine still owns a queue"

                async def all_settled() -> bool:
                    for engine in alive:
                        engine.check_alive()
                    return await settled_count(store) == sagas

                await starting
                await poll(all_settled, SETTLE_DEADLINE, f"all {sagas} sagas to settle")
                figures["run"] = time.monotonic() - run_began
                figures["after kill"] = time.monotonic() - killed_at

                for engine in alive:
                    assert await engine.end(signal.SIGTERM, 60) == 0, f"unclean stop: see {engine.log}"

                async def drained() -> bool:
                    return await participants_behind(amqp_management_url, prefix) == 0

                await poll(drained, DRAIN_DEADLINE, "the participants to drain their command queues")
                fleet.stop_participants(60)
                instances = await store.list_instances(limit=10 * sagas)
                dead_letters = await store.dead_letters(limit=1000, include_replayed=True)
                events = await history_counts(db_url)
                ledger = fleet.ledger_counts()
                errors: Counter[str] = Counter()
                for engine in [*engines, restarted]:
                    errors.update(engine.errors())
            finally:
                if starting is not None:
                    starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
                fleet.close()
                await store.close()

    statuses = Counter(str(i.status) for i in instances)
    print(f"\nrabbitmq multi-engine: {sagas} sagas on 3 engines, the replies' consumer SIGKILLed at {settled_at_kill} "
          f"settled; final {dict(statuses)}; dead letters {len(dead_letters)}; set-up {figures['set-up']:.1f}s, "
          f"run {figures['run']:.1f}s ({sagas / figures['run']:.1f} sagas/s), settled {figures['after kill']:.1f}s "
          f"after the kill; error lines {dict(errors)}")
    assert not dead_letters, [d.reason for d in dead_letters[:5]]
    assert "engine loop crashed" not in errors, errors
    check_outcomes(instances, ledger, events, sagas)


def connection_lines(engine: EngineProcess) -> tuple[list[str], list[str]]:
    """The engine log's lines from the RabbitMQ adapter: connection lost, connection restored."""
    lost, restored = [], []
    for line in engine.lines():
        event = str(line.get("event"))
        if "RabbitBroker(" in event and "connection lost" in event:
            lost.append(event)
        elif "RabbitBroker(" in event and "connection restored" in event:
            restored.append(event)
    return lost, restored


async def run_with_disruption(disruption: str, pg_url: str, amqp_url: str, management_url: str,
                              tmp_path: Path) -> tuple[EngineProcess, int, list[Any], int, Counter[Any],
                                                       Counter[tuple[str, str, str]], dict[str, float]]:
    """300 sagas through one engine at a steady pace; a third of the way in, `disruption` happens to RabbitMQ."""
    sagas = 300
    prefix = f"rout{uuid.uuid4().hex[:8]}"
    orders = [(f"order-{i:03d}", 1 + (i * 37) % 130) for i in range(sagas)]
    timings: dict[str, float] = {}
    async with scratch_database(pg_url) as db_url:
        definition = write_definition(tmp_path, prefix)
        store = SqlStore(db_url)
        await store.initialize()
        await store.save_definition(load_file(definition))
        fleet = Fleet(tmp_path, broker_url(amqp_url), db_url, prefix, definition)
        starting: asyncio.Future[None] | None = None
        paused = False
        try:
            await fleet.start_participants([[name] for name in COMMANDS], seed=SEED, transient=0.05,
                                           timeout=PROCESS_START)
            engine = fleet.spawn_engine("0")
            pid = engine.proc.pid
            await engine.started(PROCESS_START)
            admin = SagaAdmin(store, reply_topic=f"{prefix}.replies")
            started = 0

            async def start_all() -> None:
                nonlocal started
                began = time.monotonic()
                for index, (order_id, amount) in enumerate(orders):
                    await asyncio.sleep(max(0.0, began + index / 10.0 - time.monotonic()))  # pacing: 10/s
                    await admin.start("multi_order", {"order_id": order_id, "amount": amount}, key=order_id)
                    started += 1

            run_began = time.monotonic()
            starting = asyncio.ensure_future(start_all())
            await poll(lambda: started >= sagas // 3 or starting.done(), SETTLE_DEADLINE, "sagas to start")
            if disruption == "pause":
                paused = True
                await services("pause")
                await asyncio.sleep(10.0)  # deliberate: the outage window
                timings["resume"] = await services("resume")
                paused = False
            else:
                await services(disruption)

            async def all_settled() -> bool:
                engine.check_alive()
                try:
                    return await settled_count(store) == sagas
                except StoreError:
                    return False

            await asyncio.wait_for(starting, SETTLE_DEADLINE)
            await poll(all_settled, SETTLE_DEADLINE, f"all {sagas} sagas to settle")
            timings["run"] = time.monotonic() - run_began
            assert engine.proc.poll() is None, "the engine process exited"
            assert engine.proc.pid == pid
            assert await engine.end(signal.SIGTERM, 60) == 0, f"unclean stop: see {engine.log}"

            async def drained() -> bool:
                return await participants_behind(management_url, prefix) == 0

            try:
                await poll(drained, DRAIN_DEADLINE, "the participants to drain their command queues")
            except AssertionError as exc:
                raise AssertionError(f"{exc}:\n{await queue_report(management_url, prefix)}") from None
            fleet.stop_participants(60)
            instances = await store.list_instances(limit=10 * sagas)
            dead_letters = len(await store.dead_letters(limit=1000, include_replayed=True))
            events = await history_counts(db_url)
            ledger = fleet.ledger_counts()
        finally:
            if starting is not None:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            if paused:  # never leave the server stopped
                await services("resume")
            fleet.close()
            await store.close()
    return engine, pid, instances, dead_letters, events, ledger, timings


@pytest.mark.timeout(600)
@pytest.mark.parametrize("disruption", ["pause", "close-connections"])
async def test_one_engine_rides_out_rabbitmq_going_away(
    disruption: str, pg_url: str, amqp_url: str, amqp_management_url: str, tmp_path: Path
) -> None:
    """RabbitMQ stopped for 10 s (pause), or every connection closed by the server, during 300 sagas: the same
    engine process settles every saga as its participants decided, every effect once, and its log has one line
    for the lost connection and one for the recovery (and, for the stop, the engine's own outage pair)."""
    with capture_logs():
        engine, pid, instances, dead_letters, events, ledger, timings = await run_with_disruption(
            disruption, pg_url, amqp_url, amqp_management_url, tmp_path)
    lost, restored = connection_lines(engine)
    statuses = Counter(str(i.status) for i in instances)
    print(f"\nrabbitmq {disruption}: 300 sagas, engine pid {pid} throughout; final {dict(statuses)}; run "
          f"{timings['run']:.1f}s; connection lines: lost {lost}, restored {restored}; "
          f"engine outage events {len(engine.events('broker unavailable; retrying publish'))} / recoveries "
          f"{len(engine.events('broker available again'))}; errors {dict(engine.errors())}")
    assert dead_letters == 0
    check_outcomes(instances, ledger, events, 300)
    assert len(engine.events("engine started")) == 1, "the engine was restarted"
    # The adapter says it once each way; the engine adds its own pair when publishing was held up for longer
    # than its outage_log_after (5 s): so for the 10 s stop, not for the closed connections.
    assert len(lost) == 1, lost
    assert len(restored) == 1, restored
    outages, recoveries = (len(engine.events(e)) for e in ("broker unavailable; retrying publish",
                                                            "broker available again"))
    assert (outages, recoveries) == ((1, 1) if disruption == "pause" else (0, 0))
    other_errors = engine.errors() - Counter({"broker unavailable; retrying publish": outages})
    assert not other_errors, other_errors

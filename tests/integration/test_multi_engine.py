"""Several engine processes on one PostgreSQL database and one Kafka cluster.

- Three `sagas serve` processes (one consumer group on a 6-partition replies topic) run 1,000 sagas while one of
  them is SIGKILLed and restarted a few seconds later; participant processes on Kafka (the crash test's
  participants, tests/integration/kafka_participants.py) record every effect in ledgers without a unique
  constraint. Every saga must end as its participants decided, with each effect applied exactly once.
- A stale write (an instance update carrying an old version) is rejected with its whole unit of work.

Each test gets its own PostgreSQL database and its own topics, dropped at the end.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

from sagas.adapters.sql import SqlStore
from sagas.definitions import load_file
from sagas.engine.admin import SagaAdmin
from sagas.engine.ports import BrokerMessage, HistoryRecord, InboxRecord, OutboxMessage, UnitOfWork
from sagas.engine.state import HistoryEntry, SagaInstance, SagaStatus, TimerKind, TimerSpec
from sagas.errors import ConcurrencyConflict
from tests.integration.crash_participants import COMMANDS
from tests.integration.kafka_participants import (
    PARTITIONS,
    TEMPLATE,
    Fleet,
    KafkaProbe,
    effect_problems,
    poll,
    run_topics_created,
    scratch_database,
    write_definition,
)

SEED = 20240612
SAGAS = 1000
ENGINES = 3
KILL_AFTER_SETTLED = SAGAS // 4  # the SIGKILL comes once this many sagas are settled: mid-run
KILL_WINDOW = 5.0  # seconds the killed engine stays down
START_CONCURRENCY = 16
PROCESS_START = 90.0
SETTLE_DEADLINE = 200.0
DRAIN_DEADLINE = 60.0


async def settled_count(store: SqlStore) -> int:
    counts = await store.count_by_status()
    return counts[SagaStatus.COMPLETED] + counts[SagaStatus.COMPENSATED] + counts[SagaStatus.FAILED]


async def history_counts(db_url: str) -> Counter[tuple[str, str, str]]:
    """(saga, step, history event type) -> how many times the engines recorded it."""
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.text(
                "SELECT saga_id, COALESCE(step, ''), type, COUNT(*) FROM saga_events GROUP BY 1, 2, 3"))
            return Counter({(saga, step, type_): n for saga, step, type_, n in rows})
    finally:
        await engine.dispose()


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(480)
async def test_three_engines_one_killed_run_1000_sagas_with_every_effect_once(
    pg_url: str, kafka_url: str, tmp_path: Path
) -> None:
    """Three engines share PostgreSQL and Kafka; one is SIGKILLed mid-run and restarted, and still all 1,000
    sagas end as their participants decided, with every step effect and compensation applied exactly once."""
    prefix = f"multi{uuid.uuid4().hex[:8]}"
    rng = random.Random(SEED)
    orders = [(f"order-{i:04d}", rng.randint(1, 130)) for i in range(SAGAS)]
    figures: dict[str, float] = {}
    began = time.monotonic()
    with capture_logs():  # the in-process SagaAdmin logs every command it queues
        async with (
            scratch_database(pg_url) as db_url,
            run_topics_created(kafka_url, prefix),
            KafkaProbe(kafka_url) as probe,
        ):
            definition = write_definition(tmp_path, prefix)
            store = SqlStore(db_url)
            await store.initialize()
            await store.save_definition(load_file(definition))
            fleet = Fleet(tmp_path, kafka_url, db_url, prefix, definition)
            starting: asyncio.Future[float] | None = None
            try:
                await fleet.start_participants([[name] for name in COMMANDS], seed=SEED, transient=0.05,
                                               timeout=PROCESS_START)
                engines = [fleet.spawn_engine(str(i)) for i in range(ENGINES)]
                for engine in engines:
                    await engine.started(PROCESS_START)

                async def shared() -> bool:  # every engine owns 2 of the 6 reply partitions
                    return await probe.assignment(f"{prefix}-engine") == [PARTITIONS // ENGINES] * ENGINES

                await poll(shared, PROCESS_START, "the engines' consumer group to share the reply partitions")
                figures["set-up"] = time.monotonic() - began

                # ---- start 1,000 sagas as the CLI does (instance + outbox; the engines' relays publish) --------
                admin = SagaAdmin(store, reply_topic=f"{prefix}.replies")
                limit = asyncio.Semaphore(START_CONCURRENCY)

                async def start(order_id: str, amount: int) -> str:
                    async with limit:
                        saga_id, created = await admin.start("multi_order", {"order_id": order_id, "amount": amount},
                                                             key=order_id)
                    assert created
                    return saga_id

                async def start_all() -> float:
                    await asyncio.gather(*(start(o, a) for o, a in orders))
                    return time.monotonic() - run_began

                run_began = time.monotonic()
                starting = asyncio.ensure_future(start_all())

                # ---- SIGKILL one engine mid-run (sagas still starting), restart it after a few seconds ----------
                async def enough_settled() -> bool:
                    return await settled_count(store) >= KILL_AFTER_SETTLED

                await poll(enough_settled, SETTLE_DEADLINE, f"{KILL_AFTER_SETTLED} settled sagas")
                victim = engines[1]
                assert await victim.end(signal.SIGKILL, 10) == -signal.SIGKILL
                killed_at, settled_at_kill = time.monotonic(), await settled_count(store)
                started_at_kill = sum((await store.count_by_status()).values())
                await asyncio.sleep(KILL_WINDOW)  # deliberate: the engine stays dead for a while
                restarted = fleet.spawn_engine("1-restarted")
                await restarted.started(PROCESS_START)
                figures["restart"] = time.monotonic() - killed_at - KILL_WINDOW
                await poll(shared, PROCESS_START, "the restarted engine to rejoin the consumer group")
                figures["rejoined"] = time.monotonic() - killed_at

                async def all_settled() -> bool:
                    for engine in (engines[0], engines[2], restarted):
                        engine.check_alive()
                    return await settled_count(store) == SAGAS

                figures["start 1000"] = await starting
                await poll(all_settled, SETTLE_DEADLINE, f"all {SAGAS} sagas to settle")
                figures["run"] = time.monotonic() - run_began
                figures["after kill"] = time.monotonic() - killed_at

                # ---- graceful stop; late duplicates reach the participants before the ledgers are read ----------
                for engine in (engines[0], engines[2], restarted):
                    assert await engine.end(signal.SIGTERM, 60) == 0, f"unclean stop: see {engine.log}"
                async def drained() -> bool:
                    return await probe.participants_behind(prefix) == 0

                await poll(drained, DRAIN_DEADLINE, "the participants to drain their command topics")
                stats = fleet.stop_participants(60)
                instances = await store.list_instances(limit=10 * SAGAS)
                dead_letters = await store.dead_letters(limit=1000, include_replayed=True)
                events = await history_counts(db_url)
                await store.close()
                ledger = fleet.ledger_counts()
                lives = [*engines, restarted]
                errors: Counter[str] = Counter()
                conflicts = relayed = 0
                for engine in lives:
                    errors.update(engine.errors())
                    conflicts += len(engine.events("batch conflicted; re-reading"))
                    relayed += sum(line.get("count", 0) for line in engine.events("relaying outbox rows"))
                batch_failures = sum(fleet.participant_log(i).count("participant batch failed")
                                     for i in range(len(fleet.participants)))
            finally:
                if starting is not None:
                    starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
                fleet.close()
                await store.close()

    statuses = Counter(str(i.status) for i in instances)
    types: Counter[str] = Counter()
    for (_, _, type_), n in events.items():
        types[type_] += n
    print(
        f"\nmulti-engine: {SAGAS} sagas on {ENGINES} engines, engine 1 SIGKILLed at {started_at_kill} started / "
        f"{settled_at_kill} settled, "
        f"down {KILL_WINDOW:.0f}s (+{figures['restart']:.1f}s to restart; "
        f"partitions shared by 3 engines again {figures['rejoined']:.1f}s after the kill)\n"
        f"  final: {dict(statuses)}; dead letters {len(dead_letters)}\n"
        f"  set-up {figures['set-up']:.1f}s; starting 1000 sagas {figures['start 1000']:.1f}s; run "
        f"{figures['run']:.1f}s ({SAGAS / figures['run']:.1f} sagas/s); settled {figures['after kill']:.1f}s after "
        f"the kill\n"
        f"  engines: {types['step.sent']} commands sent for {types['step.succeeded']} step successes; "
        f"{types['compensation.sent']} compensations sent for {types['compensation.succeeded']} done; "
        f"duplicates dropped {types['message.duplicate']}, stale/late {types['message.ignored']}; "
        f"conflicted batches {conflicts}; rows relayed {relayed}; error lines {dict(errors)}\n"
        f"  participants: effects {sum(s['handled'] for s in stats.values())}, deduplicated "
        f"{sum(s['deduplicated'] for s in stats.values())}, declined {sum(s['failed'] for s in stats.values())}, "
        f"transient {sum(s['retryable'] for s in stats.values())}, failed batches {batch_failures}; "
        f"ledger rows {sum(ledger.values())}\n"
        f"  total {time.monotonic() - began:.1f}s"
    )

    assert len(instances) == SAGAS
    assert not dead_letters, [d.reason for d in dead_letters[:5]]
    assert "engine loop crashed" not in errors, errors
    problems = effect_problems(instances, ledger)
    assert not problems, f"{len(problems)} problems, first: {problems[:10]}"
    assert {saga_id for saga_id, _, _ in ledger} <= {i.id for i in instances}, "effect of an unknown saga"
    twice = [key for key, n in events.items()
             if key[2] in ("step.succeeded", "step.failed", "compensation.succeeded") and n > 1]
    assert not twice, f"outcomes applied twice by the engines: {twice[:10]}"


def _unit(instance: SagaInstance, tag: str, now: float) -> UnitOfWork:
    """An update of `instance` (at the version it was read) with one row of every other kind, all tagged."""
    saga_id = instance.id
    message = BrokerMessage(topic="stale.test", value=b"{}", key=saga_id)
    return UnitOfWork(
        updates=[instance.model_copy(update={"failure": f"written by {tag}", "updated_at": now})],
        history=[HistoryRecord(saga_id, HistoryEntry(at=now, type=f"test.{tag}"))],
        outbox=[OutboxMessage(f"out-{tag}-{saga_id}", saga_id, message, now)],
        inbox=[InboxRecord(f"in-{tag}-{saga_id}", saga_id, "applied", now)],
        timers=[TimerSpec(id=f"timer-{tag}-{saga_id}", saga_id=saga_id, timer=TimerKind.DEADLINE, due_at=now + 3600)],
    )


async def _assert_only_first_applied(store: SqlStore, saga_id: str, winner: str, loser: str) -> None:
    stored = (await store.load([saga_id]))[saga_id]
    assert stored.version == 2
    assert stored.failure == f"written by {winner}"
    history = {record.entry.type for record in await store.history(saga_id)}
    assert f"test.{winner}" in history
    assert f"test.{loser}" not in history
    assert await store.seen([f"in-{winner}-{saga_id}", f"in-{loser}-{saga_id}"]) == {f"in-{winner}-{saga_id}"}
    pending = {m.id for m in await store.pending_outbox(1000)}
    assert f"out-{winner}-{saga_id}" in pending
    assert f"out-{loser}-{saga_id}" not in pending
    timers = {t.id for t in await store.timers_of(saga_id)}
    assert f"timer-{winner}-{saga_id}" in timers
    assert f"timer-{loser}-{saga_id}" not in timers


@pytest.mark.postgres
@pytest.mark.timeout(120)
async def test_stale_write_is_rejected_with_its_whole_unit_of_work(pg_url: str) -> None:
    """Two store handles (two engines) update the same saga from the same version: the second write, now stale,
    raises ConcurrencyConflict and none of its history, outbox, inbox or timer rows are written."""
    with capture_logs():
        async with scratch_database(pg_url) as db_url:
            one, two = SqlStore(db_url), SqlStore(db_url)
            try:
                await one.initialize()
                await one.save_definition(load_file(TEMPLATE))
                admin = SagaAdmin(one)
                sequential, _ = await admin.start("multi_order", {"order_id": "o-1", "amount": 5})
                concurrent, _ = await admin.start("multi_order", {"order_id": "o-2", "amount": 5})

                # One after the other: the second handle's read is stale by the time it commits.
                a = (await one.load([sequential]))[sequential]
                b = (await two.load([sequential]))[sequential]
                assert a.version == b.version == 1
                now = time.time()
                await one.commit(_unit(a, "one", now))
                with pytest.raises(ConcurrencyConflict) as caught:
                    await two.commit(_unit(b, "two", now))
                assert caught.value.saga_ids == (sequential,)
                await _assert_only_first_applied(one, sequential, "one", "two")

                # At the same time: the row lock serializes them, exactly one wins.
                a = (await one.load([concurrent]))[concurrent]
                b = (await two.load([concurrent]))[concurrent]
                results = await asyncio.gather(one.commit(_unit(a, "one", now)), two.commit(_unit(b, "two", now)),
                                               return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                assert len(failed) == 1, results
                assert isinstance(failed[0], ConcurrencyConflict), repr(failed[0])
                winner, loser = ("one", "two") if results[0] is None else ("two", "one")
                await _assert_only_first_applied(one, concurrent, winner, loser)
            finally:
                await one.close()
                await two.close()

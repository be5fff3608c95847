"""Every metric of the Prometheus adapter, asserted on what really ran: on the embedded default (SQLite + db://)
and, where the numbers come from elsewhere (Kafka offsets, a PostgreSQL outage), on PostgreSQL + Kafka."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sagas.adapters import open_broker
from sagas.adapters.kafka import KafkaBroker
from sagas.adapters.prometheus import EngineMetrics, dead_letter_class
from sagas.adapters.sql import SqlStore
from sagas.definitions.model import SagaDefinition
from sagas.engine.admin import SagaAdmin
from sagas.engine.ports import Broker, BrokerMessage
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import Outcome
from sagas.engine.wire import CommandMessage, decode_command, encode_reply
from sagas.participant import BusinessFailure
from tests.engine.support import ledger_participant, three_steps
from tests.web.support import Proxy, eventually, sample


async def scrape(metrics: EngineMetrics) -> str:
    body, _ = await metrics.exposition()
    return body.decode()


def decline_charge(command: CommandMessage) -> dict[str, Any]:
    if command.data.get("amount") == 99:
        raise BusinessFailure("declined")
    return {"ok": True}


def refuse_undo(command: CommandMessage) -> dict[str, Any]:
    if command.data.get("order") == "park":
        raise BusinessFailure("cannot release")
    return {"ok": True}


def lifecycle_participants() -> list[Any]:
    """Payment declines an amount of 99; inventory refuses to release the order "park" (its saga is parked)."""
    return [
        ledger_participant("inventory", {"Reserve": None, "UndoReserve": refuse_undo}),
        ledger_participant("payment", {"Charge": decline_charge, "UndoCharge": None}),
        ledger_participant("shipping", {"Ship": None, "UndoShip": None}),
    ]


@contextlib.asynccontextmanager
async def running(store: SqlStore, broker_for: Any, definitions: list[SagaDefinition], *, participants: list[Any],
                  **metrics_options: Any) -> AsyncIterator[tuple[Engine, EngineMetrics]]:
    metrics = EngineMetrics(cache_seconds=0, **metrics_options)
    engine = Engine(store=store, broker=broker_for(), definitions=definitions, observer=metrics)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(engine)
        metrics.bind(engine)
        for participant in participants:
            broker = broker_for()
            stack.push_async_callback(broker.close)
            await stack.enter_async_context(participant.serve(broker=broker))
        yield engine, metrics


async def run_lifecycle(engine: Engine, metrics: EngineMetrics) -> str:
    """Two sagas complete, one is compensated (declined charge), one is parked (its release refused)."""
    ids = [await engine.start_saga("order", {"order_id": order, "amount": amount})
           for order, amount in (("a", 1), ("b", 2), ("c", 99), ("park", 99))]
    statuses = [(await engine.wait(saga_id, timeout=60)).status.value for saga_id in ids]
    assert statuses == ["completed", "completed", "compensated", "failed"]
    return await scrape(metrics)


def check_lifecycle(text: str) -> None:
    assert sample(text, 'sagas_started_total{definition="order",version="1"}') == 4
    assert sample(text, 'sagas_settled_total{definition="order",status="completed"}') == 2
    assert sample(text, 'sagas_settled_total{definition="order",status="compensated"}') == 1
    assert sample(text, 'sagas_settled_total{definition="order",status="failed"}') == 1
    assert sample(text, 'sagas_saga_duration_seconds_count{definition="order",status="completed"}') == 2
    assert sample(text, 'sagas_saga_duration_seconds_sum{definition="order",status="completed"}') > 0
    trips = 'sagas_step_round_trip_seconds_count{definition="order",kind="%s",outcome="%s",step="%s"}'
    assert sample(text, trips % ("command", "success", "reserve")) == 4
    assert sample(text, trips % ("command", "success", "charge")) == 2
    assert sample(text, trips % ("command", "failure", "charge")) == 2
    assert sample(text, trips % ("command", "success", "ship")) == 2
    assert sample(text, trips % ("compensation", "success", "reserve")) == 1
    assert sample(text, trips % ("compensation", "failure", "reserve")) == 1
    # 4 reserve + 4 charge + 2 ship commands, 2 compensations.
    assert sample(text, "sagas_messages_published_total") == 12
    assert sample(text, "sagas_publish_latency_seconds_count") == 12
    assert sample(text, 'sagas_replies_fetched_total{topic="sagas.replies"}') == 12
    assert sample(text, "sagas_commit_duration_seconds_count") >= 1
    assert sample(text, "sagas_commit_batch_sagas_count") >= 1
    assert sample(text, "sagas_commit_batch_sagas_sum") >= 4  # every saga written at least once (its start)
    assert sample(text, 'sagas_sagas{status="completed"}') == 2
    assert sample(text, 'sagas_sagas{status="compensated"}') == 1
    assert sample(text, 'sagas_sagas{status="failed"}') == 1
    assert sample(text, 'sagas_sagas{status="running"}') == 0
    assert sample(text, "sagas_parked_sagas") == 1
    assert sample(text, "sagas_stuck_sagas") == 0
    assert sample(text, "sagas_outbox_pending_messages") == 0
    assert sample(text, "sagas_outbox_oldest_age_seconds") == 0
    assert sample(text, "sagas_dead_letters_stored") == 0
    assert sample(text, 'sagas_component_down{component="store"}') == 0
    assert sample(text, 'sagas_outages_total{component="broker"}') == 0


async def test_saga_lifecycle_metrics_on_the_embedded_default(tmp_path: Path) -> None:
    """Started, settled by status, durations, round trips per step/kind/outcome, publishes, fetches, commits and
    the store's gauges (by status, parked, stuck, outbox) match four sagas run on SQLite + db://, and the reply
    consumer's lag on db:// is back to 0."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    store = SqlStore(url)
    definition = three_steps(comp_attempts=1)
    try:
        async with running(store, lambda: open_broker("db://", db_url=url), [definition],
                           participants=lifecycle_participants()) as (engine, metrics):
            text = await run_lifecycle(engine, metrics)
            check_lifecycle(text)

            async def drained() -> bool:
                return sample(await scrape(metrics), 'sagas_consumer_lag_messages{partition="0",'
                              'topic="sagas.replies"}') == 0

            await eventually(drained)
    finally:
        await store.close()


def one_step(timeout: float) -> SagaDefinition:
    return SagaDefinition.model_validate({
        "name": "ship_only", "version": 1,
        "steps": [{"name": "ship", "participant": "shipping", "command": "Ship", "timeout": timeout, "kind": "pivot",
                   "retry": {"max_attempts": 2, "initial_backoff": 0.2, "max_backoff": 0.2, "jitter": 0.0},
                   "payload": {"order": "input.order_id"}}],
    })


async def next_command(broker: Broker, consumer: Any, attempt: int) -> CommandMessage:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for delivery in await consumer.fetch(10, timeout=0.5):
            await consumer.commit([delivery])
            command = decode_command(delivery.message)
            if command.attempt == attempt:
                return command
    raise AssertionError(f"no command of attempt {attempt}")


def succeeded(command: CommandMessage) -> BrokerMessage:
    return encode_reply(command, outcome=Outcome.SUCCESS, type=f"{command.type}.succeeded", data={},
                        source="test", at=time.time())


async def test_timer_reply_and_dead_letter_metrics_on_the_embedded_default(tmp_path: Path) -> None:
    """A step that times out once and is retried, a late reply to the first attempt, the second attempt's reply
    delivered twice and a malformed reply show as timers fired (with their lateness), timeout and success round
    trips, one ignored and one duplicate reply, and one malformed dead letter (counted and stored)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    store = SqlStore(url)
    broker = open_broker("db://", db_url=url)
    metrics = EngineMetrics(cache_seconds=0)
    engine = Engine(store=store, broker=open_broker("db://", db_url=url), definitions=[one_step(0.3)],
                    observer=metrics, settings=EngineSettings(timer_interval=0.02))
    try:
        async with engine:
            metrics.bind(engine)
            await broker.start()
            commands = await broker.subscribe(["shipping.commands"], "test-shipping")
            saga_id = await engine.start_saga("ship_only", {"order_id": "o-1"})
            first = await next_command(broker, commands, 1)
            second = await next_command(broker, commands, 2)  # after the first timed out and its backoff
            await broker.publish([succeeded(first)])
            await broker.publish([succeeded(second), succeeded(second)])
            assert (await engine.wait(saga_id, timeout=30)).status == "completed"

            async def both_counted() -> bool:
                text = await scrape(metrics)
                return sample(text, "sagas_duplicate_replies_total") + sample(
                    text, "sagas_ignored_replies_total") == 2

            await eventually(both_counted)
            await broker.publish([BrokerMessage("sagas.replies", b"not json", headers=(("ce_id", b"x"),))])

            async def dead_lettered() -> bool:
                return sample(await scrape(metrics), "sagas_dead_letters_stored") == 1

            await eventually(dead_lettered)
            text = await scrape(metrics)
    finally:
        await broker.close()
        await store.close()
    assert sample(text, "sagas_timers_fired_total") >= 2  # the timeout, then the retry
    assert sample(text, "sagas_timer_lateness_seconds_count") == sample(text, "sagas_timers_fired_total")
    trips = 'sagas_step_round_trip_seconds_count{definition="ship_only",kind="command",outcome="%s",step="ship"}'
    assert sample(text, trips % "timeout") == 1
    assert sample(text, trips % "success") == 1
    assert sample(text, "sagas_ignored_replies_total") == 1
    assert sample(text, "sagas_duplicate_replies_total") == 1
    assert sample(text, 'sagas_dead_letters_total{reason="malformed"}') == 1
    assert sample(text, "sagas_timers_due") == 0


async def test_backlog_gauges_read_what_waits_in_the_store(tmp_path: Path) -> None:
    """A saga started from the CLI (no engine publishing) leaves its first command in the outbox: the outbox
    gauges count it and its age; seen an hour later it is also stuck and its step timer due."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    store = SqlStore(url)
    try:
        await store.initialize()
        definition = three_steps(timeout=60)
        await store.save_definition(definition)
        await SagaAdmin(store).start("order", {"order_id": "o", "amount": 1})
        now = metrics_time = time.time()
        metrics = EngineMetrics(cache_seconds=0, stuck_after=600, clock=lambda: metrics_time)
        metrics.bind_components(store, None, [], "g")
        text = await scrape(metrics)
        assert sample(text, "sagas_outbox_pending_messages") == 1
        assert 0 <= sample(text, "sagas_outbox_oldest_age_seconds") < 60
        assert sample(text, 'sagas_sagas{status="running"}') == 1
        assert sample(text, "sagas_stuck_sagas") == 0
        assert sample(text, "sagas_timers_due") == 0
        assert sample(text, "sagas_stuck_threshold_seconds") == 600
        metrics_time = now + 3600
        text = await scrape(metrics)
        assert sample(text, "sagas_stuck_sagas") == 1
        assert sample(text, "sagas_timers_due") == 1
        assert sample(text, "sagas_outbox_oldest_age_seconds") >= 3600
    finally:
        await store.close()


async def test_gauges_are_cached_between_scrapes(tmp_path: Path) -> None:
    """Scrapes within `cache_seconds` of a reading serve it again without querying the store."""
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}")
    try:
        await store.initialize()
        calls = []
        real = store.gauges

        async def counted(now: float, stuck_after: float) -> Any:
            calls.append(now)
            return await real(now, stuck_after)

        store.gauges = counted  # type: ignore[method-assign]
        metrics = EngineMetrics(cache_seconds=60)
        metrics.bind_components(store, None, [], "g")
        for _ in range(5):
            await scrape(metrics)
        assert len(calls) == 1
    finally:
        await store.close()


def test_dead_letter_reasons_fall_in_few_classes() -> None:
    """Reasons (unbounded text) become one of five label values."""
    assert dead_letter_class("processing failed: KeyError('x')", "s") == "processing_failed"
    assert dead_letter_class("refused by the broker: too large", "s") == "broker_refused"
    assert dead_letter_class("unknown saga 'x'", None) == "unknown_saga"
    assert dead_letter_class("unexpected reply type", "s") == "rejected"
    assert dead_letter_class("value is not JSON", None) == "malformed"


def test_two_engines_in_one_process_keep_their_own_series() -> None:
    """Each EngineMetrics has its own registry: counting in one leaves the other at zero."""
    first, second = EngineMetrics(), EngineMetrics()
    first.loop_failed("writer", RuntimeError("x"))
    assert first.registry.get_sample_value("sagas_loop_restarts_total", {"loop": "writer"}) == 1
    assert second.registry.get_sample_value("sagas_loop_restarts_total", {"loop": "writer"}) is None


@pytest.mark.postgres
@pytest.mark.kafka
async def test_lifecycle_lag_and_outage_metrics_on_postgres_and_kafka(pg_url: str, kafka_url: str) -> None:
    """On PostgreSQL + Kafka the same four sagas give the same counters and gauges; the reply consumer's lag per
    partition (Kafka end offset - committed offset) is back to 0 once drained; a store outage (PostgreSQL reached
    through a proxy that is stopped) is counted and shows as down until it ends."""
    url = sa.engine.make_url(pg_url)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    suffix = uuid.uuid4().hex[:8]
    schema = f"metrics_{suffix}"  # its own schema and topics: the gauges count everything in the database
    store = SqlStore(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
                     schema=schema)
    body = three_steps(comp_attempts=1).model_dump(mode="json")
    for step in body["steps"]:
        step["topic"] = f"{step['participant']}.commands.{suffix}"
    definition = SagaDefinition.model_validate(body)
    settings = EngineSettings(reply_topic=f"replies-{suffix}", group=f"engine-{suffix}", outage_backoff_max=0.2)
    metrics = EngineMetrics(cache_seconds=0)
    engine = Engine(store=store, broker=KafkaBroker.from_url(kafka_url), definitions=[definition],
                    observer=metrics, settings=settings)
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(engine)
            metrics.bind(engine)
            for participant in lifecycle_participants():
                participant.topic = f"{participant.name}.commands.{suffix}"
                participant.group = f"{participant.name}-{suffix}"
                broker = KafkaBroker.from_url(kafka_url)
                stack.push_async_callback(broker.close)
                await stack.enter_async_context(participant.serve(broker=broker))
            text = await run_lifecycle(engine, metrics)
            check_lifecycle(text.replace(f'topic="{settings.reply_topic}"', 'topic="sagas.replies"'))

            async def drained() -> bool:
                lags = [float(line.rpartition(" ")[2]) for line in (await scrape(metrics)).splitlines()
                        if line.startswith("sagas_consumer_lag_messages{") and settings.reply_topic in line]
                return len(lags) == 3 and sum(lags) == 0

            await eventually(drained, timeout=60)
            await proxy.stop()

            async def down() -> bool:
                return sample(await scrape(metrics), 'sagas_component_down{component="store"}') == 1

            await eventually(down)
            await proxy.start()

            async def back() -> bool:
                return sample(await scrape(metrics), 'sagas_component_down{component="store"}') == 0

            await eventually(back, timeout=60)
            assert sample(await scrape(metrics), 'sagas_outages_total{component="store"}') == 1
    finally:
        await store.close()
        await proxy.stop()
        cleanup = SqlStore(pg_url)
        with contextlib.suppress(Exception):
            await cleanup._runner.write(lambda c: c.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await cleanup.close()

"""Acceptance: the engine's reply consumer survives a flood of hostile messages on every broker.

Per broker (memory; db:// on SQLite and on PostgreSQL; Kafka), at least 10,000 generated hostile messages (random
bytes, missing, duplicated and wrongly typed headers, wrong encodings, huge and deeply nested values, valid-looking
replies for unknown sagas, steps and attempts, and what only that transport can carry: undecodable rows, null
Kafka headers) go into the reply topic while 200 sagas run with their participants. At the end every saga is
terminal as its participants decided, every hostile message is a dead letter or an ignored reply with a reason, no
loop was ever restarted, and the process's memory grew by less than MEMORY_CAP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore
from sagas.adapters.sqlqueue import SqlQueueBroker
from sagas.definitions.model import SagaDefinition
from sagas.engine.ports import Broker
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import SagaStatus
from tests.contract.test_broker_poison import insert_raw
from tests.engine.hostile import Hostile, Shape, expand, pools
from tests.engine.support import decline_if, ledger_participant

HOSTILE = 10_000
SAGAS = 200
MEMORY_CAP = 400 * 2**20
"""RSS growth allowed over a run: the hostile bodies alone (tens of 1 MB values among them) pass through memory."""
FUZZ = settings(max_examples=1, deadline=None, phases=[Phase.generate], database=None,
                suppress_health_check=list(HealthCheck))


def definition(suffix: str) -> SagaDefinition:
    """reserve → charge → ship on participants of this run only (other tests share the servers' topics)."""
    def step(name: str, participant: str, command: str, undo: str) -> dict[str, Any]:
        return {"name": name, "participant": f"{participant}_{suffix}", "command": command, "timeout": 300.0,
                "payload": {"order": "input.order_id", "amount": "input.amount"},
                "compensation": {"command": undo, "payload": {"order": "input.order_id"}}}

    return SagaDefinition.model_validate({
        "name": f"fuzz_{suffix}", "version": 1,
        "steps": [step("reserve", "inventory", "Reserve", "UndoReserve"), step("charge", "payment", "Charge",
                                                                                "UndoCharge"),
                  step("ship", "shipping", "Ship", "UndoShip")],
    })


def participants(suffix: str) -> list[Any]:
    declined = decline_if(lambda data: data["amount"] % 4 == 0)
    return [ledger_participant(f"inventory_{suffix}", {"Reserve": None, "UndoReserve": None}),
            ledger_participant(f"payment_{suffix}", {"Charge": declined, "UndoCharge": None}),
            ledger_participant(f"shipping_{suffix}", {"Ship": None, "UndoShip": None})]


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


Inject = Callable[[list[Hostile]], Awaitable[None]]


async def scenario(broker: Broker, store: SqlStore, inject: Inject, pool: list[Shape], seed: int,
                   transport: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    reply_topic = f"fuzz.replies.{suffix}"
    saga_ids = [f"fz-{suffix}-{i}" for i in range(SAGAS)]
    hostile = expand(pool, seed, HOSTILE, saga_ids=saga_ids, steps=["reserve", "charge", "ship"],
                     transport=transport, topic=reply_topic,
                     max_huge=900_000 if transport == "kafka" else 1_050_000)
    originals = [h for h in hostile if h.copy_of is None]
    assert len(originals) == HOSTILE
    settings = EngineSettings(reply_topic=reply_topic, group=f"fuzz-{suffix}", timer_interval=0.05)
    engine = Engine(store=store, broker=broker, definitions=[definition(suffix)], settings=settings)
    baseline = peak = rss()
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss())
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    async with engine, contextlib.AsyncExitStack() as stack:
        for participant in participants(suffix):
            await stack.enter_async_context(participant.serve(broker=broker))

        async def flood() -> None:
            for start in range(0, len(hostile), 250):  # in chunks, between the sagas' own replies
                await inject(hostile[start:start + 250])
                await asyncio.sleep(0)

        began = time.monotonic()
        flooding = asyncio.ensure_future(flood())
        name = f"fuzz_{suffix}"
        for start in range(0, SAGAS, 20):
            await asyncio.gather(*(engine.start_saga(name, {"order_id": f"o-{i}", "amount": i}, saga_id=saga_ids[i])
                                   for i in range(start, start + 20)))
        await flooding
        finals = await asyncio.gather(*(engine.wait(s, timeout=120, poll=0.5) for s in saga_ids))
        settled = time.monotonic()
        # Every start, every real reply (200 x 3 commands) and every hostile message is an item the writer took.
        expected = SAGAS + 3 * SAGAS + len(hostile)
        async with asyncio.timeout(120):
            while engine.stats["items"] < expected:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        missing = await _unaccounted(store, originals, deadline=time.monotonic() + 20)
        health = {name: (h.restarts, h.running) for name, h in engine.health().items()}
        print(f"{transport}: {len(hostile)} hostile messages, {SAGAS} sagas settled in {settled - began:.1f}s, "
              f"accounted {time.monotonic() - settled:.1f}s later; RSS +{(peak - baseline) / 2**20:.0f} MiB")
    sampling = False
    await sampler

    assert [f.status for f in finals] == [
        SagaStatus.COMPENSATED if i % 4 == 0 else SagaStatus.COMPLETED for i in range(SAGAS)
    ]
    assert not missing, f"{len(missing)} hostile messages neither dead-lettered nor ignored, e.g. {missing[:3]}"
    letters = await store.dead_letters(limit=3 * HOSTILE, include_replayed=True)
    assert all(d.reason for d in letters)
    assert all((d.message.key or "").startswith("h") for d in letters), "a real reply was dead-lettered"
    assert all(len(d.message.value) <= 64 * 1024 for d in letters)
    assert all(restarts == 0 and running for restarts, running in health.values()), health
    assert peak - baseline < MEMORY_CAP, f"RSS grew by {(peak - baseline) / 2**20:.0f} MiB"


async def _unaccounted(store: SqlStore, originals: list[Hostile], *, deadline: float) -> list[Hostile]:
    """The hostile messages of which no trace is found yet: a dead letter under their key, or an ignored reply
    under their id in their saga's history. Waits until none is left or `deadline`."""
    targeted = sorted({h.saga_id for h in originals if h.saga_id is not None})
    while True:
        keys = {d.message.key for d in await store.dead_letters(limit=3 * HOSTILE, include_replayed=True)}
        ignored: set[str] = set()
        for saga_id in targeted:
            for record in await store.history(saga_id):
                if record.entry.type in ("message.ignored", "message.duplicate") and record.entry.detail.get("reason"):
                    ignored.add(record.entry.detail["message_id"])
        missing = [h for h in originals if h.key not in keys and h.ce_id not in ignored]
        if not missing or time.monotonic() > deadline:
            return missing
        await asyncio.sleep(0.5)


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 170))  # type: ignore[arg-type]


seeds = st.integers(0, 2**32)


@FUZZ
@given(pool=pools(), seed=seeds)
def test_memory_broker_survives_a_hostile_flood(pool: list[Shape], seed: int, tmp_path_factory: Any) -> None:
    """In-process broker: anything a BrokerMessage can hold, headers of any type included."""
    path = tmp_path_factory.mktemp("fuzz") / "engine.db"

    async def go() -> None:
        broker = MemoryBroker()
        store = SqlStore(f"sqlite+aiosqlite:///{path}")
        try:
            await scenario(broker, store, _memory_inject(broker), pool, seed, "memory")
        finally:
            await store.close()

    run(go())


def _memory_inject(broker: MemoryBroker) -> Inject:
    async def inject(batch: list[Hostile]) -> None:
        await broker.publish([h.message for h in batch])

    return inject


def _queue_inject(broker: SqlQueueBroker) -> Inject:
    async def inject(batch: list[Hostile]) -> None:
        published = [h.message for h in batch if not h.raw]
        if published:
            await broker.publish(published)
        raw = [{"headers": h.raw["headers"], "value": h.raw["value"], "key": h.key} for h in batch if h.raw]
        if raw:
            await insert_raw(broker, batch[0].message.topic, raw)

    return inject


async def _on_queue(url: str, store: SqlStore, pool: list[Shape], seed: int, transport: str) -> None:
    """The scenario with db:// at `url` (the store's own database); closes the store."""
    broker = SqlQueueBroker(url)
    try:
        await broker.start()
        await scenario(broker, store, _queue_inject(broker), pool, seed, transport)
    finally:
        await broker.close()
        await store.close()


@FUZZ
@given(pool=pools(), seed=seeds)
def test_db_queue_on_sqlite_survives_a_hostile_flood(pool: list[Shape], seed: int, tmp_path_factory: Any) -> None:
    """db:// in the store's SQLite file: rows of any shape written behind the queue's back among the rest."""
    path: Path = tmp_path_factory.mktemp("fuzz") / "engine.db"
    url = f"sqlite+aiosqlite:///{path}"

    run(_on_queue(url, SqlStore(url), pool, seed, "sqlite"))


@pytest.mark.postgres
@FUZZ
@given(pool=pools(), seed=seeds)
def test_db_queue_on_postgres_survives_a_hostile_flood(pool: list[Shape], seed: int, pg_url: str) -> None:
    """db:// on PostgreSQL, the store in a schema of its own."""
    schema = f"fuzz_{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        try:
            await _on_queue(pg_url, SqlStore(pg_url, schema=schema), pool, seed, "postgres")
        finally:
            await _drop_schema(pg_url, schema)

    run(go())


async def _drop_schema(url: str, schema: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await engine.dispose()


@pytest.mark.kafka
@FUZZ
@given(pool=pools(), seed=seeds)
def test_kafka_survives_a_hostile_flood(pool: list[Shape], seed: int, kafka_url: str,
                                        tmp_path_factory: Any) -> None:
    """Kafka: records written by a raw producer, null header values and null values among them."""
    from aiokafka import AIOKafkaProducer

    from sagas.adapters.kafka import KafkaBroker

    path = tmp_path_factory.mktemp("fuzz") / "engine.db"

    async def go() -> None:
        broker = KafkaBroker.from_url(kafka_url, partitions=2, retry_for=30.0)
        store = SqlStore(f"sqlite+aiosqlite:///{path}")
        producer = AIOKafkaProducer(bootstrap_servers=kafka_url.removeprefix("kafka://"), linger_ms=5,
                                    max_request_size=1_048_576)
        await producer.start()

        async def inject(batch: list[Hostile]) -> None:
            sent = []
            for h in batch:
                value = None if h.raw.get("null_value") else h.message.value
                sent.append(await producer.send(h.message.topic, value=value, key=h.key.encode(),
                                                headers=list(h.message.headers)))
            await asyncio.gather(*sent)

        try:
            await scenario(broker, store, inject, pool, seed, "kafka")
        finally:
            await producer.stop()
            await store.close()

    run(go())


@pytest.mark.rabbitmq
@FUZZ
@given(pool=pools(), seed=seeds)
def test_rabbitmq_survives_a_hostile_flood(pool: list[Shape], seed: int, amqp_url: str,
                                           tmp_path_factory: Any) -> None:
    """RabbitMQ: every message published raw through aio-pika; the transport's own ones with tables of AMQP types
    the binding does not map, both CloudEvents prefixes, broken exact-header entries, other encodings, no
    properties, and properties pamqp cannot read (the connection must survive them)."""
    import aio_pika

    from sagas.adapters.rabbitmq import RabbitBroker
    from sagas.adapters.rabbitwire import encode_message
    from tests.integration.rabbitmq_support import hostile_properties

    path = tmp_path_factory.mktemp("fuzz") / "engine.db"

    async def go() -> None:
        broker = RabbitBroker.from_url(amqp_url, retry_for=30.0)
        store = SqlStore(f"sqlite+aiosqlite:///{path}")
        connection = await aio_pika.connect(amqp_url)
        underlay = await (await connection.channel(publisher_confirms=True)).get_underlay_channel()
        topics: set[str] = set()

        async def inject(batch: list[Hostile]) -> None:
            sends = []
            for h in batch:
                topics.add(h.message.topic)
                if "amqp" in h.raw:
                    properties = hostile_properties(h.message.headers, h.raw["amqp"], h.index)
                else:
                    properties = encode_message(h.message)[2]
                sends.append(underlay.basic_publish(h.message.value, exchange=h.message.topic, routing_key=h.key,
                                                    properties=properties, mandatory=True))
            await asyncio.gather(*sends)

        try:
            await scenario(broker, store, inject, pool, seed, "rabbitmq")
            letters = await store.dead_letters(limit=3 * HOSTILE, include_replayed=True)
            assert any("AMQP properties undecodable" in d.reason for d in letters)
            assert broker._epoch == 1, "the engine's connection was lost and made again"
        finally:
            await connection.close()
            await store.close()
            await _delete_rabbitmq_run(amqp_url, topics)

    run(go())


async def _delete_rabbitmq_run(amqp_url: str, reply_topics: set[str]) -> None:
    """Delete this run's exchanges and queues from the shared server (the reply topic and the participants')."""
    from sagas.adapters.rabbitmq import RabbitBroker

    broker = RabbitBroker.from_url(amqp_url)
    await broker.start()
    try:
        for reply_topic in reply_topics:
            suffix = reply_topic.rsplit(".", 1)[1]
            commands = [step.command_topic for step in definition(suffix).iter_steps()]
            groups = [f"fuzz-{suffix}", *(f"{name}_{suffix}-participant" for name in ("inventory", "payment",
                                                                                      "shipping"))]
            await broker.delete_topics([reply_topic, *commands], groups)
    finally:
        await broker.close()

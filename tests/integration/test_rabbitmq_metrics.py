"""The engine's optional broker capabilities on the real RabbitMQ, through what an operator sees: the command
topics declared when the engine starts (a participant may start later), /readyz's probe of the broker, and the
queue depths on /metrics — the engine's reply queues and a participant's command queues."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from sagas.adapters.prometheus import EngineMetrics, ParticipantMetrics
from sagas.adapters.rabbitmq import RabbitBroker
from sagas.adapters.sql import SqlStore
from sagas.definitions.model import SagaDefinition
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import SagaStatus
from sagas.participant import Participant
from tests.web.support import eventually

pytestmark = pytest.mark.rabbitmq


def lags(text: str, name: str) -> dict[str, float]:
    """The series of metric `name` in an exposition: labels → value."""
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
            if line.startswith(name + "{")}


async def test_topics_at_start_probe_and_queue_depths_on_metrics(amqp_url: str, tmp_path: Path) -> None:
    """At start the engine has declared its participant's command topic (a raw client can publish to it at once);
    the broker probe answers; with the participant's handler held, its depth on /metrics is the 4 commands of 4
    sagas; released, every saga completes and both the participant's and the engine's (3 partitions) depths drop
    to 0."""
    suffix = uuid.uuid4().hex[:8]
    topic, replies = f"pay.commands.{suffix}", f"replies.{suffix}"
    definition = SagaDefinition.model_validate({"name": "pay", "version": 1, "steps": [
        {"name": "charge", "participant": "payment", "command": "Charge", "topic": topic, "kind": "pivot",
         "timeout": 60.0}]})
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}")
    metrics = EngineMetrics(cache_seconds=0)
    engine = Engine(store=store, broker=RabbitBroker.from_url(amqp_url), definitions=[definition],
                    observer=metrics, settings=EngineSettings(reply_topic=replies, group=f"engine-{suffix}"))
    gate = asyncio.Event()
    participant = Participant("payment", topic=topic, group=f"payment-{suffix}")

    @participant.command("Charge")
    async def charge(command: Any, tx: Any) -> dict[str, Any]:
        await gate.wait()
        return {"charged": True}

    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(engine)
            metrics.bind(engine)
            connection = await aio_pika.connect(amqp_url)
            stack.push_async_callback(connection.close)
            channel = await connection.channel()
            await channel.get_exchange(topic, ensure=True)  # declared by the engine's start: no 404
            assert isinstance(engine.broker, RabbitBroker)
            await engine.broker.probe()

            ids = [await engine.start_saga("pay", {"n": i}) for i in range(4)]
            participant_broker = RabbitBroker.from_url(amqp_url)
            stack.push_async_callback(participant_broker.close)
            served = await stack.enter_async_context(
                participant.serve(broker=participant_broker, database_url=str(tmp_path / "payment.db")))
            seen = ParticipantMetrics(served, cache_seconds=0)

            async def participant_depth(expected: float) -> bool:
                body, _ = await seen.exposition()
                series = lags(body.decode(), "sagas_participant_consumer_lag_messages")
                return len(series) == 3 and sum(series.values()) == expected

            await eventually(lambda: participant_depth(4), timeout=30)
            gate.set()
            finals = [await engine.wait(saga_id, timeout=60) for saga_id in ids]
            assert [f.status for f in finals] == [SagaStatus.COMPLETED] * 4
            await eventually(lambda: participant_depth(0), timeout=30)

            async def engine_drained() -> bool:
                body, _ = await metrics.exposition()
                series = lags(body.decode(), "sagas_consumer_lag_messages")
                return len(series) == 3 and all(replies in name for name in series) and sum(series.values()) == 0

            await eventually(engine_drained, timeout=30)
    finally:
        await store.close()
        cleanup = RabbitBroker.from_url(amqp_url)
        await cleanup.start()
        await cleanup.delete_topics([topic, replies], [f"payment-{suffix}", f"engine-{suffix}"])
        await cleanup.close()

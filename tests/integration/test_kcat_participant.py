"""A participant written in shell with kcat, from docs/protocol.md alone, takes part in the order saga on Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from sagas.adapters.kafka import KafkaBroker
from sagas.adapters.sql import SqlStore
from sagas.definitions import load_file
from sagas.definitions.model import SagaDefinition
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import SagaStatus
from sagas.participant import Participant
from samples.order_payment import participants as sample

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("kcat_payments.sh")


def on_topics(definition: SagaDefinition, prefix: str) -> SagaDefinition:
    """The sample saga with its command topics prefixed, so earlier runs' messages never meet this one."""
    data = definition.model_dump()
    for step in data["steps"]:
        step["topic"] = f"{prefix}.{step['participant']}.commands"
    return SagaDefinition.model_validate(data)


def moved(participant: Participant, prefix: str) -> Participant:
    clone = Participant(participant.name, topic=f"{prefix}.{participant.name}.commands",
                        group=f"{prefix}-{participant.name}", metadata=participant.metadata)
    clone.handlers = participant.handlers
    return clone


def start_script(kafka_url: str, prefix: str, state: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("w") as log:
        return subprocess.Popen(
            ["bash", str(SCRIPT), kafka_url.removeprefix("kafka://"), f"{prefix}.payments.commands",
             f"{prefix}-payments", str(state)],
            start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )


def order(total: float) -> dict[str, object]:
    return {"customer_id": "c-1", "items": [{"sku": "apple", "quantity": 1}], "total": total, "currency": "EUR"}


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_order_saga_with_a_kcat_payments_participant(kafka_url: str, tmp_path: Path) -> None:
    """Payments answered by a kcat shell script: accepted charges complete, declined ones compensate, and the
    script applies each charge once."""
    prefix = f"kcat{uuid.uuid4().hex[:8]}"
    definition = on_topics(load_file(ROOT / "samples" / "order_payment" / "saga.yaml"), prefix)
    topics = [step.command_topic for step in definition.iter_steps()] + [f"{prefix}.replies"]
    setup = KafkaBroker.from_url(kafka_url)
    await setup.start()
    await setup.ensure_topics(topics)
    await setup.close()

    state = tmp_path / "kcat"
    script_log = tmp_path / "kcat.log"
    script = start_script(kafka_url, prefix, state, script_log)
    settings = EngineSettings(reply_topic=f"{prefix}.replies", group=f"{prefix}-engine")
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'engine.db'}")
    try:
        async with contextlib.AsyncExitStack() as stack:
            engine = await stack.enter_async_context(
                Engine(store=store, broker=KafkaBroker.from_url(kafka_url), definitions=[definition],
                       settings=settings))
            for participant in (sample.orders, sample.inventory):
                broker = KafkaBroker.from_url(kafka_url)
                stack.push_async_callback(broker.close)  # the worker leaves the broker it was given to its owner
                await stack.enter_async_context(moved(participant, prefix).serve(
                    broker=broker, database_url=f"sqlite+aiosqlite:///{tmp_path / participant.name}.db"))
            totals = [10.0, 20.0, 900.0, 30.0, 950.0]
            ids = [await engine.start_saga("order_payment", order(total), key=f"{prefix}-{i}")
                   for i, total in enumerate(totals)]
            results = await asyncio.gather(*(engine.wait(saga_id, timeout=90) for saga_id in ids))
    finally:
        os.killpg(script.pid, signal.SIGTERM)
        script.wait(timeout=10)
        await store.close()

    statuses = [r.status for r in results]
    assert statuses == [SagaStatus.COMPLETED, SagaStatus.COMPLETED, SagaStatus.COMPENSATED,
                        SagaStatus.COMPLETED, SagaStatus.COMPENSATED], script_log.read_text()
    declined = results[2]
    assert declined.steps["charge_payment"].error is not None
    assert declined.steps["reserve_inventory"].status == "compensated"
    assert results[0].steps["charge_payment"].output == {"payment_id": f"pay-{ids[0][:8]}"}
    effects = (state / "effects").read_text().splitlines()
    charged = sorted(line.split("\t")[0] for line in effects)
    assert charged == sorted(f"{ids[i]}/charge_payment/command" for i in (0, 1, 3))  # once each, none declined

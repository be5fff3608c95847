"""A participant written in shell with rabbitmqadmin, amqp-publish and jq, from docs/protocol.md alone, takes part
in the order saga on RabbitMQ (the engine and the other participants on `RabbitBroker`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sagas.adapters.rabbitmq import RabbitBroker
from sagas.adapters.sql import SqlStore
from sagas.definitions import load_file
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import SagaStatus
from samples.order_payment import participants as sample
from tests.integration.test_kcat_participant import moved, on_topics, order

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("rabbitmq_payments.sh")


def start_script(amqp_url: str, management_url: str, prefix: str, state: Path, log_path: Path
                 ) -> subprocess.Popen[bytes]:
    management = urlsplit(management_url)
    with log_path.open("w") as log:
        return subprocess.Popen(
            ["bash", str(SCRIPT), amqp_url, management.hostname or "127.0.0.1", str(management.port or 15672),
             management.username or "guest", management.password or "guest", f"{prefix}.payments.commands",
             f"{prefix}-payments-bash", str(state)],
            start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )


@pytest.mark.rabbitmq
@pytest.mark.timeout(240)
async def test_order_saga_with_a_bash_payments_participant_on_rabbitmq(
    amqp_url: str, amqp_management_url: str, tmp_path: Path
) -> None:
    """Payments answered by a shell script over RabbitMQ: accepted charges complete, declined ones compensate,
    and the script applies each charge once."""
    prefix = f"bash{uuid.uuid4().hex[:8]}"
    definition = on_topics(load_file(ROOT / "samples" / "order_payment" / "saga.yaml"), prefix)
    state = tmp_path / "bash"
    script_log = tmp_path / "bash.log"
    script = start_script(amqp_url, amqp_management_url, prefix, state, script_log)
    settings = EngineSettings(reply_topic=f"{prefix}.replies", group=f"{prefix}-engine")
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'engine.db'}")
    try:
        deadline = time.monotonic() + 60
        while not (state / "ready").exists():  # its queue is bound: the commands will reach it
            assert script.poll() is None, script_log.read_text()
            assert time.monotonic() < deadline, "the script never bound its queue"
            await asyncio.sleep(0.1)
        async with contextlib.AsyncExitStack() as stack:
            engine = await stack.enter_async_context(
                Engine(store=store, broker=RabbitBroker.from_url(amqp_url), definitions=[definition],
                       settings=settings))
            for participant in (sample.orders, sample.inventory):
                broker = RabbitBroker.from_url(amqp_url)
                stack.push_async_callback(broker.close)  # the worker leaves the broker it was given to its owner
                await stack.enter_async_context(moved(participant, prefix).serve(
                    broker=broker, database_url=f"sqlite+aiosqlite:///{tmp_path / participant.name}.db"))
            totals = [10.0, 20.0, 900.0, 30.0, 950.0]
            ids = [await engine.start_saga("order_payment", order(total), key=f"{prefix}-{i}")
                   for i, total in enumerate(totals)]
            results = await asyncio.gather(*(engine.wait(saga_id, timeout=150) for saga_id in ids))
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

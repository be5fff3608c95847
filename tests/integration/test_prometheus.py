"""A real Prometheus scrapes `sagas serve --http` and three participants on PostgreSQL + Kafka; its HTTP API shows
the series, with the values of what ran, and evaluates the shipped alerting rules on them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from sagas.adapters.kafka import KafkaBroker
from sagas.adapters.sql import SqlStore
from sagas.engine.admin import SagaAdmin
from sagas.engine.state import SagaStatus
from tests.web.test_metrics import lifecycle_participants

ROOT = Path(__file__).resolve().parents[2]
SAGAS = str(Path(sys.executable).parent / "sagas")

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.prometheus]

DEFINITIONS = '''
from tests.engine.support import three_steps
from sagas.definitions.model import SagaDefinition

_body = three_steps(comp_attempts=1).model_dump(mode="json")
for _step in _body["steps"]:
    _step["topic"] = f"{_step['participant']}.commands.{SUFFIX}"
order = SagaDefinition.model_validate(_body)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def query(client: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
    answer = (await client.get("/api/v1/query", params={"query": promql})).json()
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


async def value_of(client: httpx.AsyncClient, promql: str) -> float | None:
    result = await query(client, promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None


async def until(client: httpx.AsyncClient, promql: str, expected: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = await value_of(client, promql)
        if seen == expected:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{promql} = {seen}, expected {expected}")


@contextlib.asynccontextmanager
async def database(pg_url: str) -> Any:
    """A database of its own: the gauges count every saga in the database they read."""
    url = sa.engine.make_url(pg_url)
    name = f"obs_{uuid.uuid4().hex[:10]}"
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_prometheus_scrapes_engine_and_participants(
    pg_url: str, kafka_url: str, prometheus_url: str, prometheus_targets: str, tmp_path: Path
) -> None:
    """Five sagas (three complete, one compensated, one parked) run by `sagas serve --http` and participants with
    http=: Prometheus scrapes all four, settled totals equal the sagas run by status, the reply and command lags
    are back to 0 after draining, the parked gauge is 1 and the SagasParked alert is pending."""
    suffix = uuid.uuid4().hex[:8]
    (tmp_path / "defs.py").write_text(f"SUFFIX = {suffix!r}\n" + DEFINITIONS)
    port = free_port()
    targets = Path(prometheus_targets) / f"test-{suffix}.json"
    async with database(pg_url) as db_url, contextlib.AsyncExitStack() as stack:
        env = {**os.environ, "SAGAS_REPLY_TOPIC": f"replies-{suffix}", "SAGAS_GROUP": f"engine-{suffix}",
               "PYTHONPATH": str(ROOT)}
        engine = subprocess.Popen(  # noqa: ASYNC220  # returns at once; the test waits on HTTP, not on it
            [SAGAS, "serve", "--definitions", str(tmp_path / "defs.py"), "--db", db_url, "--broker", kafka_url,
             "--http", f"127.0.0.1:{port}", "--json-logs"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def stop_engine() -> None:
            if engine.poll() is None:
                engine.send_signal(signal.SIGTERM)
                try:
                    engine.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    engine.kill()

        stack.callback(stop_engine)
        workers = []
        for participant in lifecycle_participants():
            participant.topic = f"{participant.name}.commands.{suffix}"
            participant.group = f"{participant.name}-{suffix}"
            broker = KafkaBroker.from_url(kafka_url)
            stack.push_async_callback(broker.close)
            workers.append(await stack.enter_async_context(participant.serve(broker=broker, http="127.0.0.1:0")))
        addresses = [f"127.0.0.1:{port}"] + [w.http_url.removeprefix("http://") for w in workers]
        targets.write_text(json.dumps([{"targets": addresses, "labels": {"test": suffix}}]))
        stack.callback(targets.unlink, missing_ok=True)

        store = SqlStore(db_url)
        stack.push_async_callback(store.close)
        async with httpx.AsyncClient() as local:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await local.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert engine.poll() is None, engine.communicate()[1]
                assert time.monotonic() < deadline, "sagas serve never became ready"
                await asyncio.sleep(0.2)
        admin = SagaAdmin(store, reply_topic=f"replies-{suffix}")
        for order, amount in (("a", 1), ("b", 2), ("c", 3), ("d", 99), ("park", 99)):
            await admin.start("order", {"order_id": order, "amount": amount})

        deadline = time.monotonic() + 120
        while True:
            counts = await store.count_by_status()
            if counts[SagaStatus.RUNNING] == counts[SagaStatus.COMPENSATING] == 0:
                break
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.2)
        assert counts[SagaStatus.COMPLETED] == 3
        assert counts[SagaStatus.COMPENSATED] == 1
        assert counts[SagaStatus.FAILED] == 1

        mine = f'test="{suffix}"'
        async with httpx.AsyncClient(base_url=prometheus_url, timeout=10) as prom:
            await until(prom, f"count(up{{{mine}}} == 1)", 4)
            await until(prom, f"sum(sagas_settled_total{{{mine}}})", 5)
            await until(prom, f'sum(sagas_settled_total{{{mine},status="completed"}})', 3)
            await until(prom, f'sum(sagas_settled_total{{{mine},status="compensated"}})', 1)
            await until(prom, f'sum(sagas_settled_total{{{mine},status="failed"}})', 1)
            # Started from the CLI (SagaAdmin), not through the engine's API: counted by no engine's started total.
            await until(prom, f'sum(sagas_sagas{{{mine},status=~"completed|compensated|failed"}})', 5)
            await until(prom, f"max(sagas_parked_sagas{{{mine}}})", 1)
            await until(prom, f'count(sagas_consumer_lag_messages{{{mine},topic="replies-{suffix}"}})', 3)
            await until(prom, f'sum(sagas_consumer_lag_messages{{{mine},topic="replies-{suffix}"}})', 0)
            await until(prom, f"count(sagas_participant_consumer_lag_messages{{{mine}}})", 9)
            await until(prom, f"sum(sagas_participant_consumer_lag_messages{{{mine}}})", 0)
            # reserve: 5 commands + 2 compensations; charge: 5 commands (2 declined); ship: 3.
            await until(prom, f'sum(sagas_participant_commands_total{{{mine},participant="inventory",'
                              f'outcome="handled"}})', 6)
            await until(prom, f'sum(sagas_step_round_trip_seconds_count{{{mine},step="ship",outcome="success"}})', 3)
            assert await value_of(prom, f"max(sagas_component_down{{{mine}}})") == 0
            # The shipped rule, evaluated by this Prometheus: pending until its `for:` of a minute has passed.
            deadline = time.monotonic() + 60
            while not await query(prom, 'ALERTS{alertname="SagasParked"}'):
                assert time.monotonic() < deadline, "SagasParked never became pending"
                await asyncio.sleep(0.5)
        stop_engine()
        assert engine.returncode == 0

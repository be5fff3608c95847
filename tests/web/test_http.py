"""The HTTP endpoints of an engine and a participant: /metrics, /healthz, /readyz, on the embedded default
(SQLite + db://) and on PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from sagas.adapters import open_broker
from sagas.adapters.memory import MemoryBroker
from sagas.adapters.prometheus import EngineMetrics
from sagas.adapters.sql import SqlStore
from sagas.engine.ports import Consumer, Delivery
from sagas.engine.runtime import Engine, EngineSettings
from sagas.web.app import create_app
from sagas.web.server import HttpServer, parse_address, serving
from tests.engine.support import three_steps
from tests.web.support import Proxy, eventually, participants, sample


def test_addresses_default_to_loopback_and_bad_ones_are_refused() -> None:
    """`--http` takes HOST:PORT, :PORT or PORT (loopback) and [v6]:PORT; anything else is a clear error."""
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    for bad in ("localhost:http", "1:70000", ""):
        with pytest.raises(ValueError, match="--http"):
            parse_address(bad)


async def test_a_port_in_use_fails_start_with_a_clear_error() -> None:
    """A second server on a port already taken fails `start()` with an OSError naming the address."""
    async with serving(create_app(), "127.0.0.1:0") as first:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            await HttpServer(create_app(), f"127.0.0.1:{first.port}").start()


@contextlib.asynccontextmanager
async def embedded_engine(tmp_path: Path, **kwargs: Any) -> AsyncIterator[tuple[Engine, EngineMetrics, str]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    store = SqlStore(url)
    broker = open_broker("db://", db_url=url)
    metrics = EngineMetrics(cache_seconds=0)
    engine = Engine(store=store, broker=broker, definitions=[three_steps()], observer=metrics, **kwargs)
    try:
        async with engine:
            metrics.bind(engine)
            async with serving(create_app(target=engine, metrics=metrics)) as server:
                yield engine, metrics, server.url
    finally:
        await store.close()


async def test_engine_serves_health_readiness_and_metrics_with_participants(tmp_path: Path) -> None:
    """An engine on SQLite + db:// answers /healthz and /readyz with 200, and /metrics counts the sagas it ran;
    a participant serving with http= answers its own three endpoints."""
    async with embedded_engine(tmp_path) as (engine, _metrics, url), contextlib.AsyncExitStack() as stack:
        db_url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
        workers = []
        for participant in participants():
            broker = open_broker("db://", db_url=db_url)
            stack.push_async_callback(broker.close)
            workers.append(await stack.enter_async_context(participant.serve(broker=broker, http="127.0.0.1:0")))
        ids = [await engine.start_saga("order", {"order_id": f"o-{n}", "amount": n}) for n in range(3)]
        for saga_id in ids:
            assert (await engine.wait(saga_id, timeout=30)).status == "completed"
        async with httpx.AsyncClient(base_url=url) as client:
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            assert {"writer", "publisher", "consumer", "relay", "timers"} <= set(health.json()["loops"])
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"store": "ok", "broker": "ok"}
            text = (await client.get("/metrics")).text
        assert 'sagas_started_total{definition="order",version="1"} 3.0' in text
        assert 'sagas_settled_total{definition="order",status="completed"} 3.0' in text
        assert 'sagas_sagas{status="completed"} 3.0' in text
        assert workers[0].http_url is not None
        async with httpx.AsyncClient(base_url=workers[0].http_url) as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).json()["checks"] == {"database": "ok", "broker": "ok"}
            metrics = (await client.get("/metrics")).text
        assert 'sagas_participant_commands_total{outcome="handled",participant="inventory"} 3.0' in metrics
        assert 'sagas_participant_consumer_lag_messages{participant="inventory",partition="0",' \
               'topic="inventory.commands"} 0.0' in metrics


class FailingConsumer:
    """A reply consumer whose fetch fails as a bug would (not a broker error): its loop is restarted each time."""

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        raise RuntimeError("fetch bug")

    async def commit(self, deliveries: Sequence[Delivery]) -> None:
        pass

    async def close(self) -> None:
        pass


class BrokenConsumerBroker(MemoryBroker):
    async def subscribe(self, topics: Sequence[str], group: str) -> Consumer:
        await super().subscribe(topics, group)
        return FailingConsumer()


async def test_healthz_fails_when_a_loop_keeps_failing(tmp_path: Path) -> None:
    """A loop restarted three times within the window makes /healthz answer 503 naming the loop; restarts are
    counted in sagas_loop_restarts_total."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'sagas.db'}"
    store = SqlStore(url)
    metrics = EngineMetrics(cache_seconds=0)
    engine = Engine(store=store, broker=BrokenConsumerBroker(), definitions=[three_steps()], observer=metrics,
                    settings=EngineSettings(outage_backoff_max=0.2))
    try:
        async with engine, serving(create_app(target=engine, metrics=metrics)) as server, \
                httpx.AsyncClient(base_url=server.url) as client:
            async def failing() -> bool:
                return (await client.get("/healthz")).status_code == 503

            await eventually(failing)
            body = (await client.get("/healthz")).json()
            assert body["status"] == "failing"
            assert body["loops"]["consumer"]["restarts"] >= 3
            assert "fetch bug" in body["loops"]["consumer"]["last_error"]
            text = (await client.get("/metrics")).text
            assert sample(text, 'sagas_loop_restarts_total{loop="consumer"}') >= 3
    finally:
        await store.close()


async def test_readyz_fails_when_the_schema_is_not_at_the_newest_migration(tmp_path: Path) -> None:
    """/readyz answers 503 naming the store while the database's schema is behind, and 200 once upgraded."""
    async with embedded_engine(tmp_path) as (_engine, _metrics, url), httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/readyz")).status_code == 200
        raw = sa.create_engine(f"sqlite:///{tmp_path / 'sagas.db'}")
        with raw.begin() as conn:
            head = conn.execute(sa.text("SELECT version_num FROM sagas_schema_version")).scalar_one()
            conn.execute(sa.text("UPDATE sagas_schema_version SET version_num = 'older'"))
        answer = await client.get("/readyz")
        assert answer.status_code == 503
        assert "newest migration" in answer.json()["checks"]["store"]
        assert answer.json()["checks"]["broker"] == "ok"
        with raw.begin() as conn:
            conn.execute(sa.text("UPDATE sagas_schema_version SET version_num = :v"), {"v": head})
        raw.dispose()
        assert (await client.get("/readyz")).status_code == 200


@pytest.mark.postgres
async def test_readyz_fails_while_the_store_is_stopped(pg_url: str) -> None:
    """With PostgreSQL reached through a proxy that is then stopped, /readyz answers 503 for the store (the broker
    stays ok) within its timeout, and 200 again once the store is back."""
    url = sa.engine.make_url(pg_url)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    store = SqlStore(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    engine = Engine(store=store, broker=MemoryBroker(), definitions=[three_steps()])
    try:
        async with engine, serving(create_app(target=engine)) as server, \
                httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.get("/readyz")).status_code == 200
            await proxy.stop()
            answer = await client.get("/readyz")
            assert answer.status_code == 503
            assert answer.json()["checks"]["store"] != "ok"
            assert answer.json()["checks"]["broker"] == "ok"
            await proxy.start()

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready)
    finally:
        await store.close()
        await proxy.stop()

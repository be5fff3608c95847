"""A served engine for the web tests: a real store (SQLite file or a PostgreSQL schema), the in-memory broker, real
participants, and the operators' app (API + console) over them, reached through httpx; or (`served_process`) a real
`sagas serve --http` subprocess over its own database, the db:// broker and the participants in this process."""

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import create_async_engine

from sagas.adapters import normalize_db_url, open_broker
from sagas.adapters.sql import SqlStore, upgrade
from sagas.definitions.model import SagaDefinition
from sagas.engine.admin import SagaAdmin
from sagas.engine.ports import Broker
from sagas.engine.runtime import DEFAULT_REPLY_TOPIC, Engine, EngineSettings
from sagas.engine.state import SagaInstance, SagaStatus
from sagas.engine.wire import CommandMessage
from sagas.participant import Participant
from sagas.web.operations import Operations
from sagas.web.security import Security
from sagas.web.site import operator_app
from tests.engine.support import decline_if, ledger_participant, three_steps

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
ORDER = {"order_id": "o-1", "amount": 10}


def alice() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS['alice']}"}


@dataclass
class Switch:
    """Whether the payment service's refund is broken (its compensation then fails and the saga parks)."""

    refund_broken: bool = False
    seen: list[float] = field(default_factory=list)


def participants(switch: Switch) -> list[Participant]:
    def refund(command: CommandMessage) -> dict[str, Any]:
        if switch.refund_broken:
            raise RuntimeError("refund gateway down")
        return {"refunded": True}

    def reserve(command: CommandMessage) -> dict[str, Any]:
        switch.seen.append(time.time())
        return {"reserved": command.data["order"]}

    return [
        ledger_participant("inventory", {"Reserve": reserve, "UndoReserve": None}),
        ledger_participant("payment", {"Charge": decline_if(lambda d: d["amount"] > 100), "UndoCharge": refund}),
        ledger_participant("shipping", {"Ship": decline_if(lambda d: str(d["order"]).startswith("x")),
                                        "UndoShip": None}),
    ]


def definition() -> SagaDefinition:
    """Three steps; a compensation that fails once parks the saga (one compensation attempt)."""
    return three_steps(comp_attempts=1, max_attempts=2)


@dataclass
class Stack:
    """What a web test reaches: the app through `client`, and the store, participants and broker behind it.

    `engine` is the engine in this process, or None when the app is a real `sagas serve` subprocess (`process`);
    `security` is then a copy of the server's settings, which changing here does not change there.
    """

    client: httpx.AsyncClient
    engine: Engine | None
    admin: SagaAdmin
    store: SqlStore
    switch: Switch
    security: Security
    app: Any
    broker: Broker
    reply_topic: str = DEFAULT_REPLY_TOPIC
    process: subprocess.Popen[str] | None = None

    async def settled(self, saga_id: str, timeout: float = 15.0) -> SagaInstance:
        if self.engine is not None:
            return await self.engine.wait(saga_id, timeout=timeout, poll=0.05)

        async def read() -> SagaInstance | None:
            instance = await self.admin.get(saga_id)
            return instance if instance.status.is_settled else None

        found: SagaInstance = await self.until(read, timeout)
        return found

    async def until(self, check: Callable[[], Any], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.02)
        raise AssertionError("condition not met in time")

    async def parked(self) -> str:
        """A saga parked in compensation: shipping declines, the refund fails."""
        self.switch.refund_broken = True
        response = await self.client.post("/api/sagas", headers=alice(),
                                          json={"definition": "order", "input": {"order_id": "x-9", "amount": 5}})
        assert response.status_code == 201, response.text
        saga_id: str = response.json()["id"]
        assert (await self.settled(saga_id)).status is SagaStatus.FAILED
        return saga_id


@contextlib.asynccontextmanager
async def stack(db_url: str, tmp_path: Path, *, schema: str | None = None, open_reads: bool = False,
                max_body: int = 1 << 20) -> AsyncIterator[Stack]:
    store = SqlStore(db_url, schema=schema)
    broker = open_broker("memory://")
    switch = Switch()
    settings = EngineSettings(timer_interval=0.05, relay_interval=0.2)
    engine = Engine(store=store, broker=broker, definitions=[definition()], settings=settings)
    security = Security(tokens=TOKENS, open_reads=open_reads, max_body=max_body)
    async with contextlib.AsyncExitStack() as stack_:
        await engine.start()
        stack_.push_async_callback(store.close)
        stack_.push_async_callback(engine.stop)
        for n, participant in enumerate(participants(switch)):
            url = f"sqlite+aiosqlite:///{tmp_path / f'participant{n}.db'}"
            await stack_.enter_async_context(participant.serve(broker=broker, database_url=url))
        admin = SagaAdmin(store, reply_topic=settings.reply_topic)
        app = operator_app(Operations(admin, engine), security)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        client = await stack_.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1"))
        yield Stack(client, engine, admin, store, switch, security, app, broker, settings.reply_topic)


SAGAS = str(Path(sys.executable).parent / "sagas")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def served_process(db_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    """A real `sagas serve --http` subprocess on `db_url` (its own database) with the db:// broker, the
    participants in this process on the same queue, and httpx over TCP to the server."""
    definition_file = tmp_path / "order.yaml"
    definition_file.write_text(json.dumps(definition().model_dump(mode="json", exclude_none=True)))
    port = _free_port()
    env = {**os.environ, "SAGAS_HTTP_TOKENS": ",".join(f"{n}={t}" for n, t in TOKENS.items()),
           "SAGAS_HTTP": f"127.0.0.1:{port}", "SAGAS_HTTP_OPEN_READS": "", "SAGAS_HTTP_MAX_BODY": str(1 << 20)}
    log = (tmp_path / "serve.log").open("w")
    # Popen returns once the child is forked: nothing here waits on it.
    command = [SAGAS, "serve", "--definitions", str(definition_file), "--db", db_url, "--broker", "db://",
               "--json-logs"]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)  # noqa: ASYNC220
    url = f"http://127.0.0.1:{port}"
    switch = Switch()
    store = SqlStore(db_url)
    broker = open_broker("db://", db_url=normalize_db_url(db_url))
    try:
        async with contextlib.AsyncExitStack() as stack_:
            client = await stack_.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30))
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "sagas serve never became ready"
                await asyncio.sleep(0.1)
            stack_.push_async_callback(store.close)
            await broker.start()
            stack_.push_async_callback(broker.close)
            for n, participant in enumerate(participants(switch)):
                participant_url = f"sqlite+aiosqlite:///{tmp_path / f'participant{n}.db'}"
                await stack_.enter_async_context(participant.serve(broker=broker, database_url=participant_url))
            admin = SagaAdmin(store)
            yield Stack(client, None, admin, store, switch, Security(tokens=TOKENS, max_body=1 << 20), None, broker,
                        process=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.asynccontextmanager
async def pg_schema(pg_url: str) -> AsyncIterator[str]:
    name = f"test_web_{uuid.uuid4().hex[:12]}"
    await upgrade(pg_url, schema=name)
    try:
        yield name
    finally:
        engine = create_async_engine(pg_url)
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await engine.dispose()

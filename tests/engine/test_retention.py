"""The engine's retention loop keeps the tables from growing forever, and never touches live sagas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from structlog.testing import capture_logs

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore
from sagas.engine.ports import BrokerMessage
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import OperatorCommand, SagaStatus
from sagas.testing import VirtualClock
from tests.engine.support import ledger_participant, three_steps


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_retention_removes_finished_sagas_and_keeps_running_ones() -> None:
    """An hour after they finished, completed sagas and their history are purged; a running saga stays."""
    clock = VirtualClock()
    broker = MemoryBroker()
    store = SqlStore("sqlite+aiosqlite:///:memory:")
    settings = EngineSettings(retention=3600.0, retention_interval=0.02, timer_interval=None)
    inventory = ledger_participant("inventory", {"Reserve": None, "UndoReserve": None})
    payment = ledger_participant("payment", {"Charge": None, "UndoCharge": None})
    try:
        async with Engine(store=store, broker=broker, definitions=[three_steps()], settings=settings,
                          clock=clock) as engine, inventory.serve(broker=broker), payment.serve(broker=broker):
            ids = [await engine.start_saga("order", {"order_id": f"o-{i}", "amount": 1}) for i in range(3)]

            async def all_waiting_for_ship() -> bool:
                sagas = await store.load(ids)
                return all(s.steps["ship"].status == "running" for s in sagas.values())

            await eventually(all_waiting_for_ship)  # "ship" has no participant: skip it by hand for two sagas
            finished, running = ids[:2], ids[2]
            for saga_id in finished:
                await engine.operate(saga_id, OperatorCommand(action="skip", step="ship", reason="test"))
            statuses = {s.id: s.status for s in await store.list_instances()}
            assert statuses == {ids[0]: SagaStatus.COMPLETED, ids[1]: SagaStatus.COMPLETED,
                                running: SagaStatus.RUNNING}
            assert await store.history(finished[0])

            async def purged() -> bool:
                return len(await store.list_instances()) == 1

            clock.advance(3600.0 - 1)  # not yet an hour: nothing goes
            await asyncio.sleep(0.1)
            assert len(await store.list_instances()) == 3
            clock.advance(2)
            await eventually(purged)
            assert [s.id for s in await store.list_instances()] == [running]
            assert await store.history(finished[0]) == []
            assert await store.history(running) != []
    finally:
        await store.close()


async def test_dead_letters_are_purged_after_their_own_horizon_even_with_retention_off() -> None:
    """With `retention` off and a dead-letter horizon of a day, a dead letter stays for 24 h less a second and is
    gone a little after 24 h; the clean-up line counts it."""
    clock = VirtualClock()
    broker = MemoryBroker()
    store = SqlStore("sqlite+aiosqlite:///:memory:")
    settings = EngineSettings(retention=None, dead_letter_retention=86400.0, retention_interval=0.02,
                              timer_interval=None)
    try:
        async with Engine(store=store, broker=broker, settings=settings, clock=clock) as engine:
            with capture_logs() as logs:
                await broker.publish([BrokerMessage(topic=engine.settings.reply_topic, value=b"{not json")])

                async def recorded() -> bool:
                    return len(await store.dead_letters()) == 1

                await eventually(recorded)
                clock.advance(86400.0 - 1)
                await asyncio.sleep(0.1)  # a few clean-ups run: nothing is old enough yet
                assert len(await store.dead_letters()) == 1
                clock.advance(2)

                async def purged() -> bool:
                    return await store.dead_letters(include_replayed=True) == []

                await eventually(purged)
            assert any(e["event"] == "retention clean-up" and e["dead_letters"] == 1 for e in logs)
    finally:
        await store.close()

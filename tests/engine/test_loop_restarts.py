"""Every engine loop survives an unexpected exception: the supervisor logs it once with its cause, restarts the loop
and counts the restart, and a saga in flight completes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore
from sagas.engine.ports import NoObserver
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import SagaStatus
from tests.engine.support import ledger_participant, three_steps

LOOPS = ["consumer", "writer", "publisher", "relay", "timers", "retention", "checkpoint"]


class Injected(RuntimeError):
    """The unexpected error a test puts into a loop."""


def fail_once(call: Callable[..., Any], marker: str, fired: asyncio.Event) -> Callable[..., Any]:
    """`call`, except that its first call raises Injected(marker)."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not fired.is_set():
            fired.set()
            raise Injected(marker)
        return await call(*args, **kwargs)

    return wrapper


def arm(engine: Engine, loop: str, marker: str, fired: asyncio.Event) -> None:
    """Make the next call the loop makes at its top raise: what a bug anywhere in it would do."""
    if loop == "consumer":
        consumer: Any = engine._consumer
        consumer.fetch = fail_once(consumer.fetch, marker, fired)
    elif loop == "writer":
        engine._queue.get = fail_once(engine._queue.get, marker, fired)  # type: ignore[method-assign]
    elif loop == "publisher":
        engine._publish_queue.get = fail_once(engine._publish_queue.get, marker, fired)  # type: ignore[method-assign]
    else:
        names = {"relay": "pending_outbox", "timers": "due_timers", "retention": "purge", "checkpoint": "checkpoint"}
        name = names[loop]
        setattr(engine.store, name, fail_once(getattr(engine.store, name), marker, fired))


@contextlib.asynccontextmanager
async def running_engine() -> AsyncIterator[Engine]:
    broker = MemoryBroker()
    store = SqlStore("sqlite+aiosqlite:///:memory:")
    settings = EngineSettings(timer_interval=0.02, relay_interval=0.02, relay_grace=0.0, retention=3600.0,
                              retention_interval=0.02)
    engine = Engine(store=store, broker=broker, definitions=[three_steps()], settings=settings)
    participants = [ledger_participant("inventory", {"Reserve": None, "UndoReserve": None}),
                    ledger_participant("payment", {"Charge": None, "UndoCharge": None}),
                    ledger_participant("shipping", {"Ship": None, "UndoShip": None})]
    async with engine, contextlib.AsyncExitStack() as stack:
        for participant in participants:
            await stack.enter_async_context(participant.serve(broker=broker))
        yield engine
    await store.close()


@pytest.mark.parametrize("loop", LOOPS)
async def test_an_unexpected_exception_restarts_the_loop_once_logged_and_the_saga_completes(loop: str) -> None:
    """An exception injected into the loop while a saga runs: the loop is restarted (one restart counted, running
    again, the engine still healthy), one log line carries the cause, and the saga completes."""
    marker = f"injected into the {loop} loop"
    fired = asyncio.Event()
    async with running_engine() as engine:
        with capture_logs() as logs:
            saga_id = await engine.start_saga("order", {"order_id": "o-1", "amount": 5})
            arm(engine, loop, marker, fired)
            async with asyncio.timeout(20):
                await fired.wait()
                instance = await engine.wait(saga_id, poll=0.05)
                while engine.health()[loop].restarts == 0 or not engine.health()[loop].running:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the restart follows the failure after a short backoff
        health = engine.health()[loop]
        assert instance.status == SagaStatus.COMPLETED
        assert (health.restarts, health.running) == (1, True)
        assert marker in (health.last_error or "")
        assert engine.healthy
        about = [e for e in logs if any(marker in str(v) for v in e.values())]
        assert len(about) == 1, about
        assert about[0]["event"] == "loop failed; restarting"
        assert about[0]["loop"] == loop
        # Every other loop ran on undisturbed.
        assert all(h.restarts == 0 for name, h in engine.health().items() if name != loop)


async def test_an_observer_that_raises_after_a_publish_does_not_have_the_messages_published_again() -> None:
    """The observer is told of a publish after the broker took the messages; when it raises, that is logged and
    ignored: no command goes out twice, and the saga completes."""

    class Raising(NoObserver):
        def published(self, messages: Any, seconds: float) -> None:
            raise Injected("observer broke")

    async with running_engine() as engine:
        engine.observer = Raising()
        sent: list[str | None] = []
        real_publish = engine.broker.publish

        async def publish(messages: Any) -> None:
            await real_publish(messages)
            sent.extend(m.header("ce_id") for m in messages if m.header("ce_sagakind") != "reply")

        engine.broker.publish = publish  # type: ignore[method-assign]
        with capture_logs() as logs:
            saga_id = await engine.start_saga("order", {"order_id": "o-1", "amount": 5})
            instance = await engine.wait(saga_id, timeout=20, poll=0.05)
        assert instance.status == SagaStatus.COMPLETED
        assert len(sent) == 3
        assert len(set(sent)) == 3
        assert sum(e["event"] == "observer failed" for e in logs) == 3

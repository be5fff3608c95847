"""Test your own sagas without servers: in-memory broker and store, your participants, and a virtual clock.

    async with SagaHarness([order_saga], participants=[inventory, payment]) as h:
        saga_id = await h.start("order", {"order_id": "o-1"})
        await h.settle()
        await h.advance(30)                 # fire step timeouts, retry backoffs, deadlines
        assert (await h.instance(saga_id)).status == SagaStatus.COMPENSATED

Time only moves when you call `advance`, so timeouts and backoffs of minutes are tested in milliseconds.

`explore(definition)` searches every path the world and an operator can drive a definition down (`sagas explore`):

    result = explore(order_saga)
    assert result.ok                                        # no invariant violated, no error-level finding
    assert "charge_payment ok" not in result.ending("compensated").witness
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore
from sagas.definitions.model import SagaDefinition
from sagas.engine.explore import Exploration, explore
from sagas.engine.ports import HistoryRecord
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import OperatorCommand, SagaInstance
from sagas.errors import UnknownSaga
from sagas.participant import Participant, ParticipantWorker

EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a fixed start keeps timelines reproducible


class VirtualClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = EPOCH) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        # Kept to the microsecond: ten steps of 0.1 s from EPOCH must reach a timer due 1 s later, which plain
        # float sums fall short of (by 1e-6 s near EPOCH).
        self._now = round(self._now + seconds, 6)


class SagaHarness:
    """An engine, an in-memory broker and store, and the participants under test, on a virtual clock."""

    def __init__(
        self,
        definitions: Sequence[SagaDefinition],
        participants: Sequence[Participant] = (),
        *,
        clock: VirtualClock | None = None,
        store_url: str = "sqlite+aiosqlite:///:memory:",
    ) -> None:
        self.clock = clock or VirtualClock()
        self.broker = MemoryBroker()
        self.store = SqlStore(store_url, clock=self.clock.now)  # leases and sent times on the virtual clock too
        self.engine = Engine(
            store=self.store,
            broker=self.broker,
            definitions=definitions,
            settings=EngineSettings(timer_interval=None, relay_interval=3600.0),
            clock=self.clock,
        )
        self.participants = list(participants)
        self._workers: list[ParticipantWorker] = []
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> SagaHarness:
        await self.engine.start()
        for participant in self.participants:
            worker = await self._stack.enter_async_context(participant.serve(broker=self.broker))
            self._workers.append(worker)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()
        await self.engine.stop()
        await self.store.close()

    async def add_participant(self, participant: Participant) -> ParticipantWorker:
        """Start another participant (e.g. one that was "down"); it reads its topic from the beginning."""
        worker = await self._stack.enter_async_context(participant.serve(broker=self.broker))
        self.participants.append(participant)
        self._workers.append(worker)
        await self.settle()
        return worker

    @property
    def workers(self) -> list[ParticipantWorker]:
        return list(self._workers)

    async def start(self, name: str, input: dict[str, Any], *, key: str | None = None) -> str:
        saga_id = await self.engine.start_saga(name, input, key=key)
        await self.settle()
        return saga_id

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until no message is in flight and the engine has nothing left to do at the current time."""
        deadline = time.monotonic() + timeout
        quiet_rounds = 0
        while quiet_rounds < 3:
            if time.monotonic() > deadline:
                raise TimeoutError(f"saga harness did not settle within {timeout}s")
            quiet = await self.engine.idle() and self.in_flight() == 0
            if quiet and await self.engine.fire_due_timers():  # due now (a zero backoff): not done yet
                quiet = False
            quiet_rounds = quiet_rounds + 1 if quiet else 0
            await asyncio.sleep(0.002)

    def in_flight(self) -> int:
        """Messages published but not yet processed and acknowledged by the engine or a participant."""
        settings = self.engine.settings
        return self.broker.lag(settings.reply_topic, settings.group) + sum(
            self.broker.lag(p.topic, p.group) for p in self.participants
        )

    async def advance(self, seconds: float) -> int:
        """Move the clock, fire every timer now due, and settle. Returns how many timers fired."""
        self.clock.advance(seconds)
        fired = 0
        while True:
            batch = await self.engine.fire_due_timers()
            if batch == 0:
                break
            fired += batch
            await self.settle()
        return fired

    async def instance(self, saga_id: str) -> SagaInstance:
        found = (await self.store.load([saga_id])).get(saga_id)
        if found is None:
            raise UnknownSaga(f"no saga with id {saga_id!r}")
        return found

    async def history(self, saga_id: str) -> list[HistoryRecord]:
        return await self.store.history(saga_id)

    async def operate(self, saga_id: str, command: OperatorCommand) -> SagaInstance:
        instance = await self.engine.operate(saga_id, command)
        await self.settle()
        return instance


__all__ = ["EPOCH", "Exploration", "SagaHarness", "VirtualClock", "explore"]

"""What the processor remembers between batches, and the engine deciding batch N+1 while batch N commits.

The processor decides a saga's next event on the instance it wrote last, without reading the store; another writer
(an operator, another engine) makes that memory stale, and the version check must then send the event back through
a fresh read. The engine builds batch N+1 on the uncommitted batch N; when N fails to commit, N+1 must be decided
again, not committed on top of something that never happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from sagas.adapters.ports import BrokerMessage, OutboxMessage, UnitOfWork
from sagas.adapters.sql import SqlStore
from sagas.definitions.registry import DefinitionRegistry
from sagas.engine.processor import Prepared, Processor, ReplyItem, StartItem
from sagas.engine.state import Outcome, SagaInstance, SagaStatus, StepStatus
from sagas.engine.wire import decode_command, encode_reply
from sagas.errors import ConcurrencyConflict, StoreError
from sagas.testing import SagaHarness
from tests.engine.support import ledger_participant, ledger_rows, three_steps

NOW = 1_000.0
ORDER = {"order_id": "o-1", "amount": 5}


class CountingStore(SqlStore):
    """Counts the instances read from the database."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.loaded: list[str] = []

    async def load(self, saga_ids: Sequence[str]) -> dict[str, SagaInstance]:
        self.loaded.extend(saga_ids)
        return await super().load(saga_ids)


@pytest.fixture
async def store() -> AsyncIterator[CountingStore]:
    store = CountingStore("sqlite+aiosqlite:///:memory:")
    await store.initialize()
    definition = three_steps()
    await store.save_definition(definition)
    yield store
    await store.close()


def processor(store: SqlStore) -> Processor:
    registry = DefinitionRegistry()
    registry.register(three_steps())
    return Processor(store, registry, reply_topic="replies")


def succeeded(command: OutboxMessage) -> BrokerMessage:
    """The participant's success reply to `command`, as the wire protocol has it."""
    decoded = decode_command(command.message)
    return encode_reply(decoded, outcome=Outcome.SUCCESS, type=f"{decoded.type}.succeeded", data={},
                        source="test", at=NOW)


async def test_the_next_event_of_a_saga_is_decided_without_reading_the_store(store: CountingStore) -> None:
    engine = processor(store)
    started = await engine.process([StartItem(three_steps(), "s-1", ORDER)], NOW)
    (reserve,) = started.published
    replied = await engine.process([ReplyItem(succeeded(reserve))], NOW + 1)
    assert replied.results[0].outcome == "applied"
    assert store.loaded == []  # remembered from the start
    stored = (await store.load(["s-1"]))["s-1"]
    assert stored.version == 2
    assert stored.steps["reserve"].status == StepStatus.SUCCEEDED


async def test_a_remembered_instance_another_writer_moved_on_is_read_again(store: CountingStore) -> None:
    """Engine A remembers s-1 waiting for `reserve`. Another writer applies reserve's reply (s-1 now waits for
    `charge`). When charge's reply reaches A, A's memory would call it unexpected and ignore it: the version check
    must catch that, and the reply must be applied on the stored instance instead."""
    engine_a, other = processor(store), processor(store)
    (reserve,) = (await engine_a.process([StartItem(three_steps(), "s-1", ORDER)], NOW)).published
    (charge,) = (await other.process([ReplyItem(succeeded(reserve))], NOW + 1)).published
    store.loaded.clear()

    result = await engine_a.process([ReplyItem(succeeded(charge))], NOW + 2)

    assert result.results[0].outcome == "applied"
    assert store.loaded == ["s-1"]  # the conflict sent it back to the store
    stored = (await store.load(["s-1"]))["s-1"]
    assert stored.steps["charge"].status == StepStatus.SUCCEEDED
    assert stored.steps["ship"].status == StepStatus.RUNNING
    history = [r.entry.type for r in await store.history("s-1")]
    assert "message.ignored" not in history
    assert history.count("step.succeeded") == 2


async def test_a_prepared_batch_builds_on_the_uncommitted_one_and_a_failed_commit_forgets_it(
    store: CountingStore,
) -> None:
    engine = processor(store)
    (reserve,) = (await engine.process([StartItem(three_steps(), "s-1", ORDER)], NOW)).published
    first = await engine.prepare([ReplyItem(succeeded(reserve))], NOW + 1)
    (charge,) = first.work.outbox
    # Not committed yet, and already the base of the next batch (and its reply counts as seen).
    second = await engine.prepare([ReplyItem(succeeded(charge)), ReplyItem(succeeded(reserve))], NOW + 2)
    assert [r.outcome for r in second.results] == ["applied", "ignored"]
    assert second.work.updates[0].version == 2  # read at the version `first` will give it
    assert store.loaded == []

    async def refuse(work: UnitOfWork) -> None:
        raise StoreError("disk full", retriable=True)

    real_commit = store.commit
    store.commit = refuse  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await engine.commit(first)
    store.commit = real_commit  # type: ignore[method-assign]
    # `second` is void: the processor forgot what `first` would have written, so a fresh prepare reads the store.
    again: Prepared = await engine.prepare([ReplyItem(succeeded(charge))], NOW + 3)
    assert store.loaded == ["s-1"]
    assert again.results[0].outcome == "ignored"  # charge is not running in what the store holds
    with pytest.raises(ConcurrencyConflict):
        await engine.commit(second)  # built on a version that was never written


@pytest.mark.parametrize("failure", ["conflict", "outage"])
async def test_engine_redecides_the_batch_built_on_a_commit_that_failed(failure: str) -> None:
    participants = [
        ledger_participant("inventory", {"Reserve": None, "UndoReserve": None}),
        ledger_participant("payment", {"Charge": None, "UndoCharge": None}),
        ledger_participant("shipping", {"Ship": None, "UndoShip": None}),
    ]
    async with SagaHarness([three_steps()], participants) as h:
        h.engine.settings = dataclasses.replace(h.engine.settings, batch_max=8)  # many batches in a row
        real_commit, real_prepare = h.store.commit, h.engine.processor.prepare
        state: dict[str, Any] = {"committing": False, "overlap": False, "overlapped": 0, "failed": 0}

        async def prepare(*args: Any, **kwargs: Any) -> Prepared:
            if state["committing"]:
                state["overlap"] = True
                state["overlapped"] += 1
            return await real_prepare(*args, **kwargs)

        async def commit(work: UnitOfWork) -> None:
            state["committing"], state["overlap"] = True, False
            try:
                await asyncio.sleep(0.005)  # room for the next batch to be prepared on top of this one
                if state["overlap"] and state["failed"] < 2:
                    state["failed"] += 1
                    if failure == "conflict":
                        raise ConcurrencyConflict([u.id for u in work.updates] or ["?"])
                    raise StoreError("connection lost", retriable=True)
                await real_commit(work)
            finally:
                state["committing"] = False

        h.store.commit = commit  # type: ignore[method-assign]
        h.engine.processor.prepare = prepare  # type: ignore[method-assign]
        saga_ids = await asyncio.gather(
            *(h.engine.start_saga("order", {"order_id": f"o-{n}", "amount": 5}) for n in range(60))
        )
        await h.settle()

        assert state["failed"] == 2
        assert state["overlapped"] > 2
        for saga_id in saga_ids:
            instance = await h.instance(saga_id)
            assert instance.status == SagaStatus.COMPLETED, instance
            history = Counter(r.entry.type for r in await h.history(saga_id))
            assert (history["step.succeeded"], history["step.sent"]) == (3, 3), history
        rows = [row for worker in h.workers for row in await ledger_rows(worker)]
        effects = Counter(row[:3] for row in rows)
        assert len(effects) == 180
        assert set(effects.values()) == {1}

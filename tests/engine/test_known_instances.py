"""What the processor remembers between batches.

The processor decides a saga's next event on the instance it wrote last, without reading the store. Another writer
(an operator, another engine) makes that memory stale, and the version check must then send the event back through
a fresh read; a commit that fails must leave nothing remembered that the store does not hold.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from sagas.adapters.sql import SqlStore
from sagas.definitions.registry import DefinitionRegistry
from sagas.engine.ports import BrokerMessage, OutboxMessage, UnitOfWork
from sagas.engine.processor import OperatorItem, Processor, ReplyItem, StartItem, TimerItem
from sagas.engine.state import OperatorCommand, Outcome, SagaInstance, SagaStatus, StepStatus
from sagas.engine.wire import decode_command, encode_reply
from sagas.errors import ConcurrencyConflict, IdempotencyConflict, OperatorError, StoreError
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


async def retry_through_outages(call: Any) -> Any:
    """The engine's outage policy, without the wait: call again while the store fails."""
    while True:
        try:
            return await call()
        except StoreError:
            continue


def succeeded(command: OutboxMessage) -> BrokerMessage:
    """The participant's success reply to `command`, as the wire protocol has it."""
    decoded = decode_command(command.message)
    return encode_reply(decoded, outcome=Outcome.SUCCESS, type=f"{decoded.type}.succeeded", data={},
                        source="test", at=NOW)


async def test_the_next_events_of_a_saga_are_decided_without_reading_the_store(store: CountingStore) -> None:
    engine = processor(store)
    started = await engine.process([StartItem(three_steps(), "s-1", ORDER)], NOW)
    (reserve,) = started.published
    (charge,) = (await engine.process([ReplyItem(succeeded(reserve))], NOW + 1)).published
    replied = await engine.process([ReplyItem(succeeded(charge))], NOW + 2)
    assert replied.results[0].outcome == "applied"
    assert store.loaded == []  # remembered from the start, at the version each commit gave it
    stored = (await store.load(["s-1"]))["s-1"]
    assert stored.version == 3
    assert stored.steps["charge"].status == StepStatus.SUCCEEDED
    assert engine.remembered("s-1") == stored


async def test_the_remembered_input_is_not_the_callers_object(store: CountingStore) -> None:
    """The caller may change its input after the start; what the engine remembers (and sends) must not move."""
    engine = processor(store)
    order = {"id": "o-1"}
    caller_input = {"order_id": order, "amount": 5}
    (reserve,) = (await engine.process([StartItem(three_steps(), "s-1", caller_input)], NOW)).published
    order["id"] = "o-999"
    caller_input["amount"] = 7
    (charge,) = (await engine.process([ReplyItem(succeeded(reserve))], NOW + 1)).published
    assert decode_command(charge.message).data == {"order": {"id": "o-1"}, "amount": 5}
    assert (await store.load(["s-1"]))["s-1"].input == {"order_id": {"id": "o-1"}, "amount": 5}


async def test_a_timer_refused_on_a_stale_memory_is_fired_on_the_stored_instance(store: CountingStore) -> None:
    """Engine A remembers s-1 running `reserve`; another writer moves it on to `charge`, whose timeout timer A
    then fires. A's memory has no running `charge` and would drop the timer (it is consumed whatever the machine
    decides): the write-back of the refusal must conflict, and the timer fire on what the store holds."""
    engine_a, other = processor(store), processor(store)
    (reserve,) = (await engine_a.process([StartItem(three_steps(), "s-1", ORDER)], NOW)).published
    await other.process([ReplyItem(succeeded(reserve))], NOW + 1)
    (timeout,) = [t for t in await store.timers_of("s-1") if t.step == "charge"]

    result = await engine_a.process([TimerItem(timeout)], timeout.due_at)

    assert result.results[0].outcome == "applied"
    history = [(r.entry.type, r.entry.step) for r in await store.history("s-1")]
    assert ("step.timed_out", "charge") in history


async def test_operator_commands_read_the_store(store: CountingStore) -> None:
    engine = processor(store)
    await engine.process([StartItem(three_steps(), "s-1", ORDER)], NOW)
    await engine.process([OperatorItem("s-1", OperatorCommand(action="abort", reason="test"))], NOW + 1)
    assert store.loaded == ["s-1"]


async def test_a_commit_that_fails_after_writing_leaves_nothing_remembered(store: CountingStore) -> None:
    """A commit may fail after it reached the database (a connection lost during COMMIT): the processor cannot
    know what the store holds, so it forgets, and the next event reads again."""
    engine = processor(store)
    await engine.process([StartItem(three_steps(), "s-1", ORDER)], NOW)
    real_commit = store.commit

    async def commit_then_fail(work: UnitOfWork) -> None:
        await real_commit(work)
        raise StoreError("connection lost during COMMIT", retriable=True)

    store.commit = commit_then_fail  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await engine.process([StartItem(three_steps(), "s-2", ORDER)], NOW)
    assert engine.remembered("s-1") is None


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


@pytest.mark.parametrize("failure", ["conflict", "outage"])
async def test_a_batch_whose_commit_failed_is_decided_again_on_what_the_store_holds(failure: str) -> None:
    participants = [
        ledger_participant("inventory", {"Reserve": None, "UndoReserve": None}),
        ledger_participant("payment", {"Charge": None, "UndoCharge": None}),
        ledger_participant("shipping", {"Ship": None, "UndoShip": None}),
    ]
    async with SagaHarness([three_steps()], participants) as h:
        h.engine.settings = dataclasses.replace(h.engine.settings, batch_max=8)  # many batches
        real_commit = h.store.commit
        failed: list[int] = []

        async def commit(work: UnitOfWork) -> None:
            if work.updates and len(failed) < 2:  # two batches that change remembered sagas
                failed.append(len(work.updates))
                if failure == "conflict":
                    raise ConcurrencyConflict([u.id for u in work.updates])
                raise StoreError("connection lost", retriable=True)
            await real_commit(work)

        h.store.commit = commit  # type: ignore[method-assign]
        saga_ids = await asyncio.gather(
            *(h.engine.start_saga("order", {"order_id": f"o-{n}", "amount": 5}) for n in range(60))
        )
        await h.settle()

        assert len(failed) == 2
        for saga_id in saga_ids:
            instance = await h.instance(saga_id)
            assert instance.status == SagaStatus.COMPLETED, instance
            history = Counter(r.entry.type for r in await h.history(saga_id))
            assert (history["step.succeeded"], history["step.sent"]) == (3, 3), history
        rows = [row for worker in h.workers for row in await ledger_rows(worker)]
        effects = Counter(row[:3] for row in rows)
        assert len(effects) == 180
        assert set(effects.values()) == {1}


async def test_settled_sagas_are_forgotten_and_memory_is_bounded(store: CountingStore) -> None:
    engine = processor(store)
    engine.known_max = 3
    replies = []
    for n in range(5):
        (reserve,) = (await engine.process([StartItem(three_steps(), f"s-{n}", ORDER)], NOW)).published
        replies.append(succeeded(reserve))
    assert list(engine._known) == ["s-2", "s-3", "s-4"]  # the least recently written went first
    await engine.process([ReplyItem(replies[0])], NOW + 1)
    assert store.loaded == ["s-0"]
    abort = OperatorCommand(action="abort", reason="test")
    await engine.process([OperatorItem("s-4", abort)], NOW + 2)
    assert "s-4" in engine._known  # compensating: still running
    reply = replies[3]
    for _ in range(3):  # reserve, charge, ship
        assert "s-3" in engine._known
        published = (await engine.process([ReplyItem(reply)], NOW + 3)).published
        reply = succeeded(published[0]) if published else reply
    assert (await store.load(["s-3"]))["s-3"].status == SagaStatus.COMPLETED
    assert "s-3" not in engine._known


async def test_published_ids_go_back_to_the_caller_when_every_item_keeps_conflicting(store: CountingStore) -> None:
    """The engine hands each batch the ids it published since its last commit, to mark them sent; when nothing of
    the batch commits, they come back (`unmarked`) for the engine's next commit."""
    engine = processor(store)
    real_commit = store.commit
    committed: list[UnitOfWork] = []

    async def conflicting(work: UnitOfWork) -> None:
        if work.inserts:
            raise ConcurrencyConflict([i.id for i in work.inserts])
        committed.append(work)
        await real_commit(work)

    store.commit = conflicting  # type: ignore[method-assign]
    items = [StartItem(three_steps(), "s-1", ORDER), StartItem(three_steps(), "s-2", ORDER)]
    result = await engine.process(items, NOW, sent=["s-0/reserve/command/1"])
    assert [type(r.error) for r in result.results] == [ConcurrencyConflict, ConcurrencyConflict]
    assert committed == []
    assert result.unmarked == ["s-0/reserve/command/1"]
    single = await engine.process([StartItem(three_steps(), "s-3", ORDER)], NOW, sent=["s-0/reserve/command/1"])
    assert isinstance(single.results[0].error, ConcurrencyConflict)
    assert single.unmarked == ["s-0/reserve/command/1"]

    store.commit = real_commit  # type: ignore[method-assign]
    items = [StartItem(three_steps(), "s-1", ORDER), StartItem(three_steps(), "s-2", ORDER)]
    result = await engine.process(items, NOW, sent=["s-0/reserve/command/1"])
    assert result.unmarked == []


async def test_an_instance_remembered_for_longer_than_the_retention_is_read_again(store: CountingStore) -> None:
    """Retention may purge a saga another engine finished, and a new saga may then reuse its explicit id and reach
    the remembered version: past the retention period, the memory is not trusted."""
    engine = processor(store)
    engine.known_max_age = 60.0
    (reserve,) = (await engine.process([StartItem(three_steps(), "s-1", ORDER)], NOW)).published
    (charge,) = (await engine.process([ReplyItem(succeeded(reserve))], NOW + 30)).published
    assert store.loaded == []
    await engine.process([ReplyItem(succeeded(charge))], NOW + 30 + 61)
    assert store.loaded == ["s-1"]


async def test_an_outage_while_a_conflicting_batch_is_split_does_not_undo_what_already_committed() -> None:
    """A batch that keeps conflicting is committed item by item. If the store fails half-way, only the items not
    yet committed are tried again: a saga already started must not be reported as a conflict to its caller."""
    participants = [
        ledger_participant("inventory", {"Reserve": None, "UndoReserve": None}),
        ledger_participant("payment", {"Charge": None, "UndoCharge": None}),
        ledger_participant("shipping", {"Ship": None, "UndoShip": None}),
    ]
    async with SagaHarness([three_steps()], participants) as h:
        real_commit = h.store.commit
        singles: list[str] = []
        outages: list[str] = []

        async def commit(work: UnitOfWork) -> None:
            if len(work.inserts) > 1:  # a batch of starts always conflicts: it is split
                raise ConcurrencyConflict([i.id for i in work.inserts])
            if len(work.inserts) == 1:
                singles.append(work.inserts[0].id)
                if len(singles) == 2 and not outages:  # the second start on its own meets an outage
                    outages.append(work.inserts[0].id)
                    raise StoreError("connection lost", retriable=True)
            await real_commit(work)

        h.store.commit = commit  # type: ignore[method-assign]
        saga_ids = [f"s-{n}" for n in range(4)]
        started = await asyncio.gather(
            *(h.engine.start_saga("order", {"order_id": f"o-{n}", "amount": 5}, saga_id=saga_id)
              for n, saga_id in enumerate(saga_ids))
        )
        await h.settle()

        assert outages, "the split path was not taken"
        assert sorted(started) == saga_ids
        assert singles.count(outages[0]) == 2  # the start that met the outage was tried again, on its own
        for saga_id in saga_ids:
            assert singles.count(saga_id) <= 2
            assert (await h.instance(saga_id)).status == SagaStatus.COMPLETED


@pytest.mark.parametrize("key", [None, "order-1"])
async def test_a_start_whose_commit_answer_was_lost_is_reported_started_not_conflicting(
    store: CountingStore, key: str | None
) -> None:
    """The connection drops during COMMIT after the database committed: the engine retries the batch, the start
    conflicts with its own row, and must be answered as started (a caller retrying would start a second saga); a
    later start under the same key with another input is refused as a conflict."""
    engine = processor(store)
    real_commit = store.commit
    lost: list[int] = []

    async def commit(work: UnitOfWork) -> None:
        await real_commit(work)
        if work.inserts and not lost:
            lost.append(1)
            raise StoreError("connection lost during COMMIT", retriable=True)

    store.commit = commit  # type: ignore[method-assign]
    result = await engine.process([StartItem(three_steps(), "s-1", ORDER, key)], NOW, retry=retry_through_outages)
    assert lost
    assert result.results[0].error is None
    assert result.results[0].instance is not None
    assert result.results[0].instance.id == "s-1"
    other_input = {**ORDER, "amount": 6}
    other = await engine.process([StartItem(three_steps(), "s-1", other_input, key)], NOW, retry=retry_through_outages)
    if key is None:  # the same id with another input is another saga: a conflict
        assert isinstance(other.results[0].error, ConcurrencyConflict)
    else:  # the same key with another input: refused, naming the saga the key started
        error = other.results[0].error
        assert isinstance(error, IdempotencyConflict)
        assert error.saga_id == "s-1"
        again = await engine.process([StartItem(three_steps(), "s-2", ORDER, key)], NOW, retry=retry_through_outages)
        assert again.results[0].outcome == "ignored"  # the same key and input: the saga it started
        assert again.results[0].instance is not None
        assert again.results[0].instance.id == "s-1"


async def test_an_operator_command_whose_commit_answer_was_lost_is_reported_done(store: CountingStore) -> None:
    """`sagas abort` whose COMMIT went through while the connection dropped: tried again, the machine refuses it
    (the saga compensates already), but it is this very command, found in the history by its id."""
    engine = processor(store)
    await engine.process([StartItem(three_steps(), "s-1", ORDER)], NOW)
    real_commit = store.commit
    lost: list[int] = []

    async def commit(work: UnitOfWork) -> None:
        await real_commit(work)
        if not lost:
            lost.append(1)
            raise StoreError("connection lost during COMMIT", retriable=True)

    store.commit = commit  # type: ignore[method-assign]
    abort = OperatorItem("s-1", OperatorCommand(action="abort", reason="customer cancelled"))
    result = await engine.process([abort], NOW + 1, retry=retry_through_outages)
    assert lost
    assert result.results[0].error is None
    assert result.results[0].instance is not None
    assert result.results[0].instance.status == SagaStatus.COMPENSATING
    again = await engine.process([OperatorItem("s-1", OperatorCommand(action="abort", reason="twice"))], NOW + 2)
    assert isinstance(again.results[0].error, OperatorError)  # another abort is refused as before

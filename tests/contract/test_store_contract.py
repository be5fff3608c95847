"""The `Store` contract, run against every store implementation.

`StoreContract` holds the tests; a subclass supplies `open_store`, a fixture returning an async factory of
stores that all share ONE fresh database for the duration of the test and use the contract's fake `clock`.
`SqlContract` adds what only the SQL store has (schema, migrations, error mapping).
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from sagas.adapters.sql import SqlStore, connection, migrate, upgrade
from sagas.adapters.sql import store as store_module
from sagas.adapters.sql.migrate import current_revision, head_revision
from sagas.adapters.sql.tables import metadata
from sagas.definitions.model import CompensationDefinition, SagaDefinition, StepDefinition
from sagas.engine import ports
from sagas.engine.ports import (
    BrokerMessage,
    DeadLetter,
    HistoryRecord,
    InboxRecord,
    OutboxMessage,
    Store,
    UnitOfWork,
)
from sagas.engine.processor import bounded_letter
from sagas.engine.state import HistoryEntry, SagaInstance, SagaStatus, StepState, TimerKind, TimerSpec
from sagas.errors import ConcurrencyConflict, DefinitionConflict, StoreError, UnknownDefinition

T0 = 1_700_000_000.0


class FakeClock:
    """The stores' wall clock (leases, sent_at), moved by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


OpenStore = Callable[[], Awaitable[Store]]


def instance(
    saga_id: str,
    *,
    definition: str = "order",
    key: str | None = None,
    status: SagaStatus = SagaStatus.RUNNING,
    at: float = T0,
    version: int = 0,
) -> SagaInstance:
    return SagaInstance(
        id=saga_id,
        definition=definition,
        definition_version=1,
        status=status,
        steps={"reserve": StepState(), "charge": StepState()},
        input={"order_id": saga_id, "amount": 12.5, "items": ["a", "b"]},
        idempotency_key=key,
        version=version,
        created_at=at,
        updated_at=at,
    )


def message(message_id: str, saga_id: str, *, at: float = T0) -> OutboxMessage:
    headers = (("ce_id", message_id.encode()), ("raw", b"\x00\xff\xfe"))
    value = b'{"data": "' + message_id.encode() + b'"}'
    return OutboxMessage(
        id=message_id,
        saga_id=saga_id,
        created_at=at,
        message=BrokerMessage(topic="inventory.commands", value=value, key=saga_id, headers=headers),
    )


def timer(saga_id: str, due_at: float, *, attempt: int = 1, step: str | None = "reserve") -> TimerSpec:
    kind = TimerKind.STEP_TIMEOUT if step else TimerKind.DEADLINE
    return TimerSpec(
        id=f"{saga_id}/timer/{kind}/{step or '-'}/{attempt}",
        saga_id=saga_id,
        timer=kind,
        step=step,
        attempt=attempt,
        due_at=due_at,
    )


def event(saga_id: str, kind: str, *, at: float = T0) -> HistoryRecord:
    return HistoryRecord(
        saga_id=saga_id,
        entry=HistoryEntry(at=at, type=kind, step="reserve", attempt=1, detail={"why": kind, "n": [1, 2]}),
    )


def definition(version: int = 1, command: str = "inventory.reserve") -> SagaDefinition:
    step = StepDefinition(
        name="reserve",
        participant="inventory",
        command=command,
        timeout=5.0,
        compensation=CompensationDefinition(command="inventory.release", payload={"id": "input.id"}),
    )
    return SagaDefinition(name="order", version=version, steps=(step,), input_schema={"type": "object"})


def dead_letter(letter_id: str, *, at: float = T0, saga_id: str | None = "s1") -> DeadLetter:
    raw = BrokerMessage(topic="order.replies", value=b"\x80not json", key=None, headers=(("h", b"\x01"),))
    return DeadLetter(id=letter_id, reason="malformed: not JSON", message=raw, at=at, saga_id=saga_id)


class StoreContract:
    """Behaviour every `Store` must have. Subclasses provide the `open_store` fixture."""

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def open_store(self, clock: FakeClock) -> OpenStore:
        raise NotImplementedError

    @pytest.fixture
    async def store(self, open_store: OpenStore) -> Store:
        return await open_store()

    # ---- instances --------------------------------------------------------------------------------------

    async def test_insert_then_load_round_trips_with_version_one(self, store: Store) -> None:
        """An inserted instance loads back equal, stored with version 1."""
        saga = instance("s1", key="k1")
        await store.commit(UnitOfWork(inserts=[saga]))
        loaded = await store.load(["s1"])
        assert loaded == {"s1": saga.model_copy(update={"version": 1})}

    async def test_load_returns_only_the_instances_that_exist(self, store: Store) -> None:
        """`load` of several ids returns the existing ones and skips unknown ids."""
        await store.commit(UnitOfWork(inserts=[instance(f"s{i}") for i in range(3)]))
        assert set(await store.load(["s0", "s2", "nope"])) == {"s0", "s2"}
        assert await store.load([]) == {}

    async def test_update_bumps_the_version(self, store: Store) -> None:
        """An update carrying the stored version is written and stored with version + 1."""
        await store.commit(UnitOfWork(inserts=[instance("s1")]))
        current = (await store.load(["s1"]))["s1"]
        changed = current.model_copy(update={"stage": 1, "status": SagaStatus.COMPENSATING, "updated_at": T0 + 5})
        await store.commit(UnitOfWork(updates=[changed]))
        assert (await store.load(["s1"]))["s1"] == changed.model_copy(update={"version": 2})

    async def test_an_update_moves_the_columns_queries_use_and_keeps_the_fixed_ones(self, store: Store) -> None:
        """The status a listing filters on follows an update; the key and start time set at the start stay."""
        await store.commit(UnitOfWork(inserts=[instance("s1", key="k1", at=T0 + 1)]))
        current = (await store.load(["s1"]))["s1"]
        done = current.model_copy(update={"status": SagaStatus.COMPLETED, "stage": 1, "updated_at": T0 + 9})
        await store.commit(UnitOfWork(updates=[done]))
        assert [s.id for s in await store.list_instances(status=SagaStatus.COMPLETED)] == ["s1"]
        assert await store.list_instances(status=SagaStatus.RUNNING) == []
        assert (await store.count_by_status())[SagaStatus.COMPLETED] == 1
        assert [s.id for s in await store.list_instances(since=T0 + 1)] == ["s1"]
        assert await store.list_instances(since=T0 + 2) == []
        found = await store.find_by_key("order", "k1")
        assert found is not None
        assert (found.id, found.version, found.status) == ("s1", 2, SagaStatus.COMPLETED)

    async def test_successive_versions_of_one_saga_in_one_unit_apply_in_order(self, store: Store) -> None:
        """A unit may carry an instance at version v and then at v + 1; both apply, ending at v + 2."""
        await store.commit(UnitOfWork(inserts=[instance("s1")]))
        first = (await store.load(["s1"]))["s1"].model_copy(update={"stage": 1})
        second = first.model_copy(update={"stage": 2, "version": 2})
        await store.commit(UnitOfWork(updates=[first, second]))
        loaded = (await store.load(["s1"]))["s1"]
        assert (loaded.stage, loaded.version) == (2, 3)

    async def test_stale_update_is_rejected_and_nothing_of_the_unit_is_written(self, store: Store) -> None:
        """A unit with one stale update raises ConcurrencyConflict naming it and writes none of its rows."""
        await store.commit(UnitOfWork(inserts=[instance("s1"), instance("s2")]))
        fresh = (await store.load(["s1"]))["s1"].model_copy(update={"stage": 1})
        stale = instance("s2", version=7)
        work = UnitOfWork(
            inserts=[instance("s3")],
            updates=[fresh, stale],
            history=[event("s1", "step.succeeded")],
            outbox=[message("m1", "s1")],
            inbox=[InboxRecord("r1", "s1", "applied", T0)],
            timers=[timer("s1", T0 + 1)],
            dead_letters=[dead_letter("d1")],
            sent=[],
        )
        with pytest.raises(ConcurrencyConflict) as caught:
            await store.commit(work)
        assert caught.value.saga_ids == ("s2",)
        assert set(await store.load(["s1", "s2", "s3"])) == {"s1", "s2"}
        assert (await store.load(["s1"]))["s1"].version == 1
        assert await store.history("s1") == []
        assert await store.pending_outbox(10) == []
        assert await store.seen(["r1"]) == set()
        assert await store.timers_of("s1") == []
        assert await store.dead_letters() == []

    async def test_many_updates_in_one_unit_apply_each_and_one_stale_among_them_is_named(self, store: Store) -> None:
        """Updates beyond one statement's worth (SQLite writes 64 a statement) all apply, each to its own row; one
        stale update in the second statement fails the whole unit and is the one named."""
        ids = [f"s{i:03d}" for i in range(150)]
        await store.commit(UnitOfWork(inserts=[instance(i) for i in ids]))
        loaded = await store.load(ids)
        moved = [loaded[i].model_copy(update={"stage": n % 5, "updated_at": T0 + n}) for n, i in enumerate(ids)]
        await store.commit(UnitOfWork(updates=moved))
        after = await store.load(ids)
        assert [(after[i].version, after[i].stage, after[i].updated_at) for i in ids] == [
            (2, n % 5, T0 + n) for n in range(len(ids))
        ]
        stale = [after[i].model_copy(update={"stage": 9}) for i in ids]
        stale[100] = stale[100].model_copy(update={"version": 1})
        with pytest.raises(ConcurrencyConflict) as caught:
            await store.commit(UnitOfWork(updates=stale))
        assert caught.value.saga_ids == ("s100",)
        assert {s.stage for s in (await store.load(ids)).values()} == {0, 1, 2, 3, 4}

    async def test_update_of_a_missing_instance_is_a_conflict(self, store: Store) -> None:
        """Updating an instance that was never inserted raises ConcurrencyConflict."""
        with pytest.raises(ConcurrencyConflict):
            await store.commit(UnitOfWork(updates=[instance("ghost", version=1)]))

    async def test_duplicate_insert_id_is_a_conflict_and_writes_nothing(self, store: Store) -> None:
        """Inserting an existing id raises ConcurrencyConflict naming it and writes nothing of the unit."""
        await store.commit(UnitOfWork(inserts=[instance("s1")]))
        with pytest.raises(ConcurrencyConflict) as caught:
            await store.commit(UnitOfWork(inserts=[instance("s2"), instance("s1")], outbox=[message("m1", "s2")]))
        assert caught.value.saga_ids == ("s1",)
        assert set(await store.load(["s1", "s2"])) == {"s1"}
        assert await store.pending_outbox(10) == []

    async def test_idempotency_key_is_unique_per_definition(self, store: Store) -> None:
        """The same definition and idempotency key twice conflicts; another definition or no key does not."""
        await store.commit(UnitOfWork(inserts=[instance("s1", key="k"), instance("n1"), instance("n2")]))
        with pytest.raises(ConcurrencyConflict) as caught:
            await store.commit(UnitOfWork(inserts=[instance("s2", key="k")]))
        assert caught.value.saga_ids == ("s2",)
        await store.commit(UnitOfWork(inserts=[instance("t1", definition="travel", key="k"), instance("n3")]))
        found = await store.find_by_key("order", "k")
        assert found is not None
        assert found.id == "s1"
        assert await store.find_by_key("order", "other") is None

    async def test_duplicate_inbox_id_is_a_conflict(self, store: Store) -> None:
        """Recording a message id already in the inbox raises ConcurrencyConflict (another engine won)."""
        await store.commit(UnitOfWork(inserts=[instance("s1")], inbox=[InboxRecord("r1", "s1", "applied", T0)]))
        with pytest.raises(ConcurrencyConflict) as caught:
            await store.commit(UnitOfWork(inbox=[InboxRecord("r1", "s1", "ignored", T0)]))
        assert caught.value.saga_ids == ("s1",)

    async def test_seen_reports_the_message_ids_in_the_inbox(self, store: Store) -> None:
        """`seen` returns exactly the given ids that were recorded, whatever their outcome."""
        records = [InboxRecord("r1", "s1", "applied", T0), InboxRecord("r2", None, "rejected", T0)]
        await store.commit(UnitOfWork(inbox=records))
        assert await store.seen(["r1", "r2", "r3"]) == {"r1", "r2"}
        assert await store.seen([]) == set()

    async def test_empty_unit_of_work_is_a_no_op(self, store: Store) -> None:
        """Committing an empty unit of work succeeds and writes nothing."""
        await store.commit(UnitOfWork())
        assert sum((await store.count_by_status()).values()) == 0

    async def test_a_unit_of_500_events_commits(self, store: Store) -> None:
        """A group commit of 100 sagas with 500 history rows, messages and inbox ids is written in full."""
        sagas = [instance(f"s{i:03}") for i in range(100)]
        work = UnitOfWork(
            inserts=sagas,
            history=[event(f"s{i % 100:03}", f"e{i}") for i in range(500)],
            outbox=[message(f"m{i}", f"s{i % 100:03}") for i in range(500)],
            inbox=[InboxRecord(f"r{i}", f"s{i % 100:03}", "applied", T0) for i in range(500)],
            timers=[timer(s.id, T0 + 30) for s in sagas],
        )
        await store.commit(work)
        assert len(await store.load([s.id for s in sagas])) == 100
        assert len(await store.seen([f"r{i}" for i in range(500)])) == 500
        assert len(await store.history("s007")) == 5
        assert len(await store.pending_outbox(1000)) == 500

    # ---- history ----------------------------------------------------------------------------------------

    async def test_history_is_returned_in_append_order_with_increasing_seq(self, store: Store) -> None:
        """History entries come back in the order appended, across commits, with increasing `seq`."""
        await store.commit(UnitOfWork(history=[event("s1", "started"), event("s2", "other"), event("s1", "sent")]))
        await store.commit(UnitOfWork(history=[event("s1", "replied", at=T0 - 1)]))
        records = await store.history("s1")
        assert [r.entry.type for r in records] == ["started", "sent", "replied"]
        assert [r.seq for r in records] == sorted({r.seq for r in records})
        assert records[0].entry == event("s1", "started").entry
        assert await store.history("unknown") == []

    # ---- outbox -----------------------------------------------------------------------------------------

    async def test_outbox_pending_then_mark_sent_is_no_longer_pending(self, store: Store) -> None:
        """A message round-trips byte for byte; once marked sent it is no longer pending."""
        original = message("m1", "s1")
        await store.commit(UnitOfWork(outbox=[original]))
        assert await store.pending_outbox(10) == [original]
        await store.mark_sent(["m1"], T0 + 1)
        assert await store.pending_outbox(10) == []

    async def test_outbox_is_oldest_first_then_in_insertion_order(self, store: Store, clock: FakeClock) -> None:
        """Pending rows come oldest first, rows created together in insertion order; `limit` and
        `created_before` narrow the batch."""
        await store.commit(UnitOfWork(outbox=[message("b2", "s", at=T0 + 2), message("b1", "s", at=T0 + 2)]))
        await store.commit(UnitOfWork(outbox=[message("a", "s", at=T0 + 1), message("c", "s", at=T0 + 3)]))
        assert [m.id for m in await store.pending_outbox(2, created_before=T0 + 3)] == ["a", "b2"]
        assert [m.id for m in await store.pending_outbox(10, created_before=T0 + 3)] == ["b1"]
        clock.advance(60)
        assert [m.id for m in await store.pending_outbox(10)] == ["a", "b2", "b1", "c"]

    async def test_sent_ids_in_a_unit_of_work_are_marked_sent(self, store: Store) -> None:
        """Outbox ids listed in `sent` are marked sent by the commit."""
        await store.commit(UnitOfWork(outbox=[message("m1", "s1"), message("m2", "s1")]))
        await store.commit(UnitOfWork(sent=["m1"], history=[event("s1", "sent")]))
        assert [m.id for m in await store.pending_outbox(10)] == ["m2"]

    async def test_claimed_outbox_rows_return_only_when_the_lease_expires(self, store: Store, clock: FakeClock) -> None:
        """A row handed out by `pending_outbox` is not handed out again until its lease expires."""
        await store.commit(UnitOfWork(outbox=[message("m1", "s1")]))
        assert [m.id for m in await store.pending_outbox(10)] == ["m1"]
        assert await store.pending_outbox(10) == []
        clock.advance(3600)
        assert [m.id for m in await store.pending_outbox(10)] == ["m1"]

    async def test_rows_their_committer_publishes_are_stored_claimed(self, store: Store, clock: FakeClock) -> None:
        """A `publishing` unit (the engine publishes its rows right after the commit) stores them under a lease,
        so another engine's relay leaves them alone while that publish is slow; rows written by the CLI wait
        for any relay at once."""
        await store.commit(UnitOfWork(outbox=[message("fast", "s1")], publishing=True))
        await store.commit(UnitOfWork(outbox=[message("cli", "s2")]))
        assert [m.id for m in await store.pending_outbox(10)] == ["cli"]
        clock.advance(3600)  # the publisher died without marking it sent: it comes back
        assert [m.id for m in await store.pending_outbox(10)] == ["fast", "cli"]  # both leases ran out

    async def test_concurrent_claimers_never_get_the_same_outbox_rows(self, open_store: OpenStore) -> None:
        """Two stores claiming at once from one database get disjoint batches that cover the backlog."""
        first, second = await open_store(), await open_store()
        await first.commit(UnitOfWork(outbox=[message(f"m{i:03}", f"s{i % 7}", at=T0 + i) for i in range(200)]))
        batches: list[list[OutboxMessage]] = []
        for _ in range(5):
            batches += await asyncio.gather(first.pending_outbox(30), second.pending_outbox(30))
        ids = [m.id for batch in batches for m in batch]
        assert len(ids) == len(set(ids)) == 200

    # ---- timers -----------------------------------------------------------------------------------------

    async def test_due_timers_come_earliest_first_and_only_when_due(self, store: Store) -> None:
        """`due_timers` returns due timers earliest first up to `limit`, never one that is not due."""
        specs = [timer("s1", T0 + 30), timer("s2", T0 + 10), timer("s3", T0 + 20), timer("s4", T0 + 99)]
        await store.commit(UnitOfWork(timers=specs))
        assert await store.due_timers(T0 + 50, 2) == [specs[1], specs[2]]
        assert await store.due_timers(T0 + 50, 10) == [specs[0]]
        assert await store.due_timers(T0 + 50, 10) == []

    async def test_a_claimed_timer_returns_when_its_lease_expires(self, store: Store, clock: FakeClock) -> None:
        """A timer handed out but not cancelled is handed out again once its lease expires."""
        await store.commit(UnitOfWork(timers=[timer("s1", T0)]))
        assert len(await store.due_timers(T0, 10)) == 1
        assert await store.due_timers(T0, 10) == []
        clock.advance(3600)
        assert len(await store.due_timers(T0, 10)) == 1

    async def test_polls_with_nothing_to_claim_write_nothing(self, store: Store, clock: FakeClock) -> None:
        """Every idle engine polls timers and the outbox several times a second: with nothing due (or only rows
        another engine holds) the polls are reads, so they never wait for nor take the write lock."""
        runner = store._runner  # type: ignore[attr-defined]
        real_write, written = runner.write, []

        async def counting(work: Any) -> Any:
            written.append(work)
            return await real_write(work)

        await store.commit(UnitOfWork(timers=[timer("s1", T0 + 60)]))
        runner.write = counting
        assert await store.due_timers(T0, 10) == []
        assert await store.pending_outbox(10) == []
        assert written == []
        assert len(await store.due_timers(T0 + 60, 10)) == 1  # due: claimed (a write)
        assert len(written) == 1
        assert await store.due_timers(T0 + 60, 10) == []  # held by this claim: nothing to write
        assert len(written) == 1

    async def test_setting_a_timer_id_again_replaces_it(self, store: Store) -> None:
        """A timer set again under the same id takes the new due time (and a fresh claim)."""
        await store.commit(UnitOfWork(timers=[timer("s1", T0 + 5)]))
        assert len(await store.due_timers(T0 + 5, 10)) == 1
        await store.commit(UnitOfWork(timers=[timer("s1", T0 + 8)]))
        assert await store.timers_of("s1") == [timer("s1", T0 + 8)]
        assert await store.due_timers(T0 + 8, 10) == [timer("s1", T0 + 8)]

    async def test_cancelled_timers_are_gone(self, store: Store) -> None:
        """A cancelled timer never fires and no longer belongs to its saga; unknown ids are ignored."""
        keep, drop = timer("s1", T0 + 1, attempt=1), timer("s1", T0 + 2, attempt=2)
        await store.commit(UnitOfWork(timers=[keep, drop, timer("s2", T0 + 3, step=None)]))
        await store.commit(UnitOfWork(cancel_timers=[drop.id, "no-such-timer"]))
        assert await store.timers_of("s1") == [keep]
        assert [t.id for t in await store.due_timers(T0 + 10, 10)] == [keep.id, timer("s2", 0, step=None).id]

    async def test_a_timer_cancelled_and_set_in_one_unit_stays_set(self, store: Store) -> None:
        """Cancels apply before sets, so a unit that cancels and re-sets one id leaves the timer set."""
        await store.commit(UnitOfWork(timers=[timer("s1", T0 + 1)]))
        await store.commit(UnitOfWork(cancel_timers=[timer("s1", 0).id], timers=[timer("s1", T0 + 9)]))
        assert await store.timers_of("s1") == [timer("s1", T0 + 9)]

    async def test_concurrent_claimers_never_get_the_same_timers(self, open_store: OpenStore) -> None:
        """Two stores claiming due timers at once get disjoint sets that together cover every due timer."""
        first, second = await open_store(), await open_store()
        await first.commit(UnitOfWork(timers=[timer(f"s{i:03}", T0 + i) for i in range(120)]))
        batches: list[list[TimerSpec]] = []
        for _ in range(4):
            batches += await asyncio.gather(first.due_timers(T0 + 500, 20), second.due_timers(T0 + 500, 20))
        ids = [t.id for batch in batches for t in batch]
        assert len(ids) == len(set(ids)) == 120

    # ---- definitions ------------------------------------------------------------------------------------

    async def test_definitions_round_trip_and_latest_version_wins(self, store: Store) -> None:
        """A saved definition loads back equal; without a version the highest one is returned."""
        await store.save_definition(definition(1))
        await store.save_definition(definition(2, command="inventory.hold"))
        assert await store.load_definition("order", 1) == definition(1)
        assert await store.load_definition("order") == definition(2, command="inventory.hold")

    async def test_saving_the_same_definition_twice_is_fine_but_changed_content_conflicts(self, store: Store) -> None:
        """Same name, version and content is a no-op; same name and version with other content raises."""
        await store.save_definition(definition(1))
        await store.save_definition(definition(1))
        with pytest.raises(DefinitionConflict):
            await store.save_definition(definition(1, command="inventory.hold"))
        assert await store.load_definition("order", 1) == definition(1)

    async def test_unknown_definitions_raise(self, store: Store) -> None:
        """Loading an unknown name, or an unknown version of a known name, raises UnknownDefinition."""
        await store.save_definition(definition(1))
        with pytest.raises(UnknownDefinition):
            await store.load_definition("travel")
        with pytest.raises(UnknownDefinition):
            await store.load_definition("order", 3)

    # ---- listing ----------------------------------------------------------------------------------------

    async def test_list_instances_filters_and_is_newest_first(self, store: Store) -> None:
        """`list_instances` filters by status, definition and creation time, newest first, up to `limit`."""
        sagas = [
            instance("a", at=T0 + 1),
            instance("b", at=T0 + 2, status=SagaStatus.COMPLETED),
            instance("c", at=T0 + 3, definition="travel"),
            instance("d", at=T0 + 4, status=SagaStatus.FAILED),
        ]
        await store.commit(UnitOfWork(inserts=sagas))

        async def ids(**filters: Any) -> list[str]:
            return [s.id for s in await store.list_instances(**filters)]

        assert await ids() == ["d", "c", "b", "a"]
        assert await ids(limit=2) == ["d", "c"]
        assert await ids(status=SagaStatus.RUNNING) == ["c", "a"]
        assert await ids(definition="order") == ["d", "b", "a"]
        assert await ids(since=T0 + 2) == ["d", "c", "b"]
        assert await ids(status=SagaStatus.RUNNING, definition="order", since=T0) == ["a"]

    async def test_count_by_status_counts_every_status(self, store: Store) -> None:
        """`count_by_status` counts instances per status and reports zero for the others."""
        statuses = [SagaStatus.RUNNING, SagaStatus.RUNNING, SagaStatus.FAILED]
        await store.commit(UnitOfWork(inserts=[instance(f"s{i}", status=s) for i, s in enumerate(statuses)]))
        counts = await store.count_by_status()
        assert counts == {**dict.fromkeys(SagaStatus, 0), SagaStatus.RUNNING: 2, SagaStatus.FAILED: 1}

    async def test_query_instances_filters_and_pages_by_keyset(self, store: Store) -> None:
        """Every filter of `query_instances` narrows the list, and pages after (created_at, id) cover each saga
        once, in order, even among sagas created at the same instant."""
        sagas = [instance(f"s{i:02d}", at=T0 + i // 3, key=f"k{i}", definition="order" if i % 2 else "travel",
                          status=SagaStatus.FAILED if i % 5 == 0 else SagaStatus.RUNNING) for i in range(12)]
        sagas[5] = sagas[5].model_copy(update={"failure": "card DECLINED by 100% of banks"})
        await store.commit(UnitOfWork(inserts=sagas))

        async def ids(**filters: Any) -> list[str]:
            return [s.id for s in await store.query_instances(ports.SagaQuery(**filters))]

        newest_first = [s.id for s in sorted(sagas, key=lambda s: (s.created_at, s.id), reverse=True)]
        assert await ids() == newest_first
        pages, before = [], None
        while True:
            page = await store.query_instances(ports.SagaQuery(limit=5, before=before))
            if not page:
                break
            pages.append([s.id for s in page])
            before = (page[-1].created_at, page[-1].id)
        assert [len(p) for p in pages] == [5, 5, 2]
        assert [saga_id for page in pages for saga_id in page] == newest_first
        assert await ids(status=SagaStatus.FAILED) == ["s10", "s05", "s00"]
        assert await ids(definition="order", status=SagaStatus.FAILED) == ["s05"]
        assert await ids(created_from=T0 + 1, created_to=T0 + 2) == ["s05", "s04", "s03"]
        assert await ids(key="k7") == ["s07"]
        assert await ids(updated_before=T0 + 1) == ["s02", "s01", "s00"]
        assert await ids(reason="declined by 100%") == ["s05"]
        assert await ids(reason="100_") == []  # LIKE wildcards in the text are taken literally
        assert await ids(id_prefix="s1") == ["s11", "s10"]
        assert await ids(id_prefix="s1", limit=1) == ["s11"]
        assert await ids(id_suffix="1") == ["s11", "s01"]
        assert await ids(id_suffix="%1") == []
        assert await store.count_instances(ports.SagaQuery(status=SagaStatus.RUNNING, limit=1)) == 9
        assert await store.count_instances(ports.SagaQuery(id_prefix="s0")) == 10

    async def test_counts_by_definition_and_latest_definitions(self, store: Store) -> None:
        """Sagas are counted per (definition, status), and each definition's newest stored version is listed."""
        statuses = [SagaStatus.RUNNING, SagaStatus.RUNNING, SagaStatus.FAILED]
        await store.commit(UnitOfWork(inserts=[instance(f"s{i}", status=s) for i, s in enumerate(statuses)]
                                      + [instance("t", definition="travel")]))
        assert await store.count_by_definition() == {
            ("order", SagaStatus.RUNNING): 2, ("order", SagaStatus.FAILED): 1, ("travel", SagaStatus.RUNNING): 1}
        await store.save_definition(definition(1))
        await store.save_definition(definition(2, command="inventory.hold"))
        assert [(d.name, d.version) for d in await store.latest_definitions()] == [("order", 2)]

    async def test_history_pages_after_a_sequence_number(self, store: Store) -> None:
        """`history(after=, limit=)` pages through a saga's timeline in order without skipping or repeating."""
        await store.commit(UnitOfWork(inserts=[instance("s1")], history=[event("s1", f"e{i}") for i in range(7)]
                                      + [event("s2", "other")]))
        first = await store.history("s1", limit=3)
        rest = await store.history("s1", after=first[-1].seq, limit=10)
        assert [r.entry.type for r in first + rest] == [f"e{i}" for i in range(7)]
        assert await store.history("s1", after=rest[-1].seq) == []

    # ---- dead letters -----------------------------------------------------------------------------------

    async def test_dead_letters_round_trip_newest_first(self, store: Store) -> None:
        """Dead letters keep their raw bytes and headers and are listed newest first up to `limit`."""
        letters = [
            dead_letter("d1", at=T0 + 1),
            dead_letter("d2", at=T0 + 2, saga_id=None),
            dead_letter("d3", at=T0),
        ]
        await store.commit(UnitOfWork(dead_letters=letters))
        assert await store.dead_letters() == [letters[1], letters[0], letters[2]]
        assert await store.dead_letters(limit=1) == [letters[1]]
        assert await store.dead_letter("d3") == letters[2]

    async def test_replayed_dead_letters_are_hidden_unless_asked_for(self, store: Store) -> None:
        """After `mark_replayed` a dead letter carries the time and is listed only with include_replayed."""
        await store.commit(UnitOfWork(dead_letters=[dead_letter("d1"), dead_letter("d2", at=T0 + 1)]))
        await store.mark_replayed("d1", T0 + 10)
        assert [d.id for d in await store.dead_letters()] == ["d2"]
        assert [d.id for d in await store.dead_letters(include_replayed=True)] == ["d2", "d1"]
        assert (await store.dead_letter("d1")).replayed_at == T0 + 10

    async def test_unknown_dead_letters_raise_lookup_error(self, store: Store) -> None:
        """Reading or marking an unknown dead letter raises LookupError."""
        with pytest.raises(LookupError):
            await store.dead_letter("nope")
        with pytest.raises(LookupError):
            await store.mark_replayed("nope", T0)

    async def test_a_dead_letter_recorded_twice_keeps_the_first(self, store: Store) -> None:
        """Dead-lettering a redelivered message again under the same id is accepted; the first one stays."""
        await store.commit(UnitOfWork(dead_letters=[dead_letter("d1")]))
        await store.commit(UnitOfWork(dead_letters=[dead_letter("d1", at=T0 + 5)]))
        assert await store.dead_letters() == [dead_letter("d1")]

    async def test_a_dead_letter_keeps_its_prefix_with_the_whole_bodys_size_and_digest(self, store: Store) -> None:
        """A dead letter holding a prefix of its body round-trips with the whole body's size and SHA-256, and
        says it is truncated; one holding its whole body is not."""
        body = b"x" * 100_000
        letter = bounded_letter("big", "too big", BrokerMessage(topic="r", value=body), T0, saga_id=None,
                                max_bytes=1024)
        await store.commit(UnitOfWork(dead_letters=[letter, dead_letter("small")]))
        stored = await store.dead_letter("big")
        assert stored == letter
        assert (len(stored.message.value), stored.size, stored.truncated) == (1024, 100_000, True)
        assert stored.sha256 == hashlib.sha256(body).hexdigest()
        small = await store.dead_letter("small")
        assert (small.truncated, small.size, small.sha256) == (False, 9, hashlib.sha256(b"\x80not json").hexdigest())

    async def test_a_dead_letter_of_any_hostile_message_can_be_stored(self, store: Store) -> None:
        """Header names that are not text, hold NUL or lone surrogates, values of any type, 100 KB of headers, a
        key and reason with NUL: the letter is made storable (and says the headers were cut) on every store."""
        headers: Any = [(5, b"x"), ("a\x00b", b"v"), ("\udcff", b"v"), ("ce_id", 7), ("big", b"y" * 100_000),
                        ("after", b"z")]
        message = BrokerMessage(topic="r", value=b"{}", key="k\x00", headers=headers)
        letter = bounded_letter("dl/hostile", "bad \x00 reason \udcff", message, T0, saga_id="s\udcff",
                                max_bytes=1024)
        await store.commit(UnitOfWork(dead_letters=[letter]))
        stored = await store.dead_letter("dl/hostile")
        assert stored == letter
        assert stored.message.key is None
        assert "headers cut to fit" in stored.reason
        assert sum(len(k) + len(v) for k, v in stored.message.headers) <= 16 * 1024
        assert [k for k, _ in stored.message.headers][:4] == ["5", "'a\\x00b'", "'\\udcff'", "ce_id"]

    async def test_dead_letters_are_purged_after_their_own_horizon_and_kept_before_it(self, store: Store) -> None:
        """`purge` deletes dead letters recorded before `dead_letters_before` (replayed or not), keeps the later
        ones, and keeps every dead letter when it is not given."""
        await store.commit(UnitOfWork(dead_letters=[dead_letter("old", at=T0), dead_letter("older", at=T0 - 5),
                                                    dead_letter("new", at=T0 + 100)]))
        await store.mark_replayed("older", T0)
        kept_all = await store.purge(T0 + 1000)
        assert kept_all.dead_letters == 0
        assert len(await store.dead_letters(include_replayed=True)) == 3
        result = await store.purge(T0 - 1000, dead_letters_before=T0 + 50)
        assert result.dead_letters == 2
        assert [d.id for d in await store.dead_letters(include_replayed=True)] == ["new"]

    # ---- retention --------------------------------------------------------------------------------------

    async def test_purge_removes_old_finished_sagas_and_keeps_the_rest(self, store: Store, clock: FakeClock) -> None:
        """`purge` deletes old inbox ids, old sent messages and old finished sagas with their history and
        timers; running, compensating and failed sagas, recent ones and unsent messages stay."""
        old, cutoff, recent = T0, T0 + 100, T0 + 200
        sagas = {
            "done": instance("done", status=SagaStatus.COMPLETED, at=old),
            "undone": instance("undone", status=SagaStatus.COMPENSATED, at=old),
            "running": instance("running", at=old),
            "compensating": instance("compensating", status=SagaStatus.COMPENSATING, at=old),
            "failed": instance("failed", status=SagaStatus.FAILED, at=old),
            "fresh": instance("fresh", status=SagaStatus.COMPLETED, at=recent),
        }
        await store.commit(
            UnitOfWork(
                inserts=list(sagas.values()),
                history=[event(s, "e") for s in sagas] + [event("done", "e2")],
                timers=[timer(s, recent) for s in sagas],
                inbox=[
                    InboxRecord("old", "done", "applied", old),
                    InboxRecord("new", "fresh", "applied", recent),
                ],
                outbox=[
                    message("sent-old", "done"),
                    message("sent-new", "fresh"),
                    message("unsent", "running"),
                ],
            )
        )
        await store.mark_sent(["sent-old"], old)
        await store.mark_sent(["sent-new"], recent)

        result = await store.purge(cutoff)

        assert result == ports.RetentionResult(inbox=1, outbox=1, history=3, instances=2)
        assert set(await store.load(list(sagas))) == set(sagas) - {"done", "undone"}
        assert await store.history("done") == []
        assert len(await store.history("failed")) == 1
        assert await store.timers_of("done") == []
        assert len(await store.timers_of("running")) == 1
        assert await store.seen(["old", "new"]) == {"new"}
        clock.advance(3600)
        assert [m.id for m in await store.pending_outbox(10)] == ["unsent"]


class SqlContract(StoreContract):
    """What the SQL store adds to the contract: migrations and error mapping."""

    async def test_the_migrated_schema_is_exactly_the_tables_module(self, store: Store) -> None:
        """Upgrading to head yields exactly `tables.metadata` (alembic autogenerate finds no difference)."""
        assert isinstance(store, SqlStore)

        def compare(connection: sa.Connection) -> list[Any]:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return [d for d in compare_metadata(context, metadata) if "sagas_schema_version" not in repr(d)]

        assert await store._runner.read(compare) == []
        assert await store._runner.read(current_revision) == head_revision() == migrate.HEAD

    async def test_a_database_at_head_is_recognised_without_migrating(
        self, store: Store, bare_store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`initialize` of a migrated database reads the version and runs no migration; a new one is not at head,
        and a version table at another revision is not either."""
        assert isinstance(store, SqlStore)
        assert isinstance(bare_store, SqlStore)
        assert await bare_store._runner.read(migrate.at_head) is False
        assert await store._runner.read(migrate.at_head) is True

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("migrated again")

        monkeypatch.setattr(store_module, "upgrade_connection", refuse)
        await store.initialize()
        monkeypatch.setattr(migrate, "HEAD", "9999")
        assert await store._runner.read(migrate.at_head) is False
        with pytest.raises(AssertionError, match="migrated again"):
            await store.initialize()

    async def test_a_schema_migrated_by_a_newer_version_is_refused_in_one_clear_error(self, store: Store) -> None:
        """A database at a revision this version does not know (a newer sagas migrated it) is refused with a
        permanent StoreError saying so, not alembic's traceback."""
        assert isinstance(store, SqlStore)

        def set_version(revision: str) -> Callable[[sa.Connection], None]:
            return lambda c: c.execute(sa.text(f"UPDATE sagas_schema_version SET version_num = '{revision}'")) and None

        await store._runner.write(set_version("9999"))
        try:
            with pytest.raises(StoreError, match=r"revision '9999'.*newer sagas") as caught:
                await store.initialize()
            assert caught.value.retriable is False
        finally:
            await store._runner.write(set_version(migrate.HEAD))
        await store.initialize()

    async def test_initialize_is_idempotent(self, store: Store) -> None:
        """Initializing a store at head again changes nothing and keeps the data."""
        await store.commit(UnitOfWork(inserts=[instance("s1")]))
        await store.initialize()
        assert set(await store.load(["s1"])) == {"s1"}

    async def test_a_store_without_schema_fails_with_a_permanent_error(self, bare_store: Store) -> None:
        """Using a store whose schema was never created raises StoreError that is not retriable."""
        with pytest.raises(StoreError) as caught:
            await bare_store.load(["s1"])
        assert caught.value.retriable is False

    @pytest.fixture
    async def bare_store(self) -> Store:
        raise NotImplementedError


class TestSqliteStore(SqlContract):
    @pytest.fixture
    async def open_store(self, tmp_path: Path, clock: FakeClock) -> AsyncIterator[OpenStore]:
        stores: list[SqlStore] = []

        async def open_store() -> Store:
            store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", clock=clock)
            stores.append(store)
            await store.initialize()
            return store

        yield open_store
        for store in stores:
            await store.close()

    @pytest.fixture
    async def bare_store(self, tmp_path: Path) -> AsyncIterator[Store]:
        store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
        yield store
        await store.close()

    async def test_the_database_uses_wal_and_normal_sync(self, store: Store, tmp_path: Path) -> None:
        """The SQLite file is in WAL mode and connections run with synchronous=NORMAL and a busy timeout."""
        assert isinstance(store, SqlStore)

        def pragmas(connection: sa.Connection) -> tuple[Any, ...]:
            return tuple(
                connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout")
            )

        assert await store._runner.read(pragmas) == ("wal", 1, int(connection.BUSY_TIMEOUT * 1000))

    async def test_a_database_locked_by_another_process_is_a_retriable_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A commit blocked past the busy timeout by another process's lock fails retriably, writes nothing,
        and the same commit succeeds once the lock is released."""
        monkeypatch.setattr(connection, "BUSY_TIMEOUT", 0.05)
        path = tmp_path / "locked.db"
        await upgrade(f"sqlite+aiosqlite:///{path}")
        other = sqlite3.connect(path, isolation_level=None)
        store = SqlStore(f"sqlite+aiosqlite:///{path}")
        work = UnitOfWork(inserts=[instance("s1")], history=[event("s1", "started")])
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError) as caught:
                await store.commit(work)
            assert caught.value.retriable is True
            other.execute("ROLLBACK")
            assert await store.load(["s1"]) == {}
            await store.commit(work)
            assert set(await store.load(["s1"])) == {"s1"}
        finally:
            other.close()
            await store.close()

    async def test_dead_letters_from_before_the_size_columns_read_as_whole_bodies(self, tmp_path: Path) -> None:
        """A database at revision 0001 with a dead letter upgrades to head; the old letter (its whole body kept)
        reads back with its size and SHA-256 computed from that body, not truncated."""
        url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        await upgrade(url, revision="0001")
        body = b'{"old": true}'
        row = {"id": "dl/old", "reason": "r", "saga_id": None, "topic": "t", "key": None,
               "headers": '{"n":[],"l":[],"v":""}', "value": body, "at": T0, "replayed_at": None}
        plain = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
        with plain.begin() as conn:
            conn.execute(sa.text("INSERT INTO dead_letters VALUES (:id, :reason, :saga_id, :topic, :key, :headers, "
                                 ":value, :at, :replayed_at)"), row)
        plain.dispose()
        store = SqlStore(url)
        try:
            await store.initialize()
            letter = await store.dead_letter("dl/old")
        finally:
            await store.close()
        assert (letter.size, letter.sha256, letter.truncated) == (len(body), hashlib.sha256(body).hexdigest(), False)

    async def test_a_closed_store_refuses_calls(self, store: Store) -> None:
        """After `close` (twice is fine) calls raise a permanent StoreError."""
        await store.close()
        await store.close()
        with pytest.raises(StoreError) as caught:
            await store.load(["s1"])
        assert caught.value.retriable is False

    async def test_commits_from_two_stores_on_one_file_both_land(self, open_store: OpenStore) -> None:
        """Two stores (as two processes would) writing the same file at once both commit (BEGIN IMMEDIATE)."""
        first, second = await open_store(), await open_store()
        await asyncio.gather(
            *(
                store.commit(UnitOfWork(inserts=[instance(f"{n}{i}")], history=[event(f"{n}{i}", "started")]))
                for i in range(20)
                for n, store in (("a", first), ("b", second))
            )
        )
        assert sum((await first.count_by_status()).values()) == 40


class TestSqliteMemoryStore(StoreContract):
    @pytest.fixture
    async def open_store(self, clock: FakeClock) -> AsyncIterator[OpenStore]:
        store = SqlStore("sqlite+aiosqlite:///:memory:", clock=clock)
        await store.initialize()

        async def open_store() -> Store:
            return store  # one private database per store: every claimer shares this one

        yield open_store
        await store.close()


@pytest.fixture(scope="module")
def migrated_schema(pg_url: str) -> Iterator[str]:
    """A PostgreSQL schema migrated once for the module's tests."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    asyncio.run(upgrade(pg_url, schema=name))
    yield name
    asyncio.run(_drop_schema(pg_url, name))


@pytest.mark.postgres
class TestPostgresStore(SqlContract):
    """Tests share one migrated schema, emptied before each test (migrating a schema per test costs ~0.5 s);
    tests about migrations themselves get a fresh schema."""

    @pytest.fixture
    async def schema(self, pg_url: str) -> AsyncIterator[str]:
        name = f"test_{uuid.uuid4().hex[:16]}"
        yield name
        await _drop_schema(pg_url, name)

    @pytest.fixture
    async def open_store(self, pg_url: str, migrated_schema: str, clock: FakeClock) -> AsyncIterator[OpenStore]:
        engine = create_async_engine(pg_url)
        async with engine.begin() as conn:
            for table in metadata.sorted_tables:  # DELETE: TRUNCATE of tiny tables is slower (new files)
                await conn.exec_driver_sql(f'DELETE FROM "{migrated_schema}"."{table.name}"')
        await engine.dispose()
        stores: list[SqlStore] = []

        async def open_store() -> Store:
            store = SqlStore(pg_url, schema=migrated_schema, clock=clock)
            stores.append(store)
            await store.initialize()
            return store

        yield open_store
        for store in stores:
            await store.close()

    @pytest.fixture
    async def bare_store(self, pg_url: str, schema: str) -> AsyncIterator[Store]:
        store = SqlStore(pg_url, schema=schema)
        yield store
        await store.close()

    async def test_an_unreachable_server_is_a_retriable_error(self, pg_url: str) -> None:
        """When nothing listens at the address, calls raise a retriable StoreError."""
        url = sa.make_url(pg_url).set(host="127.0.0.1", port=1)
        store = SqlStore(url.render_as_string(hide_password=False))
        try:
            with pytest.raises(StoreError) as caught:
                await store.load(["s1"])
            assert caught.value.retriable is True
        finally:
            await store.close()

    async def test_a_role_that_may_not_create_schemas_starts_on_a_migrated_one(self, pg_url: str) -> None:
        """The DBA migrates once; the application's role, without CREATE on the database, can still start (its
        upgrade finds the schema and does not ask to create it)."""
        import asyncpg

        database = f"test_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
        try:
            await admin.execute(f'CREATE DATABASE "{database}"')
            url = sa.make_url(pg_url).set(database=database).render_as_string(hide_password=False)
            await upgrade(url, schema="app")
            owner = await asyncpg.connect(url.replace("+asyncpg", ""))
            try:
                await owner.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC, CURRENT_USER')
            finally:
                await owner.close()
            store = SqlStore(url, schema="app")
            try:
                await store.initialize()
                assert sum((await store.count_by_status()).values()) == 0
            finally:
                await store.close()
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await admin.close()

    async def test_concurrent_upgrades_of_a_fresh_schema_succeed(self, pg_url: str, schema: str) -> None:
        """Several processes upgrading one fresh schema at once all succeed (advisory lock)."""
        await asyncio.gather(*(upgrade(pg_url, schema=schema) for _ in range(4)))
        store = SqlStore(pg_url, schema=schema)
        try:
            assert sum((await store.count_by_status()).values()) == 0
        finally:
            await store.close()


async def _drop_schema(url: str, schema: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await engine.dispose()

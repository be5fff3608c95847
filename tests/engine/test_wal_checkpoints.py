"""SQLite's WAL checkpoints run off the commit path: the writer has automatic checkpoints off, the store's
`checkpoint()` (the engine's checkpoint loop) keeps the WAL bounded under constant load, and every reader, the CLI
included, sees what was committed."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore, connection
from sagas.engine.ports import HistoryRecord, UnitOfWork
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import HistoryEntry, SagaInstance, SagaStatus, StepState
from tests.conftest import pg_database
from tests.engine.support import ledger_participant, three_steps

SAGAS = str(Path(sys.executable).parent / "sagas")
PASSIVE_AT = 256 * 1024
TRUNCATE_AT = 1024 * 1024


@pytest.fixture
def small_wal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint thresholds small enough for a few thousand commits to cross them many times."""
    monkeypatch.setattr(connection, "WAL_CHECKPOINT_BYTES", PASSIVE_AT)
    monkeypatch.setattr(connection, "WAL_MAX_BYTES", TRUNCATE_AT)


def _instance(index: int) -> SagaInstance:
    return SagaInstance(
        id=f"wal-{index:06}", definition="order", definition_version=1,
        steps={"reserve": StepState(), "charge": StepState()},
        input={"order_id": index, "note": "x" * 200}, created_at=1.0, updated_at=1.0,
    )  # fmt: skip


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


async def _commit_load(store: SqlStore, db: Path, units: int, *, checkpoints: bool) -> int:
    """Commit `units` units of work (10 new sagas and their history each) while a reader keeps reading and, if
    `checkpoints`, a task calls `store.checkpoint()` as the engine's loop does; the largest WAL size seen."""
    wal = Path(f"{db}-wal")
    largest = 0
    done = asyncio.Event()

    async def read_constantly() -> None:
        while not done.is_set():
            await store.list_instances(limit=5)

    async def checkpoint_loop() -> None:
        while not done.is_set():
            await store.checkpoint()
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(read_constantly())]
    if checkpoints:
        tasks.append(asyncio.create_task(checkpoint_loop()))
    try:
        for serial in range(units):
            work = UnitOfWork()
            for index in range(serial * 10, serial * 10 + 10):
                instance = _instance(index)
                work.inserts.append(instance)
                work.history.append(HistoryRecord(instance.id, HistoryEntry(at=1.0, type="saga.started")))
            await store.commit(work)
            largest = max(largest, _size(wal))
    finally:
        done.set()
        await asyncio.gather(*tasks)
    return largest


async def test_the_wal_stays_bounded_under_constant_load_and_grows_without_the_checkpoints(
    tmp_path: Path, small_wal: None
) -> None:
    """1,500 commits of 10 sagas with a reader always reading: with the store's checkpoints the WAL stays within a
    small multiple of the TRUNCATE bound (what the writer appends while a checkpoint runs: its frames come ~1 MiB
    per 30 ms here); the same load without them grows it to over 30 times the bound (the writer's automatic
    checkpoints are off), and every saga committed is in the database."""
    bounded, unbounded = tmp_path / "bounded.db", tmp_path / "unbounded.db"
    sizes = {}
    for db, checkpoints in ((bounded, True), (unbounded, False)):
        store = SqlStore(f"sqlite+aiosqlite:///{db}")
        await store.initialize()
        try:
            sizes[checkpoints] = await _commit_load(store, db, 1_500, checkpoints=checkpoints)
        finally:
            await store.close()
    assert sizes[True] <= 24 * TRUNCATE_AT, sizes  # what a checkpoint lets pass meanwhile: timing, on a busy machine
    assert sizes[False] > 30 * TRUNCATE_AT, sizes
    with sqlite3.connect(bounded) as plain:
        assert plain.execute("SELECT count(*) FROM saga_instances").fetchone() == (15_000,)


async def test_the_writer_has_automatic_checkpoints_off_and_other_connections_keep_theirs(tmp_path: Path) -> None:
    """The store's writer connection says wal_autocheckpoint 0 and a journal size limit; its reader keeps SQLite's
    default (1,000 pages), as does every other connection to the file."""
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    await store.initialize()
    runner = store._runner
    assert isinstance(runner, connection.SqliteRunner)
    try:
        on_writer = await runner.write(
            lambda c: (c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar(),
                       c.exec_driver_sql("PRAGMA journal_size_limit").scalar()))
        on_reader = await runner.read(lambda c: c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar())
    finally:
        await store.close()
    assert on_writer == (0, connection.WAL_CHECKPOINT_BYTES // 2)  # a reset leaves the WAL under the threshold
    assert on_reader == 1000


async def test_an_engine_checkpoints_and_readers_and_the_cli_see_committed_sagas(
    tmp_path: Path, small_wal: None
) -> None:
    """An engine runs 150 sagas on a file store: its checkpoint loop (supervised, in `health()`) has checkpointed,
    and while it still runs, the store's reader, a plain sqlite3 connection and `sagas list` in another process
    all see every saga completed."""
    db = tmp_path / "engine.db"
    store = SqlStore(f"sqlite+aiosqlite:///{db}")
    broker = MemoryBroker()
    engine = Engine(store=store, broker=broker, definitions=[three_steps()],
                    settings=EngineSettings(timer_interval=0.05))
    participants = [ledger_participant("inventory", {"Reserve": None, "UndoReserve": None}),
                    ledger_participant("payment", {"Charge": None, "UndoCharge": None}),
                    ledger_participant("shipping", {"Ship": None, "UndoShip": None})]
    async with engine:
        serving = [p.serve(broker=broker) for p in participants]
        for context in serving:
            await context.__aenter__()
        try:
            ids = [await engine.start_saga("order", {"order_id": f"o-{i}", "amount": 5}) for i in range(150)]
            settled = [await engine.wait(saga_id, timeout=60) for saga_id in ids]
            assert {s.status for s in settled} == {SagaStatus.COMPLETED}
            assert engine.health()["checkpoint"].running
            checkpointer = store._runner._checkpointer  # type: ignore[attr-defined]
            deadline = asyncio.get_running_loop().time() + 30
            while checkpointer.stats["passive"] + checkpointer.stats["truncate"] == 0:
                assert asyncio.get_running_loop().time() < deadline, "no checkpoint ran"
                await asyncio.sleep(0.05)
            loaded = await store.load(ids)
            with sqlite3.connect(db) as plain:
                completed = plain.execute(
                    "SELECT count(*) FROM saga_instances WHERE status = 'completed'").fetchone()[0]
            listed = await asyncio.to_thread(
                subprocess.run, [SAGAS, "list", "--db", str(db), "--json", "--limit", "1000"], capture_output=True,
                text=True, timeout=120, env={**os.environ, "SAGAS_DB": ""}, check=True,
            )
        finally:
            for context in serving:
                await context.__aexit__(None, None, None)
    await store.close()
    assert {i.status for i in loaded.values()} == {SagaStatus.COMPLETED}
    assert len(loaded) == 150
    assert completed == 150
    assert {s["status"] for s in json.loads(listed.stdout)} == {"completed"}
    assert len(json.loads(listed.stdout)) == 150


async def test_after_a_wal_reset_small_commits_do_not_trigger_a_checkpoint_each(tmp_path: Path,
                                                                                small_wal: None) -> None:
    """Once a checkpoint has copied a large WAL and the writer has started it over, a few small commits leave it
    under the threshold: the checkpoint loop's next looks do nothing (it checkpointed on every tick when a reset
    left the file exactly at the threshold)."""
    db = tmp_path / "reset.db"
    store = SqlStore(f"sqlite+aiosqlite:///{db}")
    await store.initialize()
    try:
        runner = store._runner
        assert isinstance(runner, connection.SqliteRunner)
        checkpointer = runner._checkpointer
        assert checkpointer is not None
        serial = 0

        async def commit_one() -> None:
            nonlocal serial
            work = UnitOfWork()
            work.inserts.append(_instance(serial))
            serial += 1
            await store.commit(work)

        while _size(Path(f"{db}-wal")) < PASSIVE_AT:
            await commit_one()
        assert await runner.checkpoint() == "PASSIVE"
        before = dict(checkpointer.stats)
        for _ in range(3):
            await commit_one()  # the WAL starts over from its beginning: a few small commits stay under the bound
            assert _size(Path(f"{db}-wal")) < PASSIVE_AT
            assert await runner.checkpoint() is None
        assert checkpointer.stats == before
    finally:
        await store.close()


async def test_the_checkpoint_loop_runs_only_where_the_store_needs_it(tmp_path: Path, pg_url: str) -> None:
    """SQLite's WAL needs the checkpoint loop; PostgreSQL has nothing for it to do, so the engine starts none (it
    woke ten times a second there for nothing)."""
    async with pg_database(pg_url, "ckpt") as url:
        for store, expected in ((SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'engine.db'}"), True),
                                (SqlStore(url), False)):
            assert store.needs_checkpoints() is expected
            engine = Engine(store=store, broker=MemoryBroker(), definitions=[three_steps()])
            async with engine:
                assert ("checkpoint" in engine.health()) is expected
                assert "writer" in engine.health()
            await store.close()

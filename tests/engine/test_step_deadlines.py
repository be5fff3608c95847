"""Step timeouts kept on the saga's row (`sagas/adapters/sql/deadlines.py`) instead of a timers row per step: they
are durable across a restart, fire once with several engines, survive a parallel step's reply, and migration 0004
moves the timers rows of an older database onto their sagas."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore, upgrade
from sagas.adapters.sql.tables import saga_instances, timers
from sagas.engine.ports import UnitOfWork
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import SagaInstance, StepState, StepStatus, TimerKind, TimerSpec, timer_id
from tests.engine.support import three_steps

T0 = 1_700_000_000.0


def _spec(saga_id: str, step: str, due_at: float, *, attempt: int = 1,
          kind: TimerKind = TimerKind.STEP_TIMEOUT) -> TimerSpec:
    return TimerSpec(id=timer_id(saga_id, kind, step, attempt), saga_id=saga_id, timer=kind, step=step,
                     attempt=attempt, due_at=due_at)


def _parallel(saga_id: str, a: StepStatus, b: StepStatus, *, version: int = 0) -> SagaInstance:
    return SagaInstance(
        id=saga_id, definition="order", definition_version=1, version=version, created_at=T0, updated_at=T0,
        steps={"a": StepState(status=a, attempt=1), "b": StepState(status=b, attempt=1)}, input={},
    )  # fmt: skip


async def _timer_rows(db: Path) -> list[tuple[str, str]]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    try:
        async with engine.connect() as conn:
            return [tuple(r) for r in (await conn.execute(sa.select(timers.c.id, timers.c.kind))).all()]  # type: ignore[misc]
    finally:
        await engine.dispose()


async def _timed_out(store: SqlStore, saga_id: str) -> list[tuple[str | None, int | None]]:
    return [(r.entry.step, r.entry.attempt) for r in await store.history(saga_id) if r.entry.type == "step.timed_out"]


async def _until(condition_check: object, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition_check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_step_timeout_is_on_the_saga_row_and_fires_after_a_restart(tmp_path: Path) -> None:
    """A saga whose participant never answers: its step timeout is on its row (no timers row), and after the engine
    stops before it is due, another engine on the same file fires it once."""
    db = tmp_path / "restart.db"
    definition = three_steps(timeout=1.0, max_attempts=2)
    store = SqlStore(f"sqlite+aiosqlite:///{db}")
    async with Engine(store=store, broker=MemoryBroker(), definitions=[definition]) as engine:
        saga_id = await engine.start_saga("order", {"order_id": "o-1", "amount": 5})
        pending = await store.timers_of(saga_id)
    await store.close()
    assert [(t.timer, t.step, t.attempt) for t in pending] == [(TimerKind.STEP_TIMEOUT, "reserve", 1)]
    assert await _timer_rows(db) == []

    store = SqlStore(f"sqlite+aiosqlite:///{db}")
    async with Engine(store=store, broker=MemoryBroker(), definitions=[definition]) as engine:

        async def fired() -> bool:
            return bool(await _timed_out(store, saga_id))

        await _until(fired, "the step timeout after the restart")
        assert await _timed_out(store, saga_id) == [("reserve", 1)]
        retry = await store.timers_of(saga_id)
    await store.close()
    # The retry's backoff is a timers row, as before; the consumed timeout is gone from the saga's row.
    assert [(t.timer, t.step, t.attempt) for t in retry] == [(TimerKind.STEP_RETRY, "reserve", 1)]
    assert await _timer_rows(db) == [(retry[0].id, "step_retry")]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str | None]]:
    """One database for two engines: a SQLite file, or a fresh PostgreSQL schema (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}", None
        return
    pg_url: str = request.getfixturevalue("pg_url")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    await upgrade(pg_url, schema=schema)
    yield pg_url, schema
    engine = create_async_engine(pg_url)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await engine.dispose()


@pytest.mark.timeout(120)
async def test_two_engines_fire_each_step_timeout_once(shared_url: tuple[str, str | None]) -> None:
    """Two engines on one database, 30 sagas whose participants never answer, started half on each: every step
    timeout fires on exactly one engine (the timers both fired add up to the timeouts recorded, one per saga)."""
    url, schema = shared_url
    definition = three_steps(timeout=0.5, max_attempts=1, comp_attempts=1)
    stores = [SqlStore(url, schema=schema) for _ in range(2)]
    settings = EngineSettings(timer_interval=0.02)
    engines = [Engine(store=s, broker=MemoryBroker(), definitions=[definition], settings=settings) for s in stores]
    for engine in engines:
        await engine.start()
    try:
        ids = []
        for i in range(30):
            ids.append(await engines[i % 2].start_saga("order", {"order_id": f"o-{i}", "amount": 5}))
            # Spread the deadlines across the engines' poll cycles: started all at once, they fall due together and
            # whichever engine polls first claims every one of them (the last assertion then fails by chance).
            await asyncio.sleep(0.013)

        async def all_timed_out() -> bool:
            return all([await _timed_out(stores[0], saga_id) for saga_id in ids])

        await _until(all_timed_out, "every saga's step timeout", 60)
        # Each timed-out step asks for its compensation, which is armed with a timeout too; let those fire as well.
        await asyncio.sleep(1.5)
        await _until(lambda: _idle(engines), "both engines idle")
    finally:
        for engine in engines:
            await engine.stop()
    history = [r.entry for saga_id in ids for r in await stores[0].history(saga_id)]
    for store in stores:
        await store.close()
    timed_out = Counter((e.type, e.step, e.attempt) for e in history if e.type.endswith(".timed_out"))
    fired = sum(engine.stats["timers"] for engine in engines)
    assert timed_out[("step.timed_out", "reserve", 1)] == 30
    assert set(timed_out.values()) == {30}  # a step timeout and perhaps a compensation timeout, once per saga
    assert fired == sum(timed_out.values())
    assert all(engine.stats["timers"] > 0 for engine in engines), [e.stats for e in engines]


async def _idle(engines: list[Engine]) -> bool:
    return all([await engine.idle() for engine in engines])


async def test_a_parallel_steps_timeout_survives_the_other_steps_reply(tmp_path: Path) -> None:
    """Two parallel steps with a timeout each: a unit that moves one on and cancels its timeout leaves the other's
    on the row (read back from the row), which then comes due alone."""
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'parallel.db'}")
    await store.initialize()
    try:
        started = _parallel("p1", StepStatus.RUNNING, StepStatus.RUNNING)
        timeouts = [_spec("p1", "a", T0 + 10), _spec("p1", "b", T0 + 20)]
        await store.commit(UnitOfWork(inserts=[started], timers=timeouts))
        assert await store.timers_of("p1") == timeouts
        moved = _parallel("p1", StepStatus.SUCCEEDED, StepStatus.RUNNING, version=1)
        await store.commit(UnitOfWork(updates=[moved], cancel_timers=[timeouts[0].id]))
        assert await store.timers_of("p1") == [timeouts[1]]
        assert await store.due_timers(T0 + 15, 10) == []
        assert await store.due_timers(T0 + 25, 10) == [timeouts[1]]
        assert await store.due_timers(T0 + 25, 10) == []  # claimed: another engine does not get it
    finally:
        await store.close()


async def test_migration_0004_moves_pending_step_timeouts_onto_their_sagas(tmp_path: Path) -> None:
    """A database at 0003 with a saga's step timeout and retry timer as timers rows: after the upgrade the timeout
    is on the saga's row (and due as before), the retry still a row."""
    db = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{db}"
    await upgrade(url, revision="0003_order")
    timeout = _spec("old-1", "a", T0 + 5)
    retry = _spec("old-1", "b", T0 + 7, kind=TimerKind.STEP_RETRY)
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        row = _parallel("old-1", StepStatus.RUNNING, StepStatus.BACKOFF)
        await conn.execute(saga_instances.insert().values(
            id=row.id, definition=row.definition, definition_version=1, status="running", stage=0, version=1,
            created_at=T0, updated_at=T0, snapshot=row.model_dump(mode="json"),
        ))  # fmt: skip
        for spec in (timeout, retry):
            await conn.execute(timers.insert().values(id=spec.id, saga_id=spec.saga_id, kind=str(spec.timer),
                                                      step=spec.step, attempt=spec.attempt, due_at=spec.due_at))
    await engine.dispose()
    await upgrade(url)
    assert await _timer_rows(db) == [(retry.id, "step_retry")]
    store = SqlStore(url)
    try:
        assert await store.timers_of("old-1") == [timeout, retry]
        assert await store.due_timers(T0 + 10, 10) == [timeout, retry]
    finally:
        await store.close()

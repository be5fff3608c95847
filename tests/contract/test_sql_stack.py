"""One SQL stack: the store, the `db://` queue and the participants open their databases the same way, and every
table they own is made and upgraded by alembic, including databases made by earlier releases."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sagas.adapters import normalize_db_url
from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore, connection, participant_tables
from sagas.adapters.sql.migrate import PARTICIPANT, QUEUE, at_head, current_revision, ensure_current, head_revision
from sagas.adapters.sqlqueue import SqlQueueBroker
from sagas.adapters.sqlqueue import metadata as queue_metadata
from sagas.participant import Participant, ParticipantWorker, participant_database

PRAGMAS = ("journal_mode", "synchronous", "busy_timeout")


def _pragmas(conn: sa.Connection) -> tuple[Any, ...]:
    return tuple(conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in PRAGMAS)


async def test_the_store_queue_and_participant_connections_have_the_same_pragmas(tmp_path: Path) -> None:
    """A store, a `db://` queue and a participant on one SQLite file all run WAL, synchronous=NORMAL and the one
    busy timeout."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    store = SqlStore(url)
    queue = SqlQueueBroker(url)
    participant = participant_database(url)
    try:
        await store.initialize()
        await queue.start()
        from_store = await store._runner.read(_pragmas)
        async with queue._transaction(write=False) as conn:
            from_queue = await conn.run_sync(_pragmas)
        async with participant.connect() as conn:
            from_participant = await conn.run_sync(_pragmas)
    finally:
        await store.close()
        await queue.close()
        await participant.dispose()
    assert from_store == from_queue == from_participant == ("wal", 1, int(connection.BUSY_TIMEOUT * 1000))


def test_one_url_normaliser_serves_every_component() -> None:
    """Paths, ``sqlite:``, ``postgresql:`` and ``postgres:`` URLs get the drivers the stack opens them with."""
    assert normalize_db_url("/tmp/x.db") == "sqlite+aiosqlite:////tmp/x.db"
    assert normalize_db_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert normalize_db_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert normalize_db_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert normalize_db_url("postgresql+asyncpg://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert SqlQueueBroker("postgres://u@h/db").url == "postgresql+asyncpg://u@h/db"


async def test_the_queue_migrations_make_exactly_the_queue_tables(tmp_path: Path) -> None:
    """A new queue database is migrated to the queue chain's head, and autogenerate finds nothing to add."""
    queue = SqlQueueBroker(f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}")
    await queue.start()
    try:
        async with queue._transaction(write=False) as conn:
            diffs = await conn.run_sync(lambda c: [
                d for d in compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}),
                                            queue_metadata)
                if QUEUE.version_table not in repr(d)
            ])
            revision = await conn.run_sync(current_revision, QUEUE)
    finally:
        await queue.close()
    assert diffs == []
    assert revision == head_revision(QUEUE) == QUEUE.head


async def _participant_diffs(db: AsyncEngine) -> tuple[list[Any], str | None]:
    async with db.connect() as conn:
        diffs = await conn.run_sync(lambda c: [
            d for d in compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}),
                                        participant_tables.metadata)
            if PARTICIPANT.version_table not in repr(d)
        ])
        return diffs, await conn.run_sync(current_revision, PARTICIPANT)


async def test_the_participant_migrations_make_exactly_the_participant_tables(tmp_path: Path) -> None:
    """A new participant database is migrated to the participant chain's head, matching its tables exactly."""
    broker = MemoryBroker()
    async with Participant("payment").serve(broker=broker, database_url=str(tmp_path / "p.db")) as worker:
        diffs, revision = await _participant_diffs(worker.db)
    assert diffs == []
    assert revision == head_revision(PARTICIPANT) == PARTICIPANT.head


async def test_a_queue_made_by_create_all_is_adopted_with_its_messages(tmp_path: Path) -> None:
    """A queue database made by the release before migrations (create_all, no version table) is stamped at the
    head without losing a message, and its messages are delivered."""
    path = tmp_path / "old-queue.db"
    old = sa.create_engine(f"sqlite:///{path}")
    queue_metadata.create_all(old)
    with old.begin() as conn:
        conn.execute(queue_metadata.tables["broker_messages"].insert().values(
            topic="t", key="k", headers=[], value=b"kept", created_at=1.0))
    old.dispose()
    queue = SqlQueueBroker(f"sqlite:///{path}", retention=None)
    await queue.start()
    try:
        consumer = await queue.subscribe(["t"], "g")
        deliveries = await consumer.fetch(10, timeout=1.0)
        async with queue._transaction(write=False) as conn:
            assert await conn.run_sync(at_head, QUEUE) is True
    finally:
        await queue.close()
    assert [d.message.value for d in deliveries] == [b"kept"]


# As the first release's create_all made it (no `reason`); the second added `reason TEXT` by ALTER TABLE.
FIRST_RELEASE_DEDUP = (
    "CREATE TABLE participant_dedup (key VARCHAR(300) NOT NULL, command_id VARCHAR(300) NOT NULL,"
    " outcome VARCHAR(20) NOT NULL, type VARCHAR(200) NOT NULL, data JSON NOT NULL, at FLOAT NOT NULL,"
    " PRIMARY KEY (key))"
)
SECOND_RELEASE_DEDUP = FIRST_RELEASE_DEDUP.replace(" PRIMARY KEY (key))", " reason TEXT, PRIMARY KEY (key))")


@pytest.mark.parametrize("made_by", ["first release (no reason)", "second release (hand-written ALTER)"])
async def test_a_participant_database_of_an_earlier_release_upgrades_cleanly(tmp_path: Path, made_by: str) -> None:
    """A dedup table made without alembic keeps its records, gains what it lacks and is stamped at the head, with
    the dead letters table beside it; the same upgrade run again is a no-op."""
    path = tmp_path / "payment.db"
    with sqlite3.connect(path) as db:
        db.execute(FIRST_RELEASE_DEDUP if made_by.startswith("first") else SECOND_RELEASE_DEDUP)
        db.execute("INSERT INTO participant_dedup (key, command_id, outcome, type, data, at) VALUES"
                   " ('s-0/charge/command', 's-0/charge/command/1', 'success', 'Charge.succeeded', '{}', 1.0)")
    db_engine = participant_database(str(path))
    try:
        for _ in range(2):
            async with db_engine.begin() as conn:
                await conn.run_sync(ensure_current, PARTICIPANT)
        diffs, revision = await _participant_diffs(db_engine)
        async with db_engine.connect() as conn:
            kept = (await conn.execute(sa.text("SELECT key FROM participant_dedup"))).scalars().all()
    finally:
        await db_engine.dispose()
    assert diffs == []
    assert revision == PARTICIPANT.head
    assert kept == ["s-0/charge/command"]


@pytest.mark.postgres
async def test_a_participant_database_of_an_earlier_release_upgrades_on_postgres(pg_url: str) -> None:
    """The first release's dedup table on PostgreSQL: three replicas starting together upgrade it once, and the
    schema matches the participant's tables."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(pg_url)
    async with admin.begin() as conn:
        await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        await conn.execute(sa.text(FIRST_RELEASE_DEDUP.replace("participant_dedup", f'"{schema}".participant_dedup')))
    broker = MemoryBroker()
    await broker.start()

    def database() -> AsyncEngine:
        return create_async_engine(pg_url, connect_args={"server_settings": {"search_path": schema}})

    workers = [ParticipantWorker(Participant("payment"), broker, database(), batch_max=10) for _ in range(3)]
    try:
        results = await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
        assert results == [None, None, None]
        diffs, revision = await _participant_diffs(workers[0].db)
        assert diffs == []
        assert revision == PARTICIPANT.head
    finally:
        for worker in workers:
            await worker.stop()
        await broker.close()
        async with admin.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


def _sagas(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sagas", *args], capture_output=True, text=True, timeout=60)


def test_db_upgrade_migrates_a_participant_database_and_the_queue(tmp_path: Path) -> None:
    """`sagas db upgrade --participant-db` brings a participant's database to its head; `--queue` adds the queue's
    tables to the engine's database."""
    participant_db, engine_db = tmp_path / "payment.db", tmp_path / "sagas.db"
    with sqlite3.connect(participant_db) as db:
        db.execute(FIRST_RELEASE_DEDUP)
    done = _sagas("db", "upgrade", "--participant-db", str(participant_db))
    assert done.returncode == 0, done.stderr
    assert "participant schema up to date" in done.stdout
    done = _sagas("db", "upgrade", "--db", str(engine_db), "--queue")
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(participant_db) as db:
        assert db.execute("SELECT version_num FROM sagas_participant_version").fetchall() == [(PARTICIPANT.head,)]
        assert db.execute("SELECT count(*) FROM participant_dead_letters").fetchone() == (0,)
    with sqlite3.connect(engine_db) as db:
        assert db.execute("SELECT version_num FROM sagas_queue_version").fetchall() == [(QUEUE.head,)]
        assert db.execute("SELECT count(*) FROM broker_messages").fetchone() == (0,)


def test_no_module_subclasses_a_driver_class() -> None:
    """Nothing in sagas subclasses aiosqlite's (or another driver's) classes: the stack uses their public API."""
    import inspect

    import aiosqlite

    import sagas.adapters.sql.connection
    import sagas.adapters.sqlqueue
    import sagas.participant.worker

    for module in (sagas.adapters.sql.connection, sagas.adapters.sqlqueue, sagas.participant.worker):
        for _, value in inspect.getmembers(module, inspect.isclass):
            if value.__module__ == module.__name__:
                assert not issubclass(value, aiosqlite.Connection | aiosqlite.Cursor), value

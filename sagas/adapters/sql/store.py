"""`SqlStore`: the `Store` protocol on SQLite and PostgreSQL with one schema (SQLAlchemy Core, no ORM).

Writes live in `writes.py`, the runners (threads, engines, error mapping) in `connection.py`.

Claims: `pending_outbox` and `due_timers` hand out rows whose lease is free or expired and lease them to the
caller for `lease` seconds (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so several engines never publish
the same row at the same time. Leases use this process's clock: hosts sharing a database need clocks in
sync to well under the lease (NTP is plenty). A claimed row neither marked sent nor cancelled comes back
when its lease expires.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from sagas.adapters.sql import deadlines, queries, rows, writes
from sagas.adapters.sql.connection import Runner, SqliteRunner, open_runner
from sagas.adapters.sql.migrate import at_head, upgrade_connection
from sagas.adapters.sql.tables import dead_letters, definitions, inbox, outbox, saga_instances, timers
from sagas.definitions.model import SagaDefinition
from sagas.engine.ports import (
    DeadLetter,
    HistoryRecord,
    OutboxMessage,
    RetentionResult,
    SagaQuery,
    StoreGauges,
    UnitOfWork,
)
from sagas.engine.state import SagaInstance, SagaStatus, TimerSpec
from sagas.errors import ConcurrencyConflict, DefinitionConflict, StoreError, UnknownDeadLetter, UnknownDefinition

DEFAULT_LEASE = 10.0
"""Seconds a claimed outbox row or timer stays invisible to other claimers."""

_IDS: sa.BindParameter[list[str]] = sa.bindparam("ids", expanding=True)
# Snapshots are read as JSON text and parsed by pydantic in one step (twice as fast as json.loads + validate).
_snapshot = sa.cast(saga_instances.c.snapshot, sa.Text)
_load = sa.select(_snapshot).where(saga_instances.c.id.in_(_IDS))
_seen = sa.select(inbox.c.message_id).where(inbox.c.message_id.in_(_IDS))
_find_by_key = sa.select(_snapshot).where(
    saga_instances.c.definition == sa.bindparam("definition"),
    saga_instances.c.idempotency_key == sa.bindparam("key"),
)
_timeouts_of = sa.select(saga_instances.c.step_timeouts).where(saga_instances.c.id == sa.bindparam("saga_id"))
_timers_of = sa.select(timers).where(timers.c.saga_id == sa.bindparam("saga_id")).order_by(timers.c.due_at, timers.c.id)


class SqlStore:
    """The `Store` on ``sqlite+aiosqlite:///path.db`` (``/:memory:`` for a private in-memory database) or
    ``postgresql+asyncpg://user:password@host/db``.

    Args:
        url: the database URL.
        schema: PostgreSQL schema holding the tables (default: the server's search_path).
        lease: seconds a row returned by `pending_outbox` / `due_timers` stays claimed.
        clock: wall clock for leases and the `sent_at` of messages marked sent by `commit` (epoch seconds).
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self._schema = schema
        self._lease = lease
        self._clock = clock
        self._runner: Runner = open_runner(url, schema=schema)

    @property
    def dialect(self) -> str:
        return self._runner.dialect

    async def initialize(self) -> None:
        """Migrate the database to the latest schema, unless one read shows it is there already."""
        if not await self._runner.read(at_head):
            await self._runner.write(partial(upgrade_connection, schema=self._schema))

    async def close(self) -> None:
        await self._runner.close()

    def needs_checkpoints(self) -> bool:
        """Only SQLite's WAL needs the engine's checkpoint loop."""
        return isinstance(self._runner, SqliteRunner)

    async def checkpoint(self) -> None:
        """SQLite: checkpoint the WAL when it has grown (see `connection.SqliteRunner.checkpoint`); the engine calls
        this from a loop of its own. Nothing to do on PostgreSQL."""
        if isinstance(self._runner, SqliteRunner):
            await self._runner.checkpoint()

    # ---- writes -------------------------------------------------------------------------------------

    async def commit(self, work: UnitOfWork) -> None:
        """Write `work` in one transaction, or raise ConcurrencyConflict and write nothing.

        Conflicts: an update whose version is not the stored one (or whose instance does not exist), an
        insert whose id or (definition, idempotency key) exists, a message id already in the inbox (another
        engine applied it first), an outbox id that exists. `cancel_timers` apply before `timers`; a dead
        letter whose id exists is skipped (the first record stays).
        """
        if not work:
            return
        try:
            await self._runner.write(partial(writes.apply, work=work, now=self._clock(), lease=self._lease))
        except writes.VersionMismatch as error:
            stale = await self._runner.read(partial(writes.stale_updates, updates=work.updates))
            raise ConcurrencyConflict(stale or [u.id for u in work.updates]) from error
        except StoreError as error:
            if not isinstance(error.__cause__, exc.IntegrityError):
                raise
            conflicting = await self._runner.read(partial(writes.conflicting_ids, work=work))
            raise ConcurrencyConflict(conflicting) from error

    async def mark_sent(self, ids: Sequence[str], at: float) -> None:
        if ids:
            await self._runner.write(partial(writes.mark_sent, ids=ids, at=at))

    async def mark_replayed(self, dead_letter_id: str, at: float) -> None:
        """Raises UnknownDeadLetter (a LookupError) when there is no dead letter with that id."""
        statement = sa.update(dead_letters).where(dead_letters.c.id == dead_letter_id).values(replayed_at=at)
        if not await self._runner.write(lambda c: c.execute(statement).rowcount):
            raise UnknownDeadLetter(f"no dead letter {dead_letter_id!r}")

    async def save_definition(self, definition: SagaDefinition) -> None:
        digest = definition.digest
        row = {
            "name": definition.name,
            "version": definition.version,
            "digest": digest,
            "body": definition.model_dump(mode="json"),
            "created_at": self._clock(),
        }
        stored = await self._runner.write(partial(writes.insert_definition, row=row))
        if stored != digest:
            raise DefinitionConflict(
                f"definition {definition.name!r} version {definition.version} is already stored with digest "
                f"{stored}; this one has digest {digest}: give changed content a new version"
            )

    async def purge(self, older_than: float, *, dead_letters_before: float | None = None) -> RetentionResult:
        return await self._runner.write(
            partial(writes.purge, older_than=older_than, dead_letters_before=dead_letters_before)
        )

    # ---- claims -------------------------------------------------------------------------------------

    async def pending_outbox(self, limit: int, created_before: float | None = None) -> list[OutboxMessage]:
        if limit <= 0:
            return []
        # Polled by every engine while idle: look before claiming (a read), claim only when there is something.
        if not await self._runner.read(partial(writes.any_pending_outbox, before=created_before, now=self._clock())):
            return []
        return await self._runner.write(
            lambda c: writes.claim_outbox(c, limit=limit, before=created_before, now=self._clock(), lease=self._lease)
        )

    async def due_timers(self, now: float, limit: int) -> list[TimerSpec]:
        if limit <= 0:
            return []
        if not await self._runner.read(partial(writes.any_due_timer, due=now, now=self._clock())):
            return []
        return await self._runner.write(
            lambda c: writes.claim_timers(c, due=now, limit=limit, now=self._clock(), lease=self._lease)
        )

    # ---- reads --------------------------------------------------------------------------------------

    async def load(self, saga_ids: Sequence[str]) -> dict[str, SagaInstance]:
        if not saga_ids:
            return {}

        def run(connection: Connection) -> dict[str, SagaInstance]:
            found: dict[str, SagaInstance] = {}
            for chunk in writes.chunks(sorted(set(saga_ids))):
                for snapshot in connection.execute(_load, {"ids": chunk}).scalars():
                    instance = rows.instance(snapshot)
                    found[instance.id] = instance
            return found

        return await self._runner.read(run)

    async def find_by_key(self, definition: str, idempotency_key: str) -> SagaInstance | None:
        params = {"definition": definition, "key": idempotency_key}
        snapshot = await self._runner.read(lambda c: c.execute(_find_by_key, params).scalar_one_or_none())
        return None if snapshot is None else rows.instance(snapshot)

    async def seen(self, message_ids: Sequence[str]) -> set[str]:
        if not message_ids:
            return set()

        def run(connection: Connection) -> set[str]:
            found: set[str] = set()
            for chunk in writes.chunks(sorted(set(message_ids))):
                found.update(connection.execute(_seen, {"ids": chunk}).scalars())
            return found

        return await self._runner.read(run)

    async def timers_of(self, saga_id: str) -> list[TimerSpec]:
        """The timers table's rows and the step timeouts on the saga's row, soonest first."""

        def run(connection: Connection) -> list[TimerSpec]:
            found = [rows.timer(row) for row in connection.execute(_timers_of, {"saga_id": saga_id})]
            stored = connection.execute(_timeouts_of, {"saga_id": saga_id}).scalar_one_or_none()
            found += deadlines.decode(saga_id, stored)
            return sorted(found, key=lambda t: (t.due_at, t.id))

        return await self._runner.read(run)

    async def load_definition(self, name: str, version: int | None = None) -> SagaDefinition:
        statement = sa.select(definitions.c.body).where(definitions.c.name == name)
        if version is not None:
            statement = statement.where(definitions.c.version == version)
        statement = statement.order_by(definitions.c.version.desc()).limit(1)
        body = await self._runner.read(lambda c: c.execute(statement).scalar_one_or_none())
        if body is None:
            which = f"{name!r}" if version is None else f"{name!r} version {version}"
            raise UnknownDefinition(f"no stored definition {which}")
        return SagaDefinition.model_validate(body)

    async def list_instances(
        self,
        *,
        status: SagaStatus | None = None,
        definition: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[SagaInstance]:
        """Newest first (by creation time); `since` keeps the sagas created at or after it."""
        statement = sa.select(_snapshot)
        if status is not None:
            statement = statement.where(saga_instances.c.status == SagaStatus(status).value)
        if definition is not None:
            statement = statement.where(saga_instances.c.definition == definition)
        if since is not None:
            statement = statement.where(saga_instances.c.created_at >= since)
        statement = statement.order_by(saga_instances.c.created_at.desc(), saga_instances.c.id.desc()).limit(limit)
        snapshots = await self._runner.read(lambda c: c.execute(statement).scalars().all())
        return [rows.instance(snapshot) for snapshot in snapshots]

    async def count_by_status(self) -> dict[SagaStatus, int]:
        """Every status, zero included."""
        statement = sa.select(saga_instances.c.status, sa.func.count()).group_by(saga_instances.c.status)
        found = await self._runner.read(lambda c: c.execute(statement).all())
        counts = dict.fromkeys(SagaStatus, 0)
        for status, count in found:
            counts[SagaStatus(status)] = int(count)
        return counts

    async def query_instances(self, query: SagaQuery) -> list[SagaInstance]:
        return await self._runner.read(partial(queries.instances, query=query))

    async def count_instances(self, query: SagaQuery) -> int:
        return await self._runner.read(partial(queries.count, query=query))

    async def latest_definitions(self) -> list[SagaDefinition]:
        return await self._runner.read(queries.latest_definitions)

    async def count_by_definition(self) -> dict[tuple[str, SagaStatus], int]:
        return await self._runner.read(queries.count_by_definition)

    async def history(self, saga_id: str, *, after: int = 0, limit: int | None = None) -> list[HistoryRecord]:
        return await self._runner.read(partial(queries.history, saga_id=saga_id, after=after, limit=limit))

    async def dead_letters(self, *, limit: int = 100, include_replayed: bool = False) -> list[DeadLetter]:
        """Newest first."""
        statement = sa.select(dead_letters)
        if not include_replayed:
            statement = statement.where(dead_letters.c.replayed_at.is_(None))
        statement = statement.order_by(dead_letters.c.at.desc(), dead_letters.c.id).limit(limit)
        found = await self._runner.read(lambda c: c.execute(statement).all())
        return [rows.dead_letter(row) for row in found]

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """Raises UnknownDeadLetter (a LookupError) when there is no dead letter with that id."""
        statement = sa.select(dead_letters).where(dead_letters.c.id == dead_letter_id)
        row = await self._runner.read(lambda c: c.execute(statement).one_or_none())
        if row is None:
            raise UnknownDeadLetter(f"no dead letter {dead_letter_id!r}")
        return rows.dead_letter(row)

    # ---- observability (optional capabilities: Probe, Gauges) ---------------------------------------

    async def probe(self) -> None:
        """Raise StoreError unless the database answers and its schema is at the newest migration."""
        if not await self._runner.read(at_head):
            raise StoreError("the database schema is not at the newest migration (`sagas db upgrade`)",
                             retriable=False)

    async def gauges(self, now: float, stuck_after: float) -> StoreGauges:
        """Sagas by status (and the stuck ones) in one grouped query; outbox, timers and dead letters in another."""
        return await self._runner.read(partial(_gauges, now=now, stuck_after=stuck_after))


_ACTIVE = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)


def _gauges(connection: Connection, *, now: float, stuck_after: float) -> StoreGauges:
    i, o, t, d = saga_instances.c, outbox.c, timers.c, dead_letters.c
    stale = sa.case((sa.and_(i.status.in_(_ACTIVE), i.updated_at < now - stuck_after), 1), else_=0)
    by_status = dict.fromkeys(SagaStatus, 0)
    stuck = 0
    for status, count, stale_count in connection.execute(
        sa.select(i.status, sa.func.count(), sa.func.coalesce(sa.func.sum(stale), 0)).group_by(i.status)
    ):
        by_status[SagaStatus(status)] = int(count)
        stuck += int(stale_count)
    pending = sa.select(sa.func.count(), sa.func.min(o.created_at)).where(o.sent_at.is_(None)).subquery()
    # A saga whose step deadline is due counts as one timer, however many of its timeouts are due.
    due = (
        sa.select(sa.func.count()).select_from(timers).where(t.due_at <= now).scalar_subquery()
        + sa.select(sa.func.count()).select_from(saga_instances)
        .where(i.step_deadline.is_not(None), i.step_deadline <= now).scalar_subquery()
    )
    stored = sa.select(sa.func.count()).select_from(dead_letters).where(d.replayed_at.is_(None)).scalar_subquery()
    row = connection.execute(sa.select(*pending.c, due, stored)).one()
    return StoreGauges(by_status=by_status, stuck=stuck, outbox_pending=int(row[0]),
                       outbox_oldest_at=None if row[1] is None else float(row[1]), timers_due=int(row[2]),
                       dead_letters=int(row[3]))

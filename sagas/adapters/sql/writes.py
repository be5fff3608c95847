"""The write paths of `SqlStore`: a unit of work, claims, marks and purge, as synchronous Core functions.

Each function runs inside the transaction its runner opened, so raising rolls everything back. Statements are
built once (per dialect where they differ) rather than per call: building and cache-keying a Core statement
costs more than SQLite takes to run it.

A unit of work is a handful of statements whatever its size: each kind of row is written by one executemany (on
SQLite, multi-row statements of up to 64 rows each). Optimistic concurrency: every update is guarded by
``WHERE version = :expected``. On PostgreSQL the versions of the updated instances are read first ``FOR UPDATE``
(asyncpg's executemany reports no row count); on SQLite, whose ``BEGIN IMMEDIATE`` already excludes other writers,
the count of updated rows tells. A mismatch raises `ConcurrencyConflict`.
"""

from __future__ import annotations

import functools
import itertools
import operator
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.engine.interfaces import DBAPICursor

from sagas.adapters.sql import deadlines, rows
from sagas.adapters.sql.tables import (
    dead_letters,
    definitions,
    inbox,
    outbox,
    saga_events,
    saga_instances,
    timers,
)
from sagas.engine.ports import OutboxMessage, RetentionResult, UnitOfWork
from sagas.engine.state import SagaInstance, SagaStatus, TimerSpec
from sagas.errors import ConcurrencyConflict

CHUNK = 500
"""Ids per ``IN (...)`` list: far below SQLite's and asyncpg's bound-parameter limits."""

_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
"""SQLite has ``UPDATE ... FROM`` since 3.33.0; older libraries update row by row."""

ROWS_PER_INSERT = 64
"""Rows per multi-row INSERT or UPDATE on SQLite (at most 10 columns each: far below its 32,766 bound parameters)."""

_FINAL = (SagaStatus.COMPLETED.value, SagaStatus.COMPENSATED.value)
_IDS: sa.BindParameter[list[str]] = sa.bindparam("ids", expanding=True)

_insert_instances = saga_instances.insert()
_instance_versions = sa.select(saga_instances.c.id, saga_instances.c.version).where(saga_instances.c.id.in_(_IDS))
# Sorted and locked: two engines updating overlapping sagas lock them in the same order (no deadlock).
_instance_versions_locked = _instance_versions.order_by(saga_instances.c.id).with_for_update()
_update_instance = (
    sa.update(saga_instances)
    .where(saga_instances.c.id == sa.bindparam("b_id"), saga_instances.c.version == sa.bindparam("b_expected"))
    .values({name: sa.bindparam(name) for name in rows.UPDATED_COLUMNS})
)
_update_instance_timeouts = (
    sa.update(saga_instances)
    .where(saga_instances.c.id == sa.bindparam("b_id"), saga_instances.c.version == sa.bindparam("b_expected"))
    .values({name: sa.bindparam(name) for name in rows.UPDATED_TIMEOUT_COLUMNS})
)
_stored_timeouts = sa.select(saga_instances.c.id, saga_instances.c.step_timeouts).where(saga_instances.c.id.in_(_IDS))
_stored_timeouts_locked = _stored_timeouts.order_by(saga_instances.c.id).with_for_update()
_EDIT_COLUMNS = ("step_deadline", "step_timeouts", "b_id")
_edit_timeouts = (
    sa.update(saga_instances)
    .where(saga_instances.c.id == sa.bindparam("b_id"))
    .values(step_deadline=sa.bindparam("step_deadline"), step_timeouts=sa.bindparam("step_timeouts"),
            deadline_claimed_until=sa.null())
)
_insert_events = saga_events.insert()
_insert_outbox = outbox.insert()
_insert_inbox = inbox.insert()
_delete_timers = sa.delete(timers).where(timers.c.id.in_(_IDS))
_mark_sent = sa.update(outbox).where(outbox.c.id.in_(_IDS)).values(sent_at=sa.bindparam("at"), claimed_until=None)


_NOW: sa.BindParameter[float] = sa.bindparam("now")
_PENDING = (  # outbox rows to relay: not sent, not claimed by a live engine, older than the grace period
    outbox.c.sent_at.is_(None),
    sa.or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until <= _NOW),
    outbox.c.created_at < sa.bindparam("before"),
)
_DUE = (  # timers to fire: due, not claimed by a live engine
    timers.c.due_at <= sa.bindparam("due"),
    sa.or_(timers.c.claimed_until.is_(None), timers.c.claimed_until <= _NOW),
)
_DEADLINE_DUE = (  # instances with a step timeout to fire: due, not claimed by a live engine
    saga_instances.c.step_deadline.is_not(None),  # the partial index's condition, spelled out for SQLite's planner
    saga_instances.c.step_deadline <= sa.bindparam("due"),
    sa.or_(saga_instances.c.deadline_claimed_until.is_(None), saga_instances.c.deadline_claimed_until <= _NOW),
)
_any_pending = sa.select(outbox.c.seq).where(*_PENDING).limit(1)
_any_due = sa.select(timers.c.id).where(*_DUE).limit(1)
_any_deadline_due = sa.select(saga_instances.c.id).where(*_DEADLINE_DUE).limit(1)


@dataclass(frozen=True)
class _DialectStatements:
    insert_definition: sa.Executable
    insert_dead_letters: sa.Executable
    upsert_timers: sa.Executable
    claim_outbox: sa.Executable
    claim_timers: sa.Executable
    claim_deadlines: sa.Executable


@functools.cache
def _statements(dialect: str) -> _DialectStatements:
    """Statements whose SQL differs between SQLite and PostgreSQL (ON CONFLICT, SKIP LOCKED, ANY(ARRAY()))."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

    upsert = insert(timers)
    upsert = upsert.on_conflict_do_update(
        index_elements=[timers.c.id],
        set_={
            "saga_id": upsert.excluded.saga_id,
            "kind": upsert.excluded.kind,
            "step": upsert.excluded.step,
            "attempt": upsert.excluded.attempt,
            "due_at": upsert.excluded.due_at,
            "claimed_until": sa.null(),
        },
    )

    def picked(column: sa.Column[Any], pick: sa.Select[Any]) -> sa.ColumnElement[bool]:
        if dialect == "postgresql":
            # ARRAY(subquery) is an init plan evaluated once, so LIMIT and SKIP LOCKED apply exactly once (an
            # IN (subquery) may be planned as a join that rescans it and claims more than `limit` rows).
            return column == sa.any_(sa.func.array(pick.scalar_subquery()))
        return column.in_(pick)

    until: sa.BindParameter[float] = sa.bindparam("until")
    limit: sa.BindParameter[int] = sa.bindparam("limit")
    def claimable(
        column: sa.Column[Any], where: tuple[sa.ColumnElement[bool], ...], *order: sa.Column[Any]
    ) -> sa.Select[Any]:
        return sa.select(column).where(*where).order_by(*order).limit(limit).with_for_update(skip_locked=True)

    pending = claimable(outbox.c.seq, _PENDING, outbox.c.created_at, outbox.c.seq)
    due = claimable(timers.c.id, _DUE, timers.c.due_at, timers.c.id)
    deadlines_due = claimable(saga_instances.c.id, _DEADLINE_DUE, saga_instances.c.step_deadline, saga_instances.c.id)
    return _DialectStatements(
        insert_definition=insert(definitions).on_conflict_do_nothing(),
        insert_dead_letters=insert(dead_letters).on_conflict_do_nothing(),
        upsert_timers=upsert,
        claim_outbox=sa.update(outbox)
        .where(picked(outbox.c.seq, pending))
        .values(claimed_until=until)
        .returning(*outbox.c),
        claim_timers=sa.update(timers).where(picked(timers.c.id, due)).values(claimed_until=until).returning(*timers.c),
        claim_deadlines=sa.update(saga_instances)
        .where(picked(saga_instances.c.id, deadlines_due))
        .values(deadline_claimed_until=until)
        .returning(saga_instances.c.id, saga_instances.c.step_timeouts),
    )


def apply(connection: Connection, *, work: UnitOfWork, now: float, lease: float) -> None:
    """Write `work`. `now` stamps the `sent` messages; outbox rows of a `publishing` unit are claimed until
    `now + lease`. Step timeouts go on the instances' rows (`deadlines.py`), other timers to the timers table."""
    written = {i.id: i for i in work.inserts}
    written.update((u.id, u) for u in work.updates)  # successive versions of one saga: the last one
    timeouts = deadlines.plan(work.timers, work.cancel_timers, written)
    postgres = connection.dialect.name == "postgresql"
    if work.updates and postgres:
        # asyncpg reports no rowcount for executemany: read the versions under row locks first.
        stale = stale_updates(connection, work.updates, lock=True)
        if stale:
            raise ConcurrencyConflict(stale)
    stored = _timeouts_stored(connection, timeouts.needs_stored({i.id for i in work.inserts}), lock=postgres)
    values = timeouts.values(stored)
    if work.inserts:
        inserted = [
            rows.instance_values(i, version=1, timeouts=values.get(i.id, rows.NO_TIMEOUTS)) for i in work.inserts
        ]
        _executemany(connection, _insert_instances, rows.INSTANCE_COLUMNS, inserted)
    if work.updates:
        _update_instances(connection, work.updates, values)
    if work.history:
        _executemany(connection, _insert_events, rows.HISTORY_COLUMNS, list(map(rows.history_values, work.history)))
    if work.outbox:
        until = now + lease if work.publishing else None
        outbox_rows = [rows.outbox_values(message, until) for message in work.outbox]
        _executemany(connection, _insert_outbox, rows.OUTBOX_COLUMNS, outbox_rows)
    if work.inbox:
        _executemany(connection, _insert_inbox, rows.INBOX_COLUMNS, list(map(rows.inbox_values, work.inbox)))
    statements = _statements(connection.dialect.name)
    if work.dead_letters:
        # A poison message redelivered after a crash is dead-lettered again under the same id: keep the first.
        letters = list(map(rows.dead_letter_values, work.dead_letters))
        _executemany(connection, statements.insert_dead_letters, rows.DEAD_LETTER_COLUMNS, letters)
    # Cancels before sets: when one unit both cancels and sets an id, the timer stays (a stale timer is
    # ignored by `decide`; a lost one would leave a saga waiting forever).
    row_timers, row_cancels = timeouts.rows, timeouts.row_cancels
    if timeouts.elsewhere:
        more_timers, more_cancels = _edit_elsewhere(connection, timeouts.elsewhere, lock=postgres)
        row_timers, row_cancels = [*row_timers, *more_timers], [*row_cancels, *more_cancels]
    for chunk in chunks(sorted(set(row_cancels))):
        connection.execute(_delete_timers, {"ids": chunk})
    if row_timers:
        latest = {spec.id: spec for spec in row_timers}  # a multi-row upsert may not touch a row twice
        timer_rows = list(map(rows.timer_values, latest.values()))
        _executemany(connection, statements.upsert_timers, rows.TIMER_COLUMNS, timer_rows)
    if work.sent:
        mark_sent(connection, ids=work.sent, at=now)


def _timeouts_stored(connection: Connection, saga_ids: list[str], *, lock: bool) -> dict[str, str | None]:
    """The stored `step_timeouts` of these sagas (PostgreSQL: rows locked by the caller already, or here)."""
    found: dict[str, str | None] = {}
    statement = _stored_timeouts_locked if lock else _stored_timeouts
    for chunk in chunks(saga_ids):
        found.update((row.id, row.step_timeouts) for row in connection.execute(statement, {"ids": chunk}))
    return found


def _edit_elsewhere(
    connection: Connection, edits: dict[str, tuple[list[TimerSpec], set[str]]], *, lock: bool
) -> tuple[list[TimerSpec], list[str]]:
    """Step timeouts set or cancelled for sagas the unit does not write (a fired timeout that changed nothing is
    consumed): read, edited and written back on the saga's row, the claim cleared. What is left for the timers
    table: the timeouts of sagas that have no row (the store takes a timer for any saga id), and every cancelled
    id (such a timer may be a row)."""
    stored = _timeouts_stored(connection, sorted(edits), lock=lock)
    params = [(*deadlines.edited(saga_id, stored[saga_id], *edits[saga_id]), saga_id) for saga_id in sorted(stored)]
    if params:
        _executemany(connection, _edit_timeouts, _EDIT_COLUMNS, params)
    orphans = [spec for saga_id, (sets, _) in edits.items() if saga_id not in stored for spec in sets]
    return orphans, [timer for _, cancels in edits.values() for timer in cancels]


def _update_instances(
    connection: Connection, updates: Sequence[SagaInstance], timeouts: dict[str, tuple[float | None, str | None]]
) -> None:
    """The guarded updates; a saga in `timeouts` has its step timeout columns set too (one statement shape per
    group; all the versions of one saga fall in one group, in order). On PostgreSQL the caller checked the versions
    under row locks."""
    groups = (
        (_update_instance, rows.UPDATE_COLUMNS, [rows.update_values(u) for u in updates if u.id not in timeouts]),
        (
            _update_instance_timeouts,
            rows.UPDATE_TIMEOUT_COLUMNS,
            [rows.update_values(u, timeouts[u.id]) for u in updates if u.id in timeouts],
        ),
    )
    sqlite = connection.dialect.name == "sqlite"
    for statement, columns, params in groups:
        if not params:
            continue
        if not sqlite:
            _executemany(connection, statement, columns, params)
            continue
        # BEGIN IMMEDIATE excludes other writers and the rowcount is exact, so the guarded updates alone tell
        # whether every version matched; which ones did not is worked out after rollback.
        if _UPDATE_FROM and len({row[-2] for row in params}) == len(params):
            changed = _update_rows(connection, params, columns)
        else:  # successive versions of one saga: one statement each, in order
            changed = _executemany(connection, statement, columns, params)
        if changed != len(params):
            raise VersionMismatch


def _update_rows(connection: Connection, params: list[tuple[Any, ...]], columns: tuple[str, ...]) -> int:
    """SQLite: update instances (distinct ids) with ``UPDATE ... FROM (VALUES ...)``, in the groups `_insert_rows`
    inserts in; the number of rows changed. One statement step per group instead of one per row: each step gives
    the GIL back and waits for it again (see `_insert_rows`)."""
    cursor = connection.connection.cursor()
    changed, start, sql = 0, 0, ""
    try:
        for size in _group_sizes(len(params)):
            sql = _update_sql(size, columns)
            cursor.execute(sql, tuple(itertools.chain.from_iterable(params[start : start + size])))
            changed += cursor.rowcount
            start += size
    except sqlite3.Error as error:
        raise exc.DBAPIError.instance(sql, None, error, sqlite3.Error) from error
    finally:
        cursor.close()
    return changed


def _group_sizes(count: int) -> Iterator[int]:
    """`count` rows split as multi-row statements take them: 64 at a time, then the rest in power-of-two groups (so
    a handful of distinct statements, which sqlite3's statement cache keeps)."""
    yield from [ROWS_PER_INSERT] * (count // ROWS_PER_INSERT)
    rest, size = count % ROWS_PER_INSERT, ROWS_PER_INSERT // 2
    while rest:
        if rest >= size:
            yield size
            rest -= size
        size //= 2


@functools.lru_cache(maxsize=32)
def _update_sql(count: int, columns: tuple[str, ...] = rows.UPDATE_COLUMNS) -> str:
    """The update of `count` instances in one statement: parameters in the order of `columns` (the columns set,
    then ``b_id`` and ``b_expected``), row after row. It starts with UPDATE (no WITH clause), or Python's sqlite3
    does not count the rows it changed; the VALUES columns are SQLite's ``column1``, ``column2``..."""
    position = {name: f"v.column{i}" for i, name in enumerate(columns, start=1)}
    group = "(" + ", ".join(["?"] * len(position)) + ")"
    sets = ", ".join(f"{name} = {position[name]}" for name in columns[:-2])
    return (
        f"UPDATE saga_instances SET {sets} FROM (VALUES {', '.join([group] * count)}) AS v "
        f"WHERE saga_instances.id = {position['b_id']} AND saga_instances.version = {position['b_expected']}"
    )


def _executemany(
    connection: Connection, statement: sa.Executable, columns: tuple[str, ...], params: list[tuple[Any, ...]]
) -> int:
    """Run `statement` once per row of `params` (values in the order of `columns`); the number of rows it changed
    (SQLite only: -1 elsewhere).

    The statement is compiled once per dialect and its rows go to the driver as they are: SQLAlchemy's
    per-execution work (cache key, one parameter dict processed per row) costs several times what the database
    takes to run a small statement, and it is paid on every commit. Values must therefore be ready for the
    driver (JSON as `Encoded` text), which is how `rows` builds them. On SQLite they go straight to the sqlite3
    cursor; elsewhere through `exec_driver_sql`, which keeps SQLAlchemy's error handling (disconnects invalidate
    the connection). Driver errors are wrapped as SQLAlchemy's, like any other statement's.
    """
    dialect = connection.dialect
    sql, order = _driver_sql(statement, columns, type(dialect).__name__, dialect)
    rows = params if order is None else [order(row) for row in params]
    if dialect.name != "sqlite":
        return connection.exec_driver_sql(sql, rows).rowcount
    cursor = connection.connection.cursor()
    try:
        if not isinstance(statement, sa.Insert):
            cursor.executemany(sql, rows)
            return int(cursor.rowcount)
        return _insert_rows(cursor, sql, rows)
    except sqlite3.Error as error:
        raise exc.DBAPIError.instance(sql, None, error, sqlite3.Error) from error
    finally:
        cursor.close()



def _insert_rows(cursor: DBAPICursor, sql: str, rows: list[tuple[Any, ...]]) -> int:
    """Insert `rows` with multi-row ``INSERT ... VALUES (...), (...)`` statements: 64 rows at a time, then the rest
    in power-of-two groups (a handful of distinct statements, which the driver's statement cache keeps).

    The sqlite3 module releases the GIL around every step of a statement and takes it back afterwards: row by row,
    a commit of a few hundred events would ask for the GIL a thousand times, and each time the event loop's thread
    holds it, the writer waits for the interpreter's switch interval (5 ms). One step per 64 rows keeps the commit
    short when the event loop is busy.
    """
    chained = itertools.chain.from_iterable
    full = len(rows) - len(rows) % ROWS_PER_INSERT
    if full:
        groups = [tuple(chained(rows[i : i + ROWS_PER_INSERT])) for i in range(0, full, ROWS_PER_INSERT)]
        cursor.executemany(_multi_row(sql, ROWS_PER_INSERT), groups)
    start = full
    for size in _group_sizes(len(rows) - full):
        cursor.execute(_multi_row(sql, size), tuple(chained(rows[start : start + size])))
        start += size
    return len(rows)


@functools.lru_cache(maxsize=256)
def _multi_row(sql: str, rows: int) -> str:
    """`sql`, an INSERT of one row (``VALUES (?, ...)``), made an INSERT of `rows` rows."""
    if rows == 1:
        return sql
    head, values, rest = sql.partition(" VALUES ")
    group = rest[: rest.index(")") + 1]
    if not (values and group.startswith("(") and set(group[1:-1]) <= set("?, ")):
        raise ValueError(f"not a one-row INSERT: {sql}")
    return f"{head}{values}{', '.join([group] * rows)}{rest[len(group):]}"


def _driver_sql(
    statement: sa.Executable, columns: tuple[str, ...], kind: str, dialect: Dialect
) -> tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]] | None]:
    """The SQL of `statement` for rows of these columns on `dialect`, and how to reorder a row into the order its
    positional parameters take (None: they take the row's own order). Cached by the dialect's class and
    paramstyle (`kind` is the class's name), not by the dialect itself, of which every engine has its own."""
    key = (statement, columns, kind, dialect.paramstyle)
    found = _compiled.get(key)
    if found is None:
        found = _compiled[key] = _compile(statement, columns, dialect)
    return found


_compiled: dict[tuple[object, ...], tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]] | None]] = {}


def _compile(
    statement: sa.Executable, columns: tuple[str, ...], dialect: Dialect
) -> tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]] | None]:
    assert isinstance(statement, sa.ClauseElement)
    compiled = statement.compile(dialect=dialect, column_keys=list(columns))
    order = tuple(getattr(compiled, "positiontup", None) or ())
    assert order, f"{dialect.paramstyle!r} is not a positional paramstyle"
    missing = set(order) - set(columns)
    assert not missing, f"parameters {missing} have no value in the rows: bind constants with sa.null()/literal"
    if order == columns:
        return compiled.string, None
    getter = operator.itemgetter(*(columns.index(name) for name in order))
    if len(order) == 1:
        return compiled.string, lambda row: (getter(row),)
    return compiled.string, getter


class VersionMismatch(Exception):
    """Some update of a unit of work did not match its stored version (the transaction is rolled back)."""


def stale_updates(connection: Connection, updates: Sequence[SagaInstance], *, lock: bool = False) -> list[str]:
    """The ids among `updates` whose version is not the stored one, applying them in order (a unit may carry
    successive versions of one saga)."""
    stored: dict[str, int] = {}
    statement = _instance_versions_locked if lock else _instance_versions
    for chunk in chunks(sorted({u.id for u in updates})):
        stored.update((row.id, row.version) for row in connection.execute(statement, {"ids": chunk}))
    stale: list[str] = []
    for instance in updates:
        if stored.get(instance.id) != instance.version:
            stale.append(instance.id)
        else:
            stored[instance.id] = instance.version + 1
    return list(dict.fromkeys(stale))


def insert_definition(connection: Connection, *, row: dict[str, Any]) -> str:
    """Store a definition unless that name and version exist; the digest stored under them either way."""
    connection.execute(_statements(connection.dialect.name).insert_definition, [row])
    digest = connection.execute(
        sa.select(definitions.c.digest).where(
            definitions.c.name == row["name"], definitions.c.version == row["version"]
        )
    ).scalar_one()
    return str(digest)


def mark_sent(connection: Connection, *, ids: Sequence[str], at: float) -> None:
    for chunk in chunks(sorted(set(ids))):
        connection.execute(_mark_sent, {"ids": chunk, "at": at})


def any_pending_outbox(connection: Connection, *, before: float | None, now: float) -> bool:
    """Whether `claim_outbox` would claim a row. A read: an idle engine's polls must not take the write lock
    (SQLite) or lock rows (PostgreSQL)."""
    params = {"now": now, "before": _INFINITY if before is None else before}
    return connection.execute(_any_pending, params).first() is not None


def any_due_timer(connection: Connection, *, due: float, now: float) -> bool:
    """Whether `claim_timers` would claim a row or a step deadline (a read, as `any_pending_outbox`)."""
    params = {"now": now, "due": due}
    return (
        connection.execute(_any_due, params).first() is not None
        or connection.execute(_any_deadline_due, params).first() is not None
    )


def claim_outbox(
    connection: Connection, *, limit: int, before: float | None, now: float, lease: float
) -> list[OutboxMessage]:
    params = {
        "now": now,
        "until": now + lease,
        "limit": limit,
        "before": _INFINITY if before is None else before,
    }
    claimed = connection.execute(_statements(connection.dialect.name).claim_outbox, params).all()
    return [rows.outbox_message(row) for row in sorted(claimed, key=lambda r: (r.created_at, r.seq))]


def claim_timers(connection: Connection, *, due: float, limit: int, now: float, lease: float) -> list[TimerSpec]:
    """Claim up to `limit` due timers: rows of the timers table, then sagas whose step deadline is due (each
    saga's row is claimed as a whole; its timeouts due by `due` are returned), soonest first."""
    params = {"due": due, "now": now, "until": now + lease, "limit": limit}
    statements = _statements(connection.dialect.name)
    claimed = connection.execute(statements.claim_timers, params).all()
    found = [rows.timer(row) for row in claimed]
    if len(claimed) < limit:
        params["limit"] = limit - len(claimed)
        for row in connection.execute(statements.claim_deadlines, params):
            found.extend(spec for spec in deadlines.decode(row.id, row.step_timeouts) if spec.due_at <= due)
    return sorted(found, key=lambda t: (t.due_at, t.id))


_INFINITY = float("inf")


def purge(connection: Connection, *, older_than: float, dead_letters_before: float | None = None) -> RetentionResult:
    inbox_count = connection.execute(sa.delete(inbox).where(inbox.c.at < older_than)).rowcount
    outbox_count = connection.execute(
        sa.delete(outbox).where(outbox.c.sent_at.is_not(None), outbox.c.sent_at < older_than)
    ).rowcount
    finished = sa.select(saga_instances.c.id).where(
        saga_instances.c.status.in_(_FINAL), saga_instances.c.updated_at < older_than
    )
    history_count = connection.execute(sa.delete(saga_events).where(saga_events.c.saga_id.in_(finished))).rowcount
    connection.execute(sa.delete(timers).where(timers.c.saga_id.in_(finished)))
    instance_count = connection.execute(
        sa.delete(saga_instances).where(saga_instances.c.status.in_(_FINAL), saga_instances.c.updated_at < older_than)
    ).rowcount
    dead_count = 0
    if dead_letters_before is not None:
        # Replayed or not: a letter nobody acted on within its horizon is not going to be (docs/operations.md).
        dead_count = connection.execute(sa.delete(dead_letters).where(dead_letters.c.at < dead_letters_before)).rowcount
    return RetentionResult(inbox=inbox_count, outbox=outbox_count, history=history_count, instances=instance_count,
                           dead_letters=dead_count)


def conflicting_ids(connection: Connection, *, work: UnitOfWork) -> list[str]:
    """After an integrity error: the sagas whose rows already existed (or repeat within `work`)."""
    found: list[str] = []

    def existing(column: sa.Column[Any], values: Iterable[str]) -> set[str]:
        hits: set[str] = set()
        for chunk in chunks(sorted(set(values))):
            hits.update(connection.execute(sa.select(column).where(column.in_(chunk))).scalars())
        return hits

    instance_ids = existing(saga_instances.c.id, (i.id for i in work.inserts))
    found += [i.id for i in work.inserts if i.id in instance_ids]
    for instance in work.inserts:
        if (
            instance.idempotency_key is not None
            and connection.execute(
                sa.select(saga_instances.c.id).where(
                    saga_instances.c.definition == instance.definition,
                    saga_instances.c.idempotency_key == instance.idempotency_key,
                )
            ).first()
        ):
            found.append(instance.id)
    message_ids = existing(inbox.c.message_id, (r.message_id for r in work.inbox))
    found += [r.saga_id or r.message_id for r in work.inbox if r.message_id in message_ids]
    outbox_ids = existing(outbox.c.id, (m.id for m in work.outbox))
    found += [m.saga_id for m in work.outbox if m.id in outbox_ids]
    found += _repeated(work)
    if not found:  # not diagnosable after the fact: name every saga of the unit
        found = [i.id for i in work.inserts] + [r.saga_id or r.message_id for r in work.inbox]
        found += [m.saga_id for m in work.outbox]
    return list(dict.fromkeys(found))


def _repeated(work: UnitOfWork) -> list[str]:
    """Sagas whose unique values repeat inside the unit itself."""
    found: list[str] = []
    seen: set[object] = set()
    keyed: Iterable[tuple[object, str]] = [
        *((("instance", i.id), i.id) for i in work.inserts),
        *((("key", i.definition, i.idempotency_key), i.id) for i in work.inserts if i.idempotency_key is not None),
        *((("inbox", r.message_id), r.saga_id or r.message_id) for r in work.inbox),
        *((("outbox", m.id), m.saga_id) for m in work.outbox),
    ]
    for unique, saga_id in keyed:
        if unique in seen:
            found.append(saga_id)
        seen.add(unique)
    return found


def chunks(values: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(values), CHUNK):
        yield list(values[start : start + CHUNK])

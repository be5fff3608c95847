"""The reads behind operators' lists: filtered saga queries with keyset paging, counts, and paged history.

Every list is ordered by (created_at, id) descending and pages by keyset ("created before this saga"), never by
OFFSET, so the thousandth page costs what the first does: the indexes on (created_at), (status, created_at) and
(definition, created_at) serve the filters operators use most. An id prefix is a range on the primary key
(`id >= p AND id < p + U+FFFF`), which both databases answer from the index, unlike LIKE on SQLite.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from sagas.adapters.sql import rows
from sagas.adapters.sql.tables import definitions, saga_events, saga_instances
from sagas.definitions.model import SagaDefinition
from sagas.engine.ports import HistoryRecord, SagaQuery
from sagas.engine.state import SagaInstance, SagaStatus

_t = saga_instances.c
_snapshot = sa.cast(_t.snapshot, sa.Text)
_PREFIX_END = "\uffff"


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filtered(statement: sa.Select[Any], query: SagaQuery) -> sa.Select[Any]:
    if query.status is not None:
        statement = statement.where(_t.status == SagaStatus(query.status).value)
    if query.definition is not None:
        statement = statement.where(_t.definition == query.definition)
    if query.created_from is not None:
        statement = statement.where(_t.created_at >= query.created_from)
    if query.created_to is not None:
        statement = statement.where(_t.created_at < query.created_to)
    if query.updated_before is not None:
        statement = statement.where(_t.updated_at < query.updated_before)
    if query.key is not None:
        statement = statement.where(_t.idempotency_key == query.key)
    if query.id_prefix:
        statement = statement.where(_t.id >= query.id_prefix, _t.id < query.id_prefix + _PREFIX_END)
    if query.id_suffix:
        statement = statement.where(_t.id.like(f"%{_like_escaped(query.id_suffix)}", escape="\\"))
    if query.reason:
        failure = _t.snapshot["failure"].as_string()
        # Only sagas with a reason, newest first through (has_reason, created_at): a rare word no longer reads
        # every snapshot of a million sagas (bench/list_page.py).
        statement = statement.where(
            _t.has_reason == sa.true(), failure.ilike(f"%{_like_escaped(query.reason)}%", escape="\\"))
    return statement


def instances(connection: Connection, query: SagaQuery) -> list[SagaInstance]:
    statement = _filtered(sa.select(_snapshot), query)
    if query.before is not None:
        at, saga_id = query.before
        # Spelled out rather than a row-value comparison, with the redundant `created_at <= at` as a range the
        # index can seek to: without it SQLite scans the (status/definition, created_at) index from the newest
        # entry and filters, so a page deep in a million sagas took ~0.4 s (bench/list_page.py), ~0.1 ms with it.
        statement = statement.where(
            _t.created_at <= at, sa.or_(_t.created_at < at, sa.and_(_t.created_at == at, _t.id < saga_id)))
    statement = statement.order_by(_t.created_at.desc(), _t.id.desc()).limit(max(0, query.limit))
    return [rows.instance(snapshot) for snapshot in connection.execute(statement).scalars()]


def count(connection: Connection, query: SagaQuery) -> int:
    statement = _filtered(sa.select(sa.func.count()).select_from(saga_instances), query)
    return int(connection.execute(statement).scalar_one())


def count_by_definition(connection: Connection) -> dict[tuple[str, SagaStatus], int]:
    statement = sa.select(_t.definition, _t.status, sa.func.count()).group_by(_t.definition, _t.status)
    return {(name, SagaStatus(status)): int(n) for name, status, n in connection.execute(statement)}


def history(connection: Connection, saga_id: str, after: int, limit: int | None) -> list[HistoryRecord]:
    statement = sa.select(saga_events).where(saga_events.c.saga_id == saga_id)
    if after:
        statement = statement.where(saga_events.c.id > after)
    statement = statement.order_by(saga_events.c.id)
    if limit is not None:
        statement = statement.limit(max(0, limit))
    return [rows.history(row) for row in connection.execute(statement)]


def latest_definitions(connection: Connection) -> list[SagaDefinition]:
    """The highest stored version of every definition, by name."""
    d = definitions.c
    newest = sa.select(d.name, sa.func.max(d.version).label("version")).group_by(d.name).subquery()
    statement = (sa.select(d.body).join(newest, sa.and_(d.name == newest.c.name, d.version == newest.c.version))
                 .order_by(d.name))
    return [SagaDefinition.model_validate(body) for body in connection.execute(statement).scalars()]

"""What the HTTP API and the console do, over `SagaAdmin` (reads, replays, bulk retries) and the serving `Engine`.

Starts and repairs go through the engine when the server has one (`sagas serve --http`): the engine commits them
in its next batch and publishes their commands itself right after the commit, so a saga's first command does not
wait for the outbox relay. Without an engine (an app over a database only) they go through `SagaAdmin`, and the
relay of whichever engine serves the database publishes them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagas.engine.admin import SagaAdmin
from sagas.engine.ids import new_id
from sagas.engine.ports import DeadLetter, HistoryRecord, SagaQuery
from sagas.engine.state import OperatorCommand, SagaInstance, SagaStatus
from sagas.errors import InvalidInput, UnknownDefinition

if TYPE_CHECKING:
    from sagas.definitions.model import SagaDefinition
    from sagas.engine.runtime import Engine

PAGE_MAX = 500
HISTORY_PAGE = 200
STUCK_AFTER = 300.0
"""Seconds without a change after which a running saga is shown as stuck on the overview."""


def encode_cursor(instance: SagaInstance) -> str:
    raw = json.dumps([instance.created_at, instance.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        at, saga_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(at, int | float) or not isinstance(saga_id, str):
            raise TypeError
    except (ValueError, TypeError):
        raise InvalidInput(f"cursor {cursor[:40]!r} is not one this API handed out") from None
    return float(at), saga_id


@dataclass(frozen=True)
class Page:
    items: list[SagaInstance]
    next_cursor: str | None
    total: int | None


class Operations:
    def __init__(self, admin: SagaAdmin, engine: Engine | None = None) -> None:
        self.admin = admin
        self.engine = engine

    async def start(self, definition: str, input: dict[str, Any], key: str | None) -> tuple[SagaInstance, bool]:
        """(the saga, created?). The same key with the same input answers the existing saga; with another input
        it raises IdempotencyConflict."""
        engine = self.engine
        if engine is not None and _serves(engine, definition):
            saga_id = new_id()
            got = await engine.start_saga(definition, input, key=key, saga_id=saga_id)
            instance = engine.processor.remembered(got) or await self.admin.get(got)
            created = got == saga_id
        else:
            saga_id, created = await self.admin.start(definition, input, key=key)
            instance = await self.admin.get(saga_id)
        return instance, created

    async def operate(self, saga_id: str, command: OperatorCommand) -> SagaInstance:
        full_id = (await self.admin.get(saga_id)).id
        if self.engine is not None:
            return await self.engine.operate(full_id, command)
        return await self.admin.operate(full_id, command)

    async def page(self, query: SagaQuery, *, cursor: str | None, total: bool) -> Page:
        limit = max(1, min(query.limit, PAGE_MAX))
        before = decode_cursor(cursor) if cursor else None
        found = await self.admin.query(dataclasses.replace(query, before=before, limit=limit + 1))
        items = found[:limit]
        next_cursor = encode_cursor(items[-1]) if len(found) > limit else None
        count = await self.admin.count(query) if total else None
        return Page(items, next_cursor, count)

    async def history(self, saga_id: str, *, after: int, limit: int) -> tuple[list[HistoryRecord], int | None]:
        limit = max(1, min(limit, 5000))
        found = await self.admin.history(saga_id, after=after, limit=limit + 1)
        items = found[:limit]
        return items, (items[-1].seq if len(found) > limit else None)

    async def definition_of(self, instance: SagaInstance) -> SagaDefinition | None:
        try:
            return await self.admin.processor.definition(instance.definition, instance.definition_version)
        except UnknownDefinition:
            return None

    async def definitions(self) -> list[SagaDefinition]:
        return await self.admin.definitions()

    async def definition(self, name: str, version: int | None = None) -> SagaDefinition:
        return await self.admin.store.load_definition(name, version)

    async def dead_letters(self, *, limit: int, include_replayed: bool) -> list[DeadLetter]:
        return await self.admin.dead_letters(limit=max(1, min(limit, PAGE_MAX)), include_replayed=include_replayed)

    async def overview(self, *, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        store = self.admin.store
        counts = await store.count_by_definition()
        parked = await self.admin.query(SagaQuery(status=SagaStatus.FAILED, limit=20))
        stuck = [
            *await self.admin.query(SagaQuery(status=SagaStatus.RUNNING, updated_before=now - STUCK_AFTER, limit=10)),
            *await self.admin.query(
                SagaQuery(status=SagaStatus.COMPENSATING, updated_before=now - STUCK_AFTER, limit=10)),
        ]
        return {
            "counts": [{"definition": d, "status": s, "count": n} for (d, s), n in sorted(counts.items())],
            "parked": parked,
            "stuck": stuck,
            "dead_letters": len(await store.dead_letters(limit=1000)),
            "started_last_minute": await self.admin.count(SagaQuery(created_from=now - 60)),
            "started_last_hour": await self.admin.count(SagaQuery(created_from=now - 3600)),
        }


def _serves(engine: Engine, definition: str) -> bool:
    try:
        engine.registry.get(definition)
    except UnknownDefinition:
        return False
    return True

"""Operations on sagas straight against the database: what the CLI calls, and what a web console would call.

Writes go through the same `Processor` as the engine (one transaction: state, history, outbox, timers), checked by
the instance version, so they are safe while `sagas serve` runs; the serving engine's outbox relay publishes the
commands they produce.
"""

from __future__ import annotations

import builtins
import dataclasses
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sagas.definitions.model import SagaDefinition
from sagas.definitions.registry import DefinitionRegistry
from sagas.definitions.schema import validate_start
from sagas.engine.ids import new_id
from sagas.engine.ports import BrokerMessage, DeadLetter, HistoryRecord, SagaQuery, Store
from sagas.engine.processor import Item, ItemResult, OperatorItem, Processor, ReplyItem, StartItem
from sagas.engine.runtime import DEFAULT_REPLY_TOPIC
from sagas.engine.state import OperatorCommand, SagaInstance, SagaStatus, TimerSpec, evolve
from sagas.errors import AmbiguousSagaId, OperatorError, UnknownDefinition, UnknownSaga

SHORT_ID_MIN = 6
"""Characters a short id (the end or the start of a saga id) must have: fewer would match sagas by chance."""

BULK_MAX = 10_000
"""Sagas one bulk retry may touch: a filter that selects more must be narrowed (or run again)."""


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class SagaReport:
    """Everything an operator needs to understand one saga."""

    instance: SagaInstance
    history: list[HistoryRecord]
    timers: list[TimerSpec]


class SagaAdmin:
    def __init__(self, store: Store, *, reply_topic: str = DEFAULT_REPLY_TOPIC) -> None:
        self.store = store
        # Commands of one operator session: nothing worth remembering between them.
        self.processor = Processor(store, DefinitionRegistry(), reply_topic=reply_topic, known_max=0)

    async def _one(self, item: Item) -> ItemResult:
        result = (await self.processor.process([item], time.time())).results[0]
        if result.error is not None:
            raise result.error
        return result

    async def start(self, name: str, input: dict[str, Any], *, key: str | None = None) -> tuple[str, bool]:
        """Start a saga on the latest stored version of `name`. Returns (saga id, created?): the same key with the
        same input returns the saga it started, not created; with a different input it raises
        `IdempotencyConflict`. A malformed or oversized input or key raises `InvalidInput`; nothing is written."""
        definition = await self.store.load_definition(name)
        validate_start(definition, input, key=key)
        result = await self._one(StartItem(definition, new_id(), input, key))
        assert result.instance is not None
        return result.instance.id, result.outcome == "applied"

    async def get(self, saga_id: str) -> SagaInstance:
        """The saga with this id, or the one saga whose id ends with it (the short id `sagas list` shows) or
        begins with it; its steps in definition order."""
        found = (await self.store.load([saga_id])).get(saga_id)
        if found is not None:
            return (await self._in_definition_order([found]))[0]
        for query in (SagaQuery(id_suffix=saga_id, limit=3), SagaQuery(id_prefix=saga_id, limit=3)):
            matches = await self.store.query_instances(query) if len(saga_id) >= SHORT_ID_MIN else []
            if len(matches) > 1:
                shown = ", ".join(m.id for m in matches[:2])
                raise AmbiguousSagaId(f"{saga_id!r} is in the ids of several sagas ({shown}, ...): give more of it")
            if matches:
                return (await self._in_definition_order(matches))[0]
        raise UnknownSaga(f"no saga with id {saga_id!r}")

    async def show(self, saga_id: str, *, history_limit: int | None = None) -> SagaReport:
        instance = await self.get(saga_id)
        history = await self.store.history(instance.id, limit=history_limit)
        return SagaReport(instance, history, await self.store.timers_of(instance.id))

    async def history(self, saga_id: str, *, after: int = 0, limit: int = 100) -> builtins.list[HistoryRecord]:
        return await self.store.history(saga_id, after=after, limit=limit)

    async def query(self, query: SagaQuery) -> builtins.list[SagaInstance]:
        """The sagas `query` selects, each with its steps in definition order."""
        return await self._in_definition_order(await self.store.query_instances(query))

    async def count(self, query: SagaQuery) -> int:
        return await self.store.count_instances(query)

    async def definitions(self) -> builtins.list[SagaDefinition]:
        return await self.store.latest_definitions()

    async def bulk_retry(self, query: SagaQuery, *, expected: int, reason: str, operator: str) -> int:
        """Retry every parked saga `query` selects, if there are `expected` of them (the count the operator saw and
        confirmed); otherwise nothing is done and `OperatorError` says how many there are now. Returns how many
        were retried. A saga that moved on meanwhile is left as it is."""
        parked = dataclasses.replace(query, status=SagaStatus.FAILED, before=None, limit=BULK_MAX)
        found = await self.store.count_instances(parked)
        if found != expected:
            raise OperatorError(
                f"the filter selects {found} parked saga(s) now, not {expected}: check and confirm again"
            )
        if found > BULK_MAX:
            raise OperatorError(f"{found} sagas is more than one bulk retry takes ({BULK_MAX}): narrow the filter")
        retried = 0
        for instance in await self.store.query_instances(parked):
            command = OperatorCommand(action="retry", reason=reason, operator=operator)
            result = (await self.processor.process([OperatorItem(instance.id, command)], time.time())).results[0]
            retried += result.error is None and result.outcome == "applied"
        return retried

    async def list(
        self, *, status: SagaStatus | None = None, name: str | None = None, since: float | None = None,
        limit: int = 100,
    ) -> builtins.list[SagaInstance]:
        """Sagas newest first, each with its steps in definition order."""
        found = await self.store.list_instances(status=status, definition=name, since=since, limit=limit)
        return await self._in_definition_order(found)

    async def _in_definition_order(self, instances: builtins.list[SagaInstance]) -> builtins.list[SagaInstance]:
        """`instances` with their steps in the order of their definitions. Order is data: a snapshot keeps it, but
        one written to PostgreSQL's JSONB before migration 0003_order came back with its steps sorted by name length."""
        orders: dict[tuple[str, int], tuple[str, ...] | None] = {}
        ordered = []
        for instance in instances:
            identity = (instance.definition, instance.definition_version)
            if identity not in orders:
                try:
                    definition = await self.store.load_definition(*identity)
                except UnknownDefinition:  # nothing to order by: keep the stored order
                    orders[identity] = None
                else:
                    orders[identity] = tuple(step.name for step in definition.iter_steps())
            names = orders[identity]
            if names is not None and tuple(instance.steps) != names and set(names) == set(instance.steps):
                instance = evolve(instance, {"steps": {name: instance.steps[name] for name in names}})
            ordered.append(instance)
        return ordered

    async def operate(self, saga_id: str, command: OperatorCommand) -> SagaInstance:
        saga_id = (await self.get(saga_id)).id
        result = await self._one(OperatorItem(saga_id, command))
        assert result.instance is not None
        return result.instance

    async def dead_letters(self, *, limit: int = 100, include_replayed: bool = False) -> builtins.list[DeadLetter]:
        return await self.store.dead_letters(limit=limit, include_replayed=include_replayed)

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        return await self.store.dead_letter(dead_letter_id)

    async def replay(self, dead_letter_id: str) -> str:
        """Feed a dead-lettered reply to the engine again (after the cause was fixed). Returns the outcome:
        "applied", or "ignored" (the saga had moved on: the reply was late).

        The message gets a new id (`<id>/replay/<n>`), so the inbox does not mistake it for a duplicate and the
        history shows it was replayed. A dead letter replayed already is refused, so that its `replayed_at` keeps
        the replay that counted. A replay that is rejected again raises `OperatorError` with the reason; the dead
        letter stays in the list, not replayed (the rejected copy is kept as its own dead letter). A letter that
        kept only a prefix of its body is refused: replaying a part as the whole could apply a different reply.
        """
        dead = await self.store.dead_letter(dead_letter_id)
        if dead.truncated:
            raise OperatorError(
                f"dead letter {dead_letter_id!r} kept only the first {len(dead.message.value)} of its {dead.size} "
                "bytes; it cannot be replayed faithfully (`sagas dlq show --full FILE` writes what was kept)"
            )
        kind = dead.message.header("ce_sagakind")
        if kind in ("command", "compensation"):
            raise OperatorError(
                f"dead letter {dead_letter_id!r} is a {kind} the broker refused; it cannot be replayed (its saga's "
                "step follows its timeout and retry policy)"
            )
        if dead.replayed_at is not None:
            raise OperatorError(f"dead letter {dead_letter_id!r} was replayed already, at {_iso(dead.replayed_at)}")
        now = time.time()
        original = dead.message.header("ce_id") or dead.id
        new_id = f"{original}/replay/{int(now * 1000)}"
        headers = tuple((k, new_id.encode()) if k == "ce_id" else (k, v) for k, v in dead.message.headers)
        message = BrokerMessage(topic=dead.message.topic, value=dead.message.value, key=dead.message.key,
                                headers=headers)
        result = (await self.processor.process([ReplyItem(message)], now)).results[0]
        if result.error is not None:
            raise result.error  # not applied: it stays in the dead-letter list
        if result.outcome == "rejected":
            try:
                copy = await self.store.dead_letter(f"dl/{new_id}")
            except LookupError:  # malformed again: its copy is under an id of its own
                raise OperatorError(f"replay of {dead_letter_id!r} rejected again; see `sagas dlq list`") from None
            raise OperatorError(f"replay of {dead_letter_id!r} rejected: {copy.reason} (recorded as {copy.id!r})")
        await self.store.mark_replayed(dead_letter_id, now)
        return result.outcome

"""Apply a batch of events to the store in one transaction: the heart of the imperative shell.

The engine feeds batches from its service loop (group commit: concurrent sagas' events share one commit); the CLI
feeds batches of one (start, retry, abort, skip) straight to the database. Both go through `Processor.process`, so
there is one code path that reads instances, calls the pure `decide`, and writes state + history + outbox + inbox +
timers + dead letters atomically.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import pydantic_core
import structlog

from sagas.definitions.model import SagaDefinition
from sagas.definitions.registry import DefinitionRegistry
from sagas.engine import machine
from sagas.engine.ids import uuid7
from sagas.engine.ports import (
    NO_OBSERVER,
    BrokerMessage,
    DeadLetter,
    Delivery,
    HistoryRecord,
    InboxRecord,
    Observer,
    OutboxMessage,
    Store,
    UnitOfWork,
)
from sagas.engine.state import (
    Decision,
    HistoryEntry,
    OperatorCommand,
    ReplyReceived,
    SagaInstance,
    TimerFired,
    TimerSpec,
    evolve,
)
from sagas.engine.wire import (
    DEAD_LETTER_PREFIX,
    MAX_MESSAGE_ID_CHARS,
    MAX_SAGA_ID_CHARS,
    MalformedMessage,
    decode_reply,
    encode_command,
    reply_saga_id,
)
from sagas.errors import ConcurrencyConflict, IdempotencyConflict, OperatorError, UnknownDefinition, UnknownSaga

log = structlog.get_logger("sagas.engine")

CONFLICT_RETRIES = 3

T = TypeVar("T")


class Retry(Protocol):
    """How a caller retries a call that failed on the store (the engine: back off through an outage)."""

    async def __call__(self, call: Callable[[], Awaitable[T]], /) -> T: ...


@dataclass
class StartItem:
    definition: SagaDefinition
    saga_id: str
    input: dict[str, Any]
    key: str | None = None


@dataclass
class ReplyItem:
    message: BrokerMessage
    delivery: Delivery | None = None


@dataclass
class TimerItem:
    spec: TimerSpec


@dataclass
class OperatorItem:
    saga_id: str
    command: OperatorCommand

    def __post_init__(self) -> None:
        if self.command.command_id is None:  # one id for every attempt of this item: see `_already_applied`
            self.command = evolve(self.command, {"command_id": uuid7().hex})


Item = StartItem | ReplyItem | TimerItem | OperatorItem


@dataclass
class ItemResult:
    """What happened to one item: the saga it touched (if any), or the error to hand back to the caller."""

    instance: SagaInstance | None = None
    error: Exception | None = None
    outcome: str = "applied"


@dataclass
class BatchResult:
    results: list[ItemResult]
    published: list[OutboxMessage] = field(default_factory=list)
    """Outbox rows committed by this batch, to publish now."""
    settled: list[SagaInstance] = field(default_factory=list)
    unmarked: list[str] = field(default_factory=list)
    """Ids of `sent` that were not marked (every item kept conflicting): mark them with a later commit."""


@dataclass
class Prepared:
    """A batch decided but not yet committed: the unit of work and what it will mean once it is."""

    work: UnitOfWork
    results: list[ItemResult]
    written: dict[str, SagaInstance]
    """Each saga the unit inserts or updates, as it will be stored (with its next version)."""

    def outcome(self) -> BatchResult:
        settled = [r.instance for r in self.results if r.instance is not None and r.instance.status.is_settled]
        return BatchResult(self.results, self.work.outbox, settled)


DEFAULT_KNOWN_MAX = 10_000
DEAD_LETTER_MAX_BYTES = 64 * 1024
"""The default prefix of a dead letter's body that the store keeps (its size and SHA-256 are kept whole)."""
DEAD_LETTER_HEADER_BYTES = 16 * 1024
"""What a dead letter keeps of its headers' values, all together (names and values beyond it are cut)."""
_MAX_REASON = 1000
_MAX_HEADER_NAME = 200


class Processor:
    """Turns events into one unit of work per batch.

    It remembers the instances it wrote (at most `known_max`, the least recently written forgotten first, settled
    sagas as soon as they settle), so the next event of a saga is decided without reading the store. That is safe
    with other writers (engines of the same group, operators through the CLI): an update is checked against the
    version it was read at, and an event refused on a remembered instance writes it back unchanged so that the
    check covers refusals too. A conflict or a failed commit makes the processor forget and read again.
    """

    def __init__(
        self,
        store: Store,
        registry: DefinitionRegistry,
        *,
        reply_topic: str,
        known_max: int = DEFAULT_KNOWN_MAX,
        known_max_age: float | None = None,
        publishing: bool = False,
        observer: Observer | None = None,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
    ) -> None:
        """`publishing`: the caller publishes what a batch puts in the outbox right after the commit (the engine);
        otherwise (the CLI) the rows wait for a serving engine's relay. `dead_letter_max_bytes`: what a dead
        letter keeps of a message's body."""
        self.store = store
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.publishing = publishing
        self.observer: Observer = observer or NO_OBSERVER
        self.registry = registry
        self.reply_topic = reply_topic
        self.known_max = known_max
        self.known_max_age = known_max_age
        """Seconds after which a remembered instance is read again (the engine passes half its retention period:
        a margin for clocks). A saga another engine
        finished can be purged after it, and a new saga started under the same explicit id could then reach the
        remembered version: the version check alone would not tell them apart."""
        self._known: OrderedDict[str, SagaInstance] = OrderedDict()

    def remembered(self, saga_id: str) -> SagaInstance | None:
        """The running saga as this processor last wrote it, if it remembers it (never a settled one)."""
        return self._known.get(saga_id)

    def forget(self) -> None:
        """Drop every remembered instance: the store is the truth again."""
        self._known.clear()

    async def definition(self, name: str, version: int) -> SagaDefinition:
        try:
            return self.registry.get(name, version)
        except UnknownDefinition:
            definition = await self.store.load_definition(name, version)
            self.registry.register(definition)
            return definition

    async def process(
        self,
        items: Sequence[Item],
        now: float | Callable[[], float],
        sent: Sequence[str] = (),
        *,
        retry: Retry | None = None,
    ) -> BatchResult:
        """Apply `items` in one transaction, retrying on optimistic-concurrency conflicts.

        `now` is the time of the decisions, or a clock read again at every attempt. `retry` wraps every call
        that writes (the engine passes its outage policy: back off and call again). An item that keeps
        conflicting is isolated: the batch is then committed item by item, and a store failure half-way retries
        only the item it interrupted, never one already committed (a start committed and then tried again would
        be reported as a conflict to its caller).
        """
        clock: Callable[[], float] = now if callable(now) else lambda: now
        run: Retry = retry or _once
        outcome = await run(lambda: self._attempts(items, clock, sent))
        if outcome is not None:
            return outcome
        if len(items) == 1:
            error = ConcurrencyConflict([_saga_of(items[0]) or "?"])
            return BatchResult([ItemResult(error=error)], unmarked=list(sent))
        results: list[ItemResult] = []
        published: list[OutboxMessage] = []
        settled: list[SagaInstance] = []
        unmarked = list(sent)  # marked sent by the first item that commits
        for item in items:
            one = await run(functools.partial(self._attempts, [item], clock, unmarked))
            if one is None:
                results.append(ItemResult(error=ConcurrencyConflict([_saga_of(item) or "?"])))
                continue
            unmarked = []
            results.extend(one.results)
            published.extend(one.published)
            settled.extend(one.settled)
        # Every item kept conflicting: the caller marks them with its next commit.
        return BatchResult(results, published, settled, unmarked=unmarked)

    async def _attempts(
        self, items: Sequence[Item], clock: Callable[[], float], sent: Sequence[str]
    ) -> BatchResult | None:
        """Prepare and commit `items`, deciding again after each conflict; None when every attempt conflicted.

        A start that conflicts on its saga id is checked against the saga stored under it: when it is the same
        start (definition, input, key), that is this start committed before, by an attempt whose COMMIT went
        through but whose answer was lost (a connection cut during COMMIT, then retried), and it is reported as
        started rather than as a conflict.
        """
        conflicted: set[str] = set()
        for _ in range(CONFLICT_RETRIES):
            try:
                prepared = await self._prepare(items, clock(), sent, conflicted)
                await self._commit(prepared)
                return prepared.outcome()
            except ConcurrencyConflict as conflict:
                log.warning("batch conflicted; re-reading", saga_ids=list(conflict.saga_ids)[:10], items=len(items))
                conflicted.update(conflict.saga_ids)
                await asyncio.sleep(0)
        return None

    async def dead_letter(
        self, message: BrokerMessage, reason: str, now: float, *, sent: Sequence[str] = ()
    ) -> None:
        """Put a message the engine failed to process (or the broker refused) in the dead letters, under the id a
        rejection would give it, so a redelivery is kept once; `sent`: outbox ids to mark sent with it. No inbox
        record: a redelivery goes through processing again, and `sagas dlq replay` can apply it later."""
        work = UnitOfWork(sent=list(sent))
        self._dead_letter(work, message, reason, now, ItemResult(), record_id=message.header("ce_id"))
        began = time.monotonic()
        await self.store.commit(work)
        self._observe(work, time.monotonic() - began)

    async def _commit(self, prepared: Prepared) -> None:
        """Write a prepared unit and remember what it wrote. On a conflict, forget the sagas it names (the unit
        wrote nothing: every other remembered saga is as it was); on any other failure (which may even have
        committed, e.g. a connection lost during COMMIT), forget everything. Then raise."""
        began = time.monotonic()
        try:
            if prepared.work:
                await self.store.commit(prepared.work)
        except ConcurrencyConflict as conflict:
            for saga_id in conflict.saga_ids:
                self._known.pop(saga_id, None)
            raise
        except BaseException:
            self.forget()
            raise
        if prepared.work:
            self._observe(prepared.work, time.monotonic() - began)
        known = self._known
        for saga_id, instance in prepared.written.items():
            known.pop(saga_id, None)  # re-inserted at the end: least recently written first
            if not instance.status.is_settled:
                known[saga_id] = instance
        while len(known) > self.known_max:
            known.popitem(last=False)

    def _observe(self, work: UnitOfWork, seconds: float) -> None:
        try:
            self.observer.committed(work, seconds)
        except Exception:  # an observer must never fail a commit that went through
            log.exception("observer failed after a commit")

    async def _prepare(
        self, items: Sequence[Item], now: float, sent: Sequence[str], conflicted: Set[str] = frozenset()
    ) -> Prepared:
        """Read what `items` touch (remembered instances from memory), decide, and build the unit of work."""
        work = UnitOfWork(sent=list(sent), publishing=self.publishing)
        results = [ItemResult() for _ in items]
        decoded: dict[int, tuple[ReplyReceived, str]] = {}
        saga_ids: set[str] = set()
        operated: set[str] = set()
        debug = log.debug  # structlog's lazy proxy binds a logger on every attribute access: once per batch
        for index, item in enumerate(items):
            if isinstance(item, ReplyItem):
                try:
                    reply = decode_reply(item.message)
                except MalformedMessage as exc:
                    self._dead_letter(work, item.message, str(exc), now, results[index])
                    continue
                saga_id = reply_saga_id(item.message) or ""
                decoded[index] = (reply, saga_id)
                saga_ids.add(saga_id)
            elif isinstance(item, TimerItem):
                saga_ids.add(item.spec.saga_id)
            elif isinstance(item, OperatorItem):
                saga_ids.add(item.saga_id)
                operated.add(item.saga_id)

        known = self._known
        oldest = -float("inf") if self.known_max_age is None else now - self.known_max_age
        # Operator commands are rare and must not be refused on a remembered state: they read the store.
        instances: dict[str, SagaInstance] = {}
        for saga_id in saga_ids.difference(operated):
            instance = known.get(saga_id)
            if instance is None:
                continue
            if instance.updated_at < oldest:
                del known[saga_id]
            else:
                instances[saga_id] = instance
        remembered = set(instances)
        missing = sorted(saga_ids.difference(instances))
        seen: set[str] = set()
        if decoded and missing:
            # Both reads queue on the store's reader at once: one wake-up of its thread instead of two in a row.
            seen, loaded = await asyncio.gather(
                self.store.seen([r.message_id for r, _ in decoded.values()]), self.store.load(missing)
            )
            instances.update(loaded)
        elif decoded:  # one read (the common case: replies to remembered sagas) needs no tasks to gather
            seen = await self.store.seen([r.message_id for r, _ in decoded.values()])
        elif missing:
            instances.update(await self.store.load(missing))
        read_version = {saga_id: inst.version for saga_id, inst in instances.items()}
        created: dict[str, SagaInstance] = {}
        timers: dict[str, TimerSpec] = {}
        cancelled: set[str] = set()
        applied_ids: set[str] = set()
        dirty: set[str] = set()

        for index, item in enumerate(items):
            result = results[index]
            if result.outcome == "rejected":
                continue
            if isinstance(item, StartItem):
                decision = await self._start(item, now, created, result, recheck=item.saga_id in conflicted)
                if decision is None:
                    continue
                created[decision.instance.id] = decision.instance
                self._effects(work, decision, timers, cancelled, debug)
            elif isinstance(item, ReplyItem):
                reply, saga_id = decoded[index]
                if reply.message_id in seen or reply.message_id in applied_ids:
                    result.outcome = "ignored"
                    self._note(work, instances.get(saga_id), now, "message.duplicate", reply, "already applied")
                    continue
                applied_ids.add(reply.message_id)
                instance = instances.get(saga_id) or created.get(saga_id)
                if instance is None:
                    work.inbox.append(InboxRecord(reply.message_id, None, "rejected", now))
                    self._dead_letter(
                        work, item.message, f"unknown saga {saga_id!r}", now, result, record_id=reply.message_id
                    )
                    continue
                definition = await self.definition(instance.definition, instance.definition_version)
                decision = machine.decide(definition, instance, reply, now=now)
                work.inbox.append(InboxRecord(reply.message_id, saga_id, decision.outcome, now))
                if decision.outcome != "applied" and saga_id in remembered:
                    # Refused on a remembered state: write it back unchanged, so that the version check tells
                    # whether another writer moved it on (then this unit conflicts and is decided again).
                    dirty.add(saga_id)
                if decision.outcome == "rejected":
                    self._dead_letter(work, item.message, decision.reason or "rejected", now, result,
                                      record_id=reply.message_id, saga_id=saga_id)
                    self._note(work, instance, now, "message.rejected", reply, decision.reason)
                    continue
                if decision.outcome == "ignored":
                    result.outcome = "ignored"
                    result.instance = instance
                    self._note(work, instance, now, "message.ignored", reply, decision.reason)
                    log.info("reply ignored", saga_id=saga_id, step=reply.step, attempt=reply.attempt,
                             message_id=reply.message_id, reason=decision.reason)
                    continue
                self._apply(work, decision, instances, created, dirty, timers, cancelled, result, debug)
            elif isinstance(item, TimerItem):
                spec = item.spec
                cancelled.add(spec.id)  # a fired timer is consumed whatever the machine decides
                timers.pop(spec.id, None)
                instance = instances.get(spec.saga_id) or created.get(spec.saga_id)
                if instance is None:
                    result.outcome = "ignored"
                    continue
                definition = await self.definition(instance.definition, instance.definition_version)
                event = TimerFired(timer_id=spec.id, timer=spec.timer, step=spec.step, attempt=spec.attempt)
                decision = machine.decide(definition, instance, event, now=now)
                if decision.outcome != "applied":
                    result.outcome = decision.outcome
                    if spec.saga_id in remembered:
                        dirty.add(spec.saga_id)  # as for a refused reply
                    # Why a timer changed nothing is worth keeping (a deadline ignored after the pivot).
                    work.history.extend(HistoryRecord(spec.saga_id, entry) for entry in decision.history)
                    continue
                self._apply(work, decision, instances, created, dirty, timers, cancelled, result, debug)
            else:
                instance = instances.get(item.saga_id) or created.get(item.saga_id)
                if instance is None:
                    result.error = UnknownSaga(f"no saga with id {item.saga_id!r}")
                    continue
                definition = await self.definition(instance.definition, instance.definition_version)
                decision = machine.decide(definition, instance, item.command, now=now)
                if decision.outcome != "applied":
                    if await self._already_applied(item):
                        result.instance = instance
                        result.outcome = "ignored"
                        continue
                    result.error = OperatorError(f"saga {item.saga_id}: {decision.reason}")  # "cannot <action>: ..."
                    continue
                self._apply(work, decision, instances, created, dirty, timers, cancelled, result, debug)

        work.inserts = list(created.values())
        # Each changed saga is written once, with the version it was read at, however many events it took.
        work.updates = [evolve(instances[saga_id], {"version": read_version[saga_id]}) for saga_id in sorted(dirty)]
        work.timers = list(timers.values())
        work.cancel_timers = sorted(cancelled)
        written = {i.id: i if i.version == 1 else evolve(i, {"version": 1}) for i in work.inserts}
        for saga_id in dirty:
            written[saga_id] = evolve(instances[saga_id], {"version": read_version[saga_id] + 1})
        return Prepared(work, results, written)

    async def _already_applied(self, item: OperatorItem) -> bool:
        """Whether this very command is in the saga's history already: an earlier attempt of it committed, but
        its COMMIT's answer was lost (a connection cut), and it was tried again. Read only when the machine
        refuses an operator command, which is rare."""
        history = await self.store.history(item.saga_id)
        wanted = item.command.command_id
        return any(record.entry.detail.get("command_id") == wanted for record in history)

    async def _start(
        self, item: StartItem, now: float, created: dict[str, SagaInstance], result: ItemResult, *, recheck: bool
    ) -> Decision | None:
        if recheck:
            stored = (await self.store.load([item.saga_id])).get(item.saga_id)
            if stored is not None and _same_start(stored, item):
                result.instance = stored
                result.outcome = "ignored"
                return None
        if item.key is not None:
            existing = await self.store.find_by_key(item.definition.name, item.key)
            if existing is None:
                existing = next(
                    (i for i in created.values()
                     if i.definition == item.definition.name and i.idempotency_key == item.key),
                    None,
                )
            if existing is not None:
                if not _same_input(existing.input, item.input):
                    # Answering with the old saga would hide that this start's input was never used.
                    result.error = IdempotencyConflict(
                        f"idempotency key {item.key!r} already started saga {existing.id} of "
                        f"{item.definition.name!r} with a different input",
                        saga_id=existing.id,
                    )
                    return None
                result.instance = existing
                result.outcome = "ignored"
                return None
        # The instance is remembered after the commit: it must not share the caller's objects, which the caller
        # may change later. A JSON round trip also makes it exactly what the store holds.
        input = pydantic_core.from_json(pydantic_core.to_json(item.input))
        decision = machine.start(item.definition, saga_id=item.saga_id, input=input, now=now,
                                 idempotency_key=item.key)
        result.instance = decision.instance
        return decision

    def _apply(
        self,
        work: UnitOfWork,
        decision: Decision,
        instances: dict[str, SagaInstance],
        created: dict[str, SagaInstance],
        dirty: set[str],
        timers: dict[str, TimerSpec],
        cancelled: set[str],
        result: ItemResult,
        debug: Callable[..., Any],
    ) -> None:
        instance = decision.instance
        if instance.id in created:
            created[instance.id] = instance
        else:
            instances[instance.id] = instance
            dirty.add(instance.id)
        result.instance = instance
        self._effects(work, decision, timers, cancelled, debug)

    def _effects(
        self,
        work: UnitOfWork,
        decision: Decision,
        timers: dict[str, TimerSpec],
        cancelled: set[str],
        debug: Callable[..., Any],
    ) -> None:
        saga_id = decision.instance.id
        now = decision.instance.updated_at
        for entry in decision.history:
            work.history.append(HistoryRecord(saga_id, entry))
        outgoing = self.observer.outgoing
        for command in decision.commands:
            message = outgoing(command, encode_command(command, reply_topic=self.reply_topic, at=now))
            work.outbox.append(OutboxMessage(command.id, saga_id, message, now))
            debug("command", saga_id=saga_id, step=command.step, attempt=command.attempt,
                      message_id=command.id, kind=str(command.kind))
        for timer_id in decision.cancel_timers:
            timers.pop(timer_id, None)
            cancelled.add(timer_id)
        for timer in decision.timers:
            cancelled.discard(timer.id)
            timers[timer.id] = timer

    def _note(
        self, work: UnitOfWork, instance: SagaInstance | None, now: float, kind: str, reply: ReplyReceived,
        reason: str | None,
    ) -> None:
        if instance is None:
            return
        detail = {"message_id": reply.message_id, "type": reply.type, "reason": reason or ""}
        work.history.append(
            HistoryRecord(instance.id, HistoryEntry(at=now, type=kind, step=reply.step, attempt=reply.attempt,
                                                    detail=detail))
        )

    def _dead_letter(
        self,
        work: UnitOfWork,
        message: BrokerMessage,
        reason: str,
        now: float,
        result: ItemResult,
        *,
        record_id: str | None = None,
        saga_id: str | None = None,
    ) -> None:
        result.outcome = "rejected"
        # Whatever a malformed message carries must fit the dead letters' columns, or it could not even be kept.
        fits = record_id is not None and len(record_id) <= MAX_MESSAGE_ID_CHARS - len(DEAD_LETTER_PREFIX)
        fits = fits and _storable(record_id or "")
        dead_id = f"{DEAD_LETTER_PREFIX}{record_id if fits else uuid7()}"
        saga_id = saga_id or reply_saga_id(message)
        letter = bounded_letter(dead_id, reason, message, now, saga_id=saga_id, max_bytes=self.dead_letter_max_bytes)
        work.dead_letters.append(letter)
        log.warning("dead letter", reason=letter.reason[:300], topic=letter.message.topic,
                    message_id=(message.header("ce_id") or "")[:MAX_MESSAGE_ID_CHARS], saga_id=letter.saga_id,
                    size=letter.size, truncated=letter.truncated)


def bounded_letter(
    dead_id: str, reason: str, message: BrokerMessage, now: float, *, saga_id: str | None, max_bytes: int
) -> DeadLetter:
    """A dead letter that any store can hold whatever the message was: at most `max_bytes` of its body (with the
    whole body's size and SHA-256), headers cut to a bounded total and made storable (text names without NUL,
    bytes values), a key and saga id that fit their columns (or none), a reason of bounded length; no text that a
    store cannot keep (NUL, lone surrogates)."""
    value = message.value if isinstance(message.value, bytes) else bytes(message.value)
    size = message.size if message.size is not None else len(value)
    digest = hashlib.sha256(value).hexdigest() if size == len(value) else None  # a broker's prefix: never read whole
    headers, cut = _storable_headers(message.headers)
    key = message.key if isinstance(message.key, str) else None
    if key is not None and (len(key) > MAX_MESSAGE_ID_CHARS or not _storable(key)):
        key = None
    if not _storable(reason):
        reason = repr(reason)
    if saga_id is not None and (len(saga_id) > MAX_SAGA_ID_CHARS or not _storable(saga_id)):
        saga_id = None
    if cut:
        reason += " (headers cut to fit)"
    kept = BrokerMessage(topic=message.topic, value=value[: max(max_bytes, 0)], key=key, headers=headers)
    return DeadLetter(dead_id, reason[:_MAX_REASON], kept, now, saga_id=saga_id, size=size, sha256=digest)


def _storable(text: str) -> bool:
    """Whether every store can keep `text`: no NUL (PostgreSQL refuses it) and valid UTF-8 (no lone surrogate,
    which an in-process publisher can put in a str)."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _storable_headers(headers: Any) -> tuple[tuple[tuple[str, bytes], ...], bool]:
    """Headers as a store can keep them, within DEAD_LETTER_HEADER_BYTES; and whether anything was cut or
    changed to get there."""
    kept: list[tuple[str, bytes]] = []
    budget = DEAD_LETTER_HEADER_BYTES
    changed = False
    try:
        pairs = list(headers)
    except TypeError:
        return (), True
    for pair in pairs:
        try:
            name, value = pair
        except (TypeError, ValueError):
            changed = True
            continue
        if not isinstance(name, str) or not _storable(name) or len(name) > _MAX_HEADER_NAME:
            name = repr(name)[:_MAX_HEADER_NAME]  # repr escapes NUL and lone surrogates
            changed = True
        if not isinstance(value, bytes | bytearray | memoryview):
            value = repr(value)[:_MAX_HEADER_NAME].encode()
            changed = True
        value = bytes(value)
        if len(name) + len(value) > budget:
            changed = True
            if budget <= len(name):
                break
            value = value[: budget - len(name)]
        budget -= len(name) + len(value)
        kept.append((name, value))
    return tuple(kept), changed


def _same_start(stored: SagaInstance, item: StartItem) -> bool:
    """Whether `stored` is what `item` starts (the input compared as stored: after a JSON round trip)."""
    definition = item.definition
    return (
        (stored.definition, stored.definition_version, stored.idempotency_key)
        == (definition.name, definition.version, item.key)
        and _same_input(stored.input, item.input)
    )


def _same_input(stored: dict[str, Any], given: dict[str, Any]) -> bool:
    """Whether `given` is the input `stored` was started with, compared as stored (after a JSON round trip) and
    as JSON: `true` is not `1`, whatever Python's `True == 1` says; the order of keys does not matter."""
    canonical = functools.partial(json.dumps, sort_keys=True, separators=(",", ":"))
    return bool(canonical(stored) == canonical(pydantic_core.from_json(pydantic_core.to_json(given))))


async def _once(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


def _saga_of(item: Item) -> str | None:
    if isinstance(item, StartItem):
        return item.saga_id
    if isinstance(item, TimerItem):
        return item.spec.saga_id
    if isinstance(item, OperatorItem):
        return item.saga_id
    return reply_saga_id(item.message)


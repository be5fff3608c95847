"""The seams the engine owns: the broker, the store, and the observer, with the records that cross them.

Adapters implement them (`sagas.adapters` picks a broker or store from a URL; metrics and tracing are observers);
the engine never imports an adapter. Contract suites in `tests/contract/` run every implementation through the same
tests. Everything a third party needs to implement a seam is importable from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from sagas.definitions.model import SagaDefinition
from sagas.engine.state import HistoryEntry, OutgoingCommand, SagaInstance, SagaStatus, TimerSpec

Partition = tuple[str, int]
"""(topic, partition); a broker without partitions reports partition 0."""

# ---- broker -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerMessage:
    """A message as it travels: raw bytes, so that malformed input survives long enough to be dead-lettered.

    A broker that cannot decode what it read (a row whose headers are not JSON, a value of the wrong type, a body
    over its size limit) does not raise: it hands over what it could read, with `malformed` saying why, and the
    engine dead-letters it like any other message it cannot parse.
    """

    topic: str
    value: bytes
    key: str | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    malformed: str | None = None
    """Why the broker could not decode this message (None: it could)."""
    size: int | None = None
    """The body's full size in bytes when `value` holds only a prefix of it (a body over the broker's limit, never
    read whole); None when `value` is the whole body."""

    def header(self, name: str) -> str | None:
        """The first header `name` as text; None when absent. Never raises, whatever an in-process publisher put
        in the headers: it is read on every message, malformed ones included."""
        try:
            for key, value in self.headers:
                if key == name:
                    if isinstance(value, bytes | bytearray | memoryview):
                        return bytes(value).decode("utf-8", errors="replace")
                    return None
        except (TypeError, ValueError):  # headers that are not pairs
            return None
        return None


@dataclass(frozen=True)
class Delivery:
    """A consumed message and the broker's opaque token needed to acknowledge it."""

    message: BrokerMessage
    token: Any = None


class Consumer(Protocol):
    """Reads the topics it subscribed to, as one member of a consumer group (at-least-once)."""

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to `max_messages` deliveries; waits at most `timeout` seconds when none is ready."""
        ...

    async def commit(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries: they will not be delivered again to this group."""
        ...

    async def close(self) -> None:
        """Leave the group; fetched but uncommitted deliveries go to the next consumer of the group."""
        ...


class Broker(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, messages: Sequence[BrokerMessage]) -> None:
        """Publish in order; returns once the broker has durably accepted every message."""
        ...

    async def subscribe(self, topics: Sequence[str], group: str) -> Consumer: ...


@runtime_checkable
class TopicCreator(Protocol):
    """What a `Broker` with topics to create may also do (optional: the engine checks with isinstance, so a broker
    without it, such as the in-memory one or ``db://``, works as before).

    The engine calls it when it starts (and when a definition is deployed) with the command topic of every step of
    its definitions and its reply topic, so that a participant may subscribe before the first command is sent.
    """

    async def ensure_topics(self, names: Iterable[str]) -> None:
        """Create those of `names` that do not exist yet, with the broker's configured partitions; existing topics
        are left as they are."""
        ...


@runtime_checkable
class Probe(Protocol):
    """Optional capability of a store or broker: a cheap check that it is reachable and ready (`/readyz`)."""

    async def probe(self) -> None:
        """Return when usable; raise (a SagaError saying why) when not: unreachable, or (a store) a schema that is
        not at the newest migration."""
        ...


@runtime_checkable
class Checkpoints(Protocol):
    """Optional capability of a store: housekeeping kept off the commit path (SQLite's WAL checkpoints), which the
    engine calls from a supervised loop of its own every `CHECKPOINT_INTERVAL` seconds."""

    def needs_checkpoints(self) -> bool:
        """Whether this store has such housekeeping at all: when it has none (PostgreSQL), the engine runs no loop
        for it."""
        ...

    async def checkpoint(self) -> None:
        """Do what is due, if anything (cheap when nothing is); raise StoreError when the database fails."""
        ...


CHECKPOINT_INTERVAL = 0.1
"""Seconds between the engine's calls of `Checkpoints.checkpoint`."""


@runtime_checkable
class Backlog(Protocol):
    """Optional capability of a broker: how far a consumer group is behind, read when metrics are scraped."""

    async def backlog(self, topics: Sequence[str], group: str) -> dict[Partition, int]:
        """Messages of `topics` not yet committed by `group`, per (topic, partition): on Kafka the end offset minus
        the committed offset, in a queue the messages waiting."""
        ...


# ---- store --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxMessage:
    id: str
    saga_id: str
    message: BrokerMessage
    created_at: float


@dataclass(frozen=True)
class InboxRecord:
    message_id: str
    saga_id: str | None
    outcome: Literal["applied", "ignored", "rejected"]
    at: float


@dataclass(frozen=True)
class HistoryRecord:
    saga_id: str
    entry: HistoryEntry
    seq: int = 0  # assigned by the store, increasing per saga


@dataclass(frozen=True)
class DeadLetter:
    """A message the engine could not process, with why. `message.value` may hold only a prefix of its body (the
    engine keeps a bounded prefix): `size` and `sha256` describe the whole body, as it arrived."""

    id: str
    reason: str
    message: BrokerMessage
    at: float
    saga_id: str | None = None
    replayed_at: float | None = None
    size: int | None = None
    """The full body's size in bytes; None: the kept value is the whole body (filled in as its length)."""
    sha256: str | None = None
    """Hex SHA-256 of the full body; None when the body was never read whole (a broker's size limit)."""

    def __post_init__(self) -> None:
        value = self.message.value
        if self.size is None:
            object.__setattr__(self, "size", self.message.size if self.message.size is not None else len(value))
        if self.sha256 is None and self.size == len(value):
            object.__setattr__(self, "sha256", hashlib.sha256(value).hexdigest())

    @property
    def truncated(self) -> bool:
        """Whether only a prefix of the body was kept (such a letter cannot be replayed faithfully)."""
        return (self.size or 0) > len(self.message.value)


@dataclass
class UnitOfWork:
    """Everything one transaction writes. The store applies all of it or none of it."""

    inserts: list[SagaInstance] = field(default_factory=list)
    """New instances; stored with version 1."""
    updates: list[SagaInstance] = field(default_factory=list)
    """Changed instances carrying the version they were read at; stored with version + 1."""
    history: list[HistoryRecord] = field(default_factory=list)
    outbox: list[OutboxMessage] = field(default_factory=list)
    inbox: list[InboxRecord] = field(default_factory=list)
    timers: list[TimerSpec] = field(default_factory=list)
    cancel_timers: list[str] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    """Outbox ids published since the last commit, marked sent in this transaction."""
    publishing: bool = False
    """The committer publishes `outbox` itself right after the commit: the rows are stored claimed (for the
    store's lease), so that another engine's relay does not publish them too while that publish is slow."""

    def __bool__(self) -> bool:
        return any(
            (self.inserts, self.updates, self.history, self.outbox, self.inbox, self.timers,
             self.cancel_timers, self.dead_letters, self.sent)
        )


@dataclass(frozen=True)
class SagaQuery:
    """Which sagas to list, newest first (by creation time, then id), and from where: keyset paging.

    `before` is the (created_at, id) of the last saga of the previous page; the next page starts after it, so a
    page costs the same at the millionth saga as at the first (no OFFSET).
    """

    status: SagaStatus | None = None
    definition: str | None = None
    created_from: float | None = None
    created_to: float | None = None
    """Created at or after `created_from` and before `created_to`."""
    updated_before: float | None = None
    """Not changed since: running sagas that are stuck."""
    key: str | None = None
    reason: str | None = None
    """Text the saga's failure reason contains (case-insensitive)."""
    id_prefix: str | None = None
    id_suffix: str | None = None
    """The id ends with this: saga ids are UUIDv7, whose tail (random bits) tells sagas apart, not their head (the
    time). Answered by a scan of the id index, unlike a prefix."""
    before: tuple[float, str] | None = None
    limit: int = 100


@dataclass(frozen=True)
class RetentionResult:
    inbox: int
    outbox: int
    history: int
    instances: int
    dead_letters: int = 0


class Store(Protocol):
    async def initialize(self) -> None:
        """Bring the schema to the latest migration (alembic)."""
        ...

    async def close(self) -> None: ...

    async def commit(self, work: UnitOfWork) -> None:
        """Write `work` in one transaction. Raises ConcurrencyConflict (and writes nothing) when an update's
        version is not the stored one, or an insert's id or (definition, idempotency key) already exists."""
        ...

    async def load(self, saga_ids: Sequence[str]) -> dict[str, SagaInstance]: ...

    async def find_by_key(self, definition: str, idempotency_key: str) -> SagaInstance | None: ...

    async def seen(self, message_ids: Sequence[str]) -> set[str]:
        """Which of these message ids are already in the inbox."""
        ...

    async def pending_outbox(self, limit: int, created_before: float | None = None) -> list[OutboxMessage]:
        """Unsent outbox rows, oldest first. On PostgreSQL rows are claimed with FOR UPDATE SKIP LOCKED
        for a short lease so that several engines do not publish the same rows at once."""
        ...

    async def mark_sent(self, ids: Sequence[str], at: float) -> None: ...

    async def due_timers(self, now: float, limit: int) -> list[TimerSpec]:
        """Timers due at `now`, earliest first (claimed for a short lease on PostgreSQL)."""
        ...

    async def timers_of(self, saga_id: str) -> list[TimerSpec]: ...

    async def save_definition(self, definition: SagaDefinition) -> None:
        """Store a definition version. Same name+version with another digest raises DefinitionConflict."""
        ...

    async def load_definition(self, name: str, version: int | None = None) -> SagaDefinition:
        """A stored definition; the highest version when `version` is None. UnknownDefinition if absent."""
        ...

    async def list_instances(
        self,
        *,
        status: SagaStatus | None = None,
        definition: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[SagaInstance]:
        """Newest first."""
        ...

    async def count_by_status(self) -> dict[SagaStatus, int]: ...

    async def query_instances(self, query: SagaQuery) -> list[SagaInstance]:
        """The sagas `query` selects, newest first, at most `query.limit` of them."""
        ...

    async def count_instances(self, query: SagaQuery) -> int:
        """How many sagas `query` selects, ignoring its `before` and `limit`."""
        ...

    async def latest_definitions(self) -> list[SagaDefinition]:
        """The highest stored version of each definition, by name."""
        ...

    async def count_by_definition(self) -> dict[tuple[str, SagaStatus], int]:
        """Sagas per (definition name, status); combinations with none are left out."""
        ...

    async def history(self, saga_id: str, *, after: int = 0, limit: int | None = None) -> list[HistoryRecord]:
        """The saga's history in order, from the entry after sequence number `after`, at most `limit` entries."""
        ...

    async def dead_letters(self, *, limit: int = 100, include_replayed: bool = False) -> list[DeadLetter]: ...

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter: ...

    async def mark_replayed(self, dead_letter_id: str, at: float) -> None: ...

    async def purge(self, older_than: float, *, dead_letters_before: float | None = None) -> RetentionResult:
        """Delete inbox ids, sent outbox rows, and the history and snapshot of sagas that finished before
        `older_than`; and dead letters recorded before `dead_letters_before` (None keeps them all). Running and
        parked sagas are never touched."""
        ...


@dataclass(frozen=True)
class StoreGauges:
    """What the store holds right now, read in a bounded number of grouped queries (scraped metrics)."""

    by_status: dict[SagaStatus, int]
    stuck: int
    """Running or compensating sagas with no transition for longer than the threshold asked for."""
    outbox_pending: int
    outbox_oldest_at: float | None
    """Creation time of the oldest unpublished outbox message (None: none waits)."""
    timers_due: int
    dead_letters: int
    """Stored dead letters not replayed."""


@runtime_checkable
class Gauges(Protocol):
    """Optional capability of a store: the gauges metrics sample at scrape time."""

    async def gauges(self, now: float, stuck_after: float) -> StoreGauges: ...


# ---- observer ---------------------------------------------------------------------------------------


class Observer(Protocol):
    """Told what the engine did, after it is done. Every call is synchronous, on the event loop, and must be cheap
    and never raise (an observer that raises is logged and ignored, never allowed to stop a loop). Metrics and
    tracing are observers; `NO_OBSERVER` is the default and costs nothing. Implement one by subclassing
    `NoObserver` and overriding what you need: events added to this Protocol later then default to doing nothing."""

    def committed(self, work: UnitOfWork, seconds: float) -> None:
        """A unit of work was committed (history entries, outbox, inbox, dead letters...) in `seconds`."""
        ...

    def published(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        """These outbox messages were acknowledged by the broker, `seconds` after the publish began."""
        ...

    def outage(self, component: Literal["store", "broker"], down: bool) -> None:
        """The store or broker became unavailable (`down`) or available again."""
        ...

    def loop_failed(self, loop: str, error: BaseException) -> None:
        """A long-running loop failed unexpectedly and is being restarted."""
        ...

    def timers_fired(self, timers: Sequence[TimerSpec], now: float) -> None:
        """These due timers were queued to fire at `now` (their lateness is `now - due_at`)."""
        ...

    def fetched(self, deliveries: Sequence[Delivery]) -> None:
        """The engine's reply consumer fetched these deliveries."""
        ...

    def outgoing(self, command: OutgoingCommand, message: BrokerMessage) -> BrokerMessage:
        """Before the commit: the message that will carry `command` (stored in the outbox). Returns it, or a copy
        with headers added (tracing puts the trace context there); nothing else may change."""
        ...


class NoObserver:
    """The observer that observes nothing: the base class of observers (see `Observer`)."""

    def committed(self, work: UnitOfWork, seconds: float) -> None:
        pass

    def published(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        pass

    def outage(self, component: Literal["store", "broker"], down: bool) -> None:
        pass

    def loop_failed(self, loop: str, error: BaseException) -> None:
        pass

    def timers_fired(self, timers: Sequence[TimerSpec], now: float) -> None:
        pass

    def fetched(self, deliveries: Sequence[Delivery]) -> None:
        pass

    def outgoing(self, command: OutgoingCommand, message: BrokerMessage) -> BrokerMessage:
        return message


class Observers(NoObserver):
    """Tells every one of several observers (metrics and tracing together), in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def committed(self, work: UnitOfWork, seconds: float) -> None:
        for observer in self.observers:
            observer.committed(work, seconds)

    def published(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        for observer in self.observers:
            observer.published(messages, seconds)

    def outage(self, component: Literal["store", "broker"], down: bool) -> None:
        for observer in self.observers:
            observer.outage(component, down)

    def loop_failed(self, loop: str, error: BaseException) -> None:
        for observer in self.observers:
            observer.loop_failed(loop, error)

    def timers_fired(self, timers: Sequence[TimerSpec], now: float) -> None:
        for observer in self.observers:
            observer.timers_fired(timers, now)

    def fetched(self, deliveries: Sequence[Delivery]) -> None:
        for observer in self.observers:
            observer.fetched(deliveries)

    def outgoing(self, command: OutgoingCommand, message: BrokerMessage) -> BrokerMessage:
        for observer in self.observers:
            message = observer.outgoing(command, message)
        return message


NO_OBSERVER: Observer = NoObserver()

"""Helpers for writing participant services: idempotent command handlers and their replies.

    inventory = Participant("inventory")

    @inventory.command("ReserveInventory", business_errors=(OutOfStock,))
    async def reserve(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
        await tx.execute(...)            # the effect, in the same transaction as the dedup record
        return {"reservation_id": ...}

    @inventory.compensation("ReleaseInventory")
    async def release(command: CommandMessage, tx: AsyncConnection) -> dict[str, Any]: ...

    async with inventory.serve(broker=broker, database_url="sqlite+aiosqlite:///inventory.db"):
        ...

Guarantees:
- A command redelivered, or retried by the engine with a new attempt, returns the recorded reply without running
  the handler again: the dedup record is keyed by (saga, step, kind), not by message id, and is written in the
  same transaction as the handler's effect.
- A compensation that arrives before (or instead of) its command leaves a tombstone: the command, if it comes
  later, is answered with a failure and has no effect.
- A declared business exception becomes a failure reply (recorded: it is a definite answer); any other exception
  rolls the effect back and becomes a retryable reply (not recorded, so the retry runs the handler again).
- A compensation records only its success. The engine retries a failed compensation, and an operator's
  `sagas retry` sends it again after fixing the cause: the handler must run again, not answer the old failure.
- A batch is answered, replied and acknowledged as a whole; when any of it fails (the database, the broker), the
  same batch is tried again with backoff until it goes through (the dedup records make the second run answer
  what the first committed), so a reply is never left unsent while the worker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite
import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction, create_async_engine
from sqlalchemy.pool import StaticPool

from sagas.adapters import normalize_db_url
from sagas.adapters.sql.connection import is_retriable
from sagas.definitions.schema import has_nul
from sagas.engine.ports import Broker, BrokerMessage, Consumer, Delivery
from sagas.engine.state import MessageKind, Outcome
from sagas.engine.supervise import LoopHealth, probe_all
from sagas.engine.wire import (
    MAX_REASON_CHARS,
    CommandMessage,
    MalformedMessage,
    decode_command,
    encode_body,
    encode_reply,
)
from sagas.errors import SagaError

log = structlog.get_logger("sagas.participant")

RETRY_BACKOFF_MIN = 0.1
RETRY_BACKOFF_MAX = 5.0
"""Seconds between tries of a batch that failed (doubling from the first to the second)."""

Handler = Callable[[CommandMessage, AsyncConnection], Awaitable[dict[str, Any] | None]]

_metadata = sa.MetaData()
dedup_table = sa.Table(
    "participant_dedup",
    _metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("command_id", sa.String(300), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
)

_insert_dedup = dedup_table.insert()
_MAX_REPLY_TYPE: int = getattr(dedup_table.c.type.type, "length", None) or 0
"""A failure's reply type must fit the dedup record to be recorded."""


class BusinessFailure(Exception):
    """Raise from a handler to answer with a business failure: definite, not retried, nothing to undo."""

    def __init__(self, reason: str, data: dict[str, Any] | None = None, *, type: str | None = None) -> None:
        """`type`: the reply type, when the step declares its own failure types (default '<command>.failed')."""
        self.reason = reason
        self.data = data or {}
        self.type = type
        super().__init__(reason)


@dataclass(frozen=True)
class _Registration:
    handler: Handler
    kind: MessageKind
    business_errors: tuple[type[BaseException], ...]


@dataclass(frozen=True)
class _Answer:
    outcome: Outcome
    type: str
    data: dict[str, Any]
    reason: str | None = None


class Participant:
    """A participant service: command handlers, deduplicated in the participant's own database."""

    def __init__(
        self, name: str, *, topic: str | None = None, group: str | None = None, metadata: sa.MetaData | None = None
    ) -> None:
        """`metadata`: the participant's own tables, created beside the dedup table when the worker starts."""
        self.name = name
        self.metadata = metadata
        self.topic = topic or f"{name}.commands"
        self.group = group or f"{name}-participant"
        self._handlers: dict[str, _Registration] = {}
        self.stats = {"handled": 0, "deduplicated": 0, "failed": 0, "retryable": 0, "malformed": 0}

    def command(
        self, command_type: str, *, business_errors: Sequence[type[BaseException]] = ()
    ) -> Callable[[Handler], Handler]:
        return self._register(command_type, MessageKind.COMMAND, business_errors)

    def compensation(self, command_type: str) -> Callable[[Handler], Handler]:
        return self._register(command_type, MessageKind.COMPENSATION, ())

    def _register(
        self, command_type: str, kind: MessageKind, business_errors: Sequence[type[BaseException]]
    ) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            self._handlers[command_type] = _Registration(handler, kind, (BusinessFailure, *business_errors))
            return handler

        return decorate

    @contextlib.asynccontextmanager
    async def serve(
        self,
        *,
        broker: Broker,
        database_url: str = "sqlite+aiosqlite:///:memory:",
        batch_max: int = 256,
        http: str | None = None,
    ) -> AsyncIterator[ParticipantWorker]:
        """`http`: ``HOST:PORT`` to serve /metrics, /healthz and /readyz on while it runs (needs the http extra)."""
        worker = ParticipantWorker(self, broker, participant_database(database_url), batch_max=batch_max)
        await worker.start()
        server = None
        try:
            if http is not None:
                from sagas.web.server import participant_server

                server = await participant_server(worker, http)
                worker.http_url = server.url
            yield worker
        finally:
            if server is not None:
                await server.stop()
            await worker.stop()


def participant_database(url: str) -> AsyncEngine:
    """An async engine for a participant's own database. On SQLite: WAL, and BEGIN IMMEDIATE so that several
    processes sharing the file queue for the write lock instead of deadlocking."""
    url = normalize_db_url(url)
    if not url.startswith("sqlite"):
        return create_async_engine(url)
    parsed = make_url(url)
    memory = parsed.database in (None, "", ":memory:")
    options: dict[str, Any] = {"poolclass": StaticPool} if memory else {}
    if parsed.query:  # URL options (uri=true, mode=...) are the driver's business: connect the ordinary way
        engine = create_async_engine(url, connect_args={"timeout": 30}, **options)
    else:
        database = parsed.database or ":memory:"
        engine = create_async_engine(
            url, async_creator=lambda: _InlineConnection.open(database, timeout=30), **options
        )

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class _InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection that runs on the event loop's thread whatever cannot block.

    aiosqlite hands every call to its own thread; SQLAlchemy makes three calls per statement (cursor, execute,
    close), and each hop costs a thread switch (0.1 ms, and far more on a busy machine), which made a batch of
    commands ten times slower than its SQL. Inside a write transaction (``BEGIN IMMEDIATE`` holds the lock, WAL
    mode) a statement cannot wait for another connection, and ``synchronous=NORMAL`` appends to the WAL without
    fsync: it runs in microseconds on the caller's thread. So do creating and closing cursors, and the pool's
    ``rollback`` of a connection that has no transaction. What may block still goes to aiosqlite's thread:
    connecting, statements outside a transaction (``BEGIN IMMEDIATE`` waits for the write lock), ``COMMIT`` (may
    checkpoint), ``ROLLBACK`` of a transaction, and closing the connection.
    """

    @classmethod
    def open(cls, database: str, *, timeout: float) -> _InlineConnection:
        def connect() -> sqlite3.Connection:
            # check_same_thread: calls alternate between aiosqlite's thread and ours, never at the same time.
            return sqlite3.connect(database, timeout=timeout, check_same_thread=False)

        connection = cls(connect, iter_chunk_size=64)
        connection._thread.daemon = True  # as SQLAlchemy does for aiosqlite's own connections
        return connection

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._inline(fn):
            return fn(*args, **kwargs)
        return await super()._execute(fn, *args, **kwargs)  # type: ignore[no-untyped-call]  # aiosqlite's is untyped

    def _inline(self, fn: Callable[..., Any]) -> bool:
        connection = self._connection
        if connection is None or not self._running:
            return False
        in_transaction = connection.in_transaction
        name = getattr(fn, "__name__", "")
        if getattr(fn, "__self__", None) is connection:
            if name == "cursor":
                return True
            if name in ("commit", "rollback"):
                return not in_transaction  # nothing to end: a no-op
            if name == "close":
                return False
        elif name == "close":
            return True  # a cursor's: finalizes its statement
        return in_transaction


class ParticipantWorker:
    """The running loop of one participant: fetch a batch, handle it in one transaction, reply, acknowledge."""

    def __init__(self, participant: Participant, broker: Broker, db: AsyncEngine, *, batch_max: int) -> None:
        self.participant = participant
        self.broker = broker
        self.db = db
        self.batch_max = batch_max
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.http_url: str | None = None
        """Where `Participant.serve(http=...)` serves /metrics, /healthz and /readyz."""

    async def start(self) -> None:
        async with self.db.begin() as conn:
            await conn.run_sync(_metadata.create_all)
            await conn.run_sync(_add_missing_dedup_columns)
            if self.participant.metadata is not None:
                await conn.run_sync(self.participant.metadata.create_all)
        await self.broker.start()
        self._consumer = await self.broker.subscribe([self.participant.topic], self.participant.group)
        self._task = asyncio.ensure_future(self._loop())

    @property
    def healthy(self) -> bool:
        """The worker's loop runs."""
        return self._task is not None and not self._task.done()

    def health(self) -> dict[str, LoopHealth]:
        return {"worker": LoopHealth("worker", running=self.healthy)}

    async def ready(self, timeout: float = 2.0) -> dict[str, str | None]:
        """Whether the participant's database and the broker answer (None), or why not."""
        return await probe_all({"database": _DatabaseProbe(self.db), "broker": self.broker}, timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.close()
        await self.db.dispose()

    async def _loop(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                deliveries = await self._consumer.fetch(self.batch_max, timeout=0.5)
            except Exception:
                # A broker outage must not end the worker: it would stop answering without a word.
                log.exception("participant fetch failed; retrying", participant=self.participant.name)
                await asyncio.sleep(0.5)
                continue
            if deliveries:
                await self._answer(self._consumer, deliveries)

    async def _answer(self, consumer: Consumer, deliveries: Sequence[Delivery]) -> None:
        """Handle, reply to and acknowledge one batch, trying again until it goes through.

        A consumer does not deliver again what it handed out while it lives (only its group's next member does,
        after a restart or a rebalance), so giving up on a batch would leave its replies unsent until the engine's
        step timeout, or for ever. Handling again is safe: the dedup records answer what a committed run did.
        Replies already published are not published again; an acknowledgement that fails is tried on its own.
        A failure that is not an outage (the database refusing a value, a bug) would fail every try: the batch is
        then handled command by command, and a command that fails on its own is answered as retryable.
        """
        delay = RETRY_BACKOFF_MIN
        replies: list[BrokerMessage] | None = None
        apart = False
        while True:
            try:
                if replies is None:
                    answered = await (self._handle_apart(deliveries) if apart else self.handle(deliveries))
                    if answered:
                        await self.broker.publish(answered)
                    replies = answered
                await consumer.commit(deliveries)
                return
            except Exception as exc:
                if replies is None and not _transient(exc) and not apart:
                    log.error("participant batch failed; handling its commands one by one",
                              participant=self.participant.name, commands=len(deliveries), error=repr(exc))
                    apart = True
                    continue
                log.warning("participant batch failed; retrying", participant=self.participant.name,
                            stage="acknowledge" if replies is not None else "handle and reply",
                            commands=len(deliveries), error=repr(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX)

    async def _handle_apart(self, deliveries: Sequence[Delivery]) -> list[BrokerMessage]:
        """Each command in its own transaction, its reply published on its own. One that fails on its own, not
        for an outage (a value the database refuses, a reply the broker refuses, a bug), gets a retryable answer
        instead (not recorded, its effect rolled back): the engine's retry policy decides what follows. Returns
        nothing left to publish."""
        for delivery in deliveries:
            try:
                replies = await self.handle([delivery])
                if replies:
                    await self.broker.publish(replies)
            except Exception as exc:
                if _transient(exc):
                    raise
                try:
                    command = decode_command(delivery.message)
                except MalformedMessage:
                    continue  # handle() dropped it already
                self.participant.stats["retryable"] += 1
                log.error("command failed on its own; replying retryable", participant=self.participant.name,
                          saga_id=command.saga_id, step=command.step, attempt=command.attempt,
                          message_id=command.id, error=repr(exc))
                await self.broker.publish([encode_reply(
                    command, outcome=Outcome.RETRY, type=f"{command.type}.retry", data={},
                    source=self.participant.name, at=time.time(), reason=f"participant failed: {exc!r}"[:300],
                )])
        return []

    async def handle(self, deliveries: Sequence[Delivery]) -> list[BrokerMessage]:
        """Handle a batch in one transaction (a savepoint per command); return the replies to publish."""
        commands: list[CommandMessage] = []
        for delivery in deliveries:
            try:
                commands.append(decode_command(delivery.message))
            except MalformedMessage as exc:
                self.participant.stats["malformed"] += 1
                log.warning("malformed command dropped", participant=self.participant.name, reason=str(exc))
        if not commands:
            return []
        answers: list[tuple[CommandMessage, _Answer]] = []
        async with self.db.begin() as tx:
            keys = sorted({c.idempotency_key for c in commands} | {_compensation_key(c) for c in commands})
            driver = (await tx.get_raw_connection()).driver_connection
            inline = driver if isinstance(driver, _InlineConnection) else None
            recorded = await (_recorded_inline(inline, keys) if inline is not None else _recorded(tx, keys))
            records: list[tuple[str, str, str, str, Any, float, str | None]] = []
            at = time.time()
            for command in commands:
                answer = recorded.get(command.idempotency_key)
                if answer is not None:
                    self.participant.stats["deduplicated"] += 1
                else:
                    answer = await self._run(command, tx, recorded, inline)
                    if answer.outcome == Outcome.SUCCESS or (
                        answer.outcome == Outcome.FAILURE and command.kind == MessageKind.COMMAND
                    ):
                        recorded[command.idempotency_key] = answer
                        records.append((command.idempotency_key, command.id, str(answer.outcome), answer.type,
                                        answer.data, at, answer.reason))
                answers.append((command, answer))
            if records:
                # One statement for the batch, still in the transaction of the effects (and `recorded` already
                # answers repeats within the batch).
                if inline is not None:
                    rows = [(*record[:4], json.dumps(record[4]), *record[5:]) for record in records]
                    async with inline.executemany(_INSERT_DEDUP_SQL, rows):
                        pass
                else:
                    await tx.execute(
                        _insert_dedup, [dict(zip(_DEDUP_INSERT_COLUMNS, record, strict=True)) for record in records]
                    )
        now = time.time()
        return [
            encode_reply(command, outcome=a.outcome, type=a.type, data=a.data, source=self.participant.name, at=now,
                         reason=a.reason)
            for command, a in answers
        ]

    async def _run(
        self,
        command: CommandMessage,
        tx: AsyncConnection,
        recorded: dict[str, _Answer],
        inline: _InlineConnection | None,
    ) -> _Answer:
        registration = self.participant._handlers.get(command.type)
        if registration is None:
            self.participant.stats["failed"] += 1
            return _Answer(Outcome.FAILURE, f"{command.type}.failed", {}, f"no handler for {command.type!r}")
        if command.kind == MessageKind.COMMAND and _compensation_key(command) in recorded:
            # The compensation overtook the command: the saga has given up on this step, so it must not take effect.
            return _Answer(Outcome.FAILURE, f"{command.type}.failed", {}, "already compensated")
        savepoint = await _Savepoint.begin(tx, inline)
        try:
            data = await registration.handler(command, tx) or {}
            encode_body(data)  # a reply that cannot be sent must roll the effect back, not fail after the commit
        except registration.business_errors as exc:
            await savepoint.rollback()
            reason = exc.reason if isinstance(exc, BusinessFailure) else str(exc)
            extra = exc.data if isinstance(exc, BusinessFailure) else {}
            reply_type = (exc.type if isinstance(exc, BusinessFailure) else None) or f"{command.type}.failed"
            if len(reply_type) > _MAX_REPLY_TYPE or "\x00" in reply_type or has_nul(extra):
                # Recorded, it could not be stored (PostgreSQL): a bug of the handler, not a business answer.
                self.participant.stats["retryable"] += 1
                return _Answer(Outcome.RETRY, f"{command.type}.retry", {},
                               f"the handler's failure cannot be recorded (reply type {reply_type[:50]!r}...)")
            self.participant.stats["failed"] += 1
            return _Answer(Outcome.FAILURE, reply_type, extra, reason.replace("\x00", "\ufffd")[:MAX_REASON_CHARS])
        except Exception as exc:
            await savepoint.rollback()
            self.participant.stats["retryable"] += 1
            log.warning("handler raised; replying retryable", participant=self.participant.name,
                        saga_id=command.saga_id, step=command.step, attempt=command.attempt,
                        message_id=command.id, error=repr(exc))
            return _Answer(Outcome.RETRY, f"{command.type}.retry", {}, repr(exc)[:300])
        await savepoint.release()
        self.participant.stats["handled"] += 1
        return _Answer(Outcome.SUCCESS, f"{command.type}.succeeded", data)


@dataclass(frozen=True)
class _DatabaseProbe:
    db: AsyncEngine

    async def probe(self) -> None:
        async with self.db.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))


class _Savepoint:
    """The savepoint that rolls back one handler's effect and keeps the rest of the batch.

    On an `_InlineConnection` it is plain SQL on the driver connection: SQLAlchemy's nested transaction costs
    two executions through the async adapter (about 0.2 ms of CPU each) for two statements SQLite runs in
    microseconds. A handler that succeeds leaves its savepoint open rather than paying a RELEASE: savepoints of
    one name stack, ``ROLLBACK TO`` and ``RELEASE`` act on the innermost one, and COMMIT keeps them all. Savepoints
    the handler opens itself nest inside it either way.
    """

    NAME = "sagas_handler"

    def __init__(self, inline: _InlineConnection | None, nested: AsyncTransaction | None) -> None:
        self._inline = inline
        self._nested = nested

    @classmethod
    async def begin(cls, tx: AsyncConnection, inline: _InlineConnection | None) -> _Savepoint:
        if inline is None:
            return cls(None, await tx.begin_nested())
        await inline.execute(f"SAVEPOINT {cls.NAME}")
        return cls(inline, None)

    async def rollback(self) -> None:
        if self._nested is not None:
            await self._nested.rollback()
        elif self._inline is not None:
            await self._inline.execute(f"ROLLBACK TO {self.NAME}")
            await self._inline.execute(f"RELEASE {self.NAME}")

    async def release(self) -> None:
        if self._nested is not None:
            await self._nested.commit()


_DEDUP_INSERT_COLUMNS = tuple(column.name for column in dedup_table.columns)  # the order of `handle`'s records
_INSERT_DEDUP_SQL = (
    f"INSERT INTO {dedup_table.name} ({', '.join(_DEDUP_INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_DEDUP_INSERT_COLUMNS))})"
)
_KEYS_PER_SELECT = 500


async def _recorded(tx: AsyncConnection, keys: list[str]) -> dict[str, _Answer]:
    rows = (await tx.execute(sa.select(dedup_table).where(dedup_table.c.key.in_(keys)))).mappings().all()
    return {
        row["key"]: _Answer(Outcome(row["outcome"]), row["type"], row["data"], row["reason"]) for row in rows
    }


async def _recorded_inline(inline: _InlineConnection, keys: list[str]) -> dict[str, _Answer]:
    """`_recorded` in plain SQL on SQLite's own connection, inside the transaction: the same rows (the JSON column
    is text there, as SQLAlchemy's JSON type writes it) without SQLAlchemy's per-statement work, which cost more
    than the query."""
    recorded: dict[str, _Answer] = {}
    for start in range(0, len(keys), _KEYS_PER_SELECT):
        chunk = keys[start : start + _KEYS_PER_SELECT]
        marks = ", ".join("?" * len(chunk))
        sql = f"SELECT key, outcome, type, data, reason FROM {dedup_table.name} WHERE key IN ({marks})"
        async with inline.execute(sql, chunk) as cursor:
            for key, outcome, reply_type, data, reason in await cursor.fetchall():
                recorded[key] = _Answer(Outcome(outcome), reply_type, json.loads(data), reason)
    return recorded


def _add_missing_dedup_columns(connection: sa.Connection) -> None:
    """Bring a dedup table made by an earlier release up to date: its columns added since are all nullable.
    Replicas may start together: PostgreSQL's IF NOT EXISTS lets the second one through (SQLite's BEGIN IMMEDIATE
    already runs them one after the other, and the second sees the column)."""
    present = {column["name"] for column in sa.inspect(connection).get_columns(dedup_table.name)}
    guard = " IF NOT EXISTS" if connection.dialect.name == "postgresql" else ""
    for column in dedup_table.columns:
        if column.name not in present:
            kind = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f"ALTER TABLE {dedup_table.name} ADD COLUMN{guard} {column.name} {kind}")


def _transient(exc: BaseException) -> bool:
    """A failure that may pass by itself (the database or the broker unreachable, a lock): try the same again.
    The database's errors are told apart as the engine's store tells them (`is_retriable`)."""
    if isinstance(exc, SagaError):
        return bool(getattr(exc, "retriable", False))
    return is_retriable(exc)


def _compensation_key(command: CommandMessage) -> str:
    """The dedup key of the compensation of the same step: its presence is the tombstone."""
    return f"{command.saga_id}/{command.step}/{MessageKind.COMPENSATION}"

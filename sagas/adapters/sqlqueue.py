"""A durable queue in a SQL database: `SqlQueueBroker`.

It lets separate OS processes on one machine (the engine, participant services, the CLI) exchange messages
through a SQLite file, with no server to run. It also works on PostgreSQL. The semantics are those of the
other brokers (see `sagas.adapters.memory` for the summary):

* ``broker_messages`` is the log of every topic; ids increase in commit order within a topic.
* ``broker_groups`` holds, per (group, topic), the id of the last message the group committed, and a lease:
  the consumer that holds it (``holder``) and until when (``lease_until``, wall-clock seconds). One consumer
  per group owns a topic at a time, which keeps the messages of one key in order; other members of the group
  poll until the lease is released (`close`) or expires (the holder died: SIGKILL, power loss), then resume
  from the committed position. Messages fetched but not committed are thus delivered again.
* The lease is renewed by ``fetch`` and ``commit``. A consumer that calls neither for `lease` seconds is
  presumed dead; if it was only slow, its later commit is ignored and its messages are delivered again.
* Rows that every group subscribed to a topic has committed are deleted, as are rows older than `retention`
  (like Kafka's ``retention.ms``: a group that is never used again cannot make the table grow forever).

These tables belong to this transport, not to the engine's schema: they have their own migrations
(`sagas.adapters.sql.migrate.QUEUE`, run by `start` when the database is not at their head, or by
`sagas db upgrade --queue`). Connections come from `sagas.adapters.sql.connection`, with the store's SQLite
configuration (the queue often shares the store's file).
SQLite has no cross-process notification, so ``fetch`` polls (5 ms, doubling up to 50 ms); within one
process a ``publish`` wakes the waiting fetches at once. Lease times come from each process's clock: run the
processes on one machine (or with synchronized clocks).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    cast,
    delete,
    func,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import NullType

from sagas.adapters import normalize_db_url
from sagas.adapters.sql.connection import WRITE, open_async_engine
from sagas.adapters.sql.migrate import QUEUE, ensure_current
from sagas.engine.ports import BrokerMessage, Delivery
from sagas.engine.wire import MAX_MESSAGE_BYTES
from sagas.errors import BrokerError

__all__ = ["SqlQueueBroker", "SqlQueueConsumer", "metadata"]

metadata = MetaData()

messages_table = Table(
    "broker_messages",
    metadata,
    # AUTOINCREMENT on SQLite: ids must never be reused after rows are pruned, or cursors would skip messages.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("topic", String(255), nullable=False),
    Column("key", String(255), nullable=True),
    Column("headers", JSON, nullable=False),
    Column("value", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_broker_messages_topic_id", "topic", "id"),
    sqlite_autoincrement=True,
)

groups_table = Table(
    "broker_groups",
    metadata,
    Column("group_name", String(255), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("committed", BigInteger, nullable=False),
    Column("holder", String(64), nullable=True),
    Column("lease_until", Float, nullable=False),
)

_MIN_POLL, _MAX_POLL = 0.005, 0.05
_OVERSIZED_PREFIX = 64 * 1024
"""What a consumer reads of a value over the size limit: enough for a dead letter's prefix."""


def _normalize_url(url: str) -> str:
    url = normalize_db_url(url)
    in_memory = url.rstrip("/").endswith(":") or ":memory:" in url or "mode=memory" in url
    if url.startswith("sqlite") and in_memory:
        raise ValueError(f"{url!r}: in-memory SQLite is not shared between processes; use MemoryBroker")
    return url


def _encode_headers(headers: tuple[tuple[str, bytes], ...]) -> list[list[str]]:
    return [[name, base64.b64encode(value).decode("ascii")] for name, value in headers]


def _decode_headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    """The headers of a row as `_encode_headers` wrote them (the column read as raw text); ValueError saying what
    is wrong with them otherwise (a row written by anything but `publish`)."""
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw).decode()  # UnicodeDecodeError is a ValueError
    if not isinstance(raw, str):
        raise ValueError(f"headers are stored as {type(raw).__name__}, not JSON text")
    headers = json.loads(raw)
    if not isinstance(headers, list):
        raise ValueError(f"headers are a JSON {type(headers).__name__}, not a list of [name, base64] pairs")
    decoded = []
    for pair in headers:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str)):
            raise ValueError("a header is not a [name, base64 text] pair")
        decoded.append((pair[0], base64.b64decode(pair[1], validate=True)))  # binascii.Error is a ValueError
    return tuple(decoded)


def _decode_row(row: Any, max_bytes: int) -> BrokerMessage:
    """The message a row holds. Never raises: a row that cannot be decoded (written by anything but `publish`, or
    corrupted) becomes a message carrying what could be read and, in `malformed`, why the rest could not, which a
    consumer dead-letters instead of stalling on it."""
    problems: list[str] = []
    key = row.key
    if isinstance(key, bytes):  # SQLite's, read as bytes
        try:
            key = key.decode()
        except UnicodeDecodeError:
            problems.append("key is not UTF-8 text")
            key = None
    elif key is not None and not isinstance(key, str):
        problems.append(f"key is stored as {type(key).__name__}, not text")
        key = None
    try:
        headers = _decode_headers(row.headers)
    except (ValueError, RecursionError) as exc:
        problems.append(f"headers undecodable: {str(exc)[:200] or type(exc).__name__}")
        headers = ()
    value = row.value
    size = None
    if row.size is not None and row.size > max_bytes:
        # Only a prefix was read (see `_poll`): the body itself never left the database.
        problems.append(f"value of {row.size} bytes exceeds the limit of {max_bytes}")
        size = int(row.size)
    if isinstance(value, str):  # SQLite keeps what it was given: text where bytes belong
        problems.append("value is stored as text, not bytes")
        value = value.encode("utf-8", errors="replace")
    elif isinstance(value, bytearray | memoryview):
        value = bytes(value)
    elif not isinstance(value, bytes):
        problems.append(f"value is stored as {type(value).__name__}, not bytes")
        value = str(value).encode()
    if size is not None and size <= len(value):
        size = None
    malformed = "; ".join(problems) or None
    return BrokerMessage(topic=row.topic, key=key, headers=headers, value=value, malformed=malformed, size=size)


class SqlQueueBroker:
    """A `Broker` whose topics are rows in a SQL database (SQLite file or PostgreSQL).

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite+aiosqlite:///var/sagas.db`` or ``postgresql+asyncpg://...``
            (``sqlite:`` and ``postgresql:`` get the async driver). May be the engine store's database.
        lease: Seconds a consumer keeps a topic of its group without fetching or committing.
        retention: Seconds after which a message is deleted even if some group has not committed it;
            None keeps messages until every group has committed them.
        prune_interval: Least seconds between two deletions of committed rows (run by ``commit``).
        max_message_bytes: A message whose value is larger is not read whole: its consumer gets a prefix of it,
            marked `malformed` with its size (the engine dead-letters it).
    """

    def __init__(
        self,
        url: str,
        *,
        lease: float = 10.0,
        retention: float | None = 7 * 24 * 3600.0,
        prune_interval: float = 1.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.url = _normalize_url(url)
        self.lease = lease
        self.retention = retention
        self.prune_interval = prune_interval
        self.max_message_bytes = max_message_bytes
        self._engine: AsyncEngine | None = None
        self._writer: AsyncEngine | None = None
        self._wakeup = asyncio.Event()
        self._consumers: set[SqlQueueConsumer] = set()
        self._last_prune = 0.0

    def __repr__(self) -> str:
        return f"SqlQueueBroker({self.url!r})"

    @property
    def is_postgresql(self) -> bool:
        return self.url.startswith("postgresql")

    async def start(self) -> None:
        """Connect and migrate the queue's tables to their head if they are not there. Calling it again does
        nothing."""
        if self._engine is not None:
            return
        # begin=None: BEGIN IMMEDIATE on the writer (it takes the write lock up front, so a writer waits for the
        # busy timeout instead of failing with SQLITE_BUSY when it upgrades from a read lock), BEGIN for reads.
        engine = open_async_engine(self.url, begin=None)
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE: True})
        try:
            async with self._transaction(write=True) as conn:
                await conn.run_sync(ensure_current, QUEUE)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every consumer (releasing their leases) and the connection pool."""
        for consumer in list(self._consumers):
            await consumer.close()
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = self._writer = None
        self._wake()

    async def publish(self, messages: Sequence[BrokerMessage]) -> None:
        """Insert the messages in one transaction; returns once it is committed."""
        if not messages:
            return
        now = time.time()
        rows = []
        for message in messages:
            if not isinstance(message.value, bytes):
                raise TypeError(f"message value must be bytes, got {type(message.value).__name__}")
            if not message.topic:
                raise ValueError("topic name must not be empty")
            rows.append(
                {
                    "topic": message.topic,
                    "key": message.key,
                    "headers": _encode_headers(message.headers),
                    "value": message.value,
                    "created_at": now,
                }
            )
        async with self._transaction(write=True) as conn:
            if self.is_postgresql:
                # Serializes publishers per topic so that ids become visible in increasing order: a reader
                # must never see id 10 committed while id 9 is still in flight, or its cursor would skip 9.
                for topic in sorted({message.topic for message in messages}):
                    await conn.execute(
                        text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": "sagas.broker:" + topic}
                    )
            await conn.execute(messages_table.insert(), rows)
        self._wake()

    async def subscribe(self, topics: Sequence[str], group: str) -> SqlQueueConsumer:
        """A new member of `group` reading `topics`. A new group starts at the oldest message held."""
        if not topics:
            raise ValueError("subscribe needs at least one topic")
        topics = tuple(dict.fromkeys(topics))
        rows = [
            {"group_name": group, "topic": topic, "committed": 0, "holder": None, "lease_until": 0.0}
            for topic in topics
        ]
        dialect = postgresql if self.is_postgresql else sqlite
        async with self._transaction(write=True) as conn:
            await conn.execute(dialect.insert(groups_table).on_conflict_do_nothing(), rows)
        consumer = SqlQueueConsumer(self, topics, group)
        self._consumers.add(consumer)
        return consumer

    async def message_count(self, topic: str | None = None) -> int:
        """How many messages the table holds (of `topic`, or of all topics): to watch pruning."""
        query = select(func.count()).select_from(messages_table)
        if topic is not None:
            query = query.where(messages_table.c.topic == topic)
        async with self._transaction(write=False) as conn:
            return int((await conn.execute(query)).scalar_one())

    async def probe(self) -> None:
        """Raise BrokerError unless the queue's database answers."""
        async with self._transaction(write=False) as conn:
            await conn.execute(select(1))

    async def backlog(self, topics: Sequence[str], group: str) -> dict[tuple[str, int], int]:
        """Messages of each topic after `group`'s committed position (one partition per topic: partition 0)."""
        m, g = messages_table.c, groups_table.c
        query = (
            select(m.topic, func.count())
            .select_from(messages_table.join(groups_table, and_(g.topic == m.topic, g.group_name == group)))
            .where(m.topic.in_(list(topics)), m.id > g.committed)
            .group_by(m.topic)
        )
        async with self._transaction(write=False) as conn:
            found = {topic: int(count) for topic, count in (await conn.execute(query)).all()}
        return {(topic, 0): found.get(topic, 0) for topic in topics}

    # ---- internals shared with SqlQueueConsumer ----

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        engine = self._writer if write else self._engine
        if engine is None:
            raise BrokerError(f"{self!r} is not started (or closed)", retriable=False)
        try:
            async with engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            # Locked database, lost connection, server restart: the same call may work later.
            retriable = isinstance(exc, OperationalError) or exc.connection_invalidated
            raise BrokerError(f"{self!r}: {exc.orig or exc}", retriable=retriable) from exc

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def _prune(self, conn: AsyncConnection, topics: Sequence[str]) -> None:
        now = time.time()
        if now - self._last_prune < self.prune_interval:
            return
        self._last_prune = now
        m, g = messages_table.c, groups_table.c
        for topic in topics:
            low = select(func.min(g.committed)).where(g.topic == topic).scalar_subquery()
            await conn.execute(delete(messages_table).where(m.topic == topic, m.id <= low))
        if self.retention is not None:
            await conn.execute(delete(messages_table).where(m.created_at < now - self.retention))


@dataclass
class _Claim:
    """A topic this consumer holds the group's lease of, and what it fetched from it."""

    cursor: int
    """Id of the last message fetched (or of the group's committed position when nothing was fetched yet)."""
    fetched: OrderedDict[int, bool] = field(default_factory=OrderedDict)
    """Ids of the messages fetched and not yet committed, in id order, each with whether it was acked."""


@dataclass(frozen=True)
class _Token:
    holder: str
    id: int


_HOST = socket.gethostname()[:24]


def _died_here(holder: str) -> bool:
    """True when `holder` was a consumer process on this machine that no longer exists."""
    host, _, rest = holder.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


class SqlQueueConsumer:
    """One member of a consumer group of a `SqlQueueBroker`. Use `SqlQueueBroker.subscribe` to get one."""

    def __init__(self, broker: SqlQueueBroker, topics: tuple[str, ...], group: str) -> None:
        self._broker = broker
        self.topics = topics
        self.group = group
        # host:pid:random — the random part tells members apart, host and pid let a successor on the same machine
        # see at once that the holder died (SIGKILL) instead of waiting for its lease to run out.
        self.holder = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._claims: dict[str, _Claim] = {}
        self._lease_until = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"SqlQueueConsumer({self.holder[:8]}, group={self.group!r}, topics={list(self.topics)!r})"

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to `max_messages` new deliveries; polls for up to `timeout` seconds for the first one."""
        if self._closed:
            raise BrokerError(f"{self!r} is closed", retriable=False)
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        interval = _MIN_POLL
        while True:
            wakeup = self._broker._wakeup  # taken before reading, so that a publish during the read wakes us
            deliveries = await self._poll(max_messages)
            remaining = deadline - loop.time()
            if deliveries or self._closed or remaining <= 0:
                return deliveries
            try:
                async with asyncio.timeout(min(interval, remaining)):
                    await wakeup.wait()
            except TimeoutError:
                interval = min(interval * 2, _MAX_POLL)

    async def commit(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries.

        Deliveries this consumer no longer holds (its lease expired and another member took over, or it is
        closed) are skipped: they will be delivered again.
        """
        touched: set[str] = set()
        for delivery in deliveries:
            token = delivery.token
            claim = self._claims.get(delivery.message.topic)
            if not isinstance(token, _Token) or token.holder != self.holder or claim is None:
                continue
            if token.id in claim.fetched:
                claim.fetched[token.id] = True
                touched.add(delivery.message.topic)
        positions: dict[str, int] = {}
        for topic in touched:
            fetched = self._claims[topic].fetched
            while fetched and fetched[next(iter(fetched))]:
                positions[topic] = fetched.popitem(last=False)[0]
        if not positions:
            return
        g = groups_table.c
        until = time.time() + self._broker.lease
        async with self._broker._transaction(write=True) as conn:
            for topic, committed in positions.items():
                result = await conn.execute(
                    update(groups_table)
                    .where(g.group_name == self.group, g.topic == topic, g.holder == self.holder)
                    .values(committed=committed)
                )
                if result.rowcount == 0:  # another member took over: it redoes these messages
                    self._claims.pop(topic, None)
            # Renew every topic held, not only those committed: `_lease_until` stands for all of them, and a
            # topic left to expire would be taken by another member while this one still reads it.
            await conn.execute(
                update(groups_table)
                .where(g.group_name == self.group, g.holder == self.holder)
                .values(lease_until=until)
            )
            await self._broker._prune(conn, self.topics)
        self._lease_until = until

    async def close(self) -> None:
        """Release this consumer's leases: what it fetched and did not commit goes to the next member."""
        if self._closed:
            return
        self._closed = True
        self._broker._consumers.discard(self)
        if self._claims:
            await self._release()
        self._broker._wake()

    async def _release(self) -> None:
        self._claims.clear()
        g = groups_table.c
        try:
            async with self._broker._transaction(write=True) as conn:
                await conn.execute(
                    update(groups_table)
                    .where(g.group_name == self.group, g.holder == self.holder)
                    .values(holder=None, lease_until=0.0)
                )
        except BrokerError:
            pass  # the lease will expire instead

    async def _poll(self, max_messages: int) -> list[Delivery]:
        if self._closed:
            return []
        await self._claim()
        if self._closed:  # closed while claiming (a fetch woken by `close`): give back what the claim took
            if self._claims:
                await self._release()
            return []
        if not self._claims:
            return []
        m = messages_table.c
        limit = self._broker.max_message_bytes
        size = func.length(m.value)
        prefix = min(limit, _OVERSIZED_PREFIX)
        # Read raw, past SQLAlchemy's JSON and bytes processing and the drivers' decoding, any of which would raise
        # on a row that `publish` did not write (and fail the whole fetch, every time); and only a prefix of a value
        # over the limit, so that it is never copied. SQLite's columns hold any type: read them as bytes (text that
        # is not UTF-8 would fail in the driver); PostgreSQL's hold their declared type: read the JSON as text.
        raw = NullType()
        key: ColumnElement[Any]
        headers: ColumnElement[Any]
        if self._broker.is_postgresql:
            key, headers = m.key, cast(m.headers, Text)
        else:
            key, headers = cast(m.key, LargeBinary()), cast(m.headers, LargeBinary())
        query = (
            select(
                m.id, m.topic, type_coerce(key, raw).label("key"), type_coerce(headers, raw).label("headers"),
                size.label("size"),
                type_coerce(case((size <= limit, m.value), else_=func.substr(m.value, 1, prefix)), raw).label("value"),
            )
            .where(or_(*(and_(m.topic == t, m.id > c.cursor) for t, c in self._claims.items())))
            .order_by(m.id)
            .limit(max_messages)
        )
        async with self._broker._transaction(write=False) as conn:
            rows = (await conn.execute(query)).all()
        deliveries = []
        for row in rows:
            claim = self._claims[row.topic]
            claim.cursor = row.id
            claim.fetched[row.id] = False
            message = _decode_row(row, limit)
            deliveries.append(Delivery(message, _Token(self.holder, row.id)))
        return deliveries

    async def _claim(self) -> None:
        """Renew our leases when half used, and take the topics of our group that nobody holds."""
        now = time.time()
        renew = bool(self._claims) and now > self._lease_until - self._broker.lease / 2
        g = groups_table.c
        mine = and_(g.group_name == self.group, g.topic.in_(self.topics))
        claimable = or_(g.holder.is_(None), g.holder == self.holder, g.lease_until < now)
        if not renew:
            if len(self._claims) == len(self.topics):
                return
            async with self._broker._transaction(write=False) as conn:  # a read: idle members poll cheaply
                rows = (await conn.execute(select(g.topic, g.holder, g.lease_until).where(mine))).all()
            free = {t for t, holder, until in rows if holder is None or holder == self.holder or until < now}
            dead = {holder for _, holder, until in rows
                    if holder and holder != self.holder and until >= now and _died_here(holder)}
            if not free - set(self._claims) and not dead:
                return
            if dead:
                claimable = or_(claimable, g.holder.in_(dead))
        until = now + self._broker.lease
        held_by_me = select(g.topic, g.committed).where(mine, g.holder == self.holder)
        async with self._broker._transaction(write=True) as conn:
            kept = set((await conn.execute(held_by_me)).scalars().all())
            await conn.execute(
                update(groups_table).where(mine, claimable).values(holder=self.holder, lease_until=until)
            )
            held = (await conn.execute(held_by_me)).all()
        self._lease_until = until
        claims = {}
        for topic, committed in held:
            # A topic held all along keeps its cursor; one (re)taken starts over from the committed position.
            previous = self._claims.get(topic) if topic in kept else None
            claims[topic] = previous or _Claim(cursor=committed)
        self._claims = claims  # topics we lost are dropped: their deliveries are abandoned

"""An in-process broker for tests and single-process use: `MemoryBroker`.

It has the semantics of the real brokers, scaled down (see `sagas.engine.ports.Consumer`):

* Each topic is an ordered log. Each consumer group keeps, per topic, a committed position; a new group
  starts at the oldest message still held (like Kafka's ``auto_offset_reset="earliest"``).
* Within a group, one consumer at a time owns a topic (like a Kafka partition). Other consumers of the group
  that subscribe to the same topic wait until the owner closes, then take over from the committed position.
  This is what keeps the messages of one key in order.
* ``fetch`` returns the messages after those this consumer already fetched; ``commit`` acknowledges
  deliveries. The committed position only moves over an unbroken run of acknowledged messages, so a message
  committed out of order may be delivered again later: delivery is at least once, never at most once.
* When a consumer closes, what it fetched but did not commit goes to the next consumer of the group.
* Every group gets every message of its topics. A message is dropped from memory once every group subscribed
  to its topic has committed it; a topic that no group has subscribed to yet keeps everything.

Nothing here sleeps: ``fetch`` waits on an `asyncio.Condition` that ``publish`` and ``close`` notify.

Example::

    broker = MemoryBroker()
    await broker.start()
    consumer = await broker.subscribe(["orders"], group="billing")
    await broker.publish([BrokerMessage(topic="orders", key="o-1", value=b"{}")])
    deliveries = await consumer.fetch(max_messages=10, timeout=1.0)
    await consumer.commit(deliveries)
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from sagas.engine.ports import BrokerMessage, Delivery
from sagas.errors import BrokerError

__all__ = ["MemoryBroker", "MemoryConsumer"]


@dataclass
class _Position:
    """Where one group stands on one topic."""

    committed: int
    """Offset of the first message not yet acknowledged by the group."""
    owner: MemoryConsumer | None = None


@dataclass
class _Topic:
    entries: deque[BrokerMessage] = field(default_factory=deque)
    base: int = 0
    """Offset of ``entries[0]``; offsets below it were trimmed."""
    groups: dict[str, _Position] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.base + len(self.entries)

    def trim(self) -> None:
        """Forget the messages that every group has committed."""
        if not self.groups:
            return
        low = min(position.committed for position in self.groups.values())
        while self.base < low and self.entries:
            self.entries.popleft()
            self.base += 1


@dataclass
class _Ownership:
    """What a consumer has fetched from a topic it owns and not yet committed."""

    cursor: int
    """Offset of the next message to fetch."""
    acked: set[int] = field(default_factory=set)
    """Acknowledged offsets above the group's committed position."""


@dataclass(frozen=True)
class _Token:
    consumer: int
    offset: int


class MemoryBroker:
    """A `Broker` that lives in this process's memory.

    Args:
        name: Shown in ``repr`` and errors, handy when a test uses several brokers.
    """

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self._topics: dict[str, _Topic] = {}
        self._changed = asyncio.Condition()
        self._consumers: set[MemoryConsumer] = set()
        self._ids = itertools.count(1)
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryBroker({self.name!r})"

    async def start(self) -> None:
        """Nothing to connect to; present for the `Broker` protocol."""

    async def close(self) -> None:
        """Close every consumer. Fetches waiting on them return what they have (usually nothing)."""
        for consumer in list(self._consumers):
            await consumer.close()
        self._closed = True
        async with self._changed:
            self._changed.notify_all()

    async def publish(self, messages: Sequence[BrokerMessage]) -> None:
        """Append the messages to their topics, in order. They are visible to consumers on return."""
        self._check_open()
        for message in messages:
            if not isinstance(message.value, bytes):
                raise TypeError(f"message value must be bytes, got {type(message.value).__name__}")
        async with self._changed:
            for message in messages:
                self._topic(message.topic).entries.append(message)
            self._changed.notify_all()

    async def subscribe(self, topics: Sequence[str], group: str) -> MemoryConsumer:
        """A new member of `group` reading `topics`. The group starts at the oldest message held."""
        self._check_open()
        if not topics:
            raise ValueError("subscribe needs at least one topic")
        for name in topics:
            topic = self._topic(name)
            topic.groups.setdefault(group, _Position(committed=topic.base))
        consumer = MemoryConsumer(self, next(self._ids), tuple(dict.fromkeys(topics)), group)
        self._consumers.add(consumer)
        return consumer

    # ---- introspection for tests ----

    def pending(self, topic: str) -> int:
        """How many messages of `topic` are still held (not yet committed by every group)."""
        return len(self._topics[topic].entries) if topic in self._topics else 0

    def lag(self, topic: str, group: str) -> int:
        """How many messages of `topic` the group has not committed yet."""
        state = self._topics.get(topic)
        if state is None or group not in state.groups:
            return 0
        return state.end - state.groups[group].committed

    async def probe(self) -> None:
        """Raise BrokerError once closed."""
        self._check_open()

    async def backlog(self, topics: Sequence[str], group: str) -> dict[tuple[str, int], int]:
        """`lag` of each topic, as partition 0."""
        return {(topic, 0): self.lag(topic, group) for topic in topics}

    # ---- internals shared with MemoryConsumer ----

    def _topic(self, name: str) -> _Topic:
        if not name:
            raise ValueError("topic name must not be empty")
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic()
        return topic

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError(f"{self!r} is closed", retriable=False)


class MemoryConsumer:
    """One member of a consumer group of a `MemoryBroker`. Use `MemoryBroker.subscribe` to get one."""

    def __init__(self, broker: MemoryBroker, id: int, topics: tuple[str, ...], group: str) -> None:
        self._broker = broker
        self._id = id
        self.topics = topics
        self.group = group
        self._owned: dict[str, _Ownership] = {}
        self._next_topic = 0  # rotates so that a busy topic does not starve the others
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryConsumer(#{self._id}, group={self.group!r}, topics={list(self.topics)!r})"

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to `max_messages` new deliveries; waits up to `timeout` seconds for the first one."""
        if self._closed:
            raise BrokerError(f"{self!r} is closed", retriable=False)
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        changed = self._broker._changed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        async with changed:
            while True:
                deliveries = self._take(max_messages)
                remaining = deadline - loop.time()
                if deliveries or self._closed or remaining <= 0:
                    return deliveries
                try:
                    async with asyncio.timeout(remaining):
                        await changed.wait()
                except TimeoutError:
                    return self._take(max_messages)

    async def commit(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries fetched by this consumer.

        Deliveries it no longer holds (after `close`, or fetched by another consumer) and repeated ones are
        ignored: they are, or will be, delivered again to the group.
        """
        touched: set[str] = set()
        for delivery in deliveries:
            token = delivery.token
            owned = self._owned.get(delivery.message.topic)
            if self._closed or not isinstance(token, _Token) or token.consumer != self._id or owned is None:
                continue
            position = self._broker._topics[delivery.message.topic].groups[self.group]
            if position.committed <= token.offset < owned.cursor:
                owned.acked.add(token.offset)
                touched.add(delivery.message.topic)
        for name in touched:
            topic = self._broker._topics[name]
            position = topic.groups[self.group]
            owned = self._owned[name]
            while position.committed in owned.acked:
                owned.acked.remove(position.committed)
                position.committed += 1
            topic.trim()

    async def close(self) -> None:
        """Leave the group: the topics this consumer owned, with their uncommitted messages, pass on."""
        if self._closed:
            return
        self._closed = True
        self._broker._consumers.discard(self)
        for name in self._owned:
            self._broker._topics[name].groups[self.group].owner = None
        self._owned.clear()
        async with self._broker._changed:
            self._broker._changed.notify_all()  # wake other members waiting to take over, and our own fetch

    def _take(self, max_messages: int) -> list[Delivery]:
        deliveries: list[Delivery] = []
        count = len(self.topics)
        start = self._next_topic
        self._next_topic = (start + 1) % count
        for i in range(count):
            name = self.topics[(start + i) % count]
            topic = self._broker._topics[name]
            owned = self._claim(name, topic)
            if owned is None:
                continue
            owned.cursor = max(owned.cursor, topic.base)
            while owned.cursor < topic.end and len(deliveries) < max_messages:
                message = topic.entries[owned.cursor - topic.base]
                deliveries.append(Delivery(message, _Token(self._id, owned.cursor)))
                owned.cursor += 1
        return deliveries

    def _claim(self, name: str, topic: _Topic) -> _Ownership | None:
        """This consumer's hold on `topic`, taking it over if no other member of the group has it (never once
        closed: a fetch woken by `close` must not take back what `close` released)."""
        if self._closed:
            return None
        position = topic.groups[self.group]
        if position.owner is None:
            position.owner = self
            self._owned[name] = _Ownership(cursor=position.committed)
        return self._owned[name] if position.owner is self else None

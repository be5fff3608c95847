"""RabbitMQ through aio-pika: `RabbitBroker`, and `parse_amqp_url` for ``amqp://`` / ``amqps://`` URLs.

Semantics, as for the other brokers (see `sagas.adapters.memory`), and how they are made (docs/architecture.md):

* A **topic** is a durable fanout exchange of that name. Each consumer **group** has, per topic, a
  consistent-hash exchange ``<topic>@<group>`` bound to it and ``partitions`` quorum queues
  ``<topic>@<group>.<n>`` behind that, so every group gets every message, and the message key (the routing key,
  the saga id) picks one queue of the group: one saga's messages stay in one queue, in order.
* Each partition queue has **single-active-consumer** on: of a group's members only one consumes a queue at a
  time, the others wait and take over, with the unacknowledged messages first, when it leaves. That is what
  keeps one saga's messages in order with several engines.
* **Durable**: quorum queues, persistent messages, publisher confirms awaited before `publish` returns,
  ``mandatory`` publishing (an unroutable message is a `BrokerError`, never a silent loss). A topic that no group
  has subscribed to yet routes to its alternate exchange, into the bounded quorum queue ``<topic>.unrouted``;
  the first group that subscribes to the topic takes those messages over.
* `commit` acknowledges, after the caller's own commit. A message delivered ``delivery_limit`` times without an
  ack (it keeps crashing its consumer) is dead-lettered by the queue into ``<topic>@<group>.dead``, which the
  group also consumes: it comes back once more, marked `BrokerMessage.malformed` with the reason, and the engine
  stores it as a dead letter instead of processing it (a participant keeps it among its own dead letters).
* **Reconnection** is this module's own (not aio-pika's robust connection): when the connection or a channel is
  lost, the deliveries fetched on it are abandoned (committing them later is skipped: their delivery tags mean
  other messages on a new channel, and the server redelivers them anyway), publishes wait for the new connection
  (for at most `retry_for` seconds, then `BrokerError(retriable=True)`) and are sent again, and every consumer is
  restored on the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

from sagas.adapters.rabbitwire import decode_message, encode_message
from sagas.engine.ports import BrokerMessage, Delivery
from sagas.errors import BrokerError

__all__ = ["RabbitBroker", "RabbitConsumer", "RabbitSettings", "parse_amqp_url"]

log = logging.getLogger(__name__)


class _SaidOnce(logging.Filter):
    """aiormq logs a server's close of the connection as an error, with a traceback, and every failed reconnect
    attempt; this adapter already says it (one line for the loss, one for the recovery), so the operator reads one
    outage, not a page of failures."""

    SAID = ("Unexpected connection close from remote", "Cancelling cause reader exited abnormally",
            "error when creating transport")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.SAID)


logging.getLogger("aiormq.connection").addFilter(_SaidOnce())

_OWN_OPTIONS = {"partitions": int, "prefetch": int, "delivery_limit": int, "unrouted_max": int, "retry_for": float}


@dataclass(frozen=True)
class RabbitSettings:
    """What an ``amqp://`` URL says: the connection URL aio-pika gets, and this broker's own options."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_amqp_url(url: str) -> RabbitSettings:
    """Read ``amqp[s]://user:password@host:port/vhost[?partitions=N&prefetch=N&delivery_limit=N&...]``.

    ``partitions``, ``prefetch``, ``delivery_limit``, ``unrouted_max`` and ``retry_for`` are this broker's (see
    `RabbitBroker`); other query parameters go to aio-pika's connection (``heartbeat``, ``connection_timeout``,
    TLS files for ``amqps``...). A heartbeat of 10 s is asked for unless the URL says otherwise, so a peer that is
    gone without closing the connection is noticed within seconds, not minutes.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an amqp:// or amqps:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    options: dict[str, Any] = {}
    passed: list[tuple[str, str]] = []
    for name, raw in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        kind = _OWN_OPTIONS.get(name)
        if kind is None:
            passed.append((name, raw))
            continue
        try:
            options[name] = kind(raw)
        except ValueError:
            raise ValueError(f"amqp:// URL option {name}={raw!r}: expected a {kind.__name__}") from None
    if not any(name == "heartbeat" for name, _ in passed):
        passed.append(("heartbeat", "10"))
    return RabbitSettings(urlunsplit(parts._replace(query=urlencode(passed))), options)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}{parts.path or '/'}"


# Errors meaning the connection or channel is gone (or going): the call is tried again on a new one.
_LOST = (
    aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError, OSError,
    asyncio.TimeoutError, RuntimeError,
)


class RabbitBroker:
    """A `Broker` on RabbitMQ (3.10 or later, with the bundled ``rabbitmq_consistent_hash_exchange`` plugin).

    Args:
        url: ``amqp://`` or ``amqps://`` URL for aio-pika (see `parse_amqp_url`; `from_url` reads options too).
        partitions: Partition queues per topic and group, fixed when a group first subscribes to a topic. More
            partitions let a future RabbitMQ spread them over members; today single-active-consumer gives each
            queue to the member that subscribed first, the others standing by.
        prefetch: Unacknowledged deliveries per partition queue and consumer. The engine fetches up to 512 replies
            a batch and acknowledges them after its commit; with 3 partitions, 256 each keeps a full batch waiting
            while the previous one commits, and bounds what a consumer holds in memory to 768 messages.
        delivery_limit: Deliveries of one message without an ack before its queue dead-letters it (a message
            that keeps crashing its consumer). 20: far above what outages and restarts cause.
        unrouted_max: Messages kept for a topic that no group has subscribed to yet; beyond, publishing to it is
            refused (a retriable error) instead of growing without bound.
        retry_for: Seconds a call waits for a lost connection to come back before `BrokerError(retriable=True)`.
    """

    def __init__(
        self,
        url: str,
        *,
        partitions: int = 3,
        prefetch: int = 256,
        delivery_limit: int = 20,
        unrouted_max: int = 100_000,
        retry_for: float = 30.0,
    ) -> None:
        if partitions < 1 or prefetch < 1 or delivery_limit < 1 or unrouted_max < 1:
            raise ValueError("partitions, prefetch, delivery_limit and unrouted_max must be at least 1")
        self.url = url
        self.partitions = partitions
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self.unrouted_max = unrouted_max
        self.retry_for = retry_for
        self._connection: AbstractConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._up = asyncio.Event()
        self._epoch = 0
        """Bumped by every new connection."""
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self._lock = asyncio.Lock()
        self._topics: set[str] = set()
        """Topics whose exchanges this broker declared (they are durable: they outlive a reconnect)."""
        self._consumers: set[RabbitConsumer] = set()
        self._ids = itertools.count(1)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RabbitBroker:
        """A broker from an ``amqp://`` URL (see `parse_amqp_url`); keyword arguments override the URL."""
        settings = parse_amqp_url(url)
        return cls(settings.url, **{**settings.options, **overrides})

    def __repr__(self) -> str:
        return f"RabbitBroker({_redacted(self.url)!r})"

    # ---- connection -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, retrying for `retry_for` seconds while RabbitMQ is unreachable."""
        if self._connection is not None and not self._connection.is_closed:
            return
        self._closing = False
        deadline = time.monotonic() + self.retry_for
        delay = 0.1
        while True:
            try:
                await self._connect()
                return
            except _LOST as exc:
                if time.monotonic() + delay > deadline:
                    raise BrokerError(f"{self!r}: cannot connect for {self.retry_for:.0f}s: {exc!r}",
                                      retriable=True) from exc
                log.debug("%r: connect failed (%r), retrying in %.1fs", self, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except aiormq.exceptions.AMQPError as exc:  # refused login, unknown vhost: trying again will not help
                raise BrokerError(f"{self!r}: cannot connect: {exc!r}", retriable=False) from exc

    async def _connect(self) -> None:
        # Named after this process (aiormq reads `name` from the URL), so `rabbitmqctl list_connections name` and the
        # management UI tell who is who.
        named = urlsplit(self.url)
        query = urlencode([*parse_qsl(named.query), ("name", f"sagas pid {os.getpid()}")])
        connection = await aio_pika.connect(urlunsplit(named._replace(query=query)), timeout=10)
        try:
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        self._connection, self._publisher = connection, publisher
        self._epoch += 1
        epoch = self._epoch
        connection.close_callbacks.add(lambda _sender, exc: self._lost(epoch, exc))
        self._up.set()

    def _lost(self, epoch: int, exc: BaseException | None) -> None:
        """The connection of `epoch` closed: unless we closed it, reconnect in the background."""
        if epoch != self._epoch or self._closing:
            return
        self._up.clear()
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("%r: connection lost (%r); reconnecting", self, exc)
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                await self._connect()
            except Exception as exc:  # whatever stops a connect, the next attempt may not meet it
                log.debug("%r: reconnect failed (%r), retrying in %.1fs", self, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self._down_since is not None:
                log.warning("%r: connection restored", self,
                            extra={"outage_seconds": round(time.monotonic() - self._down_since, 1)})
                self._down_since = None
            for consumer in list(self._consumers):
                consumer._reconnected()
            return

    async def _ready(self, deadline: float) -> tuple[AbstractConnection, int]:
        """The open connection and its epoch, waiting for a reconnect until `deadline`."""
        while True:
            connection = self._connection
            if self._closing or connection is None:
                raise BrokerError(f"{self!r} is not started (or closed)", retriable=False)
            if self._up.is_set() and not connection.is_closed:
                return connection, self._epoch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"{self!r}: RabbitMQ unreachable for {self.retry_for:.0f}s", retriable=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), remaining)

    async def close(self) -> None:
        """Close the consumers (their unacknowledged deliveries go back to their queues), then the connection."""
        self._closing = True
        for consumer in list(self._consumers):
            await consumer.close()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnecting
        connection, self._connection, self._publisher = self._connection, None, None
        self._up.clear()
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*_LOST, aiormq.exceptions.AMQPError):
                await connection.close()

    # ---- topology ---------------------------------------------------------------------------------

    async def _declare_topic(self, channel: AbstractChannel, topic: str) -> None:
        """The topic's fanout exchange, with its alternate exchange and bounded queue for unrouted messages."""
        unrouted = f"{topic}.unrouted"
        await channel.declare_exchange(unrouted, aio_pika.ExchangeType.FANOUT, durable=True)
        queue = await channel.declare_queue(unrouted, durable=True, arguments={
            "x-queue-type": "quorum", "x-max-length": self.unrouted_max, "x-overflow": "reject-publish",
        })
        await queue.bind(unrouted)
        await channel.declare_exchange(topic, aio_pika.ExchangeType.FANOUT, durable=True,
                                       arguments={"alternate-exchange": unrouted})

    async def _ensure_topics(self, topics: set[str], deadline: float) -> None:
        missing = topics - self._topics
        if not missing:
            return
        async with self._lock:
            missing -= self._topics
            if not missing:
                return
            connection, _ = await self._ready(deadline)
            channel = await connection.channel()
            try:
                for topic in sorted(missing):
                    await self._declare_topic(channel, topic)
                    self._topics.add(topic)
            finally:
                if not channel.is_closed:
                    await channel.close()

    async def ensure_topics(self, names: Iterable[str]) -> None:
        """Declare the topics' exchanges (the engine's `TopicCreator` capability, called when it starts): what is
        published to a topic before any group subscribed is kept in its ``<topic>.unrouted`` queue, and the first
        group to subscribe takes it over, so a participant may start after the engine."""
        await self._ensure_topics(set(names), time.monotonic() + self.retry_for)

    async def probe(self) -> None:
        """Raise `BrokerError` unless the connection is up and RabbitMQ answers (a channel opened and closed)."""
        connection = self._connection
        if self._closing or connection is None:
            raise BrokerError(f"{self!r} is not started (or closed)", retriable=False)
        if not self._up.is_set() or connection.is_closed:
            raise BrokerError(f"{self!r}: not connected (reconnecting)", retriable=True)
        try:
            async with asyncio.timeout(5.0):
                channel = await connection.channel()
                await channel.close()
        except (*_LOST, aiormq.exceptions.AMQPError) as exc:
            raise BrokerError(f"{self!r}: {exc!r}", retriable=True) from exc

    async def backlog(self, topics: Sequence[str], group: str) -> dict[tuple[str, int], int]:
        """Per partition queue ``<topic>@<group>.<n>``: its messages ready (RabbitMQ's count, for the whole group)
        plus those this process's consumers of the group fetched and have not acknowledged yet. AMQP tells no
        client of the unacknowledged messages another member holds: with several engines, each reports what is
        ready plus its own (the management API's ``messages`` is exact, when it is enabled). A group that has not
        subscribed yet has nothing waiting (what its topic holds meanwhile is in ``<topic>.unrouted``)."""
        held: dict[tuple[str, int], int] = {}
        for consumer in self._consumers:
            if consumer.group == group:
                for partition, count in consumer._held().items():
                    held[partition] = held.get(partition, 0) + count
        names = {(topic, number): f"{topic}@{group}.{number}" for topic in dict.fromkeys(topics)
                 for number in range(self.partitions)}
        ready = await self._ready_counts(list(names.values()))
        return {partition: ready.get(name, 0) + held.get(partition, 0) for partition, name in names.items()}

    async def _ready_counts(self, queues: list[str]) -> dict[str, int]:
        """Messages ready in each of `queues` that exists (passive declares; a missing queue closes the channel,
        the next one is asked on a new channel)."""
        connection, _ = await self._ready(time.monotonic() + 5.0)
        counts: dict[str, int] = {}
        channel: AbstractChannel | None = None
        try:
            for name in queues:
                if channel is None or channel.is_closed:
                    channel = await connection.channel()
                try:
                    declared = await channel.declare_queue(name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    continue
                counts[name] = int(declared.declaration_result.message_count or 0)
        except (*_LOST, aiormq.exceptions.AMQPError) as exc:
            raise BrokerError(f"{self!r}: reading queue depths: {exc!r}", retriable=True) from exc
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*_LOST, aiormq.exceptions.AMQPError):
                    await channel.close()
        return counts

    async def delete_topics(self, topics: Sequence[str], groups: Sequence[str]) -> None:
        """Delete the topics' exchanges and queues, and those of these groups on them (what is missing is skipped:
        RabbitMQ's deletes are idempotent). For tests and benchmarks that name their topics per run."""
        connection, _ = await self._ready(time.monotonic() + self.retry_for)
        channel = await connection.channel()
        try:
            for topic in topics:
                for group in groups:
                    group_exchange = f"{topic}@{group}"
                    for number in range(self.partitions):
                        await channel.queue_delete(f"{group_exchange}.{number}")
                    await channel.queue_delete(f"{group_exchange}.dead")
                    await channel.exchange_delete(f"{group_exchange}.dead")
                    await channel.exchange_delete(group_exchange)
                await channel.queue_delete(f"{topic}.unrouted")
                await channel.exchange_delete(f"{topic}.unrouted")
                await channel.exchange_delete(topic)
                self._topics.discard(topic)
        finally:
            await channel.close()

    # ---- publishing -------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[BrokerMessage]) -> None:
        """Send the messages in order and wait until RabbitMQ confirmed every one (publisher confirms).

        After a lost connection the whole call is sent again on the new one, so some messages may be published
        twice (the receivers deduplicate on ``ce_id``). A message no queue takes raises `BrokerError`.
        """
        if not messages:
            return
        encoded = [encode_message(message) for message in messages]  # refuses what AMQP cannot carry, up front
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                await self._ensure_topics({message.topic for message in messages}, deadline)
                connection, _ = await self._ready(deadline)
                publisher = self._publisher
                if publisher is None or publisher.is_closed:
                    publisher = self._publisher = await connection.channel(
                        publisher_confirms=True, on_return_raises=True)
                channel = await publisher.get_underlay_channel()
                timeout = max(deadline - time.monotonic(), 1.0)
                results = await _publish_together(channel, [
                    (message.topic, body, routing_key, properties)
                    for message, (body, routing_key, properties) in zip(messages, encoded, strict=True)
                ], timeout)
                self._check(results)
                return
            except aiormq.exceptions.PublishError as exc:
                raise BrokerError(f"{self!r}: a message was unroutable (no queue took it): {exc!r}",
                                  retriable=False) from exc
            except aiormq.exceptions.DeliveryError as exc:
                # A nack: a queue refused it (full, or the server's own trouble): later it may take it.
                raise BrokerError(f"{self!r}: RabbitMQ refused a message: {exc!r}", retriable=True) from exc
            except aiormq.exceptions.ChannelClosed as exc:
                if isinstance(exc, aiormq.exceptions.ChannelInvalidStateError):
                    pass  # the connection went: retry below
                elif not self._is_connection_gone(exc):
                    raise BrokerError(f"{self!r}: publish refused: {exc!r}", retriable=False) from exc
                await self._after_loss(exc, deadline)
            except _LOST as exc:
                await self._after_loss(exc, deadline)

    @staticmethod
    def _check(results: list[Any]) -> None:
        for result in results:  # the first failure, in publishing order, is the one that counts
            if isinstance(result, asyncio.CancelledError):  # a confirmation given up with its channel, not us
                raise aiormq.exceptions.ChannelInvalidStateError("the channel closed before confirming")
            if isinstance(result, BaseException):
                raise result
            if not isinstance(result, spec.Basic.Ack):
                raise aiormq.exceptions.DeliveryError(None, result)

    def _is_connection_gone(self, exc: BaseException) -> bool:
        connection = self._connection
        return connection is None or connection.is_closed or not self._up.is_set()

    async def _after_loss(self, exc: BaseException, deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise BrokerError(f"{self!r}: publish failed for {self.retry_for:.0f}s: {exc!r}",
                              retriable=True) from exc
        log.debug("%r: publish interrupted (%r); sending again once connected", self, exc)
        await asyncio.sleep(0.05)  # the close callback runs first: the next _ready waits for the new connection

    # ---- consuming --------------------------------------------------------------------------------

    async def subscribe(self, topics: Sequence[str], group: str) -> RabbitConsumer:
        """Join group `group` on `topics` (their exchanges and the group's queues are created if missing)."""
        if not topics:
            raise ValueError("subscribe needs at least one topic")
        topics = tuple(dict.fromkeys(topics))
        deadline = time.monotonic() + self.retry_for
        await self._ensure_topics(set(topics), deadline)
        consumer = RabbitConsumer(self, next(self._ids), topics, group)
        await consumer._open(deadline)
        self._consumers.add(consumer)
        return consumer

    def _queue_arguments(self, group_exchange: str) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum", "x-single-active-consumer": True, "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": f"{group_exchange}.dead",
        }


@dataclass(frozen=True)
class _Token:
    consumer: int
    epoch: int
    tag: int


class RabbitConsumer:
    """One member of a group on RabbitMQ. Use `RabbitBroker.subscribe` to get one."""

    def __init__(self, broker: RabbitBroker, id: int, topics: tuple[str, ...], group: str) -> None:
        self._broker = broker
        self._id = id
        self.topics = topics
        self.group = group
        self._channel: AbstractChannel | None = None
        self._connection_epoch = 0
        """The broker connection `_channel` was opened on."""
        self._epoch = 0
        """Bumped by every new channel: deliveries of an older one are abandoned."""
        self._buffer: deque[tuple[int, tuple[str, int], AbstractIncomingMessage]] = deque()
        """(channel epoch, (topic, partition), message) received and not fetched yet; partition -1: the dead queue."""
        self._unacked: dict[int, tuple[tuple[str, int], AbstractIncomingMessage]] = {}
        """Delivery tag -> (topic, partition), message: fetched on the current channel and not acknowledged."""
        self._arrived = asyncio.Event()
        self._closed = False
        self._restoring: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RabbitConsumer(#{self._id}, group={self.group!r}, topics={list(self.topics)!r})"

    async def _open(self, deadline: float) -> None:
        """A channel on the broker's connection, the group's queues declared, consuming every one of them."""
        broker = self._broker
        connection, connection_epoch = await broker._ready(deadline)
        channel = await connection.channel()
        try:
            await channel.set_qos(prefetch_count=broker.prefetch)
            self._epoch += 1
            epoch = self._epoch
            self._buffer.clear()  # all of older channels: void
            self._unacked.clear()
            for topic in self.topics:
                await self._consume_topic(connection, channel, topic, epoch)
        except BaseException:
            if not channel.is_closed:
                with contextlib.suppress(*_LOST, aiormq.exceptions.AMQPError):
                    await channel.close()
            raise
        self._channel, self._connection_epoch = channel, connection_epoch
        channel.close_callbacks.add(lambda _sender, exc: self._channel_lost(epoch, exc))

    async def _consume_topic(
        self, connection: AbstractConnection, channel: AbstractChannel, topic: str, epoch: int
    ) -> None:
        broker = self._broker
        group_exchange = f"{topic}@{self.group}"
        new_group = not await _exists(broker, f"{group_exchange}.0")
        hashed = await channel.declare_exchange(group_exchange, aio_pika.ExchangeType.X_CONSISTENT_HASH, durable=True)
        dead_exchange = await channel.declare_exchange(f"{group_exchange}.dead", aio_pika.ExchangeType.FANOUT,
                                                       durable=True)
        dead = await channel.declare_queue(f"{group_exchange}.dead", durable=True, arguments={"x-queue-type": "quorum"})
        await dead.bind(dead_exchange)
        queues = []
        for number in range(broker.partitions):
            queue = await channel.declare_queue(f"{group_exchange}.{number}", durable=True,
                                                arguments=broker._queue_arguments(group_exchange))
            await queue.bind(hashed, routing_key="20")  # the weight: points on the hash ring, for an even spread
            queues.append(queue)
        await hashed.bind(topic)
        if new_group:
            await _take_unrouted(connection, topic, group_exchange)
        for number, queue in [*enumerate(queues), (-1, dead)]:
            await queue.consume(self._receiver(epoch, (topic, number), channel), no_ack=False)

    def _held(self) -> dict[tuple[str, int], int]:
        """Messages received from each partition queue and not acknowledged yet (fetched or not)."""
        held: dict[tuple[str, int], int] = {}
        for partition in itertools.chain((p for _, p, _ in self._buffer), (p for p, _ in self._unacked.values())):
            held[partition] = held.get(partition, 0) + 1
        return held

    def _receiver(self, epoch: int, partition: tuple[str, int], channel: AbstractChannel) -> Any:
        async def receive(message: AbstractIncomingMessage) -> None:
            if epoch != self._epoch or self._closed:
                # A channel this consumer gave up on but the server still delivers to: as the single active
                # consumer it would hold these messages for ever. Closing it hands them to the current channel.
                _close_soon(channel)
                return
            self._buffer.append((epoch, partition, message))
            self._arrived.set()

        return receive

    def _channel_lost(self, epoch: int, exc: BaseException | None) -> None:
        if epoch != self._epoch or self._closed:
            return
        log.debug("%r: channel closed (%r)", self, exc)
        self._abandon()
        if self._broker._up.is_set() and self._broker._connection is not None \
                and not self._broker._connection.is_closed:
            self._reconnected()  # a channel error on a live connection: open a new channel at once

    def _abandon(self) -> None:
        self._epoch += 1
        if self._channel is not None:
            _close_soon(self._channel)  # if it is still open, its consumers must go: it is no longer read
        self._channel = None
        self._buffer.clear()
        self._unacked.clear()

    def _reconnected(self) -> None:
        """The broker has a new connection (or this channel alone was lost): consume again on a new channel."""
        if self._closed:
            return
        if self._channel is not None and not self._channel.is_closed:
            if self._connection_epoch == self._broker._epoch:
                return  # already consuming on the new connection
            self._abandon()  # the old connection's channel: its deliveries are void
        if self._restoring is None or self._restoring.done():
            self._restoring = asyncio.ensure_future(self._restore())

    async def _restore(self) -> None:
        delay = 0.1
        while not self._closed and self._channel is None:
            try:
                await self._open(time.monotonic() + self._broker.retry_for)
            except Exception as exc:  # retried until it works or the consumer closes
                log.debug("%r: restoring failed (%r), retrying in %.1fs", self, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:
                log.info("%r: consuming again", self)

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to `max_messages` deliveries; waits up to `timeout` seconds for the first one."""
        if self._closed:
            raise BrokerError(f"{self!r} is closed", retriable=False)
        if not self._buffer:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), max(timeout, 0))
        deliveries: list[Delivery] = []
        while self._buffer and len(deliveries) < max_messages and not self._closed:
            epoch, partition, incoming = self._buffer.popleft()
            if epoch != self._epoch or incoming.delivery_tag is None:
                continue
            tag = incoming.delivery_tag
            self._unacked[tag] = (partition, incoming)
            message = decode_message(partition[0], incoming)
            if incoming.headers.get("x-first-death-reason") is not None:
                message = dataclasses.replace(message, malformed=_death_reason(incoming, self._broker.delivery_limit))
            deliveries.append(Delivery(message, _Token(self._id, epoch, tag)))
        return deliveries

    async def commit(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries. Those of a lost channel (or of a closed consumer) are skipped: the server
        delivers them again, and acknowledging their tags on a new channel would acknowledge other messages."""
        # Not gated on `_channel`: deliveries already arrive while `_open` is still consuming the other queues,
        # and those of the current epoch must be acknowledged then too (on the channel they came on).
        if self._closed:
            return
        to_ack = []
        for delivery in deliveries:
            token = delivery.token
            if not isinstance(token, _Token) or token.consumer != self._id or token.epoch != self._epoch:
                continue
            held = self._unacked.pop(token.tag, None)
            if held is not None:  # committing twice would be a channel error ("unknown delivery tag")
                to_ack.append(held[1])
        if not to_ack:
            return
        try:
            # basic.ack has no answer; a write on a dead socket must not hang the caller (aio-pika#501).
            async with asyncio.timeout(5.0):
                if self._acks_all_up_to(to_ack):
                    await to_ack[-1].ack(multiple=True)  # one frame (and one drain) for the whole batch
                else:
                    for incoming in to_ack:
                        await incoming.ack()
        except (*_LOST, aiormq.exceptions.AMQPError) as exc:
            log.info("%r: acknowledgement skipped, the channel is gone: %r", self, exc)
            # Gone, or about to be: were it still open, the messages not acknowledged would stay with this single
            # active consumer for ever. Closed, they go back to their queues and come again on a new channel.
            self._abandon()
            self._reconnected()

    def _acks_all_up_to(self, to_ack: list[AbstractIncomingMessage]) -> bool:
        """Sort `to_ack` by delivery tag; whether they are every delivery of the channel up to the highest of them
        (none left unacknowledged or unfetched below it), so that one ``multiple`` ack acknowledges exactly them.
        Deliveries arrive, are buffered and are fetched in tag order, so the lowest left is the first of each."""
        to_ack.sort(key=lambda incoming: incoming.delivery_tag or 0)
        highest = to_ack[-1].delivery_tag or 0
        lowest_fetched = next(iter(self._unacked), None)
        lowest_buffered = next((m.delivery_tag for epoch, _, m in self._buffer if epoch == self._epoch), None)
        return all(tag is None or tag > highest for tag in (lowest_fetched, lowest_buffered))

    async def close(self) -> None:
        """Leave the group: what was fetched and not acknowledged goes back to the queues, for other members."""
        if self._closed:
            return
        self._closed = True
        self._broker._consumers.discard(self)
        self._arrived.set()  # a waiting fetch returns now, with nothing
        if self._restoring is not None:
            self._restoring.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restoring
        channel, self._channel = self._channel, None
        self._buffer.clear()
        self._unacked.clear()
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*_LOST, aiormq.exceptions.AMQPError):
                await channel.close()


async def _publish_together(
    channel: aiormq.abc.AbstractChannel, sends: list[tuple[str, bytes, str, spec.Basic.Properties]], timeout: float
) -> list[Any]:
    """Publish (exchange, body, routing key, properties) in order, ``mandatory``, as ONE write to the socket, and
    wait for all their confirmations (or failures, returned in order).

    aiormq's `basic_publish` writes each message on its own (a send to the socket per message, which on a busy
    machine cost more than everything else the client does); this does what it does for each message (a delivery
    tag and a confirmation future per message, its id mapped to its tag so that a ``basic.return`` fails the
    right one), under the channel's lock, and hands the writer all the frames at once."""
    assert isinstance(channel, aiormq.Channel)
    frames: list[Any] = []
    confirmations: list[asyncio.Future[Any]] = []
    async with channel.lock:
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        for exchange, body, routing_key, properties in sends:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            message_id = properties.message_id = properties.message_id or uuid.uuid4().hex
            confirmation = channel.create_future()  # failed by aiormq when the channel closes
            channel.confirmations[tag] = confirmation
            channel.message_id_delivery_tag[message_id] = tag
            confirmation.add_done_callback(functools.partial(_forget, channel, message_id, tag))
            confirmations.append(confirmation)
            frames += [spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
                       ContentHeader(properties=properties, body_size=len(body)), *channel._split_body(body)]
        await channel.write_queue.put(ChannelFrame.marshall(frames=frames, channel_number=channel.number))
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.gather(*confirmations, return_exceptions=True)
    finally:
        for confirmation in confirmations:
            confirmation.cancel()  # those not done (a timeout): their callbacks forget them


def _forget(channel: aiormq.Channel, message_id: str, tag: int, _: asyncio.Future[Any]) -> None:
    channel.confirmations.pop(tag, None)
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id)


_closing: set[asyncio.Future[Any]] = set()


def _close_soon(channel: AbstractChannel) -> None:
    """Close a channel in the background (from a callback, which cannot wait); nothing if it is closed already."""
    if channel.is_closed:
        return

    async def close() -> None:
        with contextlib.suppress(*_LOST, aiormq.exceptions.AMQPError):
            await channel.close()

    task = asyncio.ensure_future(close())
    _closing.add(task)  # a reference until it is done: the loop keeps only weak ones
    task.add_done_callback(_closing.discard)


def _death_reason(incoming: AbstractIncomingMessage, limit: int) -> str:
    reason = str(incoming.headers.get("x-first-death-reason"))
    queue = str(incoming.headers.get("x-first-death-queue", "?"))
    if reason == "delivery_limit":
        return f"delivered {limit} times without an acknowledgement (it keeps failing its consumer), from {queue}"
    return f"dead-lettered by RabbitMQ ({reason}) from {queue}"


async def _exists(broker: RabbitBroker, queue: str) -> bool:
    """Whether a queue exists: a passive declare on a throwaway channel (a 404 closes the channel)."""
    connection, _ = await broker._ready(time.monotonic() + broker.retry_for)
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*_LOST, aiormq.exceptions.AMQPError):
                await channel.close()


async def _take_unrouted(connection: AbstractConnection, topic: str, group_exchange: str) -> None:
    """Move the messages held for the topic before any group subscribed into this new group's queues, in order.
    Each is acknowledged only after RabbitMQ confirmed its copy, so a crash half-way duplicates, never loses."""
    mover = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        queue = await mover.declare_queue(f"{topic}.unrouted", passive=True)
        underlay = await mover.get_underlay_channel()
        moved = 0
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            properties = spec.Basic.Properties(  # as published (not its expiration: its time is up or running)
                content_type=message.content_type, content_encoding=message.content_encoding, delivery_mode=2,
                headers=dict(message.headers), priority=message.priority, correlation_id=message.correlation_id,
                reply_to=message.reply_to, message_id=message.message_id, timestamp=message.timestamp,
                message_type=message.type, app_id=message.app_id)
            await underlay.basic_publish(message.body, exchange=group_exchange,
                                         routing_key=message.routing_key or "", properties=properties,
                                         mandatory=True)
            await message.ack()
            moved += 1
        if moved:
            log.info("moved %d message(s) published to %r before any group subscribed into %r",
                     moved, topic, group_exchange)
    finally:
        if not mover.is_closed:
            await mover.close()


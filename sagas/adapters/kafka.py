"""Apache Kafka through aiokafka: `KafkaBroker`, and `parse_kafka_url` for ``kafka://`` URLs.

Semantics, as for the other brokers (see `sagas.adapters.memory`): publishing returns once every in-sync
replica has the messages (``acks="all"``, idempotent producer; the message key is the Kafka key, so one key
stays in one partition and in order). A consumer is a member of a Kafka consumer group with auto-commit
off; ``commit`` commits, per partition, the offset after the last of an unbroken run of acknowledged
deliveries. When the group rebalances, deliveries from revoked partitions are abandoned: committing them
later is skipped, and the partition's new owner receives them again from the committed offset.

Lost connections are retried with exponential backoff for `retry_for` seconds; then the call raises
`BrokerError(retriable=True)`. Topics are created with `partitions` partitions on first use, or before it by
`ensure_topics` (the engine's `TopicCreator` capability: it creates its definitions' topics at start). A message over
`max_request_size` is refused before anything is sent; a record Kafka itself refuses (a topic's smaller
`max.message.bytes`, say) raises `BrokerError(retriable=False)` and replaces the idempotent producer, whose
sequence numbers for that partition it left out of step: other publishes carry on, on the new producer.

A record aiokafka cannot parse (a header name that is not UTF-8, which any other client may write) does not stop
its partition: the consumer skips it and delivers it as a `BrokerMessage` with `malformed` set (no body: the
reason names its partition and offset), between the records around it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    CorruptRecordException,
    IllegalStateError,
    InvalidProducerEpoch,
    InvalidTimestampError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    UnknownProducerId,
    for_code,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from sagas.engine.ports import BrokerMessage, Delivery
from sagas.errors import BrokerError

__all__ = ["KafkaBroker", "KafkaConsumer", "KafkaSettings", "parse_kafka_url"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Options that make the semantics above; a user may not override them through `client_options`.
_FIXED = {
    "bootstrap_servers", "loop", "acks", "enable_idempotence", "transactional_id", "key_serializer",
    "value_serializer", "group_id", "enable_auto_commit", "key_deserializer", "value_deserializer",
    "partitioner",  # publish places records itself, as Kafka's default partitioner does (one key, one partition)
}
_MAX_REQUEST_SIZE = inspect.signature(AIOKafkaProducer.__init__).parameters["max_request_size"].default
_SSL_FILES = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password")
_DEFAULTS = {cls: inspect.signature(cls.__init__).parameters for cls in
             (AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient)}
_PARAMS = {cls: set(parameters) for cls, parameters in _DEFAULTS.items()}
_INT_WITHOUT_DEFAULT = ("max_poll_records", "rebalance_timeout_ms")
"""Integer options whose aiokafka default is None (the others with None are text: ids, names, credentials)."""


@dataclass(frozen=True)
class KafkaSettings:
    """What a ``kafka://`` URL says."""

    bootstrap_servers: tuple[str, ...]
    partitions: int = 3
    replication_factor: int = 1
    client_options: dict[str, Any] = field(default_factory=dict)


def _option_value(name: str, raw: str) -> Any:
    """A URL query value as the option `name` takes it: a bool, int or float where aiokafka's default is one (and
    for partitions and replication_factor), text otherwise (a password of digits stays text)."""
    if name in ("partitions", "replication_factor", *_INT_WITHOUT_DEFAULT):
        default: Any = 1
    else:
        default = next((p[name].default for p in _DEFAULTS.values() if name in p), None)
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError(raw)
            return raw.lower() == "true"
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"kafka:// URL option {name}={raw!r}: expected a {type(default).__name__}") from None
    return raw


def parse_kafka_url(url: str) -> KafkaSettings:
    """Read ``kafka://[user:password@]host:port[,host:port...][?partitions=N&replication_factor=N&option=...]``.

    Other query parameters become aiokafka client options (``security_protocol=SASL_SSL``,
    ``sasl_mechanism=SCRAM-SHA-256``, ``ssl_cafile=/path/ca.pem``...); digits become ints, true/false bools.
    Credentials in the URL set ``sasl_plain_username``/``password``, with ``sasl_mechanism=PLAIN`` and
    ``security_protocol=SASL_SSL`` unless the query says otherwise.
    """
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise ValueError(f"not a kafka:// URL: {url!r}")
    netloc = parts.netloc
    options: dict[str, Any] = {}
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        options.update(sasl_plain_username=unquote(user), sasl_plain_password=unquote(password),
                       sasl_mechanism="PLAIN", security_protocol="SASL_SSL")
    servers = tuple(server.strip() for server in netloc.split(",") if server.strip())
    if not servers:
        raise ValueError(f"no bootstrap server in {url!r}")
    for name, raw in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        options[name] = _option_value(name, raw)
    partitions = options.pop("partitions", 3)
    replication_factor = options.pop("replication_factor", 1)
    return KafkaSettings(servers, partitions, replication_factor, options)


@functools.lru_cache(maxsize=65_536)
def _key_hash(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF  # pure Python, ~20 µs: every message of a saga has the same key


def _partition(key: bytes | None, partitions: list[int]) -> int:
    """The partition Kafka's default partitioner (Java's, and aiokafka's) gives `key`; any one for no key."""
    if key is None:
        return random.choice(partitions)
    return partitions[_key_hash(key) % len(partitions)]


# Refusals of a record that leave the idempotent producer's sequence numbers out of step for its partition; other
# errors (authorization, a closed producer) say nothing about those numbers, and a new producer would not help.
_REFUSED_RECORD = (
    MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError, CorruptRecordException,
    InvalidTimestampError, OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch,
)
# What the other records of a partition meet after one was refused, or on a producer that was just replaced.
_AFTER_REPLACEMENT = (ProducerClosed, OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)


_RETIRE_SECONDS = 10.0


class _ProducerReplaced(KafkaError):  # type: ignore[misc]  # aiokafka's errors are untyped
    """The producer a publish was using was replaced under it: retried on the new one."""

    retriable = True


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _stop_within(producer: Any, seconds: float) -> None:
    """Stop a replaced producer; batches stuck behind a refused record may keep it from ever finishing."""
    try:
        await asyncio.wait_for(producer.stop(), seconds)
    except TimeoutError:
        log.warning("a replaced Kafka producer did not stop within %.0fs; abandoned", seconds)


def _is_transient(exc: BaseException) -> bool:
    """True for errors that a later attempt may not meet: lost connections, timeouts, leader elections."""
    return isinstance(exc, KafkaConnectionError | KafkaTimeoutError | TimeoutError) or bool(
        getattr(exc, "retriable", False)
    )


class KafkaBroker:
    """A `Broker` on Apache Kafka.

    Args:
        bootstrap_servers: ``"host:port"`` or several of them.
        partitions: Partitions of the topics this broker creates (existing topics keep theirs).
        replication_factor: Replicas of the topics this broker creates.
        client_options: Passed to aiokafka's producer, consumer and admin client, each getting the options
            it accepts: security (``security_protocol``, ``sasl_*``, ``ssl_context`` or ``ssl_cafile``...),
            timeouts, fetch tuning (``fetch_max_wait_ms``: aiokafka's 500 by default. A waiting fetch is
            answered as soon as a record arrives, so it mostly bounds idle polling; a partition whose records
            sit unread for a while can wait up to that long for its next fetch).
        retry_for: Seconds to keep retrying a lost connection before raising `BrokerError(retriable=True)`.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        partitions: int = 3,
        replication_factor: int = 1,
        client_options: Mapping[str, Any] | None = None,
        retry_for: float = 30.0,
    ) -> None:
        if partitions < 1 or replication_factor < 1:
            raise ValueError("partitions and replication_factor must be at least 1")
        servers = [bootstrap_servers] if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
        self.bootstrap_servers = ",".join(servers)
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.retry_for = retry_for
        self._options = self._check_options(dict(client_options or {}))
        self._max_request_size = int(self._options.get("max_request_size", _MAX_REQUEST_SIZE))
        self._producer: Any = None
        self._replace_lock = asyncio.Lock()
        self._replaced: asyncio.Future[None] | None = None
        """Resolved when the current producer is replaced (created with it, in `start`)."""
        self._retiring: set[asyncio.Future[Any]] = set()
        self._closing = False
        self._admin: Any = None
        self._known_topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._consumers: set[KafkaConsumer] = set()
        self._ids = itertools.count(1)
        self._offsets: Any = None
        """A consumer outside any group, created by the first `backlog`, that reads end offsets."""

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> KafkaBroker:
        """A broker from a ``kafka://`` URL (see `parse_kafka_url`); keyword arguments override the URL."""
        settings = parse_kafka_url(url)
        options = {**settings.client_options, **overrides.pop("client_options", {})}
        kwargs: dict[str, Any] = {
            "partitions": settings.partitions,
            "replication_factor": settings.replication_factor,
            **overrides,
        }
        return cls(settings.bootstrap_servers, **kwargs, client_options=options)

    def __repr__(self) -> str:
        return f"KafkaBroker({self.bootstrap_servers!r})"

    @staticmethod
    def _check_options(options: dict[str, Any]) -> dict[str, Any]:
        fixed = _FIXED & options.keys()
        if fixed:
            raise ValueError(f"client option(s) {sorted(fixed)} are set by KafkaBroker and cannot be changed")
        unknown = {name for name in options if not any(name in p for p in _PARAMS.values())} - set(_SSL_FILES)
        if unknown:
            raise ValueError(f"unknown aiokafka client option(s): {sorted(unknown)}")
        files = {name.removeprefix("ssl_"): options.pop(name) for name in _SSL_FILES if name in options}
        tls = options.get("security_protocol") in ("SSL", "SASL_SSL")
        if (files or tls) and "ssl_context" not in options:
            # Without CA files: the system's CAs, with hostname checks (aiokafka wants a context for TLS).
            options["ssl_context"] = create_ssl_context(**files)
        return options

    def _options_for(self, cls: type, **defaults: Any) -> dict[str, Any]:
        accepted = _PARAMS[cls]
        mine = {name: value for name, value in self._options.items() if name in accepted}
        return {**defaults, **mine, "bootstrap_servers": self.bootstrap_servers}

    async def start(self) -> None:
        """Connect the producer and the admin client, retrying while Kafka is unreachable."""
        if self._producer is not None:
            return
        self._admin = await self._started(
            lambda: AIOKafkaAdminClient(**self._options_for(AIOKafkaAdminClient)), "close"
        )
        self._producer = await self._new_producer()
        self._replaced = asyncio.get_running_loop().create_future()

    async def _new_producer(self) -> Any:
        producer_options = self._options_for(AIOKafkaProducer, linger_ms=0)
        return await self._started(
            lambda: AIOKafkaProducer(**producer_options, acks="all", enable_idempotence=True), "stop"
        )

    async def _replace_producer(self, refused: Any) -> None:
        """After Kafka refused a record for good: the idempotent producer has already counted it in the sequence
        numbers of its partition, and every later batch there would be refused as out of order. A new producer
        (a new producer id) starts them afresh. One replacement at a time; the old producer is flushed and closed
        in the background (`close` waits for it), so the failing caller is not held up by it."""
        async with self._replace_lock:
            if self._producer is not refused or self._closing:
                return  # replaced by another publish meanwhile, or the broker is closing
            log.warning("%r: Kafka refused a record; starting a new producer", self)
            try:
                fresh = await self._new_producer()
            except BrokerError as exc:  # keep the old one: the caller's own error is what it must hear
                log.warning("%r: could not start a new producer: %s", self, exc)
                return
            if self._closing:
                await fresh.stop()
                return
            self._producer = fresh
            replaced, self._replaced = self._replaced, asyncio.get_running_loop().create_future()
            if replaced is not None:
                replaced.set_result(None)  # publishes waiting on the old producer's acknowledgements give up on it
            retiring = asyncio.ensure_future(_stop_within(refused, _RETIRE_SECONDS))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Future[Any]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("%r: closing a replaced producer failed: %r", self, task.exception())

    async def _started(self, make: Callable[[], Any], stop: str) -> Any:
        async def attempt() -> Any:
            client = make()
            try:
                await client.start()
            except BaseException:
                await getattr(client, stop)()
                raise
            return client

        return await self._retrying("connect", attempt)

    async def close(self) -> None:
        """Close the consumers (they leave their groups), then flush and close the producer."""
        self._closing = True
        try:
            for consumer in list(self._consumers):
                await consumer.close()
            async with self._replace_lock:  # no replacement half done
                producer, admin, self._producer, self._admin = self._producer, self._admin, None, None
            if producer is not None:
                await producer.stop()
            if self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)
            if admin is not None:
                await admin.close()
            offsets, self._offsets = self._offsets, None
            if offsets is not None:
                await offsets.stop()
        finally:
            self._closing = False

    async def publish(self, messages: Sequence[BrokerMessage]) -> None:
        """Send the messages in order and wait until Kafka acknowledged all of them (acks=all).

        After a lost connection the whole call is retried, so some messages may be published twice.
        """
        if not messages:
            return
        if self._producer is None:
            raise BrokerError(f"{self!r} is not started (or closed)", retriable=False)
        await self.ensure_topics({message.topic for message in messages})

        # Each message's record, built once: attempts after a lost connection or a new producer reuse them.
        # `send` refuses a record over max_request_size; `send_batch` does not: check them all before sending any.
        records: list[tuple[str, dict[str, Any]]] = []
        for message in messages:
            key = message.key.encode() if message.key is not None else None
            headers = list(message.headers)
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, message.value, headers)
            if size > self._max_request_size:
                raise BrokerError(f"message of {size} bytes for {message.topic!r} exceeds max_request_size "
                                  f"({self._max_request_size})", retriable=False)
            records.append((message.topic, {"key": key, "value": message.value, "timestamp": None, "headers": headers}))

        async def send_all(producer: Any) -> None:
            # One record batch per partition instead of one `send` per message: aiokafka's per-message path
            # (a future, a partitioner call, an accumulator lookup each) was a third of its cost on the loop.
            builders: dict[tuple[str, int], Any] = {}
            acks = []
            partitions: dict[str, list[int]] = {}
            for topic, record in records:
                available = partitions.get(topic)
                if available is None:
                    available = partitions[topic] = sorted(await producer.partitions_for(topic))
                where = (topic, _partition(record["key"], available))
                builder = builders.get(where)
                if builder is None:
                    builder = builders[where] = producer.create_batch()
                if builder.append(**record) is None:  # full: send it; a fresh batch takes any one record
                    acks.append(await producer.send_batch(builder, topic, partition=where[1]))
                    builder = builders[where] = producer.create_batch()
                    builder.append(**record)
            for (topic, partition), builder in builders.items():
                acks.append(await producer.send_batch(builder, topic, partition=partition))
            await asyncio.gather(*acks)

        used: list[Any] = []

        async def attempt() -> None:
            """On the current producer. Behind a record Kafka refused, the old producer may never accept nor
            acknowledge another batch of that partition: when it is replaced meanwhile, try again on the new one."""
            producer, replaced = self._producer, self._replaced
            if producer is None or replaced is None:
                raise BrokerError(f"{self!r} is not started (or closed)", retriable=False)
            used.append(producer)
            sending = asyncio.ensure_future(send_all(producer))
            await asyncio.wait({sending, replaced}, return_when=asyncio.FIRST_COMPLETED)
            if not sending.done():
                sending.cancel()
                sending.add_done_callback(_retrieve)
                raise _ProducerReplaced()
            sending.result()

        for tries_left in (1, 0):
            try:
                await self._retrying("publish", attempt)
                return
            except BrokerError as exc:
                cause = exc.__cause__
                if isinstance(cause, _REFUSED_RECORD) and used:
                    await self._replace_producer(used[-1])
                if tries_left and isinstance(cause, _AFTER_REPLACEMENT) and used and used[-1] is not self._producer:
                    continue  # caught behind a refusal of another record: the new producer sends these
                raise

    async def ensure_topics(self, names: Iterable[str]) -> None:
        """Create the topics that do not exist yet, with this broker's partitions and replication factor."""
        missing = set(names) - self._known_topics
        if not missing:
            return
        if self._admin is None:
            raise BrokerError(f"{self!r} is not started (or closed)", retriable=False)
        async with self._topic_lock:
            missing -= self._known_topics
            if missing:
                await self._retrying("create topics", lambda: self._create_topics(sorted(missing)))
                self._known_topics |= missing

    async def _create_topics(self, names: list[str]) -> None:
        topics = [NewTopic(name, self.partitions, self.replication_factor) for name in names]
        response = await self._admin.create_topics(topics)
        for name, code, *message in response.topic_errors:
            error = for_code(code)
            if code and error is not TopicAlreadyExistsError:
                raise error(f"cannot create topic {name!r}: {message[0] if message else ''}")
        # Creation is asynchronous in the cluster: wait until every partition has a leader.
        deadline = time.monotonic() + 10
        while True:
            described = await self._admin.describe_topics(names)
            ready = all(
                t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"topics {names} have no leader yet")
            await asyncio.sleep(0.05)

    async def subscribe(self, topics: Sequence[str], group: str) -> KafkaConsumer:
        """Join consumer group `group` on `topics` (created if missing). A new group starts at the oldest."""
        if not topics:
            raise ValueError("subscribe needs at least one topic")
        await self.ensure_topics(topics)
        consumer = KafkaConsumer(self, next(self._ids), tuple(dict.fromkeys(topics)), group)
        options = self._options_for(AIOKafkaConsumer, auto_offset_reset="earliest")
        kafka = await self._started(
            lambda: _subscribed(
                AIOKafkaConsumer(**options, group_id=group, enable_auto_commit=False), consumer
            ),
            "stop",
        )
        consumer._kafka = kafka
        self._consumers.add(consumer)
        return consumer

    async def probe(self) -> None:
        """Raise BrokerError unless the cluster answers a metadata request."""
        if self._admin is None:
            raise BrokerError(f"{self!r} is not started (or closed)", retriable=False)
        try:
            await self._admin.describe_cluster()
        except KafkaError as exc:
            raise BrokerError(f"{self!r}: {exc!r}", retriable=True) from exc

    async def backlog(self, topics: Sequence[str], group: str) -> dict[tuple[str, int], int]:
        """Per partition of `topics`: its end offset minus `group`'s committed offset (from its first offset
        when the group has committed nothing there)."""
        if self._admin is None:
            raise BrokerError(f"{self!r} is not started (or closed)", retriable=False)
        try:
            if self._offsets is None:
                offsets = AIOKafkaConsumer(**self._options_for(AIOKafkaConsumer), enable_auto_commit=False)
                await offsets.start()
                self._offsets = offsets
            described = await self._admin.describe_topics(list(topics))
            partitions = [TopicPartition(t["topic"], p["partition"]) for t in described if t["error_code"] == 0
                          for p in t["partitions"]]
            committed = await self._admin.list_consumer_group_offsets(group, partitions=partitions)
            ends = await self._offsets.end_offsets(partitions)
            starts = await self._offsets.beginning_offsets(partitions)
        except KafkaError as exc:
            raise BrokerError(f"{self!r}: reading offsets: {exc!r}", retriable=True) from exc
        lag: dict[tuple[str, int], int] = {}
        for tp in partitions:
            position = committed.get(tp)
            at = position.offset if position is not None and position.offset >= 0 else starts.get(tp, 0)
            lag[(tp.topic, tp.partition)] = max(int(ends.get(tp, 0)) - int(at), 0)
        return lag

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.retry_for
        delay = 0.1
        while True:
            try:
                return await call()
            except (KafkaError, TimeoutError) as exc:
                if not _is_transient(exc):
                    raise BrokerError(f"{self!r}: {what} failed: {exc!r}", retriable=False) from exc
                if time.monotonic() + delay > deadline:
                    raise BrokerError(
                        f"{self!r}: {what} failed for {self.retry_for:.0f}s: {exc!r}", retriable=True
                    ) from exc
                log.warning("%r: %s failed (%r), retrying in %.1fs", self, what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _subscribed(kafka: Any, consumer: KafkaConsumer) -> Any:
    kafka.subscribe(list(consumer.topics), listener=_Listener(consumer))
    return kafka


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._consumer._revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.debug("%r assigned %s", self._consumer, sorted(assigned))


@dataclass(frozen=True)
class _Token:
    consumer: int
    partition: TopicPartition
    offset: int
    epoch: int


class KafkaConsumer:
    """One member of a Kafka consumer group. Use `KafkaBroker.subscribe` to get one."""

    def __init__(self, broker: KafkaBroker, id: int, topics: tuple[str, ...], group: str) -> None:
        self._broker = broker
        self._id = id
        self.topics = topics
        self.group = group
        self._kafka: Any = None
        self._epoch = 0
        """Bumped by every revocation: deliveries of an older epoch are abandoned."""
        self._fetched: dict[TopicPartition, OrderedDict[int, bool]] = {}
        """Per partition, the offsets fetched in this epoch and not committed, and whether they were acked."""
        self._resume: dict[TopicPartition, int] = {}
        """Per partition, the offset after the last record delivered in this epoch."""
        self._closed = False

    def __repr__(self) -> str:
        return f"KafkaConsumer(#{self._id}, group={self.group!r}, topics={list(self.topics)!r})"

    def _revoke(self, revoked: set[TopicPartition]) -> None:
        log.debug("%r revoked %s", self, sorted(revoked))
        self._epoch += 1
        self._fetched.clear()  # eager rebalancing revokes all; what is assigned again restarts from commits
        self._resume.clear()

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to `max_messages` deliveries; waits up to `timeout` seconds for the first one."""
        if self._closed:
            raise BrokerError(f"{self!r} is closed", retriable=False)
        try:
            timeout_ms = max(int(timeout * 1000), 0)
            batches = await self._kafka.getmany(timeout_ms=timeout_ms, max_records=max_messages)
        except ConsumerStoppedError as exc:
            raise BrokerError(f"{self!r} is closed", retriable=False) from exc
        except KafkaError as exc:
            raise BrokerError(f"{self!r}: fetch failed: {exc!r}", retriable=_is_transient(exc)) from exc
        except Exception as exc:  # a record aiokafka cannot parse, whatever it raises
            return await self._around_unreadable(max_messages, exc)
        return self._deliveries(batches)

    def _deliveries(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> list[Delivery]:
        # No await in here: a rebalance cannot slip between reading the records and tagging their epoch.
        deliveries = []
        for partition, records in batches.items():
            fetched = self._fetched.setdefault(partition, OrderedDict())
            for record in records:
                message = BrokerMessage(
                    topic=record.topic,
                    value=record.value if record.value is not None else b"",
                    key=record.key.decode("utf-8", errors="replace") if record.key is not None else None,
                    # Kafka allows a header without a value (null): it reads as empty, which the wire refuses
                    # as a missing attribute rather than failing the fetch of every record after it.
                    headers=tuple((name, b"" if value is None else bytes(value)) for name, value in record.headers),
                )
                fetched[record.offset] = False
                deliveries.append(Delivery(message, _Token(self._id, partition, record.offset, self._epoch)))
            if records:
                self._resume[partition] = records[-1].offset + 1
        return deliveries

    async def _around_unreadable(self, max_messages: int, error: Exception) -> list[Delivery]:
        """aiokafka raised while parsing a record (a header name that is not UTF-8 raises UnicodeDecodeError), and
        would raise on it again at every fetch: the partition would be stuck for ever. Read each partition one
        record at a time, so that its position stops right at the record that fails; skip that record (seek past
        it) and hand it over as a message with `malformed` saying why, to be dead-lettered and acknowledged like
        any other. Records before it are delivered as usual."""
        log.warning("%r: a record could not be parsed (%r); finding it", self, error)
        deliveries: list[Delivery] = []
        kafka = self._kafka
        try:
            # The failed call may have taken other partitions' records and lost them with the error (aiokafka
            # advances a partition's position as it hands its records over): go back to what was delivered.
            for partition in kafka.assignment():
                resume = self._resume.get(partition)
                if resume is None:
                    resume = await kafka.committed(partition)
                if resume is None:
                    await kafka.seek_to_beginning(partition)
                else:
                    kafka.seek(partition, resume)
        except (KafkaError, AssertionError) as lost:  # a rebalance meanwhile: the new assignment starts afresh
            log.info("%r: could not go back after an unreadable record: %r", self, lost)
            return []
        for partition in sorted(kafka.assignment()):
            while len(deliveries) < max_messages:
                try:
                    batch = await kafka.getmany(partition, timeout_ms=500, max_records=1)
                except ConsumerStoppedError as exc:
                    raise BrokerError(f"{self!r} is closed", retriable=False) from exc
                except KafkaError as exc:
                    raise BrokerError(f"{self!r}: fetch failed: {exc!r}", retriable=_is_transient(exc)) from exc
                except Exception as exc:  # this partition's next record is the one
                    epoch = self._epoch
                    try:
                        offset = await kafka.position(partition)
                        kafka.seek(partition, offset + 1)
                    except (KafkaError, AssertionError) as lost:  # revoked meanwhile: its next owner meets it
                        log.info("%r: could not skip the unreadable record of %s: %r", self, partition, lost)
                        break
                    if epoch != self._epoch:
                        break
                    reason = f"record {offset} of {partition.topic}[{partition.partition}] could not be parsed: "
                    message = BrokerMessage(topic=partition.topic, value=b"",
                                            malformed=reason + f"{type(exc).__name__}: {str(exc)[:200]}")
                    self._fetched.setdefault(partition, OrderedDict())[offset] = False
                    self._resume[partition] = offset + 1
                    deliveries.append(Delivery(message, _Token(self._id, partition, offset, epoch)))
                    break
                if not batch:
                    break
                deliveries.extend(self._deliveries(batch))
        return deliveries

    async def commit(self, deliveries: Sequence[Delivery]) -> None:
        """Commit deliveries.

        Deliveries of partitions revoked since they were fetched (or of a closed consumer) are skipped: the
        partition's owner receives them again.
        """
        offsets: dict[TopicPartition, int] = {}
        for delivery in deliveries:
            token = delivery.token
            if self._closed or not isinstance(token, _Token) or token.consumer != self._id:
                continue
            fetched = self._fetched.get(token.partition)
            if token.epoch != self._epoch or fetched is None or token.offset not in fetched:
                continue
            fetched[token.offset] = True
            while fetched and fetched[next(iter(fetched))]:
                offsets[token.partition] = fetched.popitem(last=False)[0] + 1
        if not offsets:
            return
        try:
            async with asyncio.timeout(self._broker.retry_for):
                await self._kafka.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.info("%r: commit skipped, the group rebalanced: %s", self, exc)
        except TimeoutError as exc:
            message = f"{self!r}: commit failed for {self._broker.retry_for:.0f}s"
            raise BrokerError(message, retriable=True) from exc
        except KafkaError as exc:
            raise BrokerError(f"{self!r}: commit failed: {exc!r}", retriable=_is_transient(exc)) from exc

    async def close(self) -> None:
        """Leave the group: its partitions, with what was fetched and not committed, go to other members."""
        if self._closed:
            return
        self._closed = True
        self._broker._consumers.discard(self)
        self._fetched.clear()
        await self._kafka.stop()

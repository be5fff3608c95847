"""The broker contract: every `Broker` implementation passes the same tests.

`BrokerContract` holds the tests; `TestMemoryBroker`, `TestSqlQueueBroker` (a SQLite file, and PostgreSQL when
available) and `TestKafkaBroker` (the real Apache Kafka of `scripts/services.sh`) run them, plus the tests of
what only their transport has (leases, partitions and rebalances). Nothing sleeps and hopes: every wait is a
fetch with a timeout or a condition checked against a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sqlqueue import SqlQueueBroker
from sagas.engine.ports import Broker, BrokerMessage, Consumer, Delivery
from sagas.errors import BrokerError

OpenBroker = Callable[[], Awaitable[Broker]]


# ---- helpers ------------------------------------------------------------------------------------------


def message(topic: str, value: str | bytes, *, key: str | None = "k") -> BrokerMessage:
    return BrokerMessage(topic=topic, value=value.encode() if isinstance(value, str) else value, key=key)


def values(deliveries: list[Delivery]) -> list[str]:
    return [d.message.value.decode() for d in deliveries]


async def collect(
    consumer: Consumer, count: int, *, within: float = 20.0, commit: bool = False
) -> list[Delivery]:
    """Fetch until `count` deliveries arrived or `within` seconds passed; returns what arrived."""
    deadline = time.monotonic() + within
    got: list[Delivery] = []
    while len(got) < count and (remaining := deadline - time.monotonic()) > 0:
        deliveries = await consumer.fetch(200, timeout=min(remaining, 1.0))
        if commit and deliveries:
            await consumer.commit(deliveries)
        got.extend(deliveries)
    assert len(got) >= count, f"only {len(got)} of {count} deliveries within {within}s: {values(got)[:10]}"
    return got


@asynccontextmanager
async def brokers(make: Callable[[], Broker]) -> AsyncIterator[OpenBroker]:
    """A factory of started brokers, all closed at the end (each one stands for a separate process)."""
    opened: list[Broker] = []

    async def open_broker() -> Broker:
        broker = make()
        await broker.start()
        opened.append(broker)
        return broker

    try:
        yield open_broker
    finally:
        for broker in reversed(opened):
            await broker.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---- the contract -------------------------------------------------------------------------------------


class BrokerContract:
    """Tests every broker passes. Subclasses provide the `open_broker` fixture."""

    @pytest.fixture
    async def open_broker(self) -> AsyncIterator[OpenBroker]:
        raise NotImplementedError("each broker's test class provides open_broker")
        yield  # noqa: PT022 - unreachable; makes this an async generator like the overrides

    @pytest.fixture
    async def broker(self, open_broker: OpenBroker) -> Broker:
        return await open_broker()

    @pytest.fixture
    def topic(self) -> str:
        return unique("topic")

    @pytest.fixture
    def group(self) -> str:
        return unique("group")

    async def test_round_trip_is_exact(self, broker: Broker, topic: str, group: str) -> None:
        """Values (any bytes), headers (order, duplicates, binary) and keys arrive exactly as published."""
        sent = [
            BrokerMessage(topic, bytes(range(256)), key="saga-1", headers=(("a", b"\x00\xff"), ("a", b"2"))),
            BrokerMessage(topic, b"", key="saga-1"),
            BrokerMessage(topic, b'{"x": 1}', key="\u00e9t\u00e9", headers=(("h", "\u2603".encode()),)),
            BrokerMessage(topic, b"no key", key=None, headers=(("empty", b""),)),
        ]
        consumer = await broker.subscribe([topic], group)
        await broker.publish(sent)
        got = [d.message for d in await collect(consumer, len(sent))]
        assert sorted(got, key=repr) == sorted(sent, key=repr)
        assert [m for m in got if m.key == "saga-1"] == sent[:2]

    async def test_per_key_order_survives_a_burst(self, broker: Broker, topic: str, group: str) -> None:
        """1,000 messages over 10 keys, published in a burst of batches, arrive in order for every key."""
        consumer = await broker.subscribe([topic], group)
        sent = [message(topic, f"{i % 10}:{i // 10}", key=f"key-{i % 10}") for i in range(1000)]
        for start in range(0, 1000, 100):
            await broker.publish(sent[start : start + 100])
        got = await collect(consumer, 1000, commit=True)
        by_key: dict[str, list[int]] = {}
        for text in values(got):
            key, seq = text.split(":")
            by_key.setdefault(key, []).append(int(seq))
        assert by_key == {str(k): list(range(100)) for k in range(10)}

    async def test_sequential_publishes_keep_key_order(self, broker: Broker, topic: str, group: str) -> None:
        """Messages of one key published one call after another arrive in that order."""
        consumer = await broker.subscribe([topic], group)
        for i in range(50):
            await broker.publish([message(topic, str(i), key="one")])
        assert values(await collect(consumer, 50, commit=True)) == [str(i) for i in range(50)]

    async def test_fetch_with_nothing_returns_empty_within_timeout(
        self, broker: Broker, topic: str, group: str
    ) -> None:
        """A fetch on an empty topic returns [] after about `timeout`, neither much sooner nor much later."""
        consumer = await broker.subscribe([topic], group)
        started = time.monotonic()
        assert await consumer.fetch(10, timeout=0.3) == []
        assert 0.25 <= time.monotonic() - started < 1.0

    async def test_waiting_fetch_returns_as_soon_as_a_message_arrives(
        self, broker: Broker, topic: str, group: str
    ) -> None:
        """A fetch waiting on an empty topic returns a message published meanwhile, before its timeout."""
        consumer = await broker.subscribe([topic], group)
        assert await consumer.fetch(10, timeout=0.05) == []  # joined; the next fetch really waits
        fetch = asyncio.create_task(consumer.fetch(10, timeout=15.0))
        await broker.publish([message(topic, "hello")])
        started = time.monotonic()
        deliveries = await fetch
        while not deliveries:  # Kafka may still be assigning partitions: keep waiting, with a deadline
            assert time.monotonic() - started < 15.0
            deliveries = await consumer.fetch(10, timeout=1.0)
        assert values(deliveries) == ["hello"]
        assert time.monotonic() - started < 10.0

    async def test_fetch_returns_at_most_max_messages(self, broker: Broker, topic: str, group: str) -> None:
        """`max_messages` caps a fetch; the rest comes with the next fetches, nothing twice."""
        consumer = await broker.subscribe([topic], group)
        await broker.publish([message(topic, str(i)) for i in range(7)])
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while len(seen) < 7 and time.monotonic() < deadline:
            batch = await consumer.fetch(3, timeout=1.0)
            assert len(batch) <= 3
            seen.extend(values(batch))
        assert seen == [str(i) for i in range(7)]

    async def test_publish_many_in_one_call(self, broker: Broker, topic: str, group: str) -> None:
        """One publish of 2,000 messages delivers all of them, in order."""
        consumer = await broker.subscribe([topic], group)
        await broker.publish([message(topic, str(i)) for i in range(2000)])
        assert values(await collect(consumer, 2000, commit=True)) == [str(i) for i in range(2000)]

    async def test_committed_messages_are_not_redelivered(
        self, broker: Broker, topic: str, group: str
    ) -> None:
        """After a consumer commits and closes, the next consumer of its group starts after the commits."""
        first = await broker.subscribe([topic], group)
        await broker.publish([message(topic, str(i)) for i in range(10)])
        await collect(first, 10, commit=True)
        await first.close()
        await broker.publish([message(topic, "sentinel")])
        second = await broker.subscribe([topic], group)
        assert values(await collect(second, 1)) == ["sentinel"]

    async def test_uncommitted_messages_are_redelivered(self, broker: Broker, topic: str, group: str) -> None:
        """What a consumer fetched but did not commit before closing goes to the group's next consumer."""
        first = await broker.subscribe([topic], group)
        await broker.publish([message(topic, str(i)) for i in range(10)])
        got = await collect(first, 10)
        await first.commit(got[:4])
        await first.close()
        await broker.publish([message(topic, "sentinel")])
        second = await broker.subscribe([topic], group)
        assert values(await collect(second, 7)) == [*map(str, range(4, 10)), "sentinel"]

    async def test_every_group_gets_every_message(self, broker: Broker, topic: str) -> None:
        """Two consumer groups on one topic each receive every message."""
        billing = await broker.subscribe([topic], unique("billing"))
        shipping = await broker.subscribe([topic], unique("shipping"))
        await broker.publish([message(topic, str(i), key=f"k{i % 3}") for i in range(30)])
        for consumer in (billing, shipping):
            got = values(await collect(consumer, 30, commit=True))
            assert sorted(got, key=int) == [str(i) for i in range(30)]

    async def test_a_consumer_reads_all_its_topics(self, broker: Broker, group: str) -> None:
        """One consumer subscribed to two topics receives the messages of both, and only those."""
        orders, payments, other = unique("orders"), unique("payments"), unique("other")
        consumer = await broker.subscribe([orders, payments], group)
        await broker.publish([message(orders, "o"), message(other, "x"), message(payments, "p")])
        got = await collect(consumer, 2)
        assert sorted(values(got)) == ["o", "p"]
        assert {d.message.topic for d in got} == {orders, payments}

    async def test_repeated_and_late_commits_are_harmless(
        self, broker: Broker, topic: str, group: str
    ) -> None:
        """Committing a delivery twice, or after the consumer closed, neither raises nor loses messages."""
        consumer = await broker.subscribe([topic], group)
        await broker.publish([message(topic, str(i)) for i in range(3)])
        got = await collect(consumer, 3)
        await consumer.commit(got[:1])
        await consumer.commit(got[:1])
        await consumer.close()
        await consumer.commit(got)  # closed: ignored, so these are delivered again
        await consumer.close()
        again = await broker.subscribe([topic], group)
        assert values(await collect(again, 2)) == ["1", "2"]

    async def test_closing_a_consumer_while_its_fetch_waits_passes_its_topics_on(
        self, broker: Broker, topic: str, group: str
    ) -> None:
        """A fetch waiting when its consumer is closed (a shutdown from another task) ends with nothing and does
        not take the topic back: the group's next member gets the messages."""
        old = await broker.subscribe([topic], group)
        assert await old.fetch(10, timeout=0.05) == []  # joined; the next fetch really waits
        waiting = asyncio.create_task(old.fetch(10, timeout=15.0))
        await asyncio.sleep(0.1)
        await old.close()
        assert await asyncio.wait_for(waiting, 10.0) == []
        successor = await broker.subscribe([topic], group)
        await broker.publish([message(topic, "after")])
        assert values(await collect(successor, 1, within=5.0)) == ["after"]

    async def test_fetch_after_close_raises(self, broker: Broker, topic: str, group: str) -> None:
        """Fetching from a closed consumer raises a BrokerError that is not retriable."""
        consumer = await broker.subscribe([topic], group)
        await consumer.close()
        with pytest.raises(BrokerError) as caught:
            await consumer.fetch(1, timeout=0.01)
        assert caught.value.retriable is False


# ---- in-memory ----------------------------------------------------------------------------------------


class SharedTransportContract:
    """For brokers that connect processes (not MemoryBroker, which is its own transport)."""

    async def test_another_process_sees_the_messages(
        self, open_broker: OpenBroker, topic: str, group: str
    ) -> None:
        """A message published through one broker instance is consumed through another on that transport."""
        publisher, subscriber = await open_broker(), await open_broker()
        consumer = await subscriber.subscribe([topic], group)
        await publisher.publish([message(topic, "across")])
        assert values(await collect(consumer, 1)) == ["across"]


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    async def open_broker(self) -> AsyncIterator[OpenBroker]:
        async with brokers(MemoryBroker) as open_broker:
            yield open_broker

    async def test_memory_is_released_once_every_group_committed(self, topic: str) -> None:
        """Messages are dropped from memory as soon as every group subscribed to the topic committed them."""
        broker = MemoryBroker()
        fast, slow = await broker.subscribe([topic], "fast"), await broker.subscribe([topic], "slow")
        await broker.publish([message(topic, str(i)) for i in range(100)])
        await collect(fast, 100, commit=True)
        assert broker.pending(topic) == 100
        got = await collect(slow, 100)
        await slow.commit(got[:60])
        assert broker.pending(topic) == 40
        await slow.commit(got)
        assert broker.pending(topic) == 0
        assert broker.lag(topic, "slow") == 0

    async def test_second_member_waits_for_the_owner(self, topic: str, group: str) -> None:
        """A second member of a group gets nothing while the first owns the topic, then takes over."""
        broker = MemoryBroker()
        owner, waiter = await broker.subscribe([topic], group), await broker.subscribe([topic], group)
        await broker.publish([message(topic, "a")])
        assert values(await owner.fetch(10, timeout=0)) == ["a"]
        waiting = asyncio.create_task(waiter.fetch(10, timeout=15.0))
        await broker.publish([message(topic, "b")])
        assert values(await owner.fetch(10, timeout=0)) == ["b"]
        assert not waiting.done()
        await owner.close()
        assert values(await waiting) == ["a", "b"]

    async def test_close_wakes_a_waiting_fetch(self, topic: str, group: str) -> None:
        """Closing the broker ends a fetch that is waiting, with no deliveries."""
        broker = MemoryBroker()
        consumer = await broker.subscribe([topic], group)
        waiting = asyncio.create_task(consumer.fetch(10, timeout=15.0))
        await asyncio.sleep(0)  # let the fetch start waiting
        await broker.close()
        assert await asyncio.wait_for(waiting, 5.0) == []
        with pytest.raises(BrokerError):
            await broker.publish([message(topic, "late")])


# ---- SQL queue ----------------------------------------------------------------------------------------


class TestSqlQueueBroker(BrokerContract, SharedTransportContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}"

    @pytest.fixture
    async def open_broker(self, url: str) -> AsyncIterator[OpenBroker]:
        async with brokers(lambda: SqlQueueBroker(url, prune_interval=0)) as open_broker:
            yield open_broker

    async def test_expired_lease_passes_the_messages_on(self, url: str, topic: str, group: str) -> None:
        """A consumer that stops renewing its lease loses its claim: another member gets its uncommitted
        messages, and the stale consumer's late commit is ignored."""
        async with brokers(lambda: SqlQueueBroker(url, lease=1.0, prune_interval=0)) as open_broker:
            stale_broker, broker = await open_broker(), await open_broker()
            stale = await stale_broker.subscribe([topic], group)
            await broker.publish([message(topic, str(i)) for i in range(5)])
            fetched = await collect(stale, 5)
            successor = await broker.subscribe([topic], group)
            assert await successor.fetch(10, timeout=0) == []  # the lease is still valid
            taken_over = await collect(successor, 5, within=10.0)
            assert values(taken_over) == values(fetched)
            await stale.commit(fetched)  # too late: skipped, not raised
            assert await stale.fetch(10, timeout=0) == []
            await successor.commit(taken_over[:2])
            await successor.close()
            newcomer = await broker.subscribe([topic], group)
            assert values(await collect(newcomer, 3)) == ["2", "3", "4"]

    async def test_a_consumer_of_several_topics_renews_them_all(self, url: str, group: str) -> None:
        """Committing on one topic renews the lease of every topic the consumer holds: one it is not busy on
        must not expire and pass to another member while this one still reads it."""
        busy, quiet = unique("busy"), unique("quiet")
        async with brokers(lambda: SqlQueueBroker(url, lease=1.0, prune_interval=0)) as open_broker:
            first_broker, second_broker = await open_broker(), await open_broker()
            first = await first_broker.subscribe([busy, quiet], group)
            assert await first.fetch(10, timeout=0) == []  # holds both topics
            second = await second_broker.subscribe([busy, quiet], group)
            deadline = time.monotonic() + 2.0  # twice the lease
            while time.monotonic() < deadline:
                await first_broker.publish([message(busy, "b")])
                await first.commit(await first.fetch(10, timeout=0.1))
                assert await second.fetch(10, timeout=0) == []
                await asyncio.sleep(0.2)
            await first_broker.publish([message(quiet, str(i)) for i in range(3)])
            assert await second.fetch(10, timeout=0.3) == []
            assert values(await collect(first, 3)) == ["0", "1", "2"]

    @pytest.mark.slow
    async def test_sigkilled_consumer_process_is_replaced(self, url: str, topic: str, group: str) -> None:
        """When a consumer's process is SIGKILLed, another process on the machine takes its messages at once,
        without waiting for the dead holder's lease (60 s here) to run out."""
        broker = SqlQueueBroker(url, lease=60.0)
        await broker.start()
        try:
            await broker.publish([message(topic, str(i)) for i in range(5)])
            script = textwrap.dedent(f"""
                import asyncio, sys
                from sagas.adapters.sqlqueue import SqlQueueBroker
                async def main():
                    broker = SqlQueueBroker({url!r}, lease=60.0)
                    await broker.start()
                    consumer = await broker.subscribe([{topic!r}], {group!r})
                    got = []
                    while len(got) < 5:
                        got += await consumer.fetch(10, timeout=1.0)
                    print(len(got), flush=True)
                    await asyncio.Event().wait()
                asyncio.run(main())
            """)
            child = subprocess.Popen(  # noqa: ASYNC220 - returns at once; we never block on it in the loop
                [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
            )
            try:
                assert child.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
                assert line.strip() == "5"
                os.kill(child.pid, signal.SIGKILL)
            finally:
                child.kill()
                child.wait()
                child.stdout.close()  # type: ignore[union-attr]
            survivor = await broker.subscribe([topic], group)
            assert values(await collect(survivor, 5, within=5.0)) == [str(i) for i in range(5)]
        finally:
            await broker.close()

    async def test_rows_are_pruned_once_every_group_committed(
        self, open_broker: OpenBroker, topic: str
    ) -> None:
        """The message table keeps a row only until every group subscribed to its topic has committed it."""
        broker = await open_broker()
        assert isinstance(broker, SqlQueueBroker)
        fast, slow = await broker.subscribe([topic], "fast"), await broker.subscribe([topic], "slow")
        await broker.publish([message(topic, str(i)) for i in range(100)])
        await collect(fast, 100, commit=True)
        assert await broker.message_count(topic) == 100
        got = await collect(slow, 100)
        await slow.commit(got[:60])
        assert await broker.message_count(topic) == 40
        await slow.commit(got)
        assert await broker.message_count(topic) == 0
        await broker.publish([message(topic, "after pruning")])  # ids are not reused: cursors stay right
        assert values(await collect(fast, 1)) == ["after pruning"]

    async def test_retention_drops_old_rows_a_dead_group_never_commits(self, url: str, topic: str) -> None:
        """Rows older than `retention` go even if a group never commits them: the table can't grow forever."""
        async with brokers(lambda: SqlQueueBroker(url, retention=0.0, prune_interval=0)) as open_broker:
            broker = await open_broker()
            assert isinstance(broker, SqlQueueBroker)
            await broker.subscribe([topic], "dead")
            live = await broker.subscribe([topic], "live")
            await broker.publish([message(topic, "old")])
            await collect(live, 1, commit=True)
            assert await broker.message_count(topic) == 0

    async def test_in_memory_sqlite_is_refused(self) -> None:
        """An in-memory SQLite URL is refused: separate processes could not share it."""
        with pytest.raises(ValueError, match="MemoryBroker"):
            SqlQueueBroker("sqlite+aiosqlite:///:memory:")


@pytest.mark.postgres
class TestSqlQueueBrokerOnPostgres(BrokerContract, SharedTransportContract):
    @pytest.fixture
    async def open_broker(self, pg_url: str) -> AsyncIterator[OpenBroker]:
        async with brokers(lambda: SqlQueueBroker(pg_url, prune_interval=0)) as open_broker:
            yield open_broker


# ---- Apache Kafka -------------------------------------------------------------------------------------


@pytest.mark.kafka
class TestKafkaBroker(BrokerContract, SharedTransportContract):
    @pytest.fixture
    async def open_broker(self, kafka_url: str) -> AsyncIterator[OpenBroker]:
        from sagas.adapters.kafka import KafkaBroker

        def make() -> Broker:
            return KafkaBroker.from_url(kafka_url, partitions=2, retry_for=10.0)

        async with brokers(make) as open_broker:
            yield open_broker

    async def test_rebalance_abandons_revoked_deliveries(
        self, broker: Broker, topic: str, group: str
    ) -> None:
        """When a second member joins, the first one's uncommitted deliveries are abandoned (committing them
        is skipped without error) and every message is received again by the partitions' new owners."""
        first = await broker.subscribe([topic], group)
        await broker.publish([message(topic, str(i), key=f"k{i}") for i in range(20)])
        before = await collect(first, 20)
        second = await broker.subscribe([topic], group)
        after: dict[Consumer, list[str]] = {first: [], second: []}
        deadline = time.monotonic() + 60
        while sorted({v for got in after.values() for v in got}, key=int) != [str(i) for i in range(20)]:
            assert time.monotonic() < deadline, f"not every message came back after the rebalance: {after}"
            for consumer, got in after.items():  # both keep polling, as members of a live group do
                got.extend(values(await consumer.fetch(100, timeout=0.2)))
        assert after[second], "the second member was assigned no partition"
        await first.commit(before)  # revoked meanwhile: skipped, not raised...
        await first.close()
        await second.close()
        newcomer = await broker.subscribe([topic], group)  # ...so nothing was committed
        assert sorted(values(await collect(newcomer, 20)), key=int) == [str(i) for i in range(20)]

    async def test_an_oversized_message_is_refused_and_its_partition_keeps_working(
        self, broker: Broker, topic: str, group: str
    ) -> None:
        """A message over max_request_size is refused before it is sent (not retriable), and later messages
        with the same key, so to the same partition, still go through: the producer's state is intact."""
        consumer = await broker.subscribe([topic], group)
        await broker.publish([message(topic, "before")])
        with pytest.raises(BrokerError) as caught:
            await broker.publish([message(topic, b"x" * 1_100_000)])
        assert caught.value.retriable is False
        assert "max_request_size" in str(caught.value)
        await broker.publish([message(topic, "after")])
        assert values(await collect(consumer, 2)) == ["before", "after"]

    async def test_a_record_kafka_refuses_does_not_block_its_partition(
        self, kafka_url: str, broker: Broker, topic: str, group: str
    ) -> None:
        """Kafka itself refuses a record (here: over the topic's max.message.bytes, under the client's limit).
        The idempotent producer has counted it in the partition's sequence numbers: without a new producer every
        later publish to that partition would be refused as out of order."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        from sagas.adapters.kafka import parse_kafka_url

        admin = AIOKafkaAdminClient(bootstrap_servers=parse_kafka_url(kafka_url).bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "2000"})])
        finally:
            await admin.close()
        consumer = await broker.subscribe([topic], group)
        await broker.publish([message(topic, "before")])
        with pytest.raises(BrokerError) as caught:
            await broker.publish([message(topic, b"x" * 5000)])
        assert caught.value.retriable is False
        await broker.publish([message(topic, "after")])
        assert values(await collect(consumer, 2)) == ["before", "after"]

        # Refused while other publishes to the same partition are in flight: one new producer, and every other
        # message still arrives (those caught behind the refused record are sent again by the new producer).
        created = 0
        new_producer = broker._new_producer  # type: ignore[attr-defined]

        async def counting() -> object:
            nonlocal created
            created += 1
            return await new_producer()

        broker._new_producer = counting  # type: ignore[attr-defined]
        small = [broker.publish([message(topic, f"m{i}")]) for i in range(8)]
        outcomes = await asyncio.gather(broker.publish([message(topic, b"y" * 5000)]), *small,
                                        return_exceptions=True)
        assert isinstance(outcomes[0], BrokerError)
        assert outcomes[1:] == [None] * 8
        assert created == 1
        got = values(await collect(consumer, 8))
        assert sorted(set(got)) == sorted(f"m{i}" for i in range(8))  # at least once each


# ---- RabbitMQ -----------------------------------------------------------------------------------------


@pytest.mark.rabbitmq
class TestRabbitBroker(BrokerContract, SharedTransportContract):
    @pytest.fixture
    async def open_broker(self, amqp_url: str) -> AsyncIterator[OpenBroker]:
        from sagas.adapters.rabbitmq import RabbitBroker

        def make() -> Broker:
            return RabbitBroker.from_url(amqp_url, retry_for=10.0)

        async with brokers(make) as open_broker:
            yield open_broker


def test_parse_kafka_url_reads_servers_partitions_and_options() -> None:
    """A kafka:// URL gives the bootstrap servers, topic settings and typed aiokafka client options."""
    from sagas.adapters.kafka import parse_kafka_url

    settings = parse_kafka_url(
        "kafka://h1:9092,h2:9093?partitions=4&replication_factor=3&security_protocol=SASL_SSL"
        "&sasl_mechanism=SCRAM-SHA-256&request_timeout_ms=5000"
    )
    assert settings.bootstrap_servers == ("h1:9092", "h2:9093")
    assert (settings.partitions, settings.replication_factor) == (4, 3)
    assert settings.client_options == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "request_timeout_ms": 5000,
    }


def test_parse_kafka_url_takes_credentials_from_userinfo() -> None:
    """Credentials in a kafka:// URL become SASL PLAIN over TLS unless the query says otherwise."""
    from sagas.adapters.kafka import parse_kafka_url

    settings = parse_kafka_url("kafka://app:p%40ss@broker:9092?security_protocol=SASL_PLAINTEXT")
    assert settings.bootstrap_servers == ("broker:9092",)
    assert settings.client_options == {
        "sasl_plain_username": "app", "sasl_plain_password": "p@ss", "sasl_mechanism": "PLAIN",
        "security_protocol": "SASL_PLAINTEXT",
    }


def test_kafka_url_options_take_the_type_of_the_client_option() -> None:
    """A password of digits stays text; a number where aiokafka takes a float is a float; bad values are named."""
    from sagas.adapters.kafka import parse_kafka_url

    options = parse_kafka_url(
        "kafka://app:000123@broker:9092?sasl_plain_username=007&metadata_max_age_ms=300000"
        "&enable_idempotence=false&client_id=42&max_poll_records=100&rebalance_timeout_ms=30000"
    ).client_options
    assert (options["max_poll_records"], options["rebalance_timeout_ms"]) == (100, 30000)
    assert options["sasl_plain_password"] == "000123"
    assert options["sasl_plain_username"] == "007"
    assert options["client_id"] == "42"
    assert options["metadata_max_age_ms"] == 300000
    assert options["enable_idempotence"] is False
    with pytest.raises(ValueError, match="request_timeout_ms='soon': expected a int"):
        parse_kafka_url("kafka://broker:9092?request_timeout_ms=soon")
    with pytest.raises(ValueError, match="partitions"):
        parse_kafka_url("kafka://broker:9092?partitions=many")


def test_every_aiokafka_option_without_a_default_is_typed_on_purpose() -> None:
    """URL values are typed by aiokafka's defaults; an option whose default is None is text unless listed as an
    integer. A new aiokafka option of that kind must be looked at, not silently passed as text."""
    from sagas.adapters import kafka

    text = {"loop", "client_id", "api_version", "key_serializer", "value_serializer", "compression_type",
            "ssl_context", "transactional_id", "sasl_plain_password", "sasl_plain_username",
            "sasl_kerberos_domain_name", "sasl_oauth_token_provider", "group_id", "group_instance_id",
            "key_deserializer", "value_deserializer", "client_rack"}
    untyped = {name for parameters in kafka._DEFAULTS.values() for name, p in parameters.items()
               if p.default is None}
    assert untyped - text == set(kafka._INT_WITHOUT_DEFAULT)


@pytest.mark.parametrize("url", ["kafka://app:secret@broker:9092", "kafka://broker:9092?security_protocol=SSL"])
def test_tls_without_ca_files_uses_the_system_cas(url: str) -> None:
    """SASL_SSL (the default with credentials) or SSL needs an SSL context: without CA files, the system's."""
    import ssl

    from sagas.adapters.kafka import KafkaBroker

    broker = KafkaBroker.from_url(url)
    context = broker._options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_kafka_broker_refuses_options_that_would_change_its_semantics() -> None:
    """Client options that would break at-least-once delivery (auto-commit, acks) or that aiokafka does not
    know are refused when the broker is created."""
    from sagas.adapters.kafka import KafkaBroker

    with pytest.raises(ValueError, match="enable_auto_commit"):
        KafkaBroker("localhost:9092", client_options={"enable_auto_commit": True})
    with pytest.raises(ValueError, match="acks"):
        KafkaBroker.from_url("kafka://localhost:9092?acks=1")
    with pytest.raises(ValueError, match="no_such_option"):
        KafkaBroker("localhost:9092", client_options={"no_such_option": 1})
    broker = KafkaBroker.from_url("kafka://localhost:9092?partitions=6", client_options={"linger_ms": 5})
    assert broker.partitions == 6


async def test_unreachable_kafka_is_a_retriable_error_after_retrying() -> None:
    """With no Kafka answering, start retries for `retry_for` seconds, then raises a retriable BrokerError."""
    from sagas.adapters.kafka import KafkaBroker

    broker = KafkaBroker("127.0.0.1:9", retry_for=1.0, client_options={"request_timeout_ms": 1000})
    started = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        await broker.start()
    assert caught.value.retriable is True
    assert 0.5 < time.monotonic() - started < 15
    await broker.close()

"""What only the RabbitMQ broker has, on the real RabbitMQ of `scripts/services.sh` (the shared contract runs in
test_broker_contract.py): ordering across a takeover, unroutable messages, messages held before any group, the
delivery limit, and reconnection, with a test for each aio-pika pitfall the issue names: consumers not restored
after a reconnect (aio-pika#231), a publish hanging while the connection is down (#636), an ack after a
connection loss hanging (#501), and delivery tags that mean other messages on a new channel.

Connections are closed from the server side with `scripts/services.sh close-connections rabbitmq`
(`rabbitmqctl close_all_connections`); the server is stopped and started with `pause` / `resume`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pamqp import commands as spec

from sagas.adapters.rabbitmq import RabbitBroker, RabbitConsumer
from sagas.engine.ports import Broker, Delivery
from sagas.errors import BrokerError
from tests.contract.test_broker_contract import OpenBroker, brokers, collect, message, unique, values
from tests.integration.rabbitmq_support import UNDECODABLE, RawProperties, publish_raw, undecodable_properties

pytestmark = pytest.mark.rabbitmq

SERVICES = Path(__file__).resolve().parents[2] / "scripts" / "services.sh"


async def services(action: str) -> None:
    """`scripts/services.sh ACTION rabbitmq`, which must succeed."""
    proc = await asyncio.create_subprocess_exec(
        str(SERVICES), action, "rabbitmq", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, f"services.sh {action} rabbitmq failed:\n{out.decode(errors='replace')}"


async def until(condition: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def open_broker(amqp_url: str) -> AsyncIterator[OpenBroker]:
    async with brokers(lambda: RabbitBroker.from_url(amqp_url, retry_for=30.0)) as open_broker:
        yield open_broker


@pytest.fixture
def topic() -> str:
    return unique("topic")


@pytest.fixture
def group() -> str:
    return unique("group")


def by_key(deliveries: list[Delivery]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for d in deliveries:
        assert d.message.key is not None
        seen.setdefault(d.message.key, []).append(int(d.message.value))
    return seen


async def test_one_key_stays_in_order_when_a_member_takes_over(
    open_broker: OpenBroker, topic: str, group: str
) -> None:
    """Two members of a group (two processes): the second stands by, and when the first leaves with deliveries
    fetched but not acknowledged, it gets those first, so every key's messages are handled in order."""
    first_broker, second_broker, publisher = await open_broker(), await open_broker(), await open_broker()
    first = await first_broker.subscribe([topic], group)
    second = await second_broker.subscribe([topic], group)
    await publisher.publish([message(topic, str(i // 8), key=f"saga-{i % 8}") for i in range(400)])
    handled = await collect(first, 150)
    await first.commit(handled[:100])  # the other 50 were fetched, not acknowledged
    assert await second.fetch(10, timeout=0.3) == []  # standing by while the first member is there
    await first.close()
    rest = await collect(second, 300, commit=True)
    order = by_key(handled[:100] + rest)
    assert order == {f"saga-{k}": list(range(50)) for k in range(8)}


async def test_an_unroutable_message_is_an_error(open_broker: OpenBroker, topic: str) -> None:
    """With the queue that holds a topic's unrouted messages gone, a publish to it fails (mandatory), not lost."""
    broker = await open_broker()
    assert isinstance(broker, RabbitBroker)
    await broker.publish([message(topic, "held")])
    connection, _ = await broker._ready(time.monotonic() + 5)
    channel = await connection.channel()
    await channel.queue_delete(f"{topic}.unrouted")
    await channel.close()
    with pytest.raises(BrokerError, match="unroutable") as caught:
        await broker.publish([message(topic, "nowhere")])
    assert caught.value.retriable is False


async def test_messages_published_before_any_group_go_to_the_first_group(
    open_broker: OpenBroker, topic: str, group: str
) -> None:
    """Commands published before their participant ever subscribed are kept, and the first group gets them."""
    publisher, subscriber = await open_broker(), await open_broker()
    await publisher.publish([message(topic, str(i)) for i in range(20)])
    consumer = await subscriber.subscribe([topic], group)
    assert values(await collect(consumer, 20, commit=True)) == [str(i) for i in range(20)]


async def test_a_message_that_keeps_crashing_its_consumer_comes_back_as_a_dead_letter(
    amqp_url: str, topic: str, group: str
) -> None:
    """A message delivered `delivery_limit` times without an ack (each consumer dies holding it) is dead-lettered
    by its queue and delivered once more, intact, marked `malformed` with the reason, so the engine stores it as
    a dead letter; acknowledged, it is gone."""
    async with brokers(lambda: RabbitBroker.from_url(amqp_url, delivery_limit=2)) as open_broker:
        broker = await open_broker()
        await broker.publish([message(topic, "poison", key="saga-x")])
        marked: list[Delivery] = []
        for _attempt in range(6):
            consumer = await broker.subscribe([topic], group)
            got = await collect(consumer, 1)
            marked = [d for d in got if d.message.malformed]
            if marked:
                await consumer.commit(marked)
                await consumer.close()
                break
            await consumer.close()  # "crashes": never acknowledged
        assert marked, "never dead-lettered"
        reason = marked[0].message.malformed or ""
        assert "delivered 2 times" in reason
        assert (marked[0].message.value, marked[0].message.key) == (b"poison", "saga-x")
        again = await broker.subscribe([topic], group)
        assert await again.fetch(10, timeout=1.0) == []


@pytest.mark.slow
async def test_consumers_are_restored_after_the_server_closes_connections(
    open_broker: OpenBroker, topic: str, group: str
) -> None:
    """aio-pika#231: after the server closed every connection, the same consumer object receives new messages."""
    subscriber, publisher = await open_broker(), await open_broker()
    consumer = await subscriber.subscribe([topic], group)
    await publisher.publish([message(topic, "before")])
    assert values(await collect(consumer, 1, commit=True)) == ["before"]
    await services("close-connections")
    await publisher.publish([message(topic, "after")])  # waits for its own reconnect
    assert values(await collect(consumer, 1, within=30, commit=True)) == ["after"]


@pytest.mark.slow
async def test_a_publish_during_a_reconnect_completes_once_connected(
    open_broker: OpenBroker, topic: str, group: str
) -> None:
    """aio-pika#636: publishes started while the connection is being replaced complete on the new one."""
    broker = await open_broker()
    consumer = await broker.subscribe([topic], group)
    closing = asyncio.ensure_future(services("close-connections"))
    publishes = []
    while not closing.done():
        publishes.append(asyncio.ensure_future(broker.publish([message(topic, str(len(publishes)))])))
        await asyncio.sleep(0.01)
    await closing
    publishes.append(asyncio.ensure_future(broker.publish([message(topic, str(len(publishes)))])))
    await asyncio.wait_for(asyncio.gather(*publishes), 30)
    got = set(values(await collect(consumer, len(publishes), within=30, commit=True)))
    assert got == {str(i) for i in range(len(publishes))}  # at least once each (a resend may duplicate)


@pytest.mark.slow
async def test_acks_of_a_dead_channel_are_skipped_and_its_tags_not_reused(
    open_broker: OpenBroker, topic: str, group: str
) -> None:
    """aio-pika#501 and delivery tags: committing deliveries fetched before the connection was lost returns at
    once, and does not acknowledge the messages that the new channel delivers under the same tag numbers: those
    are delivered again until they are committed themselves."""
    subscriber, publisher = await open_broker(), await open_broker()
    consumer = await subscriber.subscribe([topic], group)
    await publisher.publish([message(topic, str(i)) for i in range(3)])
    old = await collect(consumer, 3)
    await services("close-connections")
    new = await collect(consumer, 3, within=30)  # the server redelivers them on the restored channel
    assert values(new) == ["0", "1", "2"]
    began = time.monotonic()
    await consumer.commit(old)
    assert time.monotonic() - began < 1.0
    await consumer.close()
    successor = await subscriber.subscribe([topic], group)
    again = await collect(successor, 3)  # the old commits acknowledged nothing on the new channel
    assert values(again) == ["0", "1", "2"]
    await successor.commit(again)
    await successor.close()
    last = await subscriber.subscribe([topic], group)
    assert await last.fetch(10, timeout=1.0) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_server_restart_is_ridden_out_and_a_publish_while_down_does_not_hang(
    amqp_url: str, topic: str, group: str
) -> None:
    """aio-pika#636 with the server down: a publish gives up with a retriable error after `retry_for` instead of
    hanging; once the server is back, the same broker publishes and its consumer receives, without a restart."""
    async with brokers(lambda: RabbitBroker.from_url(amqp_url, retry_for=3.0)) as open_broker:
        broker: Broker = await open_broker()
        consumer = await broker.subscribe([topic], group)
        await broker.publish([message(topic, "before")])
        assert values(await collect(consumer, 1, commit=True)) == ["before"]
        await services("pause")
        try:
            began = time.monotonic()
            with pytest.raises(BrokerError) as caught:
                await broker.publish([message(topic, "while down")])
            assert caught.value.retriable is True
            assert time.monotonic() - began < 15
        finally:
            await services("resume")
        await broker.publish([message(topic, "after")])
        got = values(await collect(consumer, 1, within=60, commit=True))
        assert got == ["after"]


async def test_what_other_clients_send_is_delivered_never_raised(
    amqp_url: str, open_broker: OpenBroker, topic: str, group: str
) -> None:
    """Messages from another AMQP client with tables of every type (numbers, flags, nested tables, arrays, times,
    voids), a broken exact-headers entry, no properties at all, or an empty body are fetched like any other, in
    order, with their CloudEvents attributes read; the engine's wire parser then judges them."""
    import datetime
    import decimal

    import aio_pika

    broker = await open_broker()
    consumer = await broker.subscribe([topic], group)
    tables: list[dict[str, object] | None] = [
        {"cloudEvents_id": "r-1", "cloudEvents:type": "T.succeeded", "n": 7, "f": 1.5, "b": True},
        {"nested": {"a": [1, "x", None]}, "when": datetime.datetime(2026, 1, 1), "d": decimal.Decimal("1.25")},
        {"x-sagas-headers": "not a list"},
        {"x-sagas-headers": [["only a name"], [1, 2], ["ok", "v"]]},
        {"x-sagas-order": ["missing"], "a": "1"},
        None,
    ]
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topic, ensure=False)
        for index, table in enumerate(tables):
            await exchange.publish(aio_pika.Message(str(index).encode() if index else b"", headers=table),
                                   routing_key="saga-1")
    finally:
        await connection.close()
    got = await collect(consumer, len(tables), commit=True)
    assert [d.message.value for d in got] == [b"", b"1", b"2", b"3", b"4", b"5"]
    first = got[0].message
    assert (first.header("ce_id"), first.header("ce_type"), first.header("n"), first.header("b")) == (
        "r-1", "T.succeeded", "7", "True")
    assert got[3].message.headers == (("1", b"2"), ("ok", b"v"))
    assert got[4].message.headers == (("a", b"1"),)
    assert got[5].message.headers == ()
    assert all(d.message.key == "saga-1" for d in got)


@pytest.mark.slow
async def test_deliveries_committed_while_the_consumer_is_still_being_restored_are_acknowledged(
    open_broker: OpenBroker, group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reconnect, a consumer's first queues deliver while it is still consuming its other queues; what is
    committed then is acknowledged (not kept unacknowledged by the consumer for ever, out of everyone's reach)."""
    first_topic, second_topic = unique("first"), unique("second")
    broker = await open_broker()
    consumer = await broker.subscribe([first_topic, second_topic], group)
    await broker.publish([message(first_topic, str(i)) for i in range(5)])
    before = await collect(consumer, 5)
    assert isinstance(consumer, RabbitConsumer)
    release = asyncio.Event()
    real = consumer._consume_topic

    async def slow(connection: Any, channel: Any, topic: str, epoch: int) -> None:
        if topic == second_topic:
            await release.wait()  # the restore is held here: the first topic's queues already deliver
        await real(connection, channel, topic, epoch)

    monkeypatch.setattr(consumer, "_consume_topic", slow)
    await services("close-connections")
    again = await collect(consumer, 5, within=30)
    assert values(again) == values(before)
    await consumer.commit(again)
    release.set()
    await until(lambda: consumer._channel is not None, 30, "the restore to finish")
    await consumer.close()
    successor = await broker.subscribe([first_topic, second_topic], group)
    assert await successor.fetch(10, timeout=1.0) == []


# ---- the engine's optional capabilities: TopicCreator, Probe, Backlog -----------------------------------


async def test_ensure_topics_lets_any_client_publish_before_a_group_subscribes(
    amqp_url: str, open_broker: OpenBroker, topic: str, group: str
) -> None:
    """Before `ensure_topics` a raw client's publish to the topic is refused (no exchange); after it, it is
    accepted and kept, and the first group that subscribes gets it."""
    import aio_pika

    broker = await open_broker()
    assert isinstance(broker, RabbitBroker)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.get_exchange(topic, ensure=True)
        await broker.ensure_topics([topic])
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(topic, ensure=True)
        await exchange.publish(aio_pika.Message(b"early"), routing_key="saga-1", mandatory=True)
    finally:
        await connection.close()
    consumer = await (await open_broker()).subscribe([topic], group)
    assert values(await collect(consumer, 1, commit=True)) == ["early"]


async def test_probe_answers_while_connected_and_refuses_when_closed(amqp_url: str) -> None:
    """`probe` returns on a live connection and raises a non-retriable BrokerError before start and after close."""
    broker = RabbitBroker.from_url(amqp_url, retry_for=5.0)
    with pytest.raises(BrokerError, match="not started"):
        await broker.probe()
    await broker.start()
    await broker.probe()
    await broker.close()
    with pytest.raises(BrokerError) as caught:
        await broker.probe()
    assert caught.value.retriable is False


async def test_backlog_counts_what_is_ready_and_what_is_held_unacknowledged(
    open_broker: OpenBroker, topic: str, group: str
) -> None:
    """Per partition queue, the backlog is ready + fetched-and-not-acknowledged: 40 published → 40 in all (spread
    over the 3 partitions), 15 committed → 25, all committed → 0; another group's backlog is its own, and a group
that never subscribed has none."""
    broker = await open_broker()
    assert isinstance(broker, RabbitBroker)
    consumer = await broker.subscribe([topic], group)
    other = unique("other")
    await broker.subscribe([topic], other)
    await broker.publish([message(topic, str(i), key=f"saga-{i}") for i in range(40)])

    async def total(of: str) -> int:
        return sum((await broker.backlog([topic], of)).values())

    backlog = await broker.backlog([topic], group)
    assert set(backlog) == {(topic, 0), (topic, 1), (topic, 2)}
    await until_async(lambda: total(group), 40)
    assert sum(1 for count in backlog.values() if count) >= 2, backlog  # keys spread over the partitions
    got = await collect(consumer, 40)
    assert await total(group) == 40  # fetched, not acknowledged: still behind
    await consumer.commit(got[:15])
    await until_async(lambda: total(group), 25)
    await consumer.commit(got[15:])
    await until_async(lambda: total(group), 0)
    assert await total(other) == 40  # nobody consumed that group's copies
    never = unique("never")
    assert await broker.backlog([never], group) == {(never, 0): 0, (never, 1): 0, (never, 2): 0}
    await broker.delete_topics([topic], [group, other])


async def until_async(read: Any, expected: int, within: float = 15.0) -> None:
    """Until `await read()` is `expected` (RabbitMQ's counts follow acknowledgements a moment later)."""
    deadline = time.monotonic() + within
    while (value := await read()) != expected:
        assert time.monotonic() < deadline, f"stayed at {value}, expected {expected}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", UNDECODABLE)
async def test_a_delivery_pamqp_cannot_read_is_a_malformed_message_not_a_lost_connection(
    amqp_url: str, open_broker: OpenBroker, topic: str, group: str, kind: str
) -> None:
    """Properties another client wrote that pamqp cannot decode (here: the `kind`) arrive as one message marked
    malformed with the reason, in order with the next one, on the same connection; nothing comes again."""
    broker = await open_broker()
    assert isinstance(broker, RabbitBroker)
    consumer = await broker.subscribe([topic], group)
    await publish_raw(amqp_url, topic, [(b"poison", "saga-1", RawProperties(undecodable_properties(kind))),
                                        (b"after", "saga-1", spec.Basic.Properties())])
    epoch = broker._epoch
    got = await collect(consumer, 2, commit=True)
    assert [(d.message.value, d.message.key) for d in got] == [(b"poison", "saga-1"), (b"after", "saga-1")]
    assert "AMQP properties undecodable" in (got[0].message.malformed or "")
    assert got[1].message.malformed is None
    assert broker._epoch == epoch, "the connection was lost"
    assert await consumer.fetch(10, timeout=0.5) == []


def test_a_deliver_frame_with_a_routing_key_that_is_not_utf8_is_read_with_replacement_characters() -> None:
    """A basic.deliver whose exchange and routing key are not UTF-8 (RabbitMQ does not check them) is read, the bad
    bytes as U+FFFD, instead of failing the connection; a frame pamqp reads is unchanged."""
    import pamqp.frame

    good = pamqp.frame.marshal(spec.Basic.Deliver("ctag", 7, True, "ex.1", "key\x01"), 3)
    assert pamqp.frame.unmarshal(good)[2].routing_key == "key\x01"
    used, channel, frame = pamqp.frame.unmarshal(good.replace(b"ex.1", b"ex\xff1").replace(b"key\x01", b"key\xfe"))
    assert (used, channel) == (len(good), 3)
    assert isinstance(frame, spec.Basic.Deliver)
    assert (frame.consumer_tag, frame.delivery_tag, frame.redelivered, frame.exchange, frame.routing_key) == (
        "ctag", 7, True, "ex\ufffd1", "key\ufffd")


def test_a_frame_with_a_wrong_end_byte_is_still_a_broken_stream() -> None:
    """Salvage is for frames whose contents pamqp cannot read, not for a misaligned stream: a frame whose last
    byte is not FRAME_END still fails as pamqp fails it, so the connection is dropped and made again."""
    import pamqp.exceptions
    import pamqp.frame

    bad_key = pamqp.frame.marshal(spec.Basic.Deliver("ctag", 7, True, "ex.1", "key\x01"), 3).replace(
        b"key\x01", b"key\xfe")
    broken_end = bad_key[:-1] + b"\x00"
    with pytest.raises(pamqp.exceptions.UnmarshalingException):
        pamqp.frame.unmarshal(broken_end)

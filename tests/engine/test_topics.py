"""The engine creates the topics of its definitions when it starts, on a broker that can (`TopicCreator`)."""

from __future__ import annotations

from collections.abc import Iterable

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql import SqlStore
from sagas.definitions import loads
from sagas.engine.ports import TopicCreator
from sagas.engine.runtime import Engine, EngineSettings

ORDERS = loads("""\
name: orders
version: 1
steps:
  - {name: reserve, participant: inventory, command: inventory.reserve, compensation: {command: inventory.release}}
  - name: book
    parallel:
      - {name: flight, participant: airline, command: flight.book, compensation: {command: flight.cancel}}
      - {name: hotel, participant: hotels, topic: rooms.in, command: hotel.book, compensation: {command: hotel.cancel}}
  - {name: charge, participant: payments, command: payment.charge, kind: pivot}
""")
REFUNDS = loads("""\
name: refunds
version: 1
steps:
  - {name: refund, participant: payments, command: payment.refund, kind: retriable}
  - {name: notify, participant: mailer, command: mail.send, kind: retriable}
""")


class CreatingBroker(MemoryBroker):
    """The in-memory broker, recording the topics it is asked to create."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[list[str]] = []

    async def ensure_topics(self, names: Iterable[str]) -> None:
        self.created.append(list(names))


def engine(broker: MemoryBroker) -> Engine:
    return Engine(store=SqlStore("sqlite+aiosqlite:///:memory:"), broker=broker, definitions=[ORDERS],
                  settings=EngineSettings(reply_topic="replies.topic", timer_interval=None))


async def test_start_creates_every_command_topic_and_the_reply_topic_before_subscribing() -> None:
    """Every step's command topic (parallel members and explicit topics included) and the reply topic are created
    at start, in one call, before anything is published."""
    broker = CreatingBroker()
    assert isinstance(broker, TopicCreator)
    async with engine(broker):
        assert broker.created == [
            ["airline.commands", "inventory.commands", "payments.commands", "replies.topic", "rooms.in"]]
        assert broker.lag("inventory.commands", "anyone") == 0  # nothing published yet


async def test_a_definition_deployed_later_gets_its_topics_then() -> None:
    """`deploy` on a running engine creates the new definition's topics (the ones it has already exist: the broker
    leaves them)."""
    broker = CreatingBroker()
    async with engine(broker) as running:
        await running.deploy(REFUNDS)
        assert broker.created[-1] == ["mailer.commands", "payments.commands", "replies.topic"]


async def test_a_broker_that_cannot_create_topics_is_used_as_before() -> None:
    """A broker without `ensure_topics` (a third party's, or the in-memory one) is not a TopicCreator, and the
    engine starts and runs sagas on it."""
    broker = MemoryBroker()
    assert not isinstance(broker, TopicCreator)
    async with engine(broker) as running:
        inventory = await broker.subscribe(["inventory.commands"], "inventory")
        saga_id = await running.start_saga("orders", {})
        (delivery,) = await inventory.fetch(10, timeout=5)
    assert delivery.message.header("ce_subject") == saga_id

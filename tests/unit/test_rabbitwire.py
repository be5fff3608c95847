"""The CloudEvents AMQP binding of `sagas.adapters.rabbitwire`, through pamqp's real encoder and decoder."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import commands as spec
from pamqp.header import ContentHeader

from sagas.adapters.rabbitmq import parse_amqp_url
from sagas.adapters.rabbitwire import ORDER, decode_headers, encode_message
from sagas.engine.ports import BrokerMessage
from sagas.engine.state import MessageKind, OutgoingCommand
from sagas.engine.wire import encode_command
from sagas.errors import BrokerError


def on_the_wire(properties: spec.Basic.Properties) -> spec.Basic.Properties:
    """The properties as another AMQP client reads them: marshalled to bytes and parsed back."""
    frame = ContentHeader(0, 0, properties).marshal()
    header = ContentHeader()
    header.unmarshal(frame)
    return header.properties


def round_trip(message: BrokerMessage) -> tuple[tuple[tuple[str, bytes], ...], dict[str, Any], str]:
    body, key, properties = encode_message(message)
    assert body == message.value
    received = on_the_wire(properties)
    assert received.delivery_mode == 2  # persistent
    return decode_headers(received.headers, received.content_type), dict(received.headers or {}), key


def a_command() -> BrokerMessage:
    command = OutgoingCommand(
        id="s-1/charge/command/1", saga_id="s-1", saga_name="order", step="charge", attempt=1, kind=MessageKind.COMMAND,
        type="ChargePayment", topic="payment.commands", payload={"amount": 5},
    )
    return encode_command(command, reply_topic="sagas.replies", at=0.0)


def test_an_engine_command_travels_as_cloudevents_application_properties() -> None:
    """A command's ce_* headers are `cloudEvents:` string properties, content-type the AMQP property, and all of
    them come back in their order."""
    message = a_command()
    headers, table, key = round_trip(message)
    assert headers == message.headers
    assert key == "s-1"
    assert table["cloudEvents:id"] == "s-1/charge/command/1"
    assert table["cloudEvents:type"] == "ChargePayment"
    assert table["cloudEvents:specversion"] == "1.0"
    assert not any(name.startswith("ce_") for name in table)
    assert ORDER in table  # the engine's order is not alphabetical


@pytest.mark.parametrize("headers", [
    (("a", b"\x00\xff"), ("a", b"2")),          # a name twice, and bytes that are not UTF-8
    (("ce_id", b"\xff"),),                        # an attribute that is not UTF-8
    (("x-death", b"mine"), ("b", b"1")),          # a name RabbitMQ's own entries use
    (("content-type", b"text/plain"), ("z", b"")),  # content-type not last
    (("cloudEvents:id", b"1"),),                  # a name that reads back as an attribute
])
def test_headers_a_table_cannot_carry_exactly_still_arrive_exactly(headers: tuple[tuple[str, bytes], ...]) -> None:
    """Duplicates, binary attributes, reserved names and an odd content-type position fall back to the exact list."""
    decoded, table, _ = round_trip(BrokerMessage("t", b"v", "k", headers))
    assert decoded == headers
    assert "x-sagas-headers" in table


def test_a_foreign_publisher_is_read_with_either_prefix_and_broker_entries_ignored() -> None:
    """What amqp-publish or another client sends (both binding prefixes, numbers, RabbitMQ's x- entries) is read."""
    table = {"cloudEvents_id": "r-1", "cloudEvents:type": "X.succeeded", "x-delivery-count": 3, "n": 7}
    assert dict(decode_headers(table, "application/json")) == {
        "ce_id": b"r-1", "ce_type": b"X.succeeded", "n": b"7", "content-type": b"application/json",
    }
    assert decode_headers(None, None) == ()


def test_a_key_longer_than_a_routing_key_is_refused_before_sending() -> None:
    """A key over AMQP's 255-byte routing key is a non-retriable BrokerError, not a broken connection."""
    with pytest.raises(BrokerError) as caught:
        encode_message(BrokerMessage("t", b"", "k" * 256))
    assert caught.value.retriable is False


def test_amqp_url_options_are_split_from_the_connection_url() -> None:
    """The broker's options are typed and removed from the URL; a 10 s heartbeat is asked for by default."""
    settings = parse_amqp_url("amqp://u:p@h:5672/v?partitions=4&prefetch=64&retry_for=2.5&connection_timeout=3")
    assert settings.options == {"partitions": 4, "prefetch": 64, "retry_for": 2.5}
    assert settings.url == "amqp://u:p@h:5672/v?connection_timeout=3&heartbeat=10"
    with pytest.raises(ValueError, match="partitions='x'"):
        parse_amqp_url("amqp://h/?partitions=x")
    with pytest.raises(ValueError, match="not an amqp"):
        parse_amqp_url("kafka://h:1")

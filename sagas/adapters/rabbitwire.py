"""A `BrokerMessage` as an AMQP 0-9-1 message: the CloudEvents AMQP binding, binary content mode (docs/protocol.md).

* The value is the message body; the key (the saga id) is the routing key.
* A ``ce_<attribute>`` header is the application property (AMQP 0-9-1: a ``headers`` table entry)
  ``cloudEvents:<attribute>``, a string; the ``content-type`` header is the message's ``content_type`` property.
  Other headers are table entries of their own name: a string when the value is UTF-8, bytes otherwise.
* AMQP tables are sent with their keys sorted (pamqp does so), so when the headers were not in that order, the
  entry ``x-sagas-order`` lists their names in the order they had.
* Headers that such a table cannot give back exactly (a name twice, a name RabbitMQ or the binding reserves,
  ``x-…`` or ``cloudEvents…``, an attribute that is not UTF-8) travel instead as one entry ``x-sagas-headers``,
  the list of ``[name, value]`` pairs, so every message arrives exactly as it was published.

Reading accepts ``cloudEvents_`` as well as ``cloudEvents:`` (the binding allows both), and ignores the ``x-``
entries RabbitMQ adds (``x-delivery-count``, ``x-death``...).
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pamqp import commands as spec

from sagas.engine.ports import BrokerMessage
from sagas.errors import BrokerError

__all__ = ["decode_message", "encode_message"]

PREFIX = "cloudEvents:"
_PREFIXES = ("cloudEvents:", "cloudEvents_")
EXACT_HEADERS = "x-sagas-headers"
ORDER = "x-sagas-order"
_PERSISTENT = 2
_MAX_SHORT = 255  # bytes in an AMQP short string: routing keys, property values, table keys


def _table(headers: tuple[tuple[str, bytes], ...]) -> tuple[dict[str, Any], str | None] | None:
    """The headers as a table and a content type, or None when those could not give them back exactly."""
    table: dict[str, Any] = {}
    content_type: str | None = None
    for position, (name, value) in enumerate(headers):
        if name == "content-type":
            if position != len(headers) - 1 or len(value) > _MAX_SHORT:
                return None  # read back last: exact only where it was last
            try:
                content_type = value.decode()
            except UnicodeDecodeError:
                return None
            continue
        if name.startswith(("x-", *_PREFIXES)) or len(name.encode()) > _MAX_SHORT:
            return None
        key = PREFIX + name[3:] if name.startswith("ce_") else name
        if key in table:
            return None
        try:
            table[key] = value.decode()
        except UnicodeDecodeError:
            if name.startswith("ce_"):
                return None  # the binding's attributes are strings
            table[key] = bytearray(value)  # pamqp sends a bytearray as bytes ('x'), and no other bytes type
    names = [name for name, _ in headers if name != "content-type"]
    if [name for name, _ in sorted(zip(table, names, strict=True))] != names:
        table[ORDER] = names
    return table, content_type


def encode_message(message: BrokerMessage) -> tuple[bytes, str, spec.Basic.Properties]:
    """Body, routing key and properties. Raises `BrokerError` (not retriable) for a key AMQP cannot carry."""
    key = message.key or ""
    if len(key.encode()) > _MAX_SHORT:
        raise BrokerError(f"message key of {len(key.encode())} bytes for {message.topic!r}: AMQP routing keys "
                          f"hold at most {_MAX_SHORT}", retriable=False)
    mapped = _table(message.headers)
    if mapped is None:
        table: dict[str, Any] = {EXACT_HEADERS: [[name, bytearray(value)] for name, value in message.headers]}
        content_type = None
    else:
        table, content_type = mapped
    properties = spec.Basic.Properties(content_type=content_type, delivery_mode=_PERSISTENT, headers=table or None)
    return message.value, key, properties


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()  # a number or flag from another client's table: its text


def decode_headers(table: dict[str, Any] | None, content_type: str | None) -> tuple[tuple[str, bytes], ...]:
    """The headers of a message with this table and content type (from sagas or any other AMQP client)."""
    table = table or {}
    exact = table.get(EXACT_HEADERS)
    if isinstance(exact, list):
        pairs = [pair for pair in exact if isinstance(pair, list | tuple) and len(pair) == 2]
        return tuple((str(name.decode() if isinstance(name, bytes) else name), _bytes(value))
                     for name, value in pairs)
    headers: list[tuple[str, bytes]] = []
    for key, value in table.items():
        if key.startswith("x-"):
            continue
        name = "ce_" + key[len(PREFIX):] if key.startswith(_PREFIXES) else key
        headers.append((name, _bytes(value)))
    order = table.get(ORDER)
    if isinstance(order, list):
        wanted = [name.decode() if isinstance(name, bytes | bytearray) else str(name) for name in order]
        by_name = dict(headers)
        if len(by_name) == len(headers) and sorted(wanted) == sorted(by_name):
            headers = [(name, by_name[name]) for name in wanted]
    if content_type is not None:
        headers.append(("content-type", content_type.encode()))
    return tuple(headers)


def decode_message(topic: str, incoming: AbstractIncomingMessage) -> BrokerMessage:
    """The `BrokerMessage` of a delivery from `topic`; never raises, whatever another client sent: what cannot be
    read is handed over `malformed`, with the reason, for the engine to dead-letter."""
    value, key = bytes(incoming.body), incoming.routing_key or None
    try:
        headers = decode_headers(dict(incoming.headers or {}), incoming.content_type)
    except Exception as exc:  # a table of a shape no check above foresaw: kept, not raised
        return BrokerMessage(topic=topic, value=value, key=key, malformed=f"AMQP headers undecodable: {exc!r}"[:500])
    return BrokerMessage(topic=topic, value=value, key=key, headers=headers)

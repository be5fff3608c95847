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
entries RabbitMQ adds (``x-delivery-count``, ``x-death``...). A ``content_encoding`` other than ``identity``
(gzip...) makes the message `malformed`: its body is not the data itself.

**Undecodable deliveries.** RabbitMQ passes on what another client wrote without checking it: a table key or
short string that is not UTF-8, a timestamp past the year 9999, tables nested deeper than Python recurses. pamqp
then cannot read the delivery's frames, and aiormq closes the whole connection (and the server redelivers the same
message to the next one, for ever). `install_tolerant_frames` (called on import) wraps ``pamqp.frame.unmarshal``,
which aiormq calls for every frame: where pamqp would have raised on a content header, the header is kept with its
body size and one property, ``x-sagas-undecodable`` = the reason, so the delivery arrives and `decode_message`
hands it over `malformed` (a dead letter); on a ``basic.deliver`` / ``basic.get-ok`` whose exchange or routing key
is not UTF-8, those are read with U+FFFD for the bad bytes. Every other frame, and every frame pamqp reads, is as
before: the wrapper only acts where the connection would otherwise have been lost.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pamqp.frame
from aio_pika.abc import AbstractIncomingMessage
from pamqp import commands as spec
from pamqp import constants, header

from sagas.engine.ports import BrokerMessage
from sagas.errors import BrokerError

__all__ = ["decode_message", "encode_message", "install_tolerant_frames"]

PREFIX = "cloudEvents:"
_PREFIXES = ("cloudEvents:", "cloudEvents_")
EXACT_HEADERS = "x-sagas-headers"
ORDER = "x-sagas-order"
UNDECODABLE = "x-sagas-undecodable"
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
    table = incoming.headers or {}
    if UNDECODABLE in table and len(table) == 1:
        return BrokerMessage(topic=topic, value=value, key=key, malformed=str(table[UNDECODABLE]))
    encoding = incoming.content_encoding
    if encoding and encoding.lower() != "identity":  # the body is not the data itself: reading it would misread it
        return BrokerMessage(topic=topic, value=value, key=key, malformed=f"content encoding {encoding[:100]!r} "
                             "is not supported: the body must be the JSON data itself")
    try:
        headers = decode_headers(dict(table), incoming.content_type)
    except Exception as exc:  # a table of a shape no check above foresaw: kept, not raised
        return BrokerMessage(topic=topic, value=value, key=key, malformed=f"AMQP headers undecodable: {exc!r}"[:500])
    return BrokerMessage(topic=topic, value=value, key=key, headers=headers)


# ---- frames pamqp cannot read ------------------------------------------------------------------------

Unmarshal = Callable[[bytes], tuple[int, int, Any]]
_HEAD = struct.Struct(">HHQ")  # a content header: class id, weight, body size


def _text(data: bytes, offset: int) -> tuple[int, str]:
    """A short string at `offset`, with U+FFFD for bytes that are not UTF-8; the offset after it."""
    length = data[offset]
    return offset + 1 + length, data[offset + 1:offset + 1 + length].decode(errors="replace")


def _salvage(data_in: bytes, error: BaseException) -> tuple[int, int, Any] | None:
    """The frame pamqp could not read, as far as it can be read without losing the delivery; None: give up."""
    frame_type, channel, size = pamqp.frame.frame_parts(data_in)
    if size is None or len(data_in) < constants.FRAME_HEADER_SIZE + size + 1:
        return None
    used = constants.FRAME_HEADER_SIZE + size + 1
    if data_in[used - 1] != constants.FRAME_END:
        return None  # a broken or misaligned stream, not a frame with odd contents: the connection is lost
    payload = data_in[constants.FRAME_HEADER_SIZE:used - 1]
    if frame_type == constants.FRAME_HEADER and len(payload) >= _HEAD.size:
        _, weight, body_size = _HEAD.unpack_from(payload)
        reason = f"AMQP properties undecodable: {type(error).__name__}: {error}"[:500]
        return used, channel, header.ContentHeader(weight, body_size, spec.Basic.Properties(
            headers={UNDECODABLE: reason}))
    if frame_type != constants.FRAME_METHOD or len(payload) < 4:
        return None
    index = struct.unpack_from(">I", payload)[0]
    if index == spec.Basic.Deliver.index:
        offset, consumer_tag = _text(payload, 4)
        delivery_tag, flags = struct.unpack_from(">QB", payload, offset)
        offset, exchange = _text(payload, offset + 9)
        _, routing_key = _text(payload, offset)
        deliver = spec.Basic.Deliver(consumer_tag, delivery_tag, bool(flags & 1))
        deliver.exchange, deliver.routing_key = exchange, routing_key  # set after its name check: as they came
        return used, channel, deliver
    if index == spec.Basic.GetOk.index:
        delivery_tag, flags = struct.unpack_from(">QB", payload, 4)
        offset, exchange = _text(payload, 13)
        offset, routing_key = _text(payload, offset)
        (count,) = struct.unpack_from(">I", payload, offset)
        get_ok = spec.Basic.GetOk(delivery_tag, bool(flags & 1), message_count=count)
        get_ok.exchange, get_ok.routing_key = exchange, routing_key
        return used, channel, get_ok
    return None


def _tolerant(unmarshal: Unmarshal) -> Unmarshal:
    def tolerant(data_in: bytes) -> tuple[int, int, Any]:
        try:
            return unmarshal(data_in)
        except Exception as error:  # pamqp's own error, or what its decoders let through (OverflowError...)
            try:
                salvaged = _salvage(data_in, error)
            except (struct.error, IndexError, ValueError):
                salvaged = None
            if salvaged is None:
                raise
            return salvaged

    tolerant.__wrapped__ = unmarshal  # type: ignore[attr-defined]
    return tolerant


def install_tolerant_frames() -> None:
    """Wrap ``pamqp.frame.unmarshal`` (once) so that an undecodable delivery is handed over, not fatal (above)."""
    if not hasattr(pamqp.frame.unmarshal, "__wrapped__"):
        pamqp.frame.unmarshal = _tolerant(pamqp.frame.unmarshal)  # type: ignore[assignment]


install_tolerant_frames()

"""RabbitMQ's management API for the process tests: queue depths, who is the active consumer of a queue, virtual
hosts (plain urllib in a thread: the management API is HTTP with basic auth); and a raw publisher of properties
that pamqp cannot read, for the poison and fuzz tests."""

from __future__ import annotations

import asyncio
import base64
import datetime
import decimal
import json
import re
import struct
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pamqp import commands as spec

from tests.integration.crash_participants import COMMANDS
from tests.integration.kafka_participants import command_topic


def management(url: str, method: str, path: str, body: bytes | None = None) -> Any:
    """One call of RabbitMQ's management API with the URL's credentials; the decoded JSON answer (or None)."""
    parts = urlsplit(url)
    request = urllib.request.Request(
        urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}", path=f"/api/{path}")),
        data=body, method=method, headers={"content-type": "application/json"},
    )
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


async def call(url: str, method: str, path: str, body: bytes | None = None) -> Any:
    return await asyncio.to_thread(management, url, method, path, body)


async def participants_behind(url: str, prefix: str) -> int:
    """Commands in this run's participants' queues not yet handled and acknowledged (ready + unacknowledged)."""
    queues = await call(url, "GET", "queues/%2F?columns=name,messages")
    wanted = tuple(f"{command_topic(prefix, name)}@" for name in COMMANDS)
    return sum(int(q.get("messages") or 0) for q in queues if q["name"].startswith(wanted))


async def active_consumer_pids(url: str, queue_prefix: str) -> set[int]:
    """The processes (from `RabbitBroker`'s connection names, "sagas pid N") that are the single active consumer
    of a queue whose name starts with `queue_prefix`."""
    consumers = await call(url, "GET", "consumers/%2F")
    connections = await call(url, "GET", "connections?columns=name,client_properties")
    named = {c["name"]: str(properties.get("connection_name", "")) for c in connections
             if isinstance(properties := c.get("client_properties"), dict)}  # [] for a connection still opening
    pids = set()
    for consumer in consumers:
        if not consumer["queue"]["name"].startswith(queue_prefix) or not consumer.get("active", True):
            continue
        if consumer.get("activity_status") not in (None, "single_active", "up"):
            continue
        name = named.get(consumer.get("channel_details", {}).get("connection_name", ""), "")
        match = re.search(r"sagas pid (\d+)", name)
        if match:
            pids.add(int(match.group(1)))
    return pids


async def new_vhost(url: str, user: str, vhost: str) -> None:
    await call(url, "PUT", f"vhosts/{quote(vhost, safe='')}")
    await call(url, "PUT", f"permissions/{quote(vhost, safe='')}/{quote(user)}",
               b'{"configure": ".*", "write": ".*", "read": ".*"}')


async def delete_vhost(url: str, vhost: str) -> None:
    await call(url, "DELETE", f"vhosts/{quote(vhost, safe='')}")


async def queue_report(url: str, prefix: str) -> str:
    """The run's queues that hold messages, with their consumers: what a drain that times out is waiting for."""
    queues = await call(url, "GET", "queues/%2F?columns=name,messages,messages_ready,messages_unacknowledged,"
                                    "consumers,single_active_consumer_tag")
    consumers = await call(url, "GET", "consumers/%2F")
    lines = []
    for queue in queues:
        if queue["name"].startswith(prefix) and queue.get("messages"):
            mine = [(c.get("channel_details", {}).get("connection_name"), c.get("activity_status"))
                    for c in consumers if c["queue"]["name"] == queue["name"]]
            lines.append(f"{queue['name']}: ready {queue.get('messages_ready')}, unacked "
                         f"{queue.get('messages_unacknowledged')}, consumers {mine}")
    return "\n".join(lines)


class RawProperties(spec.Basic.Properties):
    """Message properties sent as the given bytes: what another AMQP client may write and pamqp would not."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw

    def marshal(self) -> bytes:
        return self.raw


UNDECODABLE = ("table key", "timestamp header", "content type", "timestamp property", "nested tables")


def undecodable_properties(kind: str) -> bytes:
    """Encoded properties that RabbitMQ passes on as they are and pamqp cannot read (one of `UNDECODABLE`)."""
    if kind == "table key":  # a table key that is not UTF-8
        return spec.Basic.Properties(headers={"k\x01": "v"}).marshal().replace(b"k\x01", b"k\xff")
    if kind == "timestamp header":  # a timestamp past the year 9999
        encoded = spec.Basic.Properties(headers={"t": datetime.datetime(2000, 1, 1)}).marshal()
        at = encoded.index(b"T") + 1
        return encoded[:at] + b"\xff" * 8 + encoded[at + 8:]
    if kind == "content type":
        return spec.Basic.Properties(content_type="ZZ").marshal().replace(b"ZZ", b"\xff\xfe")
    if kind == "timestamp property":
        encoded = spec.Basic.Properties(timestamp=datetime.datetime(2000, 1, 1)).marshal()
        return encoded[:2] + b"\xff" * 8
    table = b""  # tables nested deeper than pamqp's recursive decoder (and encoder) reaches, encoded by hand
    for _ in range(700):
        table = b"\x01nF" + struct.pack(">I", len(table)) + table
    return struct.pack(">HI", 0x2000, len(table)) + table  # property flags: headers only


async def publish_raw(amqp_url: str, exchange: str, messages: list[tuple[bytes, str, spec.Basic.Properties]]) -> None:
    """Publish (body, routing key, properties) through aio-pika's underlying channel, confirmed, nothing checked."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        underlay = await channel.get_underlay_channel()
        confirms = [underlay.basic_publish(body, exchange=exchange, routing_key=key, properties=properties)
                    for body, key, properties in messages]
        for confirm in await asyncio.gather(*confirms):
            assert isinstance(confirm, spec.Basic.Ack), confirm
    finally:
        await connection.close()


def hostile_properties(headers: tuple[tuple[str, bytes], ...], variant: int, index: int) -> spec.Basic.Properties:
    """AMQP properties another client may write for a message with these headers (variant 0-7): attributes of
    AMQP types the binding does not map; both of the binding's prefixes, disagreeing; nested tables and arrays;
    a broken exact-headers entry; another content encoding and charset; no properties at all; properties pamqp
    cannot read; hundreds of entries with a wrong order entry."""
    attrs: dict[str, Any] = {("cloudEvents:" + name[3:] if name.startswith("ce_") else name):
                             value.decode(errors="replace") for name, value in headers}
    if variant == 0:
        odd: list[Any] = [7, -1.5, True, None, decimal.Decimal("1.25"), datetime.datetime(2026, 1, 1),
                          bytearray(b"\xff\x00"), [1, "x", None], {"a": {"b": 1}}, 2**40]
        return spec.Basic.Properties(headers={key: odd[(i + index) % len(odd)] if i % 2 else value
                                              for i, (key, value) in enumerate(attrs.items())})
    if variant == 1:
        twins = {"cloudEvents_" + key[len("cloudEvents:"):]: "other" for key in attrs if key.startswith("cloudEvents:")}
        return spec.Basic.Properties(headers={**attrs, **twins}, content_type="application/json")
    if variant == 2:
        return spec.Basic.Properties(headers={key: {"v": value, "deep": [[[value]]]} for key, value in attrs.items()})
    if variant == 3:
        broken = [["cloudEvents:id", 5], "x", [bytearray(b"\xff"), bytearray(b"v")], [None, None], []]
        return spec.Basic.Properties(headers={**attrs, "x-sagas-headers": broken, "x-sagas-order": [1, None]})
    if variant == 4:
        return spec.Basic.Properties(headers=attrs, content_encoding="gzip",
                                     content_type="application/json; charset=utf-16")
    if variant == 5:
        return spec.Basic.Properties()
    if variant == 6:
        return RawProperties(undecodable_properties(UNDECODABLE[index % len(UNDECODABLE)]))
    many: dict[str, Any] = {f"n{i}": i for i in range(400)}
    return spec.Basic.Properties(headers={**many, **attrs, "x-sagas-order": sorted(many, reverse=True)})

"""What brokers hand over for messages they cannot decode: never an exception from `fetch`, always a message that
carries what could be read and, in `malformed`, why the rest could not (the engine dead-letters it)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sagas.adapters.sqlqueue import SqlQueueBroker
from sagas.engine.ports import BrokerMessage, Delivery

GOOD_HEADERS = '[["ce_id", "YQ=="]]'  # what publish writes: [[name, base64 value]]

# (what is wrong, headers as stored, value as stored, SQLite only, reason fragment)
ROWS: list[tuple[str, Any, Any, bool, str]] = [
    ("headers not JSON", "{not json", b"{}", True, "headers undecodable"),
    ("headers a JSON object", '{"ce_id": "YQ=="}', b"{}", False, "not a list"),
    ("headers a JSON string", '"x"', b"{}", False, "not a list"),
    ("a header not a pair", '[["ce_id"]]', b"{}", False, "not a [name, base64 text] pair"),
    ("a header value a number", '[["ce_id", 5]]', b"{}", False, "not a [name, base64 text] pair"),
    ("a header name a number", '[[5, "YQ=="]]', b"{}", False, "not a [name, base64 text] pair"),
    ("not base64", '[["ce_id", "***"]]', b"{}", False, "headers undecodable"),
    ("headers stored as a number", 42, b"{}", True, "headers undecodable"),
    ("headers stored as bytes, not UTF-8", b"\xff\xfe", b"{}", True, "headers undecodable"),
    ("value stored as text", GOOD_HEADERS, "a text value", True, "value is stored as text"),
    ("value stored as a number", GOOD_HEADERS, 12345, True, "value is stored as int"),
    ("value over the size limit", GOOD_HEADERS, b"x" * 2000, False, "value of 2000 bytes exceeds the limit of 1000"),
]


async def insert_raw(broker: SqlQueueBroker, topic: str, rows: list[dict[str, Any]]) -> None:
    """Rows written behind `publish`'s back, as another program (or a corruption) could."""
    table = sa.table("broker_messages", sa.column("topic"), sa.column("key"), sa.column("headers"),
                     sa.column("value"), sa.column("created_at"))
    async with broker._transaction(write=True) as conn:
        if broker.is_postgresql:  # as `publish` does: ids must become visible in order, or a reader skips some
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": "sagas.broker:" + topic})
        for row in rows:
            if broker.is_postgresql:
                await conn.execute(
                    sa.text("INSERT INTO broker_messages (topic, key, headers, value, created_at) "
                            "VALUES (:topic, :key, CAST(:headers AS JSON), :value, :created_at)"),
                    {"topic": topic, "key": row.get("key"), "headers": row["headers"], "value": row["value"],
                     "created_at": time.time()},
                )
            else:
                await conn.execute(table.insert().values(topic=topic, key=row.get("key"), headers=row["headers"],
                                                         value=row["value"], created_at=time.time()))


async def fetch_all(consumer: Any, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + 20
    while len(got) < count and time.monotonic() < deadline:
        got.extend(await consumer.fetch(100, timeout=0.5))
    return got


class SqlQueuePoison:
    sqlite: bool

    @pytest.fixture
    async def broker(self, url: str) -> AsyncIterator[SqlQueueBroker]:
        broker = SqlQueueBroker(url, max_message_bytes=1000, prune_interval=0)
        await broker.start()
        yield broker
        await broker.close()

    async def test_rows_that_cannot_be_decoded_are_delivered_as_malformed_and_the_rest_as_usual(
        self, broker: SqlQueueBroker
    ) -> None:
        """Each kind of undecodable row comes out of `fetch` as a message with a `malformed` reason (no exception,
        no stall), in order with the good rows around it, which arrive intact."""
        topic = f"t-{uuid.uuid4().hex[:8]}"
        cases = [c for c in ROWS if self.sqlite or not c[3]]
        consumer = await broker.subscribe([topic], "g")
        await broker.publish([BrokerMessage(topic=topic, value=b"before", headers=(("ce_id", b"1"),))])
        await insert_raw(broker, topic, [{"headers": h, "value": v, "key": f"k{i}"}
                                         for i, (_, h, v, _, _) in enumerate(cases)])
        await broker.publish([BrokerMessage(topic=topic, value=b"after", headers=(("ce_id", b"2"),))])
        got = await fetch_all(consumer, len(cases) + 2)
        assert [d.message.value for d in (got[0], got[-1])] == [b"before", b"after"]
        assert got[0].message.malformed is None
        assert got[-1].message.malformed is None
        for delivery, (name, _, _, _, fragment) in zip(got[1:-1], cases, strict=True):
            assert delivery.message.malformed is not None, name
            assert fragment in delivery.message.malformed, (name, delivery.message.malformed)
        await consumer.commit(got)
        oversized = next(d.message for d, c in zip(got[1:-1], cases, strict=True) if "size limit" in c[0])
        assert oversized.size == 2000
        assert len(oversized.value) < 2000  # only a prefix left the database


class TestSqlQueuePoisonOnSqlite(SqlQueuePoison):
    sqlite = True

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}"

    async def test_a_key_that_is_not_text_is_dropped_with_a_reason(self, broker: SqlQueueBroker) -> None:
        """A key stored as bytes that are not UTF-8 does not fail the fetch."""
        topic = f"t-{uuid.uuid4().hex[:8]}"
        consumer = await broker.subscribe([topic], "g")
        await insert_raw(broker, topic, [{"headers": GOOD_HEADERS, "value": b"{}", "key": b"\xff"}])
        [delivery] = await fetch_all(consumer, 1)
        assert delivery.message.key is None
        assert "key is not UTF-8" in (delivery.message.malformed or "")


@pytest.mark.postgres
class TestSqlQueuePoisonOnPostgres(SqlQueuePoison):
    sqlite = False

    @pytest.fixture
    def url(self, pg_url: str) -> str:
        return pg_url


@pytest.mark.kafka
async def test_kafka_headers_without_a_value_and_keys_that_are_not_text_are_delivered(kafka_url: str) -> None:
    """A Kafka record with a null header value, a key that is not UTF-8 and a null value is fetched like any
    other (the header reads as empty, the key with replacement characters, the value as empty bytes)."""
    from aiokafka import AIOKafkaProducer

    from sagas.adapters.kafka import KafkaBroker

    topic = f"t-{uuid.uuid4().hex[:8]}"
    broker = KafkaBroker.from_url(kafka_url, partitions=1, retry_for=10.0)
    await broker.start()
    try:
        consumer = await broker.subscribe([topic], f"g-{uuid.uuid4().hex[:6]}")
        producer = AIOKafkaProducer(bootstrap_servers=kafka_url.removeprefix("kafka://"))
        await producer.start()
        try:
            await producer.send_and_wait(topic, value=None, key=b"\xff\xfe", headers=[("ce_id", None)])
            await producer.send_and_wait(topic, value=b"next", key=b"k")
        finally:
            await producer.stop()
        got = await fetch_all(consumer, 2)
        assert [d.message.value for d in got] == [b"", b"next"]
        assert got[0].message.headers == (("ce_id", b""),)
        assert got[0].message.key == "\ufffd\ufffd"
    finally:
        await broker.close()


# A producer that writes a header name that is not UTF-8, as a client in another language can. aiokafka's own
# builder encodes names as UTF-8; its pure-Python one (AIOKAFKA_NO_EXTENSIONS) calls the name's `encode`.
_RAW_PRODUCER = """
import asyncio, sys
from aiokafka import AIOKafkaProducer

class NotUtf8(str):
    def encode(self, *args, **kwargs):
        return b"ce_\\xff\\xfe"

async def main(bootstrap, topic):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value, headers in ((b"before", []), (b"bad", [(NotUtf8("x"), b"v")]), (b"after", [])):
            await producer.send_and_wait(topic, value=value, key=b"k", headers=headers)
    finally:
        await producer.stop()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.kafka
async def test_a_kafka_record_aiokafka_cannot_parse_is_delivered_as_malformed_between_the_others(
    kafka_url: str,
) -> None:
    """A record whose header name is not UTF-8 makes aiokafka raise at every fetch; the consumer finds it, skips
    it and hands it over as malformed, with the records before and after it delivered, in order, once."""
    from sagas.adapters.kafka import KafkaBroker

    topic = f"t-{uuid.uuid4().hex[:8]}"
    broker = KafkaBroker.from_url(kafka_url, partitions=1, retry_for=10.0)
    await broker.start()
    try:
        await broker.ensure_topics([topic])
        env = {**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"}
        produced = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RAW_PRODUCER, kafka_url.removeprefix("kafka://"), topic, env=env,
            stderr=subprocess.PIPE)
        _, stderr = await produced.communicate()
        assert produced.returncode == 0, stderr.decode()
        consumer = await broker.subscribe([topic], f"g-{uuid.uuid4().hex[:6]}")
        got = await fetch_all(consumer, 3)
        assert [d.message.value for d in got] == [b"before", b"", b"after"]
        assert "record 1 of" in (got[1].message.malformed or "")
        assert "UnicodeDecodeError" in (got[1].message.malformed or "")
        assert got[0].message.malformed is None
        assert got[2].message.malformed is None
        await consumer.commit(got)
        assert await consumer.fetch(10, timeout=1.0) == []
    finally:
        await broker.close()

"""A participant survives every message and every failure of its own loops: what it cannot read becomes a bounded
dead letter in its own database (listed, shown and replayed by the CLI), its loops restart under the Supervisor,
and retention purges its dedup records and dead letters after their horizons, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql.participant_tables import dead_letters_table, dedup_table
from sagas.adapters.sqlqueue import SqlQueueBroker
from sagas.engine.ports import BrokerMessage, Consumer
from sagas.engine.state import Outcome
from sagas.participant import ParticipantDeadLetters, ParticipantWorker, dead_letters
from tests.engine.support import postgres_schema
from tests.engine.test_participant import TOPIC, broker, command, effects, payment, replies

__all__ = ["broker"]  # the in-memory broker fixture, shared with test_participant.py


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"not within {within}s"
        await _pause()


async def _pause() -> None:
    await asyncio.sleep(0.02)


async def letters(db: AsyncEngine, *, include_replayed: bool = True) -> list[Any]:
    return await ParticipantDeadLetters(db).list(limit=1000, include_replayed=include_replayed)


HOSTILE = [
    (BrokerMessage(topic=TOPIC, value=b"\xff\xfe not json", headers=(("ce_type", b"Charge"),)), "missing attribute"),
    (BrokerMessage(topic=TOPIC, value=b"{}"), "missing attribute"),
    (BrokerMessage(topic=TOPIC, value=b"[1, 2]", malformed="headers are not a JSON object"), "headers are not"),
    (BrokerMessage(topic=TOPIC, value=b"x", headers=((1, 2),)), "missing attribute"),  # type: ignore[arg-type]
]


async def test_what_the_participant_cannot_read_is_a_dead_letter_and_the_rest_is_answered(
    broker: MemoryBroker,
) -> None:
    """Undecodable messages (wire level, transport level, wrong types) between two commands: each is a dead letter
    with its reason, every message is acknowledged, and both commands are answered with their effects."""
    engine = await broker.subscribe(["replies"], "engine")
    async with payment().serve(broker=broker) as served:
        await broker.publish([command("s-1"), *(m for m, _ in HOSTILE), command("s-2")])
        got = await replies(engine, 2)
        assert sorted(r.causation_id.split("/")[0] for r in got) == ["s-1", "s-2"]
        assert [r.outcome for r in got] == [Outcome.SUCCESS] * 2
        assert await effects(served) == ["s-1", "s-2"]
        await eventually(lambda: _true(broker.lag(TOPIC, "payment-participant") == 0))
        found = await letters(served.db)
        assert served.healthy
    assert len(found) == len(HOSTILE)
    reasons = sorted(letter.reason for letter in found)
    for _, expected in HOSTILE:
        assert any(expected in reason for reason in reasons), (expected, reasons)
    assert served.participant.stats["malformed"] == len(HOSTILE)


async def _true(value: bool) -> bool:
    return value


async def test_a_huge_message_keeps_a_bounded_prefix_with_its_size_and_sha256(broker: MemoryBroker) -> None:
    """A 1 MB body is kept as its first 64 KiB with the whole size and SHA-256; it cannot be replayed, and the same
    bytes delivered again stay one letter."""
    body = b"{" + b"x" * 1_000_000
    async with payment().serve(broker=broker) as served:
        await broker.publish([BrokerMessage(topic=TOPIC, value=body)] * 3)
        await eventually(lambda: _true(broker.lag(TOPIC, "payment-participant") == 0))
        (letter,) = await letters(served.db)
        with pytest.raises(Exception, match="keeps only a prefix"):
            await ParticipantDeadLetters(served.db).replay(letter.id, broker)
    assert len(letter.message.value) == dead_letters.PREFIX_BYTES
    assert letter.message.value == body[: dead_letters.PREFIX_BYTES]
    assert (letter.size, letter.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert letter.truncated


async def test_a_message_the_broker_read_only_in_part_keeps_its_whole_size_and_no_false_digest(
    broker: MemoryBroker,
) -> None:
    """A broker that read only a prefix (its size limit) says so: the letter keeps the whole size and no digest of
    a body it never saw."""
    message = BrokerMessage(topic=TOPIC, value=b"y" * 10, malformed="over the size limit", size=50_000_000)
    async with payment().serve(broker=broker) as served:
        await broker.publish([message])
        await eventually(lambda: _true(broker.lag(TOPIC, "payment-participant") == 0))
        (letter,) = await letters(served.db)
    assert (letter.size, letter.sha256, letter.reason) == (50_000_000, None, "over the size limit")


def _sagas(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sagas", *args], capture_output=True, text=True, timeout=60)


async def test_the_cli_lists_shows_and_replays_a_participants_dead_letter(tmp_path: Path) -> None:
    """`sagas dlq list/show/replay --participant-db` in a real process: the letter is listed with its reason, shown,
    and replayed onto the db:// queue, where the running participant reads it again (live again, same letter)."""
    engine_db, participant_db = tmp_path / "sagas.db", tmp_path / "payment.db"
    broker = SqlQueueBroker(str(engine_db))
    await broker.start()
    poison = BrokerMessage(topic=TOPIC, value=b'{"not": "a command"}', key="k-1", headers=(("ce_id", b"x"),))
    try:
        async with payment().serve(broker=broker, database_url=str(participant_db)) as served:
            await broker.publish([poison])
            await eventually(lambda: _count(served.db, 1))
            listed = _sagas("dlq", "list", "--participant-db", str(participant_db), "--json")
            assert listed.returncode == 0, listed.stderr
            (entry,) = json.loads(listed.stdout)
            assert "missing attribute" in entry["reason"]
            assert (entry["topic"], entry["key"], entry["value"]) == (TOPIC, "k-1", '{"not": "a command"}')
            shown = _sagas("dlq", "show", entry["id"], "--participant-db", str(participant_db))
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["id"] == entry["id"]
            replayed = _sagas("dlq", "replay", entry["id"], "--participant-db", str(participant_db),
                              "--broker", "db://", "--db", str(engine_db))
            assert replayed.returncode == 0, replayed.stderr
            assert f"published again to {TOPIC}" in replayed.stdout
            # The participant reads it afresh: still no command, so the same letter, live again.
            await eventually(lambda: _read_again(served.db, entry["id"], entry["at"]))
            again = _sagas("dlq", "replay", "nope", "--participant-db", str(participant_db), "--broker", "db://",
                           "--db", str(engine_db))
            assert again.returncode == 1
            assert "no participant dead letter 'nope'" in again.stderr
    finally:
        await broker.close()


async def _count(db: AsyncEngine, expected: int) -> bool:
    return len(await letters(db)) == expected


async def _read_again(db: AsyncEngine, letter_id: str, replayed_at_least: float) -> bool:
    """The letter is live again (its replay mark cleared), refreshed after the replay, and still the only one."""
    live = await letters(db, include_replayed=False)
    async with db.connect() as conn:
        total = (await conn.execute(sa.select(sa.func.count()).select_from(dead_letters_table))).scalar_one()
    return [(x.id, x.at > replayed_at_least) for x in live] == [(letter_id, True)] and total == 1


# ---- supervised loops ------------------------------------------------------------------------------------


async def test_the_consumer_loop_restarts_after_an_unexpected_failure_and_answers_the_batch_in_hand(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug escaping the consumer loop (here in answering a batch) restarts it: one log line with the cause, one
    restart counted, and the command that was in hand is answered."""
    real_answer = ParticipantWorker._answer
    failures: list[int] = []

    async def answer(self: ParticipantWorker, consumer: Consumer, deliveries: Any) -> None:
        if not failures:
            failures.append(len(deliveries))
            raise RuntimeError("a bug in the consumer loop")
        await real_answer(self, consumer, deliveries)

    monkeypatch.setattr(ParticipantWorker, "_answer", answer)
    engine = await broker.subscribe(["replies"], "engine")
    with capture_logs() as logs:
        async with payment().serve(broker=broker) as served:
            await broker.publish([command("s-1")])
            (reply,) = await replies(engine, 1)
            health = served.participant.health()["consumer"]
            seen = (health.restarts, health.last_error, health.running)
            assert served.participant.healthy
    assert failures == [1]
    assert reply.outcome == Outcome.SUCCESS
    assert seen == (1, "RuntimeError('a bug in the consumer loop')", True)
    lines = [e for e in logs if e["event"].startswith("loop failed")]
    assert len(lines) == 1
    assert lines[0]["loop"] == "consumer"
    assert "a bug in the consumer loop" in lines[0]["error"]


async def test_the_retention_loop_restarts_after_an_unexpected_failure(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a purge restarts the retention loop (one log line with the cause, one restart); the next purge
    runs, and a command sent meanwhile is answered."""
    real_purge = dead_letters.purge
    calls: list[float | None] = []

    async def purge(db: AsyncEngine, **kwargs: Any) -> dead_letters.Purged:
        calls.append(kwargs["dedup_before"])
        if len(calls) == 1:
            raise RuntimeError("a bug in the purge")
        return await real_purge(db, **kwargs)

    monkeypatch.setattr(dead_letters, "purge", purge)
    engine = await broker.subscribe(["replies"], "engine")
    with capture_logs() as logs:
        async with payment().serve(broker=broker, retention=3600.0, retention_interval=0.05) as served:
            await broker.publish([command("s-1")])
            await eventually(lambda: _true(len(calls) >= 2))
            (reply,) = await replies(engine, 1)
            health = served.health()["retention"]
            seen = (health.restarts, health.running)
    assert reply.outcome == Outcome.SUCCESS
    assert seen == (1, True)
    lines = [e for e in logs if e["event"].startswith("loop failed")]
    assert len(lines) == 1
    assert lines[0]["loop"] == "retention"
    assert "a bug in the purge" in lines[0]["error"]


# ---- retention -------------------------------------------------------------------------------------------


async def _seed(db: AsyncEngine, now: float) -> None:
    """Dedup records either side of their horizon (1000 s), dead letters either side of theirs (5000 s)."""
    async with db.begin() as tx:
        for name, dedup_at, letter_at in (("old", now - 1001.0, now - 5001.0), ("fresh", now - 999.0, now - 4999.0)):
            await tx.execute(dedup_table.insert().values(
                key=f"{name}/charge/command", command_id=f"{name}/charge/command/1", outcome="success",
                type="Charge.succeeded", data={}, at=dedup_at, reason=None))
            row = dead_letters.dead_letter_row(BrokerMessage(topic=TOPIC, value=name.encode()), "unreadable",
                                               letter_at)
            await dead_letters.record(tx, [row])


async def _left(db: AsyncEngine) -> tuple[list[str], list[bytes]]:
    async with db.connect() as conn:
        keys = (await conn.execute(sa.select(dedup_table.c.key).order_by(dedup_table.c.key))).scalars().all()
        values = (await conn.execute(sa.select(dead_letters_table.c.value))).scalars().all()
    return list(keys), sorted(bytes(v) for v in values)


async def _purged_after_the_horizon(broker: MemoryBroker, database: Callable[[], AsyncEngine]) -> None:
    served = ParticipantWorker(payment(), broker, database(), batch_max=10, retention=1000.0,
                               dead_letter_retention=5000.0, retention_interval=0.05)
    await served.start()
    try:
        await _seed(served.db, time.time())
        assert await _left(served.db) == (["fresh/charge/command", "old/charge/command"], [b"fresh", b"old"])
        await eventually(lambda: _only_fresh(served.db))
        assert served.health()["retention"].restarts == 0
    finally:
        await served.stop()


async def _only_fresh(db: AsyncEngine) -> bool:
    return await _left(db) == (["fresh/charge/command"], [b"fresh"])


async def test_retention_purges_dedup_records_and_dead_letters_after_their_horizons_on_sqlite(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    """On SQLite: a dedup record older than `retention` is purged and a younger one kept; dead letters by their
    own longer horizon."""
    from sagas.participant import participant_database

    await _purged_after_the_horizon(broker, lambda: participant_database(str(tmp_path / "p.db")))


@pytest.mark.postgres
async def test_retention_purges_dedup_records_and_dead_letters_after_their_horizons_on_postgres(
    broker: MemoryBroker, pg_url: str
) -> None:
    """On PostgreSQL: the same horizons, the same rows purged and kept."""
    async with postgres_schema(pg_url) as database:
        await _purged_after_the_horizon(broker, database)

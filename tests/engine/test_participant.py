"""`sagas.participant` on its own: a participant worker against the in-memory broker, driven by hand-made
commands, its replies read from the replies topic."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sagas.adapters.memory import MemoryBroker
from sagas.adapters.sql.participant_tables import dedup_table
from sagas.definitions.limits import REPLY_TYPE_CHARS
from sagas.engine.ports import BrokerMessage, Consumer
from sagas.engine.state import MessageKind, Outcome, OutgoingCommand, ReplyReceived, message_id
from sagas.engine.wire import CommandMessage, decode_reply, encode_command
from sagas.errors import BrokerError
from sagas.participant import BusinessFailure, Participant, ParticipantWorker, participant_database
from tests.engine.support import ledger, ledger_metadata, postgres_schema

TOPIC = "payment.commands"


def command(saga_id: str, *, attempt: int = 1, kind: MessageKind = MessageKind.COMMAND,
            **payload: Any) -> BrokerMessage:
    outgoing = OutgoingCommand(
        id=message_id(saga_id, "charge", kind, attempt), saga_id=saga_id, saga_name="order", step="charge",
        kind=kind, attempt=attempt, topic=TOPIC, type="Charge" if kind == MessageKind.COMMAND else "Refund",
        payload=payload,
    )
    return encode_command(outgoing, reply_topic="replies", at=time.time())


async def replies(consumer: Consumer, count: int, *, within: float = 10.0) -> list[ReplyReceived]:
    got: list[ReplyReceived] = []
    deadline = time.monotonic() + within
    while len(got) < count and (remaining := deadline - time.monotonic()) > 0:
        deliveries = await consumer.fetch(100, timeout=min(remaining, 0.5))
        await consumer.commit(deliveries)
        got += [decode_reply(d.message) for d in deliveries]
    assert len(got) >= count, f"{len(got)} of {count} replies within {within}s"
    return got


def payment() -> Participant:
    """Charges what the command says: a ledger row per effect; `decline` answers a business failure, `bad` a
    reply the wire cannot carry (a key that is not a string)."""
    participant = Participant("payment", metadata=ledger_metadata)

    @participant.command("Charge")
    async def charge(message: CommandMessage, tx: AsyncConnection) -> dict[Any, Any]:
        await tx.execute(ledger.insert().values(saga_id=message.saga_id, step=message.step, kind="command",
                                                type=message.type))
        if message.data.get("decline"):
            raise BusinessFailure("card expired", {"code": 51})
        if message.data.get("bad"):
            return {1: "one", "two": 2}
        return {"charged": True}

    @participant.compensation("Refund")
    async def refund(message: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
        return {"refunded": True}

    return participant


async def effects(worker: ParticipantWorker) -> list[str]:
    async with worker.db.connect() as conn:
        return list((await conn.execute(sa.select(ledger.c.saga_id).order_by(ledger.c.id))).scalars())


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker()
    await broker.start()
    yield broker
    await broker.close()


async def test_a_reply_that_fails_to_publish_is_sent_again_without_running_the_handler_again(
    broker: MemoryBroker,
) -> None:
    """The broker refuses the replies of a committed batch: the worker tries the batch again (the dedup records
    answer it) until the replies go out, and the commands are acknowledged."""
    engine = await broker.subscribe(["replies"], "engine")
    real_publish = broker.publish
    refused: list[int] = []

    async def flaky(messages: Sequence[BrokerMessage]) -> None:
        if len(refused) < 2 and any(m.topic == "replies" for m in messages):
            refused.append(len(messages))
            raise BrokerError("broker unavailable", retriable=True)
        await real_publish(messages)

    broker.publish = flaky  # type: ignore[method-assign]
    async with payment().serve(broker=broker) as worker:
        await real_publish([command("s-1")])
        first = await replies(engine, 1)
        await real_publish([command("s-2"), command("s-3")])
        later = await replies(engine, 2)
        assert len(refused) == 2
        assert [r.outcome for r in first + later] == [Outcome.SUCCESS] * 3
        assert sorted(r.causation_id.split("/")[0] for r in first + later) == ["s-1", "s-2", "s-3"]
        assert sorted(await effects(worker)) == ["s-1", "s-2", "s-3"]  # each effect once
        assert broker.lag(TOPIC, "payment-participant") == 0


async def test_a_repeated_business_failure_keeps_its_reason_and_data(broker: MemoryBroker) -> None:
    engine = await broker.subscribe(["replies"], "engine")
    async with payment().serve(broker=broker) as worker:
        await broker.publish([command("s-1", decline=True)])
        (first,) = await replies(engine, 1)
        await broker.publish([command("s-1", attempt=2, decline=True)])
        (again,) = await replies(engine, 1)
        assert await effects(worker) == []  # a business failure rolls its effect back
    assert worker.participant.stats["deduplicated"] == 1
    for reply in (first, again):
        assert (reply.outcome, reply.reason, reply.data) == (Outcome.FAILURE, "card expired", {"code": 51})


async def test_a_reply_the_wire_cannot_carry_rolls_its_effect_back_and_is_retryable(broker: MemoryBroker) -> None:
    """Checked with the encoder that sends replies, inside the handler's savepoint: the rest of the batch is
    answered, and the bad command's effect is undone (it would otherwise be committed with no reply)."""
    engine = await broker.subscribe(["replies"], "engine")
    async with payment().serve(broker=broker) as worker:
        await broker.publish([command("s-1", bad=True), command("s-2")])
        got = {r.causation_id.split("/")[0]: r for r in await replies(engine, 2)}
        assert got["s-1"].outcome == Outcome.RETRY
        assert got["s-2"].outcome == Outcome.SUCCESS
        assert await effects(worker) == ["s-2"]


async def test_a_compensation_that_failed_runs_again_when_sent_again(broker: MemoryBroker) -> None:
    participant = Participant("payment")
    refusals = {"left": 1}

    @participant.compensation("Refund")
    async def refund(message: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
        if refusals["left"]:
            refusals["left"] -= 1
            raise BusinessFailure("gateway refused")
        return {"refunded": True}

    engine = await broker.subscribe(["replies"], "engine")
    async with participant.serve(broker=broker):
        await broker.publish([command("s-1", kind=MessageKind.COMPENSATION)])
        (failed,) = await replies(engine, 1)
        await broker.publish([command("s-1", kind=MessageKind.COMPENSATION, attempt=2)])
        (retried,) = await replies(engine, 1)
        await broker.publish([command("s-1", kind=MessageKind.COMPENSATION, attempt=3)])
        (repeated,) = await replies(engine, 1)
    assert [failed.outcome, retried.outcome, repeated.outcome] == [Outcome.FAILURE, Outcome.SUCCESS, Outcome.SUCCESS]
    assert participant.stats["deduplicated"] == 1  # the success is recorded


async def test_a_dedup_table_from_an_earlier_release_gets_its_new_columns(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    path = tmp_path / "payment.db"
    with sqlite3.connect(path) as db:  # the table as the first release made it: no `reason`
        db.execute("CREATE TABLE participant_dedup (key VARCHAR(300) PRIMARY KEY, command_id VARCHAR(300) NOT NULL,"
                   " outcome VARCHAR(20) NOT NULL, type VARCHAR(200) NOT NULL, data JSON NOT NULL, at FLOAT NOT NULL)")
        db.execute("INSERT INTO participant_dedup VALUES ('s-0/charge/command', 's-0/charge/command/1', 'success',"
                   " 'Charge.succeeded', '{\"charged\": true}', 1.0)")
    engine = await broker.subscribe(["replies"], "engine")
    async with payment().serve(broker=broker, database_url=f"sqlite+aiosqlite:///{path}"):
        await broker.publish([command("s-0", attempt=2), command("s-1", decline=True)])
        got = {r.causation_id.split("/")[0]: r for r in await replies(engine, 2)}
    assert (got["s-0"].outcome, got["s-0"].data) == (Outcome.SUCCESS, {"charged": True})
    assert (got["s-1"].outcome, got["s-1"].reason) == (Outcome.FAILURE, "card expired")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT reason FROM participant_dedup WHERE key = 's-1/charge/command'").fetchone() == (
            "card expired",
        )


async def test_a_command_that_fails_on_its_own_is_answered_retryable_and_holds_back_nothing(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that is not an outage (here the database refusing a value) would fail every try of the batch:
    its commands are handled one by one, the one that still fails gets a retryable reply (not recorded)."""
    real_handle = ParticipantWorker.handle

    async def handle(self: ParticipantWorker, deliveries: Sequence[Any]) -> list[BrokerMessage]:
        if any(d.message.key == "s-bad" for d in deliveries):
            raise sa.exc.DataError("INSERT ...", {}, Exception("value too long for type character varying(200)"))
        return await real_handle(self, deliveries)

    monkeypatch.setattr(ParticipantWorker, "handle", handle)
    engine = await broker.subscribe(["replies"], "engine")
    async with payment().serve(broker=broker) as worker:
        await broker.publish([command("s-bad"), command("s-good")])
        got = {r.causation_id.split("/")[0]: r for r in await replies(engine, 2)}
        assert got["s-bad"].outcome == Outcome.RETRY
        assert "value too long" in (got["s-bad"].reason or "")
        assert got["s-good"].outcome == Outcome.SUCCESS
        assert await effects(worker) == ["s-good"]
        assert broker.lag(TOPIC, "payment-participant") == 0


async def test_an_outage_is_waited_out_not_answered(broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The participant's database unreachable for a moment: the batch is tried again as it is (no retryable
    replies, which would spend the engine's retries), and answered once the database is back."""
    real_handle = ParticipantWorker.handle
    outages: list[int] = []

    async def handle(self: ParticipantWorker, deliveries: Sequence[Any]) -> list[BrokerMessage]:
        if len(outages) < 3:
            outages.append(len(deliveries))
            raise sa.exc.OperationalError("BEGIN", {}, Exception("database is locked"))
        return await real_handle(self, deliveries)

    monkeypatch.setattr(ParticipantWorker, "handle", handle)
    engine = await broker.subscribe(["replies"], "engine")
    async with payment().serve(broker=broker):
        await broker.publish([command("s-1"), command("s-2")])
        got = await replies(engine, 2)
    assert outages == [2, 2, 2]  # the same batch, whole, each time
    assert [r.outcome for r in got] == [Outcome.SUCCESS, Outcome.SUCCESS]


async def test_a_business_failure_that_could_not_be_recorded_is_not_recorded_as_one(broker: MemoryBroker) -> None:
    """A reason with a NUL character is cleaned; a reply type longer than the dedup record holds is a handler bug
    (answered retryable), not a definite answer."""
    participant = Participant("payment")

    @participant.command("Charge")
    async def charge(message: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
        if message.data.get("long"):
            raise BusinessFailure("declined", type="Charge.declined." + "x" * 200)
        raise BusinessFailure("holder 'A\x00B' rejected")

    engine = await broker.subscribe(["replies"], "engine")
    async with participant.serve(broker=broker):
        await broker.publish([command("s-nul"), command("s-long", long=True)])
        got = {r.causation_id.split("/")[0]: r for r in await replies(engine, 2)}
    assert (got["s-nul"].outcome, got["s-nul"].reason) == (Outcome.FAILURE, "holder 'A\ufffdB' rejected")
    assert got["s-long"].outcome == Outcome.RETRY
    assert participant.stats["retryable"] == 1


async def _failure_types_at_the_bound(broker: MemoryBroker, database: Any) -> None:
    participant = Participant("payment")

    @participant.command("Charge")
    async def charge(message: CommandMessage, tx: AsyncConnection) -> dict[str, Any]:
        raise BusinessFailure("declined", type=str(message.data["type"]))

    longest = "Charge.declined." + "x" * (REPLY_TYPE_CHARS - len("Charge.declined."))
    assert len(longest) == REPLY_TYPE_CHARS
    engine = await broker.subscribe(["replies"], "engine")
    worker = ParticipantWorker(participant, broker, database, batch_max=10)
    await worker.start()
    try:
        await broker.publish([command("s-fits", type=longest), command("s-over", type=longest + "x")])
        got = {r.causation_id.split("/")[0]: r for r in await replies(engine, 2)}
        assert (got["s-fits"].outcome, got["s-fits"].type) == (Outcome.FAILURE, longest)
        assert got["s-over"].outcome == Outcome.RETRY
        await broker.publish([command("s-fits", attempt=2, type=longest)])  # answered from its dedup record
        again = (await replies(engine, 1))[0]
        assert (again.outcome, again.type) == (Outcome.FAILURE, longest)
        assert participant.stats["deduplicated"] == 1
        async with worker.db.connect() as conn:
            stored = (await conn.execute(sa.select(dedup_table.c.type))).scalars().all()
        assert stored == [longest]
    finally:
        await worker.stop()


async def test_a_failure_reply_type_of_the_limit_is_recorded_and_one_more_character_is_retryable(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    """A business failure's reply type of exactly REPLY_TYPE_CHARS is recorded and answered from the record; one
    character more is answered retryable and not recorded."""
    await _failure_types_at_the_bound(broker, participant_database(str(tmp_path / "p.db")))


@pytest.mark.postgres
async def test_a_failure_reply_type_of_the_limit_fits_the_dedup_column_on_postgres(
    broker: MemoryBroker, pg_url: str
) -> None:
    """On PostgreSQL, which enforces the column's width: a reply type of REPLY_TYPE_CHARS is stored."""
    async with postgres_schema(pg_url) as database:
        await _failure_types_at_the_bound(broker, database())


async def test_a_command_handled_alone_that_fails_leaves_no_effect_and_its_failure_is_recorded(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    """A batch of one command runs without a savepoint on SQLite: when its handler wrote an effect and then failed,
    the effect is still undone (retryable: nothing recorded; business failure: the failure alone recorded)."""
    engine = await broker.subscribe(["replies"], "engine")
    async with payment().serve(broker=broker, database_url=str(tmp_path / "p.db")) as worker:
        await broker.publish([command("s-bad", bad=True)])
        (bad,) = await replies(engine, 1)
        await broker.publish([command("s-declined", decline=True)])
        (declined,) = await replies(engine, 1)
        await broker.publish([command("s-ok")])
        (ok,) = await replies(engine, 1)
        assert (bad.outcome, declined.outcome, ok.outcome) == (Outcome.RETRY, Outcome.FAILURE, Outcome.SUCCESS)
        assert await effects(worker) == ["s-ok"]
        async with worker.db.connect() as conn:
            keys = (await conn.execute(sa.select(dedup_table.c.key).order_by(dedup_table.c.key))).scalars().all()
        assert keys == ["s-declined/charge/command", "s-ok/charge/command"]


async def test_a_worker_on_an_sqlite_engine_the_application_made_answers_and_records_as_on_its_own(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    """An engine made without sagas' SQLite settings (the sqlite3 module's implicit transactions): commands are
    answered, a failure's effect undone, and repeats answered from the records, as with `participant_database`."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = await broker.subscribe(["replies"], "engine")
    worker = ParticipantWorker(payment(), broker, create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"),
                               batch_max=10)
    await worker.start()
    try:
        await broker.publish([command("s-ok"), command("s-declined", decline=True)])
        first = {r.causation_id.split("/")[0]: r.outcome for r in await replies(engine, 2)}
        await broker.publish([command("s-ok", attempt=2)])
        (again,) = await replies(engine, 1)
        assert first == {"s-ok": Outcome.SUCCESS, "s-declined": Outcome.FAILURE}
        assert (again.outcome, again.data) == (Outcome.SUCCESS, {"charged": True})  # the record's data, read back
        assert worker.participant.stats["deduplicated"] == 1
        assert await effects(worker) == ["s-ok"]
    finally:
        await worker.stop()

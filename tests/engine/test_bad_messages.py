"""Malformed, foreign, stale, late and duplicate replies: each is dead-lettered or ignored with a reason, and the
engine keeps running sagas."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from structlog.testing import capture_logs

from sagas.engine.admin import SagaAdmin
from sagas.engine.ports import BrokerMessage
from sagas.engine.runtime import DEFAULT_REPLY_TOPIC
from sagas.engine.state import ReplyReceived, SagaStatus, StepStatus
from sagas.errors import BrokerError, OperatorError, SagaError, StoreError
from sagas.testing import SagaHarness
from tests.engine.support import ledger_participant, three_steps


def reply(
    saga_id: str,
    *,
    step: str = "ship",
    attempt: int = 1,
    kind: str = "command",
    outcome: str = "success",
    type: str = "Ship.succeeded",
    value: bytes = b"{}",
    message_id: str | None = None,
    drop: tuple[str, ...] = (),
    **override: str,
) -> BrokerMessage:
    attrs = {
        "specversion": "1.0",
        "id": message_id or f"{saga_id}/{step}/{kind}/{attempt}/reply-{uuid.uuid4().hex[:6]}",
        "source": "test",
        "type": type,
        "subject": saga_id,
        "sagastep": step,
        "sagaattempt": str(attempt),
        "sagakind": "reply",
        "sagacausation": f"{saga_id}/{step}/{kind}/{attempt}",
        "sagaoutcome": outcome,
        "sagaschema": "1",
        **override,
    }
    headers = tuple((f"ce_{k}", v.encode()) for k, v in attrs.items() if k not in drop)
    return BrokerMessage(topic=DEFAULT_REPLY_TOPIC, key=saga_id, headers=headers, value=value)


def participants() -> list[Any]:
    return [ledger_participant("inventory", {"Reserve": None, "UndoReserve": None}),
            ledger_participant("payment", {"Charge": None, "UndoCharge": None})]


CASES: list[tuple[str, Any, str]] = [
    # (name, message factory taking the stuck saga's id, expected reason fragment)
    ("bad JSON", lambda s: reply(s, value=b"{not json"), "not JSON"),
    ("invalid UTF-8", lambda s: reply(s, value=b"\xff\xfe\x00"), "not JSON"),
    ("JSON array", lambda s: reply(s, value=b"[1, 2]"), "must be a JSON object"),
    ("no headers at all", lambda s: BrokerMessage(topic=DEFAULT_REPLY_TOPIC, value=b"{}"), "missing attribute"),
    ("missing id", lambda s: reply(s, drop=("id",)), "ce_id"),
    ("missing subject", lambda s: reply(s, drop=("subject",)), "ce_subject"),
    ("missing outcome", lambda s: reply(s, drop=("sagaoutcome",)), "ce_sagaoutcome"),
    ("old CloudEvents version", lambda s: reply(s, specversion="0.3"), "specversion"),
    ("future protocol schema", lambda s: reply(s, sagaschema="9"), "sagaschema"),
    ("attempt not a number", lambda s: reply(s, sagaattempt="two"), "not an integer"),
    ("attempt zero", lambda s: reply(s, sagaattempt="0"), "at least 1"),
    ("a command on the reply topic", lambda s: reply(s, sagakind="command"), "expected 'reply'"),
    ("unknown outcome", lambda s: reply(s, outcome="maybe"), "not one of"),
    ("causation of another saga", lambda s: reply(s, sagacausation=f"{uuid.uuid4()}/ship/command/1"),
     "is not the id of a command"),
    ("unknown saga", lambda s: reply(str(uuid.uuid4())), "unknown saga"),
    ("unknown step", lambda s: reply(s, step="teleport", type="Teleport.succeeded"), "unknown step"),
    ("unexpected reply type", lambda s: reply(s, type="Ship.exploded"), "unexpected reply type"),
    ("huge payload", lambda s: reply(s, value=json.dumps({"blob": "x" * 1_200_000}).encode()), "exceeds"),
    # What PostgreSQL cannot store must be refused on every store, before it reaches one.
    ("NUL in the data", lambda s: reply(s, value=b'{"note": "a\\u0000b"}'), "NUL character"),
    ("NUL in an attribute", lambda s: reply(s, sagareason="a\x00b", outcome="failure"), "NUL character"),
    ("id too long for the inbox", lambda s: reply(s, message_id="r" * 400), "ce_id is longer than 296"),
    ("subject too long for a saga id", lambda s: reply("s" * 300, message_id="r-1"), "ce_subject is longer than 200"),
]

IGNORED: list[tuple[str, Any, str]] = [
    ("stale attempt", lambda s: reply(s, attempt=2), "attempt"),
    ("late reply for a finished step", lambda s: reply(s, step="reserve", type="Reserve.succeeded"), "reserve"),
]


@pytest.mark.parametrize(("name", "make", "fragment"), CASES, ids=[c[0] for c in CASES])
async def test_bad_reply_is_dead_lettered_with_its_reason(name: str, make: Any, fragment: str) -> None:
    """A malformed or foreign reply goes to the dead-letter store with the reason, and changes no saga."""
    async with SagaHarness([three_steps()], participants()) as h:
        saga_id = await h.start("order", {"order_id": "o-1", "amount": 5})
        before = await h.instance(saga_id)
        with capture_logs() as logs:
            await h.broker.publish([make(saga_id)])
            await h.settle()
        dead = await h.store.dead_letters()
        assert len(dead) == 1, name
        assert fragment in dead[0].reason
        assert any(e["event"] == "dead letter" and fragment in e["reason"] for e in logs)
        after = await h.instance(saga_id)
        assert after.steps == before.steps
        assert after.status == SagaStatus.RUNNING


@pytest.mark.parametrize(("name", "make", "fragment"), IGNORED, ids=[c[0] for c in IGNORED])
async def test_stale_and_late_replies_are_ignored_with_a_reason(name: str, make: Any, fragment: str) -> None:
    """A reply for an attempt or step the saga is not waiting for is recorded and ignored, never applied."""
    async with SagaHarness([three_steps()], participants()) as h:
        saga_id = await h.start("order", {"order_id": "o-1", "amount": 5})
        before = await h.instance(saga_id)
        with capture_logs() as logs:
            await h.broker.publish([make(saga_id)])
            await h.settle()
        assert await h.store.dead_letters() == []
        assert (await h.instance(saga_id)).steps == before.steps
        ignored = [r.entry for r in await h.history(saga_id) if r.entry.type == "message.ignored"]
        assert len(ignored) == 1
        assert fragment in ignored[0].detail["reason"]
        assert any(e["event"] == "reply ignored" for e in logs)


async def test_duplicate_reply_is_applied_once_and_the_engine_keeps_going() -> None:
    """The same reply delivered three times is applied once; after every kind of bad input, new sagas still run."""
    async with SagaHarness([three_steps()], participants()) as h:
        saga_id = await h.start("order", {"order_id": "o-1", "amount": 5})
        good = reply(saga_id, message_id=f"{saga_id}/ship/command/1/reply")
        # Bad input first, while the saga still waits for "ship", so every case meets the state it targets.
        await h.broker.publish([make(saga_id) for _, make, _ in CASES] + [good, good, good])
        await h.settle()
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPLETED
        history = await h.history(saga_id)
        assert [r.entry.type for r in history].count("step.succeeded") == 3
        assert [r.entry.type for r in history].count("message.duplicate") == 2
        assert len(await h.store.dead_letters()) == len(CASES)

        await h.add_participant(ledger_participant("shipping", {"Ship": None, "UndoShip": None}))
        fresh = await h.start("order", {"order_id": "o-2", "amount": 5})
        assert (await h.instance(fresh)).status == SagaStatus.COMPLETED


async def test_a_reply_the_engine_fails_on_is_dead_lettered_alone_and_the_rest_of_its_batch_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a malformed message but one the engine itself fails on (a bug, a broken stored saga): the batch it came
    in is processed item by item, the failing reply goes to the dead letters with the error, and its saga carries
    on through the step's timeout and retry. `sagas dlq replay` can still apply it (no inbox record)."""
    from sagas.engine import machine

    real_decide = machine.decide
    poisoned: list[str] = []

    def decide(definition: Any, instance: Any, event: Any, *, now: float) -> Any:
        if isinstance(event, ReplyReceived) and (instance.id, event.step, event.attempt) == ("s-2", "reserve", 1):
            poisoned.append(event.message_id)
            raise RuntimeError("boom")  # every time: in its batch, then on its own
        return real_decide(definition, instance, event, now=now)

    monkeypatch.setattr(machine, "decide", decide)
    participants = [
        ledger_participant("inventory", {"Reserve": None, "UndoReserve": None}),
        ledger_participant("payment", {"Charge": None, "UndoCharge": None}),
        ledger_participant("shipping", {"Ship": None, "UndoShip": None}),
    ]
    async with SagaHarness([three_steps()], participants) as h:
        with capture_logs() as logs:
            # Started together, the five sagas are one batch: their commands go out in one publish, the inventory
            # participant answers them in one batch, and the five reserve replies come back in one batch.
            await asyncio.gather(*(
                h.engine.start_saga("order", {"order_id": f"o-{n}", "amount": 5}, saga_id=f"s-{n}") for n in range(5)
            ))
            await h.settle()
        assert len(set(poisoned)) == 1
        assert len(poisoned) == 2
        failed = [e for e in logs if e["event"] == "item failed"]
        assert any("boom" in e["error"] for e in failed)
        assert {(e["saga_id"], e["step"], e["attempt"]) for e in failed} == {("s-2", "reserve", "1")}
        assert all(e["message_id"] == poisoned[0] for e in failed)
        for n in (0, 1, 3, 4):
            instance = await h.instance(f"s-{n}")
            assert instance.status == SagaStatus.COMPLETED
            assert {s.attempt for s in instance.steps.values()} == {1}  # nothing waited for a timeout
        (letter,) = await h.store.dead_letters()
        assert letter.id == f"dl/{poisoned[0]}"
        assert letter.saga_id == "s-2"
        assert "RuntimeError('boom')" in letter.reason
        assert await h.store.seen([poisoned[0]]) == set()
        assert h.in_flight() == 0  # acknowledged

        await h.advance(30)  # the reserve step times out and is retried
        await h.advance(1)
        instance = await h.instance("s-2")
        assert instance.status == SagaStatus.COMPLETED, (instance.steps, await h.store.timers_of("s-2"))
        assert instance.steps["reserve"].attempt == 2


async def test_a_replayed_dead_letter_is_applied_once_and_a_rejected_replay_leaves_it_in_the_list() -> None:
    """`sagas dlq replay`: rejected again, the letter stays (not marked replayed); once its cause is gone it is
    applied; replaying it a second time is refused, so `replayed_at` keeps the replay that counted."""
    async with SagaHarness([three_steps()], participants()) as h:
        await h.broker.publish([reply("late-1")])  # ship's success, before its saga exists
        await h.settle()
        (letter,) = await h.store.dead_letters()
        admin = SagaAdmin(h.store)
        with pytest.raises(OperatorError, match="rejected: unknown saga"):
            await admin.replay(letter.id)
        assert (await h.store.dead_letter(letter.id)).replayed_at is None

        await h.engine.start_saga("order", {"order_id": "o-1", "amount": 5}, saga_id="late-1")
        await h.settle()  # reserve and charge done; ship waits (no shipping participant)
        assert await admin.replay(letter.id) == "applied"
        assert (await h.instance("late-1")).status == SagaStatus.COMPLETED
        replayed_at = (await h.store.dead_letter(letter.id)).replayed_at
        assert replayed_at is not None
        with pytest.raises(OperatorError, match="replayed already"):
            await admin.replay(letter.id)
        assert (await h.store.dead_letter(letter.id)).replayed_at == replayed_at


async def test_a_command_the_broker_refuses_for_good_is_dead_lettered_and_holds_back_nothing() -> None:
    """A command the broker will never take (over its size limit) goes to the dead letters with the refusal and is
    marked sent; the commands committed with it still go out, and the relay does not offer it again."""
    async with SagaHarness([three_steps()], participants()) as h:
        real_publish = h.broker.publish
        refused: list[str] = []

        async def publish(messages: Any) -> None:
            if any(m.key == "big" for m in messages):
                refused.extend(m.header("ce_id") or "" for m in messages if m.key == "big")
                raise BrokerError("message too large for the topic", retriable=False)
            await real_publish(messages)

        h.broker.publish = publish  # type: ignore[method-assign]
        await asyncio.gather(*(h.engine.start_saga("order", {"order_id": n, "amount": 5}, saga_id=n)
                               for n in ("big", "small")))
        await h.settle()
        assert (await h.instance("small")).steps["charge"].status == StepStatus.SUCCEEDED
        (letter,) = await h.store.dead_letters()
        assert letter.id == "dl/big/reserve/command/1"
        assert letter.saga_id == "big"
        assert "refused by the broker: message too large" in letter.reason
        pending = [m.id for m in await h.store.pending_outbox(10)]
        assert "big/reserve/command/1" not in pending  # marked sent: nothing left for the relay
        with pytest.raises(OperatorError, match="cannot be replayed"):
            await SagaAdmin(h.store).replay(letter.id)
        attempts = len(refused)
        await h.engine.relay_once()
        await h.settle()
        assert len(refused) == attempts


async def test_callers_hear_of_a_stop_that_interrupts_a_batch_processed_item_by_item() -> None:
    """The writer is processing a failed batch item by item, one item waits out an outage, and the engine stops:
    every caller of that batch gets an error instead of waiting for ever."""
    async with SagaHarness([three_steps()], []) as h:  # no participants: no reply queues up behind the writer
        real_commit = h.store.commit

        async def commit(work: Any) -> None:
            ids = [i.id for i in work.inserts]
            if len(ids) > 1:
                raise RuntimeError("a bug in this batch")
            if ids == ["s-2"]:
                raise StoreError("connection lost", retriable=True)
            await real_commit(work)

        h.store.commit = commit  # type: ignore[method-assign]
        starts = {n: asyncio.ensure_future(h.engine.start_saga("order", {"order_id": n, "amount": 1}, saga_id=n))
                  for n in ("s-1", "s-2", "s-3")}
        assert await asyncio.wait_for(starts["s-1"], 10) == "s-1"
        await asyncio.sleep(0.2)  # s-2 is waiting out its outage
        await h.engine._loops.cancel("writer")
        _, waiting = await asyncio.wait(starts.values(), timeout=5)
        assert not waiting
        assert starts["s-1"].result() == "s-1"
        for n in ("s-2", "s-3"):
            assert isinstance(starts[n].exception(), SagaError)
        h.store.commit = real_commit  # type: ignore[method-assign]

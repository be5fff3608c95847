"""The engine end to end on the in-memory broker and store, with real participants and a virtual clock."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from typing import Any

import pytest

from sagas.definitions.model import SagaDefinition
from sagas.engine.state import OperatorCommand, SagaStatus, StepStatus
from sagas.engine.wire import CommandMessage
from sagas.errors import InvalidInput, OperatorError
from sagas.participant import BusinessFailure
from sagas.testing import SagaHarness
from tests.engine.support import decline_if, ledger_participant, ledger_rows, three_steps

ORDER = {"order_id": "o-1", "amount": 50}


def inventory() -> Any:
    return ledger_participant("inventory", {"Reserve": None, "UndoReserve": None})


def payment(**overrides: Any) -> Any:
    return ledger_participant("payment", {"Charge": decline_if(lambda d: d["amount"] > 100), "UndoCharge": None,
                                          **overrides})


def shipping(**overrides: Any) -> Any:
    return ledger_participant("shipping", {"Ship": decline_if(lambda d: d["order"].startswith("x")),
                                           "UndoShip": None, **overrides})


def compensation_order(history: list[Any]) -> list[str]:
    return [r.entry.step for r in history if r.entry.type == "compensation.sent"]


async def test_happy_path_completes_with_each_effect_once() -> None:
    """A saga whose participants all succeed completes, and each step's effect is applied exactly once."""
    async with SagaHarness([three_steps()], [inventory(), payment(), shipping()]) as h:
        ids = [await h.start("order", {"order_id": f"o-{i}", "amount": 10}) for i in range(5)]
        for saga_id in ids:
            inst = await h.instance(saga_id)
            assert inst.status == SagaStatus.COMPLETED
            assert all(s.status == StepStatus.SUCCEEDED for s in inst.steps.values())
        for worker in h.workers:
            rows = await ledger_rows(worker)
            assert sorted(r[0] for r in rows) == sorted(ids)  # one effect per saga, none twice


async def test_business_failure_compensates_completed_steps_in_reverse() -> None:
    """When the last step is declined, the earlier steps are compensated latest-first and the saga is compensated."""
    async with SagaHarness([three_steps()], [inventory(), payment(), shipping()]) as h:
        saga_id = await h.start("order", {"order_id": "x-1", "amount": 10})
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPENSATED
        assert inst.steps["ship"].status == StepStatus.FAILED
        assert inst.steps["charge"].status == StepStatus.COMPENSATED
        assert inst.steps["reserve"].status == StepStatus.COMPENSATED
        assert compensation_order(await h.history(saga_id)) == ["charge", "reserve"]
        shipping_rows = await ledger_rows(h.workers[2])
        assert shipping_rows == []  # the declined step's effect was rolled back with its savepoint


async def test_input_schema_is_checked_at_start() -> None:
    """A saga whose input breaks the definition's input schema is refused before anything is written."""
    definition = three_steps().model_copy(update={"input_schema": {
        "type": "object", "required": ["order_id", "amount"],
        "properties": {"amount": {"type": "number", "minimum": 0}}}})
    async with SagaHarness([definition], [inventory(), payment(), shipping()]) as h:
        with pytest.raises(InvalidInput, match="amount"):
            await h.start("order", {"order_id": "o-1", "amount": -5})
        assert await h.store.list_instances() == []


async def test_start_is_idempotent_by_key() -> None:
    """Starting twice with the same idempotency key returns the first saga and runs it once."""
    async with SagaHarness([three_steps()], [inventory(), payment(), shipping()]) as h:
        first = await h.start("order", ORDER, key="order-o-1")
        second = await h.start("order", ORDER, key="order-o-1")
        assert first == second
        assert len(await h.store.list_instances()) == 1
        assert len(await ledger_rows(h.workers[0])) == 1


async def test_retryable_failures_are_retried_with_backoff_on_virtual_time() -> None:
    """A participant that fails transiently twice is retried after 1 s and 2 s of backoff, then succeeds."""
    calls = {"n": 0}

    def flaky(command: CommandMessage) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("gateway unavailable")
        return {"tracking": "T-1"}

    async with SagaHarness([three_steps()], [inventory(), payment(), shipping(Ship=flaky)]) as h:
        saga_id = await h.start("order", ORDER)
        inst = await h.instance(saga_id)
        assert inst.steps["ship"].status == StepStatus.BACKOFF
        assert await h.advance(0.5) == 0  # backoff not over yet
        assert await h.advance(0.5) == 1  # 1 s: attempt 2, fails again
        assert (await h.instance(saga_id)).steps["ship"].attempt == 2
        assert await h.advance(2.0) == 1  # 2 s more: attempt 3 succeeds
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPLETED
        assert inst.steps["ship"].attempt == 3
        assert inst.steps["ship"].output == {"tracking": "T-1"}
        assert len(await ledger_rows(h.workers[2])) == 1  # failed attempts rolled their effect back


async def test_timeouts_exhaust_retries_then_unknown_step_is_compensated_and_parks() -> None:
    """A step nobody answers times out, is retried, then counts as unknown; its compensation, unanswered too,
    parks the saga; `retry` after the participant is back compensates everything exactly once."""
    definition = three_steps(timeout=30.0, max_attempts=2, comp_attempts=2)
    async with SagaHarness([definition], [inventory(), payment()]) as h:
        saga_id = await h.start("order", ORDER)
        assert (await h.instance(saga_id)).steps["ship"].status == StepStatus.RUNNING
        await h.advance(30)  # timeout of attempt 1 → backoff 1 s
        await h.advance(1)  # attempt 2
        assert (await h.instance(saga_id)).steps["ship"].attempt == 2
        await h.advance(30)  # timeout of attempt 2: retries exhausted → unknown → compensate ship first
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPENSATING
        assert inst.steps["ship"].status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_BACKOFF)
        for _ in range(4):  # the compensation is not answered either: its retries run out
            await h.advance(30)
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.FAILED
        assert inst.failure is not None
        assert "ship" in inst.failure
        assert await h.store.timers_of(saga_id) == []

        worker = await h.add_participant(shipping())
        await h.operate(saga_id, OperatorCommand(action="retry", reason="shipping is back"))
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPENSATED
        effects = Counter(r[2] for r in await ledger_rows(worker))
        assert effects == {"command": 1, "compensation": 1}  # redelivered attempts were deduplicated
        history = await h.history(saga_id)
        assert compensation_order(history)[-2:] == ["charge", "reserve"]
        assert any(r.entry.type == "operator.retry" and r.entry.detail.get("reason") == "shipping is back"
                   for r in history)


async def test_deadline_before_the_pivot_aborts_and_compensates() -> None:
    """When the saga deadline passes while a step is outstanding, the saga compensates what it did."""
    async with SagaHarness([three_steps(timeout=60, deadline=60)], [inventory(), payment()]) as h:
        saga_id = await h.start("order", ORDER)
        await h.advance(59)
        assert (await h.instance(saga_id)).status == SagaStatus.RUNNING
        await h.advance(1)
        assert (await h.instance(saga_id)).status == SagaStatus.COMPENSATING
        await h.add_participant(shipping())  # it handles Ship, then UndoShip, in order
        await h.settle()
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPENSATED
        assert compensation_order(await h.history(saga_id)) == ["ship", "charge", "reserve"]


@pytest.mark.parametrize("error", [RuntimeError("ledger locked"), BusinessFailure("refund refused")])
async def test_compensation_that_keeps_failing_parks_then_operator_retry_resumes(error: Exception) -> None:
    """A compensation failing past its retry policy parks the saga; an operator retry finishes compensating. A
    business failure of a compensation is not a final answer: the participant runs the handler again."""
    broken = {"on": True}

    def undo_charge(command: CommandMessage) -> dict[str, Any]:
        if broken["on"]:
            raise error
        return {"refunded": True}

    async with SagaHarness([three_steps(comp_attempts=3)],
                           [inventory(), payment(UndoCharge=undo_charge), shipping()]) as h:
        saga_id = await h.start("order", {"order_id": "x-2", "amount": 10})
        for delay in (1, 2):
            await h.advance(delay)
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.FAILED
        assert inst.steps["charge"].compensation_attempt == 3
        assert inst.steps["reserve"].status == StepStatus.SUCCEEDED  # not compensated before charge is undone
        with pytest.raises(OperatorError, match=rf"^saga {saga_id}: cannot abort: (?!cannot)"):
            await h.operate(saga_id, OperatorCommand(action="abort", reason="too late"))
        broken["on"] = False
        await h.operate(saga_id, OperatorCommand(action="retry", reason="ledger unlocked"))
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPENSATED
        assert compensation_order(await h.history(saga_id))[-1] == "reserve"


async def test_operator_abort_compensates_a_running_saga() -> None:
    """Aborting a running saga compensates its completed steps and the outstanding one."""
    async with SagaHarness([three_steps()], [inventory(), payment()]) as h:
        saga_id = await h.start("order", ORDER)
        await h.operate(saga_id, OperatorCommand(action="abort", reason="customer cancelled", operator="ops"))
        await h.add_participant(shipping())
        await h.settle()
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPENSATED
        entry = next(r.entry for r in await h.history(saga_id) if r.entry.type == "operator.abort")
        assert entry.detail["reason"] == "customer cancelled"
        assert entry.detail["operator"] == "ops"


async def test_operator_skip_is_recorded_and_moves_the_saga_on() -> None:
    """Skipping a stuck step marks it skipped, records the reason, and lets the saga complete."""
    async with SagaHarness([three_steps()], [inventory(), payment()]) as h:
        saga_id = await h.start("order", ORDER)
        await h.operate(saga_id, OperatorCommand(action="skip", step="ship", reason="shipped by hand"))
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPLETED
        assert inst.steps["ship"].status == StepStatus.SKIPPED
        entry = next(r.entry for r in await h.history(saga_id) if r.entry.type == "operator.skip")
        assert entry.step == "ship"
        assert entry.detail["reason"] == "shipped by hand"
        with pytest.raises(OperatorError):
            await h.operate(saga_id, OperatorCommand(action="skip", step="ship", reason="again"))


async def test_sagas_in_flight_finish_on_the_version_they_started_with() -> None:
    """After version 2 is deployed, version-1 sagas already running finish with version 1's steps."""
    v1 = three_steps(version=1)
    v2 = v1.model_copy(update={"version": 2, "steps": v1.steps[:2]})  # v2 drops shipping
    async with SagaHarness([v1], [inventory(), payment()]) as h:
        old = [await h.start("order", {"order_id": f"o-{i}", "amount": 5}) for i in range(3)]
        await h.engine.deploy(v2)
        new = await h.start("order", {"order_id": "o-new", "amount": 5})
        assert (await h.instance(new)).definition_version == 2
        assert (await h.instance(new)).status == SagaStatus.COMPLETED  # two steps only
        for saga_id in old:
            assert (await h.instance(saga_id)).status == SagaStatus.RUNNING  # still waiting for shipping
        worker = await h.add_participant(shipping())
        await h.settle()
        for saga_id in old:
            inst = await h.instance(saga_id)
            assert inst.definition_version == 1
            assert inst.status == SagaStatus.COMPLETED
        assert sorted(r[0] for r in await ledger_rows(worker)) == sorted(old)


async def test_a_refused_publish_does_not_stop_the_engine_and_its_messages_go_out_one_by_one() -> None:
    """A publish the broker refuses (not an outage) is tried again message by message, so that only a message
    refused on its own is held back (tests/engine/test_bad_messages.py); the publisher keeps running."""
    from sagas.errors import BrokerError

    async with SagaHarness([three_steps()], [inventory(), payment(), shipping()]) as h:
        real_publish = h.broker.publish
        refused: list[int] = []

        async def flaky_publish(messages: Any) -> None:
            if not refused:
                refused.append(len(messages))
                raise BrokerError("refused", retriable=False)
            await real_publish(messages)

        h.broker.publish = flaky_publish  # type: ignore[method-assign]
        first = await h.start("order", ORDER)
        assert refused == [1]
        assert (await h.instance(first)).status == SagaStatus.COMPLETED
        other = await h.start("order", {"order_id": "o-2", "amount": 5})
        assert (await h.instance(other)).status == SagaStatus.COMPLETED  # the publisher is still alive
        h.clock.advance(h.engine.settings.relay_grace + 1)
        assert await h.engine.relay_once() == 0  # nothing was left behind
        assert await h.store.dead_letters() == []


async def test_a_publish_left_unacknowledged_is_logged_as_an_outage_and_its_end_when_it_goes_through() -> None:
    """A broker that holds a publish without answering (a client waiting out a lost connection) is reported
    unavailable after `outage_log_after`, and available again once the publish goes through, published once."""
    from structlog.testing import capture_logs

    async with SagaHarness([three_steps()], [inventory(), payment(), shipping()]) as h:
        h.engine.settings = dataclasses.replace(h.engine.settings, outage_log_after=0.05)
        real_publish = h.broker.publish
        release = asyncio.Event()
        calls: list[int] = []

        async def held_publish(messages: Any) -> None:
            calls.append(len(messages))
            if len(calls) == 1:
                await release.wait()
            await real_publish(messages)

        h.broker.publish = held_publish  # type: ignore[method-assign]
        with capture_logs() as logs:
            saga_id = await h.engine.start_saga("order", ORDER)
            async with asyncio.timeout(10):
                # A log line is the condition: no event stands for it.
                while not any(e["event"] == "broker unavailable; retrying publish" for e in logs):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            release.set()
            await h.settle()
            assert (await h.instance(saga_id)).status == SagaStatus.COMPLETED
        outage = next(e for e in logs if e["event"] == "broker unavailable; retrying publish")
        assert outage["error"] == "not acknowledged within 0.05s"
        assert [e["event"] for e in logs].count("broker available again") == 1
        assert calls[0] == 1  # the held message went out once, then the rest one by one as they were committed
        assert calls.count(1) == len(calls)


async def test_wait_notices_a_saga_settled_by_someone_else() -> None:
    """`Engine.wait` returns when another writer (another engine, or an operator via the CLI) settles the saga."""
    from sagas.engine.admin import SagaAdmin

    async with SagaHarness([three_steps()], [inventory(), payment()]) as h:
        saga_id = await h.start("order", ORDER)  # waits at "ship": no shipping participant
        waiting = asyncio.ensure_future(h.engine.wait(saga_id, timeout=10, poll=0.05))
        await SagaAdmin(h.store).operate(saga_id, OperatorCommand(action="skip", step="ship", reason="by hand"))
        assert (await waiting).status == SagaStatus.COMPLETED


async def test_wait_on_a_saga_removed_meanwhile_raises_unknown_saga() -> None:
    """The engine remembers the saga running, so `wait` starts polling without a read; when the saga is gone from
    the store (settled elsewhere, then purged by retention), the poll says so instead of waiting for ever."""
    import time

    from sagas.engine.admin import SagaAdmin
    from sagas.errors import UnknownSaga

    async with SagaHarness([three_steps()], [inventory(), payment()]) as h:
        saga_id = await h.start("order", ORDER)  # waits at "ship": no shipping participant
        assert h.engine.processor.remembered(saga_id) is not None
        await SagaAdmin(h.store).operate(saga_id, OperatorCommand(action="skip", step="ship", reason="by hand"))
        removed = await h.store.purge(time.time() + 3600)  # SagaAdmin stamps the wall clock
        assert removed.instances == 1
        with pytest.raises(UnknownSaga):
            await h.engine.wait(saga_id, timeout=5, poll=0.05)


async def test_a_deadline_ignored_past_the_point_of_no_return_is_recorded_in_the_history() -> None:
    payload = {"order": "input.order_id", "amount": "input.amount"}
    definition = SagaDefinition.model_validate({
        "name": "order", "version": 1, "deadline": 60,
        "steps": [
            {"name": "reserve", "participant": "inventory", "command": "Reserve", "timeout": 30, "payload": payload,
             "compensation": {"command": "UndoReserve"}},
            {"name": "charge", "participant": "payment", "command": "Charge", "kind": "pivot", "timeout": 30,
             "payload": payload},
            {"name": "ship", "participant": "shipping", "command": "Ship", "kind": "retriable", "timeout": 30,
             "payload": payload},
        ],
    })
    async with SagaHarness([definition], [inventory(), payment()]) as h:  # nobody ships yet
        saga_id = await h.start("order", ORDER)
        await h.advance(60)
        history = [r.entry for r in await h.history(saga_id)]
        ignored = [e for e in history if e.type == "deadline.ignored_after_pivot"]
        assert [e.step for e in ignored] == ["charge"]
        await h.add_participant(shipping())
        await h.advance(30)
        assert (await h.instance(saga_id)).status == SagaStatus.COMPLETED


async def test_small_clock_steps_reach_a_timer_due_exactly_then() -> None:
    """Ten steps of 0.1 s reach a timeout of 1 s (float sums fell short by a microsecond and missed it)."""
    async with SagaHarness([three_steps(timeout=1.0)], [inventory()]) as h:
        saga_id = await h.start("order", ORDER)  # charge waits: no payment participant
        fired = 0
        for _ in range(10):
            fired += await h.advance(0.1)
        assert fired == 1
        assert (await h.instance(saga_id)).steps["charge"].status == StepStatus.BACKOFF


async def test_settle_fires_what_is_due_at_the_current_time() -> None:
    """A retry with no backoff is due at once: settling runs it, as "nothing left to do now" promises."""
    retry = {"max_attempts": 3, "initial_backoff": 0, "max_backoff": 0, "jitter": 0}
    definition = SagaDefinition.model_validate({
        "name": "order", "version": 1,
        "steps": [{"name": "reserve", "participant": "inventory", "command": "Reserve", "retry": retry,
                   "payload": {"order": "input.order_id"}, "compensation": {"command": "UndoReserve"}}],
    })
    failures = {"left": 1}

    def flaky(command: CommandMessage) -> dict[str, Any]:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("busy")
        return {"ok": True}

    async with SagaHarness([definition], [ledger_participant("inventory", {"Reserve": flaky})]) as h:
        saga_id = await h.start("order", ORDER)
        instance = await h.instance(saga_id)
        assert instance.status == SagaStatus.COMPLETED
        assert instance.steps["reserve"].attempt == 2


async def test_a_timer_that_failed_fires_again_once_its_claim_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness's store leases on the virtual clock: a timer whose processing failed comes back when the clock
    passes its lease, not after ten seconds of real time."""
    from sagas.engine import machine
    from sagas.engine.state import TimerFired

    real_decide = machine.decide
    broken = {"on": True}

    def decide(definition: Any, instance: Any, event: Any, *, now: float) -> Any:
        if isinstance(event, TimerFired) and broken["on"]:
            raise RuntimeError("boom")
        return real_decide(definition, instance, event, now=now)

    monkeypatch.setattr(machine, "decide", decide)
    async with SagaHarness([three_steps(timeout=5.0)], [inventory()]) as h:
        saga_id = await h.start("order", ORDER)
        assert await h.advance(5) == 1  # fired, failed
        broken["on"] = False
        assert await h.advance(0) == 0  # still claimed
        assert await h.advance(60) == 1  # the lease ran out on the virtual clock
        assert (await h.instance(saga_id)).steps["charge"].attempt == 1
        assert (await h.instance(saga_id)).steps["charge"].status == StepStatus.BACKOFF


async def test_the_relay_publishes_a_row_written_outside_the_engine_once_it_is_older_than_the_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A saga started through the store alone (what `sagas start --db` does) waits for the relay: its first
    command goes out once the row is `relay_grace` old, at once with a grace of zero (SAGAS_RELAY_GRACE)."""
    from sagas.engine.admin import SagaAdmin
    from sagas.settings import SagasSettings

    async with SagaHarness([three_steps()], [inventory(), payment(), shipping()]) as h:
        import time
        saga_id, created = await SagaAdmin(h.store).start("order", ORDER)
        assert created
        h.clock.advance(time.time() + 0.5 - h.clock.now())  # SagaAdmin stamps its rows with the wall clock
        assert await h.engine.relay_once() == 0  # younger than the default grace of 2 s: left to its writer
        h.engine.settings = dataclasses.replace(h.engine.settings, relay_grace=0.0)
        assert await h.engine.relay_once() == 1
        assert await h.engine.relay_once() == 0  # in flight already: not handed out twice
        assert (await h.engine.wait(saga_id, timeout=10, poll=0.01)).status == SagaStatus.COMPLETED

    settings = SagasSettings.load(None, db="x.db", broker="memory://")
    assert settings.engine_settings().relay_grace == 2.0
    monkeypatch.setenv("SAGAS_RELAY_GRACE", "0.25")
    assert SagasSettings.load(None).engine_settings().relay_grace == 0.25

"""Example-based tests of the pure saga state machine (`sagas.engine.machine`)."""

from __future__ import annotations

import pytest

from sagas.definitions.model import RetryPolicy, StepKind
from sagas.engine.machine import decide, jitter_unit, start
from sagas.engine.state import (
    MessageKind,
    OperatorCommand,
    Outcome,
    ReplyReceived,
    SagaStatus,
    StepStatus,
    TimerFired,
    TimerKind,
    message_id,
    timer_id,
)
from tests.engine.machine_support import Run, group, reply_to, saga, step

COMMAND, COMPENSATION = MessageKind.COMMAND, MessageKind.COMPENSATION
PIVOT, RETRIABLE = StepKind.PIVOT, StepKind.RETRIABLE


def three_steps() -> Run:
    return Run.start(saga(step("a"), step("b"), step("c"), deadline=600))


# ---- start and the happy path -------------------------------------------------------------------------


def test_start_sends_the_first_stage_with_timeouts_and_the_deadline() -> None:
    """Starting a saga sends every step of stage 0 at attempt 1, with a step timeout each and the deadline."""
    definition = saga(group("g", step("a", timeout=5), step("b", timeout=7)), step("c"), deadline=60)
    decision = start(definition, saga_id="s-9", input={"x": 1}, now=100.0, idempotency_key="key")
    instance = decision.instance
    assert (instance.status, instance.stage, instance.deadline_at) == (SagaStatus.RUNNING, 0, 160.0)
    assert set(instance.steps) == {"a", "b", "c"}
    assert instance.steps["c"].status is StepStatus.PENDING
    assert [(c.id, c.topic, c.type) for c in decision.commands] == [
        ("s-9/a/command/1", "a-service.commands", "a.do"),
        ("s-9/b/command/1", "b-service.commands", "b.do"),
    ]
    due = {t.id: t.due_at for t in decision.timers}
    assert due == {
        timer_id("s-9", TimerKind.STEP_TIMEOUT, "a", 1): 105.0,
        timer_id("s-9", TimerKind.STEP_TIMEOUT, "b", 1): 107.0,
        timer_id("s-9", TimerKind.DEADLINE, None, 0): 160.0,
    }
    assert [h.type for h in decision.history] == ["saga.started", "step.sent", "step.sent"]
    assert instance.idempotency_key == "key"
    assert instance.created_at == instance.updated_at == 100.0


def test_happy_path_runs_stages_in_order_and_completes_without_timers() -> None:
    """Each success sends the next stage; the last one completes the saga and cancels every timer."""
    run = Run.start(saga(step("a"), group("g", step("b"), step("c")), step("d"), deadline=600))
    run.reply("a")
    assert run.sent_of(COMMAND) == [("a", 1), ("b", 1), ("c", 1)]
    run.reply("c")
    assert run.state("c").status is StepStatus.SUCCEEDED
    assert run.instance.stage == 1
    run.reply("b")
    assert run.instance.stage == 2
    decision = run.reply("d")
    assert run.status() is SagaStatus.COMPLETED
    assert timer_id("s-1", TimerKind.DEADLINE, None, 0) in decision.cancel_timers
    assert run.timers == {}
    assert [run.state(n).completed_order for n in "acbd"] == [1, 2, 3, 4]
    assert run.instance.updated_at == run.now
    assert run.history_types()[-2:] == ["step.succeeded", "saga.completed"]


def test_payloads_map_the_input_earlier_outputs_literals_and_the_saga() -> None:
    """Payloads are rendered from the input, earlier steps' reply data, literals and the saga's identity."""
    definition = saga(
        step("reserve", payload={"sku": "input.sku", "qty": "input.qty"}),
        step(
            "charge",
            payload={"reservation": "steps.reserve.id", "currency": {"literal": "EUR"}, "saga": "saga.id"},
            compensation_payload={"charge": "steps.charge.charge_id", "nested": {"q": "input.qty"}},
        ),
        step("ship"),
    )
    run = Run.start(definition, {"sku": "X-1", "qty": 2})
    assert run.sent[0].payload == {"sku": "X-1", "qty": 2}
    run.reply("reserve", data={"id": "r-7"})
    assert run.sent[-1].payload == {"reservation": "r-7", "currency": "EUR", "saga": "s-1"}
    assert run.state("reserve").output == {"id": "r-7"}
    run.reply("charge", data={"charge_id": "c-9"})
    run.reply("ship", Outcome.FAILURE)
    assert run.sent[-1].kind is COMPENSATION
    assert run.sent[-1].payload == {"charge": "c-9", "nested": {"q": 2}}
    assert (run.sent[-1].type, run.sent[-1].topic) == ("charge.undo", "charge-service.commands")


def test_a_payload_that_cannot_be_rendered_fails_the_step_without_sending_it() -> None:
    """A payload expression that errors at run time is a business failure of a step that was never sent."""
    run = Run.start(saga(step("a"), step("b", payload={"n": "abs(input.name)"})), {"name": "text"})
    run.reply("a")
    assert run.state("b").status is StepStatus.FAILED
    assert "payload could not be rendered" in (run.state("b").error or "")
    assert run.sent_of(COMMAND) == [("a", 1)]
    assert run.sent_of(COMPENSATION) == [("a", 1)]


# ---- business failures and compensation ----------------------------------------------------------------


def test_business_failure_compensates_earlier_steps_in_reverse_one_at_a_time() -> None:
    """A business failure compensates completed steps newest first, one stage at a time, to COMPENSATED."""
    run = three_steps()
    run.reply("a")
    run.reply("b")
    decision = run.reply("c", Outcome.FAILURE)
    assert run.status() is SagaStatus.COMPENSATING
    assert "step 'c' failed" in (run.instance.failure or "")
    assert run.state("c").status is StepStatus.FAILED
    assert [(c.step, c.kind, c.type) for c in decision.commands] == [("b", COMPENSATION, "b.undo")]
    run.reply("b")
    assert run.sent_of(COMPENSATION) == [("b", 1), ("a", 1)]
    decision = run.reply("a")
    assert run.status() is SagaStatus.COMPENSATED
    compensated = StepStatus.COMPENSATED
    assert run.statuses() == {"a": compensated, "b": compensated, "c": StepStatus.FAILED}
    assert timer_id("s-1", TimerKind.DEADLINE, None, 0) in decision.cancel_timers
    assert run.timers == {}
    assert "saga.compensating" in run.history_types()
    assert run.history_types()[-1] == "saga.compensated"


def test_failure_of_the_first_step_compensates_nothing() -> None:
    """When the first step fails there is nothing to undo and the saga is compensated at once."""
    run = three_steps()
    run.reply("a", Outcome.FAILURE)
    assert run.status() is SagaStatus.COMPENSATED
    assert run.sent_of(COMPENSATION) == []
    assert run.timers == {}


def test_parallel_member_failure_waits_for_siblings_then_compensates_the_group_together() -> None:
    """A failed group member waits for in-flight siblings; a late success is compensated with the group."""
    run = Run.start(saga(step("a"), group("g", step("b"), step("c"), step("d"), step("e")), step("f")))
    run.reply("a")
    run.reply("e")
    decision = run.reply("b", Outcome.FAILURE)
    assert run.status() is SagaStatus.COMPENSATING
    assert decision.commands == ()
    run.reply("c")  # late success of a sibling: kept, to be compensated
    assert run.state("c").status is StepStatus.SUCCEEDED
    run.fire(TimerKind.STEP_TIMEOUT, "d")  # siblings keep retrying normally
    assert run.state("d").status is StepStatus.BACKOFF
    assert run.sent_of(COMPENSATION) == []
    run.fire(TimerKind.STEP_RETRY, "d")
    decision = run.reply("d")
    assert sorted(c.step for c in decision.commands) == ["c", "d", "e"]
    assert all(c.kind is COMPENSATION for c in decision.commands)
    run.reply("c")
    run.reply("e")
    assert run.sent_of(COMPENSATION) == [("c", 1), ("d", 1), ("e", 1)]  # 'a' waits for the whole group
    run.reply("d")
    assert run.sent_of(COMPENSATION)[-1] == ("a", 1)
    run.reply("a")
    assert run.status() is SagaStatus.COMPENSATED
    assert run.state("b").status is StepStatus.FAILED
    assert run.state("f").status is StepStatus.PENDING


def test_a_sibling_business_failure_during_the_wait_keeps_the_first_reason() -> None:
    """A second failing member is recorded, but the saga's failure stays the first one."""
    run = Run.start(saga(step("a"), group("g", step("b"), step("c"))))
    run.reply("a")
    run.reply("b", Outcome.FAILURE)
    run.reply("c", Outcome.FAILURE)
    assert "step 'b' failed" in (run.instance.failure or "")
    assert run.sent_of(COMPENSATION) == [("a", 1)]


# ---- retries and timeouts -----------------------------------------------------------------------------


def test_timeout_retries_with_backoff_then_unknown_is_compensated() -> None:
    """Timeouts retry with exponential backoff and new ids; exhausted, the step is UNKNOWN and compensated."""
    policy = RetryPolicy(max_attempts=3, initial_backoff=2, jitter=0)
    run = Run.start(saga(step("a"), step("b", retry=policy)))
    run.reply("a")
    run.now = 100.0
    decision = run.fire(TimerKind.STEP_TIMEOUT, "b")
    assert run.state("b").status is StepStatus.BACKOFF
    assert [(t.timer, t.due_at) for t in decision.timers] == [(TimerKind.STEP_RETRY, 102.0)]
    assert "step.timed_out" in run.history_types()
    assert "step.retry_scheduled" in run.history_types()
    decision = run.fire(TimerKind.STEP_RETRY, "b")
    assert [c.id for c in decision.commands] == [message_id("s-1", "b", COMMAND, 2)]
    assert run.state("b").attempt == 2
    run.fire(TimerKind.STEP_TIMEOUT, "b")
    assert run.timers[timer_id("s-1", TimerKind.STEP_RETRY, "b", 2)].due_at == run.now + 4.0
    run.fire(TimerKind.STEP_RETRY, "b")
    decision = run.fire(TimerKind.STEP_TIMEOUT, "b")
    assert run.state("b").status is StepStatus.COMPENSATING  # UNKNOWN, then compensated to be safe
    assert "step.unknown" in [h.type for h in decision.history]
    assert [c.step for c in decision.commands] == ["b"]
    run.reply("b")
    run.reply("a")
    assert run.status() is SagaStatus.COMPENSATED


def test_retryable_reply_backs_off_and_cancels_the_step_timeout() -> None:
    """A RETRY reply puts the step in BACKOFF and cancels its pending step timeout."""
    run = three_steps()
    decision = run.reply("a", Outcome.RETRY)
    assert run.state("a").status is StepStatus.BACKOFF
    assert decision.cancel_timers == (timer_id("s-1", TimerKind.STEP_TIMEOUT, "a", 1),)
    run.fire(TimerKind.STEP_RETRY, "a")
    run.reply("a")
    assert run.state("a").status is StepStatus.SUCCEEDED
    assert run.state("a").attempt == 2


def test_jitter_is_deterministic_and_in_the_unit_interval() -> None:
    """jitter_unit is a pure function of its arguments with values in [0, 1)."""
    values = [jitter_unit("s", "step", n) for n in range(200)]
    assert values == [jitter_unit("s", "step", n) for n in range(200)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == 200


def test_jittered_backoff_stays_within_the_policy_band() -> None:
    """A jittered retry is scheduled within ±jitter of the nominal backoff, the same on every replay."""
    policy = RetryPolicy(max_attempts=3, initial_backoff=10, jitter=0.5)
    runs = [Run.start(saga(step("a", retry=policy))) for _ in range(2)]
    for run in runs:
        run.reply("a", Outcome.RETRY, at=0.0)
    due = [next(iter(run.timers.values())).due_at for run in runs]
    assert due[0] == due[1]
    assert 5.0 <= due[0] <= 15.0


# ---- pivot and retriable steps ------------------------------------------------------------------------


def pivot_saga(deadline: float | None = None, retriable: RetryPolicy | None = None) -> Run:
    return Run.start(
        saga(
            step("a"),
            step("p", kind=PIVOT, retry=RetryPolicy(max_attempts=2, initial_backoff=1, jitter=0)),
            step("r", kind=RETRIABLE, retry=retriable or RetryPolicy(max_attempts=1, jitter=0)),
            deadline=deadline,
        )
    )


def test_pivot_business_failure_compensates_earlier_steps() -> None:
    """A pivot that fails had no effect, so the steps before it are compensated."""
    run = pivot_saga()
    run.reply("a")
    run.reply("p", Outcome.FAILURE)
    assert run.sent_of(COMPENSATION) == [("a", 1)]
    run.reply("a")
    assert run.status() is SagaStatus.COMPENSATED
    assert run.state("p").status is StepStatus.FAILED


def test_pivot_with_unknown_outcome_parks_the_saga() -> None:
    """A pivot whose retries are exhausted parks the saga: it can be neither confirmed nor compensated."""
    run = pivot_saga(deadline=600)
    run.reply("a")
    run.fire(TimerKind.STEP_TIMEOUT, "p")
    run.fire(TimerKind.STEP_RETRY, "p")
    decision = run.fire(TimerKind.STEP_TIMEOUT, "p")
    assert run.status() is SagaStatus.FAILED
    assert "pivot outcome unknown" in (run.instance.failure or "")
    assert run.state("p").status is StepStatus.UNKNOWN
    assert timer_id("s-1", TimerKind.DEADLINE, None, 0) in decision.cancel_timers
    assert run.timers == {}
    assert run.sent_of(COMPENSATION) == []


def test_retriable_step_after_the_pivot_is_retried_forever_with_capped_backoff() -> None:
    """A retriable step retries past max_attempts, its backoff capped at max_backoff, until it succeeds."""
    policy = RetryPolicy(max_attempts=1, initial_backoff=1, multiplier=100, max_backoff=30, jitter=0)
    run = pivot_saga(retriable=policy)
    run.reply("a")
    run.reply("p")
    for _ in range(400):  # far beyond the point where multiplier ** attempt overflows a float
        run.reply("r", Outcome.RETRY)
        spec = next(iter(run.timers.values()))
        assert spec.due_at - run.now <= 30.0
        run.fire(TimerKind.STEP_RETRY, "r")
    assert run.state("r").attempt == 401
    run.reply("r")
    assert run.status() is SagaStatus.COMPLETED
    assert run.sent_of(COMPENSATION) == []


def test_retriable_business_failure_parks_and_operator_retry_resumes_with_a_fresh_budget() -> None:
    """A retriable step that fails for business reasons parks the saga; an operator retry resends it."""
    run = pivot_saga(retriable=RetryPolicy(max_attempts=2, initial_backoff=1, jitter=0))
    run.reply("a")
    run.reply("p")
    run.reply("r", Outcome.RETRY)
    run.fire(TimerKind.STEP_RETRY, "r")
    run.reply("r", Outcome.FAILURE)
    assert run.status() is SagaStatus.FAILED
    assert "failed after the pivot" in (run.instance.failure or "")
    assert run.timers == {}
    assert run.sent_of(COMPENSATION) == []
    decision = run.operator("retry")
    assert decision.outcome == "applied"
    assert run.status() is SagaStatus.RUNNING
    assert run.instance.failure is None
    assert (run.state("r").attempt, run.state("r").attempt_offset) == (3, 2)
    assert [c.id for c in decision.commands] == [message_id("s-1", "r", COMMAND, 3)]
    entry = next(h for h in decision.history if h.type == "operator.retry")
    assert entry.detail["operator"] == "alice"
    assert entry.detail["reason"] == "ticket 42"
    run.reply("r")
    assert run.status() is SagaStatus.COMPLETED


def test_a_pivot_that_succeeds_while_its_sibling_failed_parks_instead_of_compensating() -> None:
    """Nothing may be compensated once a pivot succeeded, even if a parallel sibling failed before it."""
    run = Run.start(saga(step("a"), group("g", step("b"), step("p", kind=PIVOT))))
    run.reply("a")
    run.reply("b", Outcome.FAILURE)
    run.reply("p")
    assert run.status() is SagaStatus.FAILED
    assert "cannot compensate" in (run.instance.failure or "")
    assert run.sent_of(COMPENSATION) == []
    assert run.timers == {}


# ---- deadline -----------------------------------------------------------------------------------------


def test_deadline_before_the_pivot_aborts_and_compensates_in_flight_steps() -> None:
    """The deadline aborts a saga before its pivot: in-flight steps become UNKNOWN and are compensated."""
    run = Run.start(saga(step("a"), group("g", step("b"), step("c")), step("p", kind=PIVOT), deadline=60))
    run.reply("a")
    run.reply("b", Outcome.RETRY)
    decision = run.fire(TimerKind.DEADLINE)
    assert run.status() is SagaStatus.COMPENSATING
    assert "deadline" in (run.instance.failure or "")
    assert sorted(c.step for c in decision.commands) == ["b", "c"]
    assert set(decision.cancel_timers) == {
        timer_id("s-1", TimerKind.STEP_TIMEOUT, "c", 1),
        timer_id("s-1", TimerKind.STEP_RETRY, "b", 1),
    }
    run.reply("b")
    run.reply("c")
    run.reply("a")
    assert run.status() is SagaStatus.COMPENSATED
    assert run.timers == {}


def test_deadline_after_the_pivot_is_ignored_with_a_history_entry() -> None:
    """After the pivot succeeded the deadline is ignored, recorded, and the instance is unchanged."""
    run = pivot_saga(deadline=60)
    run.reply("a")
    run.reply("p")
    before = run.instance
    decision = run.fire(TimerKind.DEADLINE)
    assert decision.outcome == "ignored"
    assert decision.instance == before
    assert [h.type for h in decision.history] == ["deadline.ignored_after_pivot"]
    run.reply("r")
    assert run.status() is SagaStatus.COMPLETED


def test_deadline_while_the_pivot_is_in_flight_is_ignored() -> None:
    """A deadline that fires while the pivot is in flight lets the pivot's own outcome decide."""
    run = pivot_saga(deadline=60)
    run.reply("a")
    decision = run.fire(TimerKind.DEADLINE)
    assert decision.outcome == "ignored"
    assert [h.type for h in decision.history] == ["deadline.ignored_pivot_in_flight"]


def test_deadline_of_a_compensating_saga_is_ignored() -> None:
    """A deadline that fires while the saga already compensates changes nothing."""
    run = three_steps()
    run.reply("a")
    run.reply("b", Outcome.FAILURE)
    assert run.fire(TimerKind.DEADLINE).outcome == "ignored"


# ---- compensation failures ----------------------------------------------------------------------------


def test_compensation_failures_retry_then_park_and_operator_retry_gives_a_fresh_budget() -> None:
    """A compensation that keeps failing parks the saga; an operator retry resends it with a new budget."""
    run = three_steps()
    run.reply("a")
    run.reply("b")
    run.reply("c", Outcome.FAILURE)
    run.reply("b", Outcome.FAILURE)
    assert run.state("b").status is StepStatus.COMPENSATION_BACKOFF
    run.fire(TimerKind.COMPENSATION_RETRY, "b")
    run.fire(TimerKind.COMPENSATION_TIMEOUT, "b")  # a timeout counts as a failed attempt too
    run.fire(TimerKind.COMPENSATION_RETRY, "b")
    decision = run.reply("b", Outcome.RETRY)
    assert run.status() is SagaStatus.FAILED
    assert run.instance.failure is not None
    assert "compensation of step 'b' failed after 3 attempts" in run.instance.failure
    assert timer_id("s-1", TimerKind.DEADLINE, None, 0) in decision.cancel_timers
    assert run.timers == {}
    assert run.sent_of(COMPENSATION) == [("b", 1), ("b", 2), ("b", 3)]
    assert run.apply(reply_to(run.sent[-1], Outcome.SUCCESS)).outcome == "ignored"  # parked: frozen
    run.operator("retry")
    assert run.status() is SagaStatus.COMPENSATING
    assert (run.state("b").compensation_attempt, run.state("b").compensation_attempt_offset) == (4, 3)
    run.reply("b", Outcome.FAILURE)  # counts as attempt 1 of the fresh budget, so it is retried
    assert run.state("b").status is StepStatus.COMPENSATION_BACKOFF
    run.fire(TimerKind.COMPENSATION_RETRY, "b")
    run.reply("b")
    run.reply("a")
    assert run.status() is SagaStatus.COMPENSATED


def test_a_compensation_reply_of_an_unexpected_type_is_a_failed_attempt() -> None:
    """Any compensation reply other than `<compensation>.succeeded` with outcome success is retried."""
    run = three_steps()
    run.reply("a")
    run.reply("b", Outcome.FAILURE)
    run.reply("a", type_="a.undo.something_else")
    assert run.state("a").status is StepStatus.COMPENSATION_BACKOFF
    assert run.history_types()[-2:] == ["compensation.failed", "compensation.retry_scheduled"]


# ---- operator commands --------------------------------------------------------------------------------


def test_operator_abort_of_a_running_saga_compensates_it() -> None:
    """An operator abort before the pivot turns in-flight steps UNKNOWN and compensates."""
    run = three_steps()
    run.reply("a")
    decision = run.operator("abort")
    assert run.status() is SagaStatus.COMPENSATING
    assert "aborted by alice" in (run.instance.failure or "")
    assert run.state("b").status is StepStatus.COMPENSATING
    assert decision.history[0].type == "operator.abort"
    assert decision.history[0].detail["operator"] == "alice"


def test_operator_abort_of_a_parked_pivot_compensates_the_steps_before_it() -> None:
    """Aborting a saga parked on an unknown pivot compensates the steps before the pivot, never the pivot."""
    run = pivot_saga()
    run.reply("a")
    for _ in range(2):
        run.fire(TimerKind.STEP_TIMEOUT, "p")
        if run.status() is not SagaStatus.FAILED:
            run.fire(TimerKind.STEP_RETRY, "p")
    assert run.status() is SagaStatus.FAILED
    run.operator("abort")
    assert run.sent_of(COMPENSATION) == [("a", 1)]
    run.reply("a")
    assert run.status() is SagaStatus.COMPENSATED
    assert run.state("p").status is StepStatus.UNKNOWN


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("after_pivot", "pivot 'p' succeeded"),
        ("pivot_in_flight", "pivot 'p' is in flight"),
        ("compensating", "saga is compensating"),
        ("completed", "saga is completed"),
    ],
)
def test_operator_abort_is_rejected_when_it_does_not_fit(setup: str, reason: str) -> None:
    """Abort is refused after the pivot, while it is in flight, and once the saga compensates or ended."""
    run = pivot_saga()
    run.reply("a")
    if setup == "after_pivot":
        run.reply("p")
    elif setup == "compensating":
        run.reply("p", Outcome.FAILURE)
    elif setup == "completed":
        run.reply("p")
        run.reply("r")
    before = run.instance
    decision = run.operator("abort")
    assert decision.outcome == "rejected"
    assert reason in (decision.reason or "")
    assert decision.instance == before


def test_operator_retry_is_rejected_unless_the_saga_is_parked() -> None:
    """Retry only applies to a parked saga."""
    run = three_steps()
    decision = run.operator("retry")
    assert decision.outcome == "rejected"
    assert "only a parked saga" in (decision.reason or "")


def test_operator_skip_of_a_stuck_step_counts_it_as_done_and_moves_on() -> None:
    """Skipping a step in backoff cancels its timer, marks it SKIPPED and sends the next stage."""
    run = three_steps()
    run.reply("a")
    run.reply("b", Outcome.RETRY)
    decision = run.operator("skip", "b")
    assert run.state("b").status is StepStatus.SKIPPED
    assert timer_id("s-1", TimerKind.STEP_RETRY, "b", 1) in decision.cancel_timers
    assert [c.step for c in decision.commands] == ["c"]
    run.reply("c", Outcome.FAILURE)  # a skipped step counts as done, so it is compensated too
    assert run.sent_of(COMPENSATION) == [("b", 1)]


def test_operator_skip_of_a_parked_pivot_goes_forward() -> None:
    """Skipping a pivot parked with an unknown outcome resumes the saga forward."""
    run = pivot_saga()
    run.reply("a")
    run.fire(TimerKind.STEP_TIMEOUT, "p")
    run.fire(TimerKind.STEP_RETRY, "p")
    run.fire(TimerKind.STEP_TIMEOUT, "p")
    run.operator("skip", "p")
    assert run.status() is SagaStatus.RUNNING
    assert run.sent_of(COMMAND)[-1] == ("r", 1)
    run.reply("r")
    assert run.status() is SagaStatus.COMPLETED


def test_operator_skip_of_a_parked_compensation_resumes_compensation() -> None:
    """Skipping a compensation that parked the saga marks it COMPENSATED and compensation moves on."""
    run = Run.start(saga(step("a"), step("b"), step("c"), compensation_retry=RetryPolicy(max_attempts=1)))
    run.reply("a")
    run.reply("b")
    run.reply("c", Outcome.FAILURE)
    run.reply("b", Outcome.FAILURE)
    assert run.status() is SagaStatus.FAILED
    decision = run.operator("skip", "b")
    assert run.status() is SagaStatus.COMPENSATING
    assert run.state("b").status is StepStatus.COMPENSATED
    assert decision.history[0].type == "operator.skip"
    assert decision.history[0].detail["direction"] == "compensation"
    run.reply("a")
    assert run.status() is SagaStatus.COMPENSATED


@pytest.mark.parametrize("target", ["a", "nope", None])
def test_operator_skip_of_a_step_that_is_not_stuck_is_rejected(target: str | None) -> None:
    """Skipping a finished, unknown or missing step is refused with a reason."""
    run = three_steps()
    run.reply("a")
    decision = run.operator("skip", target)
    assert decision.outcome == "rejected"
    assert decision.reason


# ---- duplicates, stale and foreign messages -----------------------------------------------------------


def test_duplicate_reply_is_ignored_and_leaves_the_instance_unchanged() -> None:
    """A reply that arrives twice is applied once."""
    run = three_steps()
    reply = reply_to(run.outstanding("a"), Outcome.SUCCESS)
    run.apply(reply)
    before = run.instance
    decision = run.apply(reply)
    assert decision.outcome == "ignored"
    assert "duplicate" in (decision.reason or "")
    assert decision.instance == before
    assert run.sent_of(COMMAND) == [("a", 1), ("b", 1)]


def test_reply_to_a_stale_attempt_is_ignored() -> None:
    """A reply to an earlier attempt is ignored once a newer attempt was sent."""
    run = three_steps()
    first = run.outstanding("a")
    run.fire(TimerKind.STEP_TIMEOUT, "a")
    run.fire(TimerKind.STEP_RETRY, "a")
    decision = run.apply(reply_to(first, Outcome.SUCCESS))
    assert decision.outcome == "ignored"
    assert "stale attempt" in (decision.reason or "")
    assert run.state("a").status is StepStatus.RUNNING


def test_late_reply_during_backoff_is_ignored() -> None:
    """A reply for the current attempt that arrives after its timeout (step in backoff) is ignored."""
    run = three_steps()
    command = run.outstanding("a")
    run.fire(TimerKind.STEP_TIMEOUT, "a")
    decision = run.apply(reply_to(command, Outcome.SUCCESS))
    assert decision.outcome == "ignored"
    assert "late" in (decision.reason or "")


def test_reply_with_a_foreign_causation_id_is_rejected() -> None:
    """A reply whose causation id is not the id of our command is rejected."""
    run = three_steps()
    genuine = reply_to(run.outstanding("a"), Outcome.SUCCESS)
    reply = genuine.model_copy(update={"causation_id": "other/a/command/1"})
    decision = run.apply(reply)
    assert decision.outcome == "rejected"
    assert "causation id" in (decision.reason or "")


def test_reply_for_an_unknown_step_is_rejected() -> None:
    """A reply naming a step the definition does not have is rejected."""
    run = three_steps()
    reply = ReplyReceived(
        message_id="m", causation_id=message_id("s-1", "zz", COMMAND, 1), step="zz", attempt=1, kind=COMMAND,
        outcome=Outcome.SUCCESS, type="zz.do.succeeded",
    )  # fmt: skip
    decision = run.apply(reply)
    assert decision.outcome == "rejected"
    assert "unknown step" in (decision.reason or "")


@pytest.mark.parametrize(
    ("outcome", "type_"),
    [
        (Outcome.SUCCESS, "a.do.exploded"),
        (Outcome.SUCCESS, "a.do.failed"),
        (Outcome.FAILURE, "a.do.succeeded"),
    ],
)
def test_reply_of_an_unexpected_type_is_rejected(outcome: Outcome, type_: str) -> None:
    """A reply type that isn't a success/failure type of the step, or contradicts its outcome, is rejected."""
    run = three_steps()
    decision = run.reply("a", outcome, type_=type_)
    assert decision.outcome == "rejected"
    assert "unexpected reply type" in (decision.reason or "")
    assert "a.do.succeeded" in (decision.reason or "")
    assert run.state("a").status is StepStatus.RUNNING


def test_stale_timer_is_ignored() -> None:
    """A step timeout that fires after the step already succeeded changes nothing."""
    run = three_steps()
    timeout = run.timers[timer_id("s-1", TimerKind.STEP_TIMEOUT, "a", 1)]
    run.reply("a")
    decision = run.apply(TimerFired(timer_id=timeout.id, timer=timeout.timer, step="a", attempt=1))
    assert decision.outcome == "ignored"
    assert "stale timer" in (decision.reason or "")


def test_timer_whose_id_does_not_match_is_rejected() -> None:
    """A timer event whose id is not the id of its kind, step and attempt is rejected."""
    run = three_steps()
    decision = run.apply(TimerFired(timer_id="bogus", timer=TimerKind.STEP_TIMEOUT, step="a", attempt=1))
    assert decision.outcome == "rejected"


def test_deciding_with_another_definition_version_is_an_error() -> None:
    """decide refuses a definition other than the one the instance started with."""
    run = three_steps()
    other = saga(step("a")).model_copy(update={"version": 2})
    with pytest.raises(ValueError, match="test-saga v1"):
        decide(other, run.instance, TimerFired(timer_id="x", timer=TimerKind.DEADLINE), now=1.0)


def test_a_group_member_whose_payload_fails_does_not_keep_its_siblings_from_ever_going_out() -> None:
    """After the pivot, a member whose payload cannot be rendered parks the saga before its siblings are sent.
    Once the operator skips it, the siblings go out; nothing is left PENDING with no timer and no command."""
    definition = saga(
        step("a"),
        step("p", kind=StepKind.PIVOT),
        group("finish", step("r1", kind=StepKind.RETRIABLE, payload={"n": "abs(input.name)"}),
              step("r2", kind=StepKind.RETRIABLE)),
    )
    run = Run.start(definition, {"name": "text"})
    run.reply("a")
    run.reply("p")
    assert run.status() is SagaStatus.FAILED
    assert run.statuses()["r2"] is StepStatus.PENDING
    assert run.operator("retry").outcome == "applied"  # r1 fails to render again: parked again
    assert run.status() is SagaStatus.FAILED
    decision = run.operator("skip", "r1")
    assert [c.step for c in decision.commands] == ["r2"]
    assert run.status() is SagaStatus.RUNNING
    run.reply("r2")
    assert run.status() is SagaStatus.COMPLETED


@pytest.mark.parametrize("how", ["deadline", "abort"])
def test_without_a_pivot_a_retriable_step_sent_is_the_point_of_no_return(how: str) -> None:
    """Retriable steps are never compensated, so once one was sent the saga cannot go back, pivot or not."""
    run = Run.start(saga(step("a"), step("r1", kind=StepKind.RETRIABLE), step("r2", kind=StepKind.RETRIABLE),
                         deadline=60))
    run.reply("a")
    run.reply("r1")
    if how == "deadline":
        decision = run.fire(TimerKind.DEADLINE)
        assert decision.outcome == "ignored"
        assert "retriable step 'r1' was sent" in (decision.reason or "")
        assert [h.type for h in decision.history] == ["deadline.ignored_after_pivot"]
    else:
        decision = run.operator("abort")
        assert decision.outcome == "rejected"
        assert "can only go forward" in (decision.reason or "")
    assert run.status() is SagaStatus.RUNNING
    assert run.sent_of(MessageKind.COMPENSATION) == []
    run.reply("r2")
    assert run.status() is SagaStatus.COMPLETED


def test_a_skipped_step_can_be_given_the_output_later_steps_read() -> None:
    """`sagas skip ... --output '{...}'`: the operator supplies what the participant would have answered, and the
    next step's payload reads it; it is recorded in the history. A compensation skip takes no output."""
    run = Run.start(saga(step("reserve"), step("charge", payload={"reservation": "steps.reserve.id"})))
    decision = run.apply(OperatorCommand(action="skip", step="reserve", reason="reserved by hand", output={"id": 7}))
    assert [(c.step, c.payload) for c in decision.commands] == [("charge", {"reservation": 7})]
    assert run.state("reserve").output == {"id": 7}
    (entry,) = [h for h in decision.history if h.type == "operator.skip"]
    assert entry.detail["output"] == {"id": 7}
    run.operator("abort")
    refused = run.apply(OperatorCommand(action="skip", step="charge", reason="r", output={"x": 1}))
    assert refused.outcome == "rejected"
    assert "only given when skipping a step forward" in (refused.reason or "")


def test_a_retriable_step_whose_payload_failed_sent_nothing_so_the_saga_can_still_go_back() -> None:
    """Without a pivot, a retriable step is the point of no return once its command went out; one whose payload
    could not be rendered sent nothing, so an abort still compensates what came before."""
    run = Run.start(saga(step("reserve"), step("notify", kind=StepKind.RETRIABLE, payload={"n": "abs(input.s)"})),
                    {"s": "text"})
    run.reply("reserve")
    assert run.status() is SagaStatus.FAILED  # parked: a retriable step failed
    assert run.operator("abort").outcome == "applied"
    run.reply("reserve")  # the compensation it is waiting for
    assert run.status() is SagaStatus.COMPENSATED

"""Property-based tests of the saga state machine: random definitions driven by random event sequences."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagas.definitions.model import ParallelGroup, RetryPolicy, SagaDefinition, StepDefinition, StepKind
from sagas.engine.state import (
    Decision,
    MessageKind,
    OperatorCommand,
    Outcome,
    ReplyReceived,
    SagaStatus,
    StepStatus,
    TimerFired,
    TimerKind,
    TimerSpec,
    message_id,
    timer_id,
)
from tests.engine.machine_support import Run, fired, group, implied_timers, reply_to, saga, step

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 3),
    initial_backoff=st.sampled_from([0.0, 0.5, 2.0]),
    max_backoff=st.just(10.0),
    jitter=st.sampled_from([0.0, 0.3]),
)


@st.composite
def definitions(draw: st.DrawFn, failing_payloads: bool = False) -> SagaDefinition:
    """1-4 stages, some of them parallel groups; optionally a pivot followed by retriable steps only, or, without a
    pivot, retriable steps after the compensatable ones. With `failing_payloads`, some payloads read
    `length(steps.<previous>.v)`, which fails to render unless the previous step answered with a `v`."""
    count = draw(st.integers(1, 4))
    pivot_at = draw(st.none() | st.integers(0, count - 1))
    retriable_from = pivot_at + 1 if pivot_at is not None else draw(st.integers(0, count))
    stages: list[StepDefinition | ParallelGroup] = []
    previous: str | None = None
    for index in range(count):
        if index == pivot_at:
            kind, size = StepKind.PIVOT, 1
        else:
            kind = StepKind.RETRIABLE if index >= retriable_from else StepKind.COMPENSATABLE
            size = draw(st.sampled_from([1, 1, 2, 3]))
        members = []
        for m in range(size):
            payload = {"n": "input.n"} | ({"prev": f"steps.{previous}.v"} if previous else {})
            if failing_payloads and previous and draw(st.booleans()):
                payload["len"] = f"length(steps.{previous}.v)"
            members.append(step(f"s{index}{'abc'[m]}", kind=kind, payload=payload, timeout=5.0, retry=draw(policies)))
        previous = members[0].name
        stages.append(members[0] if size == 1 else group(f"g{index}", *members))
    deadline = draw(st.sampled_from([None, 30.0]))
    return saga(*stages, deadline=deadline, compensation_retry=draw(policies))


OUTCOMES = st.sampled_from([Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE, Outcome.RETRY])
ACTIONS = st.sampled_from(
    ["reply", "reply", "reply", "duplicate", "stale_reply", "timer", "timer", "stale_timer", "operator"]
)


class Checker:
    """Drives a `Run` and checks the per-decision invariants as it goes."""

    def __init__(self, definition: SagaDefinition) -> None:
        self.definition = definition
        self.run = Run.start(definition, {"n": 7})
        self.applied_replies: list[ReplyReceived] = []
        self.spent_timers: list[TimerSpec] = []
        self.pivot_passed = False
        self.check(self.run.decisions[-1])

    def stage_of(self, name: str) -> int:
        return self.definition.stage_of(name)

    def check(self, decision: Decision) -> None:
        run, instance = self.run, self.run.instance
        for command in decision.commands:
            assert command.id == message_id(instance.id, command.step, command.kind, command.attempt)
            if command.kind is MessageKind.COMPENSATION:
                assert not self.pivot_passed, "nothing is compensated once the pivot succeeded"
                assert self.definition.step(command.step).kind is StepKind.COMPENSATABLE
        if decision.outcome == "applied":
            assert instance.updated_at == run.now
            assert decision.history, "every applied transition is recorded"
        deadline = timer_id(instance.id, TimerKind.DEADLINE, None, 0)
        step_timers = {tid for tid in run.timers if tid != deadline}
        assert step_timers == implied_timers(instance), "pending timers are exactly those the state implies"
        if instance.status.is_settled:
            assert run.timers == {}, "a settled saga has no live timer"
        done = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)
        for step_def in self.definition.iter_steps():
            state = instance.steps[step_def.name]
            if step_def.kind is StepKind.PIVOT and state.status in done:
                self.pivot_passed = True  # the point of no return: a pivot done...
            if step_def.kind is StepKind.RETRIABLE and (state.started_at is not None or state.status in done):
                self.pivot_passed = True  # ...or a retriable step sent

    def apply(self, event: ReplyReceived | TimerFired | OperatorCommand) -> Decision:
        decision = self.run.apply(event)
        self.check(decision)
        if isinstance(event, ReplyReceived) and decision.outcome == "applied":
            self.applied_replies.append(event)
        return decision

    # ---- random phase ----

    def random_phase(self, data: st.DataObject) -> None:
        """Up to 40 random events, stopping early when the saga is final."""
        for _ in range(data.draw(st.integers(0, 40), label="length")):
            if self.run.status().is_final:
                break
            self.random_step(data)

    def random_step(self, data: st.DataObject) -> None:
        run = self.run
        action = data.draw(ACTIONS, label="action")
        if action == "reply" and run.waiting():
            command = data.draw(st.sampled_from(run.waiting()), label="to")
            output = {"v": "abc"} if data.draw(st.booleans(), label="with v") else None
            self.apply(reply_to(command, data.draw(OUTCOMES, label="outcome"), data=output))
        elif action == "duplicate" and self.applied_replies:
            reply = data.draw(st.sampled_from(self.applied_replies), label="duplicate")
            before = run.instance
            decision = self.apply(reply)
            assert decision.outcome == "ignored", "a duplicate reply is applied once"
            assert decision.instance == before
        elif action == "stale_reply" and run.sent:
            command = data.draw(st.sampled_from(run.sent), label="stale")
            waiting = {c.id for c in run.waiting()}
            decision = self.apply(reply_to(command, data.draw(OUTCOMES, label="outcome")))
            if command.id not in waiting:
                assert decision.outcome == "ignored", "only an awaited command's reply is applied"
        elif action == "timer" and run.timers:
            spec = data.draw(st.sampled_from(sorted(run.timers.values(), key=lambda t: t.id)), label="timer")
            self.spent_timers.append(spec)
            self.apply(fired(spec))  # due or not: the machine never looks at the clock
        elif action == "stale_timer" and self.spent_timers:
            spec = data.draw(st.sampled_from(self.spent_timers), label="stale timer")
            if spec.id not in self.run.timers:
                assert self.apply(fired(spec)).outcome == "ignored", "a spent timer changes nothing"
        elif action == "operator":
            names = [None, *self.run.instance.steps]
            operator = OperatorCommand(
                action=data.draw(st.sampled_from(["retry", "abort", "skip"]), label="operator"),
                step=data.draw(st.sampled_from(names), label="operator step"),
                reason="property test",
                output=data.draw(st.sampled_from([None, {"v": "abc"}]), label="skip output"),
            )
            self.apply(operator)

    # ---- drain ----

    def drain(self) -> None:
        """Answer everything with success and fire the earliest timer until the saga settles."""
        for _ in range(1000):
            if self.run.status().is_settled:
                return
            waiting = self.run.waiting()
            if waiting:
                self.apply(reply_to(waiting[0], Outcome.SUCCESS, data={"v": "abc"}))
            else:
                assert self.run.timers, f"stuck: {self.run.statuses()} while {self.run.status()}"
                spec = min(self.run.timers.values(), key=lambda t: (t.due_at, t.id))
                self.apply(fired(spec))
        raise AssertionError("the saga did not settle")

    # ---- final invariants ----

    def check_final(self) -> None:
        run, instance = self.run, self.run.instance
        assert instance.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)
        assert run.timers == {}
        if instance.status is SagaStatus.COMPLETED:
            done = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)
            assert all(s.status in done for s in instance.steps.values())
        if instance.status is SagaStatus.COMPENSATED:
            for step_def in self.definition.iter_steps():
                state = instance.steps[step_def.name]
                if step_def.kind is StepKind.COMPENSATABLE and state.completed_order is not None:
                    assert state.status is StepStatus.COMPENSATED, f"{step_def.name} is {state.status}"
        compensations = [c for c in run.sent if c.kind is MessageKind.COMPENSATION]
        stages = [self.stage_of(c.step) for c in compensations]
        assert stages == sorted(stages, reverse=True), "compensation goes from the highest stage down"
        if compensations:
            first = run.sent.index(compensations[0])
            later = run.sent[first:]
            assert all(c.kind is MessageKind.COMPENSATION for c in later), "no forward after going back"
        ids = [c.id for c in run.sent]
        assert len(ids) == len(set(ids)), "each attempt of a command or compensation has its own id"
        successes = Counter(
            h.step for d in run.decisions for h in d.history if h.type == "compensation.succeeded"
        )
        assert all(n == 1 for n in successes.values()), "a compensation succeeds at most once"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definition=definitions(), data=st.data())
def test_any_event_sequence_settles_consistently(definition: SagaDefinition, data: st.DataObject) -> None:
    """Any mix of replies, duplicates, stale messages, timers and operator commands settles consistently."""
    checker = Checker(definition)
    checker.random_phase(data)
    checker.drain()
    checker.check_final()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definition=definitions(), data=st.data())
def test_operator_retries_finish_a_parked_saga(definition: SagaDefinition, data: st.DataObject) -> None:
    """A parked saga ends COMPLETED or COMPENSATED once an operator retries it and participants succeed."""
    checker = Checker(definition)
    checker.random_phase(data)
    checker.drain()
    for _ in range(5):
        if checker.run.status().is_final:
            break
        decision = checker.apply(OperatorCommand(action="retry", reason="property test"))
        assert decision.outcome == "applied", decision.reason
        checker.drain()
    checker.check_final()
    assert checker.run.status().is_final


_STUCK = (StepStatus.FAILED, StepStatus.UNKNOWN, StepStatus.RUNNING, StepStatus.BACKOFF, StepStatus.COMPENSATING,
          StepStatus.COMPENSATION_BACKOFF)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definition=definitions(failing_payloads=True), data=st.data())
def test_an_operator_can_always_finish_a_parked_saga(definition: SagaDefinition, data: st.DataObject) -> None:
    """Even with payloads that cannot be rendered, a parked saga always ends final when an operator retries it,
    or skips (with an output) what stays stuck: nothing is left that no command can move."""
    checker = Checker(definition)
    checker.random_phase(data)
    checker.drain()
    for _ in range(20):
        if checker.run.status().is_final:
            break
        decision = checker.apply(OperatorCommand(action="retry", reason="property test"))
        if decision.outcome != "applied" or checker.run.status() is SagaStatus.FAILED:
            backward = checker.run.status() is SagaStatus.COMPENSATING or any(
                s.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_BACKOFF)
                for s in checker.run.instance.steps.values()
            )
            for name, state in checker.run.instance.steps.items():
                if state.status in _STUCK:
                    checker.apply(OperatorCommand(action="skip", step=name, reason="property test",
                                                  output=None if backward else {"v": "abc"}))
        checker.drain()
    checker.check_final()
    assert checker.run.status().is_final, (checker.run.statuses(), checker.run.instance.failure)


def test_the_property_strategy_covers_pivots_groups_and_retriable_steps() -> None:
    """The definition strategy yields pivots, parallel groups and retriable steps (guards the generator)."""
    seen: set[str] = set()

    @settings(max_examples=100, deadline=None)
    @given(definitions())
    def collect(definition: SagaDefinition) -> None:
        kinds = {s.kind for s in definition.iter_steps()}
        seen.update(k.value for k in kinds)
        if any(len(stage) > 1 for stage in definition.stages):
            seen.add("group")

    collect()
    assert {"pivot", "retriable", "compensatable", "group"} <= seen

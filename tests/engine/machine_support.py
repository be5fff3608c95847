"""Helpers for the state-machine tests: small definition builders and a driver playing the runtime's part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sagas.definitions.model import (
    CompensationDefinition,
    ParallelGroup,
    RetryPolicy,
    SagaDefinition,
    StepDefinition,
    StepKind,
)
from sagas.engine import machine
from sagas.engine.state import (
    Decision,
    Event,
    MessageKind,
    OperatorCommand,
    Outcome,
    OutgoingCommand,
    ReplyReceived,
    SagaInstance,
    SagaStatus,
    StepState,
    StepStatus,
    TimerFired,
    TimerKind,
    TimerSpec,
    message_id,
    timer_id,
)

NO_JITTER = RetryPolicy(max_attempts=3, initial_backoff=1.0, multiplier=2.0, max_backoff=8.0, jitter=0.0)


def step(
    name: str,
    *,
    kind: StepKind = StepKind.COMPENSATABLE,
    payload: dict[str, Any] | None = None,
    compensation_payload: dict[str, Any] | None = None,
    timeout: float = 10.0,
    retry: RetryPolicy = NO_JITTER,
) -> StepDefinition:
    """A step whose command is `<name>.do` and (when compensatable) compensation `<name>.undo`."""
    compensation = None
    if kind is StepKind.COMPENSATABLE:
        compensation = CompensationDefinition(command=f"{name}.undo", payload=compensation_payload or {})
    return StepDefinition(
        name=name, participant=f"{name}-service", command=f"{name}.do", payload=payload or {},
        compensation=compensation, timeout=timeout, retry=retry, kind=kind,
    )  # fmt: skip


def group(name: str, *steps: StepDefinition) -> ParallelGroup:
    return ParallelGroup(name=name, parallel=steps)


def saga(
    *stages: StepDefinition | ParallelGroup,
    deadline: float | None = None,
    compensation_retry: RetryPolicy = NO_JITTER,
) -> SagaDefinition:
    return SagaDefinition(
        name="test-saga", version=1, steps=stages, deadline=deadline, compensation_retry=compensation_retry
    )


def reply_to(
    command: OutgoingCommand,
    outcome: Outcome,
    *,
    type_: str | None = None,
    data: dict[str, Any] | None = None,
) -> ReplyReceived:
    """The reply a participant sends to `command`; its type is `<command type>.<succeeded|failed|retry>`."""
    suffix = {Outcome.SUCCESS: "succeeded", Outcome.FAILURE: "failed", Outcome.RETRY: "retry"}[outcome]
    return ReplyReceived(
        message_id=f"reply-to/{command.id}", causation_id=command.id, step=command.step,
        attempt=command.attempt, kind=command.kind, outcome=outcome, type=type_ or f"{command.type}.{suffix}",
        data=data or {}, reason=f"participant said {outcome}",
    )  # fmt: skip


def fired(spec: TimerSpec) -> TimerFired:
    return TimerFired(timer_id=spec.id, timer=spec.timer, step=spec.step, attempt=spec.attempt)


@dataclass
class Run:
    """Plays the runtime: applies decisions, keeps the pending timers, and remembers every command sent."""

    definition: SagaDefinition
    instance: SagaInstance
    now: float = 0.0
    timers: dict[str, TimerSpec] = field(default_factory=dict)
    sent: list[OutgoingCommand] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    @classmethod
    def start(cls, definition: SagaDefinition, input: dict[str, Any] | None = None, now: float = 0.0) -> Run:
        decision = machine.start(definition, saga_id="s-1", input=input or {}, now=now, idempotency_key="k")
        run = cls(definition, decision.instance, now)
        run._absorb(decision, None)
        return run

    # ---- driving ----

    def apply(self, event: Event, *, at: float | None = None) -> Decision:
        """Decide on `event` and apply the outcome as the runtime would (persist, timers, publish)."""
        self.now = self.now + 1.0 if at is None else at
        decision = machine.decide(self.definition, self.instance, event, now=self.now)
        if decision.outcome != "applied":
            assert decision.instance == self.instance, "ignored/rejected events must not change the instance"
            assert not (decision.commands)
            assert not (decision.timers)
            assert not (decision.cancel_timers)
        self._absorb(decision, event)
        return decision

    def _absorb(self, decision: Decision, event: Event | None) -> None:
        self.decisions.append(decision)
        if isinstance(event, TimerFired):  # a timer that fired is consumed whatever the decision
            self.timers.pop(event.timer_id, None)
        for tid in decision.cancel_timers:
            self.timers.pop(tid, None)
        for spec in decision.timers:
            assert spec.id not in self.timers, f"timer {spec.id} set twice"
            self.timers[spec.id] = spec
        self.sent.extend(decision.commands)
        self.instance = decision.instance

    def reply(
        self, step: str, outcome: Outcome = Outcome.SUCCESS, *, at: float | None = None, **kwargs: Any
    ) -> Decision:
        """Answer the outstanding command or compensation of `step`."""
        return self.apply(reply_to(self.outstanding(step), outcome, **kwargs), at=at)

    def fire(self, kind: TimerKind, step: str | None = None) -> Decision:
        """Fire the pending timer of that kind (and step)."""
        matches = [t for t in self.timers.values() if t.timer is kind and t.step == step]
        assert len(matches) == 1, f"expected one pending {kind} timer for {step}, have {list(self.timers)}"
        return self.apply(fired(matches[0]), at=max(self.now, matches[0].due_at))

    def operator(
        self, action: Literal["retry", "abort", "skip"], step: str | None = None, reason: str = "ticket 42"
    ) -> Decision:
        return self.apply(OperatorCommand(action=action, step=step, reason=reason, operator="alice"))

    # ---- looking ----

    def status(self) -> SagaStatus:
        return self.instance.status

    def state(self, step: str) -> StepState:
        return self.instance.steps[step]

    def statuses(self) -> dict[str, StepStatus]:
        return {name: s.status for name, s in self.instance.steps.items()}

    def outstanding(self, step: str) -> OutgoingCommand:
        """The command the saga waits a reply for from `step` (command or compensation, current attempt)."""
        state = self.state(step)
        if state.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_BACKOFF):
            wanted = message_id(self.instance.id, step, MessageKind.COMPENSATION, state.compensation_attempt)
        else:
            wanted = message_id(self.instance.id, step, MessageKind.COMMAND, state.attempt)
        return next(c for c in reversed(self.sent) if c.id == wanted)

    def waiting(self) -> list[OutgoingCommand]:
        """Commands whose reply the saga is waiting for right now."""
        out = []
        for name, state in self.instance.steps.items():
            if state.status in (StepStatus.RUNNING, StepStatus.COMPENSATING) and not self.status().is_settled:
                out.append(self.outstanding(name))
        return out

    def sent_of(self, kind: MessageKind) -> list[tuple[str, int]]:
        return [(c.step, c.attempt) for c in self.sent if c.kind is kind]

    def history_types(self) -> list[str]:
        return [h.type for d in self.decisions for h in d.history]


def implied_timers(instance: SagaInstance) -> set[str]:
    """The step timers an instance's state calls for, computed independently of the machine."""
    if instance.status.is_settled:
        return set()
    implied = set()
    for name, state in instance.steps.items():
        kind, attempt = {
            StepStatus.RUNNING: (TimerKind.STEP_TIMEOUT, state.attempt),
            StepStatus.BACKOFF: (TimerKind.STEP_RETRY, state.attempt),
            StepStatus.COMPENSATING: (TimerKind.COMPENSATION_TIMEOUT, state.compensation_attempt),
            StepStatus.COMPENSATION_BACKOFF: (TimerKind.COMPENSATION_RETRY, state.compensation_attempt),
        }.get(state.status, (None, 0))
        if kind is not None:
            implied.add(timer_id(instance.id, kind, name, attempt))
    return implied

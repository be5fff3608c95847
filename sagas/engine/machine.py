"""The pure state machine of a saga: `start` and `decide`.

Both are pure: no I/O, no clock (the caller passes `now`), no randomness (retry jitter is a hash of saga
id, step and attempt). They return a `Decision` (the new instance, the commands to publish, the timers to set
and cancel, the history to append) that the runtime persists and publishes in one transaction.

How a saga moves:
- forward: status RUNNING, `stage` is the stage being run; a stage is done when all its steps SUCCEEDED or
  SKIPPED.
- backward: status COMPENSATING; `stage` first waits for in-flight siblings of the failed stage to settle,
  then its members are compensated together, then the stage below, down to stage 0.
- parked: status FAILED; everything is frozen (no timers, replies ignored) until an operator retries, aborts
  or skips. It is parked "in compensation" when one of its steps is COMPENSATING / COMPENSATION_BACKOFF.

Step timers are implied by step states (RUNNING -> step timeout, BACKOFF -> retry timer, ...), so a decision
cancels exactly the timers its new state no longer implies; a settled saga implies none.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from jmespath.exceptions import JMESPathError

from sagas.definitions.expressions import render_payload
from sagas.definitions.model import RetryPolicy, SagaDefinition, StepDefinition, StepKind
from sagas.engine.state import (
    Decision,
    Event,
    HistoryEntry,
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
    evolve,
    message_id,
    timer_id,
    trusted,
)

__all__ = ["decide", "jitter_unit", "start"]

_IN_FLIGHT = frozenset({StepStatus.RUNNING, StepStatus.BACKOFF})
_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})
_TO_COMPENSATE = frozenset({StepStatus.SUCCEEDED, StepStatus.UNKNOWN, StepStatus.SKIPPED})
_COMPENSATION_IN_FLIGHT = frozenset({StepStatus.COMPENSATING, StepStatus.COMPENSATION_BACKOFF})
_STUCK_FORWARD = frozenset({StepStatus.RUNNING, StepStatus.BACKOFF, StepStatus.UNKNOWN, StepStatus.FAILED})
# Which step status (and which attempt counter) a step timer belongs to; anything else makes it stale.
_TIMER_STATUS = {
    TimerKind.STEP_TIMEOUT: StepStatus.RUNNING,
    TimerKind.STEP_RETRY: StepStatus.BACKOFF,
    TimerKind.COMPENSATION_TIMEOUT: StepStatus.COMPENSATING,
    TimerKind.COMPENSATION_RETRY: StepStatus.COMPENSATION_BACKOFF,
}
_STATUS_TIMER = {status: kind for kind, status in _TIMER_STATUS.items()}


def jitter_unit(saga_id: str, step: str, attempt: int) -> float:
    """A number in [0, 1) that depends only on its arguments: replaying a saga gives the same backoffs."""
    digest = hashlib.sha256(f"{saga_id}\x00{step}\x00{attempt}".encode()).digest()
    # 53 bits fit a float exactly, so the result can never round up to 1.0.
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def _backoff(policy: RetryPolicy, used: int, unit: float) -> float:
    """`policy.backoff`, the exponent clamped where the delay saturates: endless retries must not overflow."""
    saturation = 1
    ratio = policy.max_backoff / policy.initial_backoff if policy.initial_backoff > 0.0 else 1.0
    if policy.multiplier > 1.0 and ratio > 1.0:
        saturation = 1 + math.ceil(math.log(ratio) / math.log(policy.multiplier))
    return policy.backoff(min(used, saturation), unit)


# ---- the transaction a decision is built in -------------------------------------------------------------


@dataclass
class _Txn:
    """Mutable scratch state for one decision; `finish` freezes it into a `Decision`."""

    definition: SagaDefinition
    base: SagaInstance
    now: float
    steps: dict[str, StepState]
    status: SagaStatus
    stage: int
    failure: str | None
    completions: int
    deadline_at: float | None
    new_saga: bool = False  # set by `start`: no timer exists yet, so there is nothing to cancel
    commands: list[OutgoingCommand] = field(default_factory=list)
    timers: list[TimerSpec] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)

    @classmethod
    def of(cls, definition: SagaDefinition, instance: SagaInstance, now: float) -> _Txn:
        return cls(
            definition, instance, now, dict(instance.steps), instance.status, instance.stage,
            instance.failure, instance.completions, instance.deadline_at,
        )  # fmt: skip

    @property
    def saga_id(self) -> str:
        return self.base.id

    def context(self) -> dict[str, Any]:
        """`self.instance().context`, without building the instance."""
        base = self.base
        return {
            "input": base.input,
            "steps": {name: s.output for name, s in self.steps.items() if s.output is not None},
            "saga": {"id": base.id, "name": base.definition, "version": base.definition_version},
        }

    def instance(self) -> SagaInstance:
        changes = {"steps": dict(self.steps), "status": self.status, "stage": self.stage}
        changes |= {"failure": self.failure, "completions": self.completions, "deadline_at": self.deadline_at}
        changes["updated_at"] = self.now
        return evolve(self.base, changes)

    def update(self, name: str, **changes: Any) -> StepState:
        state = evolve(self.steps[name], changes)
        self.steps[name] = state
        return state

    # The values below are built with `trusted` (no validation): every field is given, with the type validation
    # would give it (`float(...)` where a caller's clock may hand out ints).

    def record(self, type_: str, step: str | None = None, attempt: int | None = None, **detail: Any) -> None:
        fields = {"at": float(self.now), "type": type_, "step": step, "attempt": attempt, "detail": detail}
        self.history.append(trusted(HistoryEntry, fields))

    def timer(self, kind: TimerKind, step: str | None, attempt: int, due_at: float) -> None:
        spec = trusted(TimerSpec, {
            "id": timer_id(self.saga_id, kind, step, attempt), "saga_id": self.saga_id, "timer": kind,
            "step": step, "attempt": attempt, "due_at": float(due_at),
        })  # fmt: skip
        self.timers.append(spec)

    def command(
        self, step: StepDefinition, kind: MessageKind, attempt: int, type_: str, payload: dict[str, Any]
    ) -> str:
        mid = message_id(self.saga_id, step.name, kind, attempt)
        self.commands.append(trusted(OutgoingCommand, {
            "id": mid, "saga_id": self.saga_id, "saga_name": self.definition.name, "step": step.name, "kind": kind,
            "attempt": attempt, "topic": step.command_topic, "type": type_, "payload": dict(payload),
        }))  # fmt: skip
        return mid

    def stage_steps(self) -> tuple[StepDefinition, ...]:
        return self.definition.stages[self.stage]

    def finish(self, consumed_timer: str | None = None) -> Decision:
        after = self.instance()
        base = self.base
        settled = after.status.is_settled
        cancels = sorted(t for t in _timers_gone(base, after) if t != consumed_timer)
        if settled and not base.status.is_settled and not self.new_saga and base.deadline_at is not None:
            deadline = timer_id(self.saga_id, TimerKind.DEADLINE, None, 0)
            if consumed_timer != deadline:
                cancels.append(deadline)
        # A timer set earlier in this decision is dropped when a later transition made it moot (e.g. parking):
        # a step timer is kept only if it is the one its step's final state implies.
        steps = after.steps
        timers = tuple(
            t for t in self.timers
            if t.timer is TimerKind.DEADLINE
            or (not settled and t.step is not None and _step_timer(after.id, t.step, steps[t.step]) == t.id)
        )  # fmt: skip
        return trusted(Decision, {
            "instance": after, "outcome": "applied", "reason": None, "commands": tuple(self.commands),
            "timers": timers, "cancel_timers": tuple(cancels), "history": tuple(self.history),
        })  # fmt: skip


def _step_timer(saga_id: str, name: str, state: StepState) -> str | None:
    """The timer a step's state implies, if any."""
    kind = _STATUS_TIMER.get(state.status)
    if kind is None:
        return None
    compensation = kind in (TimerKind.COMPENSATION_TIMEOUT, TimerKind.COMPENSATION_RETRY)
    return timer_id(saga_id, kind, name, state.compensation_attempt if compensation else state.attempt)


def _timers_gone(before: SagaInstance, after: SagaInstance) -> set[str]:
    """`_live_timers(before) - _live_timers(after)`, looking only at the steps whose state changed: an unchanged
    step implies the same timer before and after, and a timer id names its step, so no two steps share one."""
    if before.status.is_settled:
        return set()
    if after.status.is_settled:
        return _live_timers(before)
    gone: set[str] = set()
    new_steps = after.steps
    for name, old in before.steps.items():
        state = new_steps.get(name)
        if state is old:
            continue
        previous = _step_timer(before.id, name, old)
        if previous is not None and (state is None or previous != _step_timer(after.id, name, state)):
            gone.add(previous)
    return gone


def _live_timers(instance: SagaInstance) -> set[str]:
    """The step timers an instance's state implies; a settled saga has none."""
    if instance.status.is_settled:
        return set()
    live: set[str] = set()
    for name, state in instance.steps.items():
        kind = _STATUS_TIMER.get(state.status)
        if kind is not None:
            compensation = kind in (TimerKind.COMPENSATION_TIMEOUT, TimerKind.COMPENSATION_RETRY)
            attempt = state.compensation_attempt if compensation else state.attempt
            live.add(timer_id(instance.id, kind, name, attempt))
    return live


def _ignored(instance: SagaInstance, reason: str, *history: HistoryEntry) -> Decision:
    return Decision(instance=instance, outcome="ignored", reason=reason, history=history)


def _rejected(instance: SagaInstance, reason: str) -> Decision:  # rejected events are dead-lettered
    return Decision(instance=instance, outcome="rejected", reason=reason)


# ---- entry points ---------------------------------------------------------------------------------------


def start(
    definition: SagaDefinition,
    *,
    saga_id: str,
    input: dict[str, Any],
    now: float,
    idempotency_key: str | None = None,
) -> Decision:
    """Create a saga instance and send the first stage."""
    deadline_at = now + definition.deadline if definition.deadline is not None else None
    instance = SagaInstance(
        id=saga_id, definition=definition.name, definition_version=definition.version,
        steps={step.name: StepState() for step in definition.iter_steps()}, input=input,
        idempotency_key=idempotency_key, created_at=now, updated_at=now, deadline_at=deadline_at,
    )  # fmt: skip
    txn = _Txn.of(definition, instance, now)
    txn.new_saga = True
    txn.record("saga.started", definition=definition.identity, idempotency_key=idempotency_key)
    _send_stage(txn, 0)
    if deadline_at is not None and not txn.status.is_settled:
        txn.timer(TimerKind.DEADLINE, None, 0, deadline_at)
    return txn.finish()


def decide(definition: SagaDefinition, instance: SagaInstance, event: Event, *, now: float) -> Decision:
    """React to one event; `definition` must be the version the instance started with."""
    if (definition.name, definition.version) != (instance.definition, instance.definition_version):
        raise ValueError(
            f"saga {instance.id} runs {instance.definition} v{instance.definition_version}, "
            f"not {definition.name} v{definition.version}"
        )
    txn = _Txn.of(definition, instance, now)
    if isinstance(event, ReplyReceived):
        return _on_reply(txn, event)
    if isinstance(event, TimerFired):
        return _on_timer(txn, event)
    return _on_operator(txn, event)


# ---- forward ------------------------------------------------------------------------------------------


def _send_stage(txn: _Txn, index: int) -> None:
    txn.stage = index
    _send_pending(txn)


def _send_pending(txn: _Txn) -> None:
    """Send the members of the current stage not sent yet. A member whose payload fails stops the others when
    it turns or parks the saga; they go out once an operator resumes it (retry or skip)."""
    for step in txn.stage_steps():
        if txn.status is not SagaStatus.RUNNING:
            return
        if txn.steps[step.name].status is StepStatus.PENDING:
            _send_step(txn, step, 1)


def _send_step(txn: _Txn, step: StepDefinition, attempt: int, **detail: Any) -> None:
    try:
        payload = render_payload(step.payload, txn.context())
    except JMESPathError as exc:
        # Never sent, so it had no effect: the same as a business failure.
        txn.update(step.name, attempt=attempt)
        _business_failure(txn, step, f"payload could not be rendered: {exc}", reply_type=None)
        return
    state = txn.steps[step.name]
    txn.update(
        step.name, status=StepStatus.RUNNING, attempt=attempt, error=None, finished_at=None,
        started_at=txn.now if state.started_at is None else state.started_at,
    )  # fmt: skip
    mid = txn.command(step, MessageKind.COMMAND, attempt, step.command, payload)
    txn.timer(TimerKind.STEP_TIMEOUT, step.name, attempt, txn.now + step.timeout)
    txn.record("step.sent", step.name, attempt, message_id=mid, type=step.command, **detail)


def _advance_forward(txn: _Txn) -> None:
    """Send what the current stage has not sent yet; once every member is done, send the next stage or complete
    the saga."""
    _send_pending(txn)
    if txn.status is not SagaStatus.RUNNING or any(txn.steps[s.name].status not in _DONE for s in txn.stage_steps()):
        return
    if txn.stage + 1 < len(txn.definition.stages):
        _send_stage(txn, txn.stage + 1)
        return
    txn.status, txn.failure = SagaStatus.COMPLETED, None
    txn.record("saga.completed")


def _succeeded(txn: _Txn, step: StepDefinition, event: ReplyReceived) -> None:
    txn.completions += 1
    txn.update(
        step.name, status=StepStatus.SUCCEEDED, output=dict(event.data), completed_order=txn.completions,
        finished_at=txn.now, error=None,
    )  # fmt: skip
    txn.record("step.succeeded", step.name, event.attempt, reply_type=event.type, message_id=event.message_id)
    _continue(txn)


def _continue(txn: _Txn) -> None:
    """After a step settled: move on in whichever direction the saga is going."""
    if txn.status is SagaStatus.RUNNING:
        _advance_forward(txn)
    elif txn.status is SagaStatus.COMPENSATING:
        _advance_compensation(txn)


def _business_failure(txn: _Txn, step: StepDefinition, reason: str, reply_type: str | None) -> None:
    """A definite failure: the step had no effect, so it is not compensated."""
    state = txn.update(step.name, status=StepStatus.FAILED, error=reason, finished_at=txn.now)
    txn.record("step.failed", step.name, state.attempt, reason=reason, reply_type=reply_type)
    if txn.status is not SagaStatus.RUNNING:
        _continue(txn)
    elif step.kind is StepKind.RETRIABLE:  # after the pivot there is no way back
        _park(txn, f"step {step.name!r} failed after the pivot: {reason}")
    else:
        _begin_compensation(txn, f"step {step.name!r} failed: {reason}")


def _retry_or_give_up(txn: _Txn, step: StepDefinition, reason: str, **detail: Any) -> None:
    """A retryable failure or a timeout: back off and retry, or give up with the outcome unknown."""
    state = txn.steps[step.name]
    used = state.attempt - state.attempt_offset
    if used < step.retry.max_attempts or step.kind is StepKind.RETRIABLE:
        delay = _backoff(step.retry, used, jitter_unit(txn.saga_id, step.name, state.attempt))
        txn.update(step.name, status=StepStatus.BACKOFF, error=reason)
        txn.timer(TimerKind.STEP_RETRY, step.name, state.attempt, txn.now + delay)
        txn.record("step.retry_scheduled", step.name, state.attempt, reason=reason, delay=delay, **detail)
        return
    txn.update(step.name, status=StepStatus.UNKNOWN, error=reason, finished_at=txn.now)
    txn.record("step.unknown", step.name, state.attempt, reason=reason, attempts=used, **detail)
    if step.kind is StepKind.PIVOT:  # it may have taken effect and cannot be undone: only a human can tell
        _park(txn, f"pivot outcome unknown: step {step.name!r} gave no definite answer after {used} attempts")
    elif txn.status is SagaStatus.RUNNING:
        _begin_compensation(txn, f"step {step.name!r}: no definite answer after {used} attempts: {reason}")
    else:
        _continue(txn)


def _park(txn: _Txn, reason: str) -> None:
    txn.status, txn.failure = SagaStatus.FAILED, reason
    # Parking cancels the deadline timer for good: from here on the operator owns the saga's time budget.
    txn.deadline_at = None
    txn.record("saga.parked", reason=reason, stage=txn.stage)


def _no_way_back(txn: _Txn) -> tuple[StepDefinition, str] | None:
    """The step past which the saga can only go forward, and why: its pivot succeeded (or was skipped as done),
    or a retriable step was sent (retriable steps are never compensated, so going back would leave its effect;
    this is the point of no return of a definition with no pivot)."""
    for step in txn.definition.iter_steps():
        state = txn.steps[step.name]
        if step.kind is StepKind.PIVOT and state.status in _DONE:
            return step, f"pivot {step.name!r} succeeded"
        # `started_at` is set when a command goes out (a payload that failed to render sent nothing).
        if step.kind is StepKind.RETRIABLE and (state.started_at is not None or state.status in _DONE):
            return step, f"retriable step {step.name!r} was sent"
    return None


def _pivot_in_flight(txn: _Txn) -> StepDefinition | None:
    for step in txn.stage_steps():
        if step.kind is StepKind.PIVOT and txn.steps[step.name].status in _IN_FLIGHT:
            return step
    return None


# ---- compensation -------------------------------------------------------------------------------------


def _begin_compensation(txn: _Txn, reason: str) -> None:
    passed = _no_way_back(txn)
    if passed is not None:
        _park(txn, f"{reason}; cannot compensate: {passed[1]}")
        return
    txn.status, txn.failure = SagaStatus.COMPENSATING, reason
    txn.record("saga.compensating", reason=reason, stage=txn.stage)
    _advance_compensation(txn)


def _needs_compensation(step: StepDefinition, state: StepState) -> bool:
    compensatable = step.kind is StepKind.COMPENSATABLE and step.compensation is not None
    return compensatable and state.status in _TO_COMPENSATE


def _advance_compensation(txn: _Txn) -> None:
    """Compensate one stage at a time, downward; wait while anything of the current stage is in flight."""
    while True:
        states = [txn.steps[s.name] for s in txn.stage_steps()]
        if any(s.status in _IN_FLIGHT or s.status in _COMPENSATION_IN_FLIGHT for s in states):
            return
        passed = _no_way_back(txn)
        if passed is not None:  # a pivot succeeded while we waited for it: no way back any more
            _park(txn, f"{txn.failure}; {passed[1]} meanwhile, so it cannot compensate")
            return
        targets = [s for s in txn.stage_steps() if _needs_compensation(s, txn.steps[s.name])]
        if targets:
            for step in targets:
                if txn.status is not SagaStatus.COMPENSATING:
                    return
                _send_compensation(txn, step, txn.steps[step.name].compensation_attempt + 1)
            return
        if txn.stage == 0:
            break
        txn.stage -= 1
    txn.status = SagaStatus.COMPENSATED
    txn.record("saga.compensated", failure=txn.failure)


def _send_compensation(txn: _Txn, step: StepDefinition, attempt: int, **detail: Any) -> None:
    assert step.compensation is not None  # only steps with a compensation are ever targets
    txn.update(step.name, status=StepStatus.COMPENSATING, compensation_attempt=attempt)
    try:
        payload = render_payload(step.compensation.payload, txn.context())
    except JMESPathError as exc:
        reason = f"compensation payload of step {step.name!r} could not be rendered: {exc}"
        txn.update(step.name, error=reason)
        _park(txn, reason)
        return
    command = step.compensation.command
    mid = txn.command(step, MessageKind.COMPENSATION, attempt, command, payload)
    txn.timer(TimerKind.COMPENSATION_TIMEOUT, step.name, attempt, txn.now + step.timeout)
    txn.record("compensation.sent", step.name, attempt, message_id=mid, type=command, **detail)


def _compensation_retry_or_park(txn: _Txn, step: StepDefinition, reason: str) -> None:
    state = txn.steps[step.name]
    used = state.compensation_attempt - state.compensation_attempt_offset
    policy = txn.definition.compensation_retry
    if used < policy.max_attempts:
        unit = jitter_unit(txn.saga_id, f"{step.name}#compensation", state.compensation_attempt)
        delay = _backoff(policy, used, unit)
        txn.update(step.name, status=StepStatus.COMPENSATION_BACKOFF, error=reason)
        txn.timer(TimerKind.COMPENSATION_RETRY, step.name, state.compensation_attempt, txn.now + delay)
        attempt = state.compensation_attempt
        txn.record("compensation.retry_scheduled", step.name, attempt, reason=reason, delay=delay)
        return
    # The step keeps its COMPENSATING status: that is what marks the saga as parked in compensation.
    txn.update(step.name, error=reason)
    _park(txn, f"compensation of step {step.name!r} failed after {used} attempts: {reason}")


# ---- replies ------------------------------------------------------------------------------------------


def _on_reply(txn: _Txn, event: ReplyReceived) -> Decision:
    instance = txn.base
    try:
        step = txn.definition.step(event.step)
    except KeyError:
        return _rejected(instance, f"unknown step {event.step!r}")
    expected = message_id(instance.id, step.name, event.kind, event.attempt)
    if event.causation_id != expected:
        return _rejected(instance, f"causation id {event.causation_id!r} is not our command {expected!r}")
    if instance.status.is_settled:
        return _ignored(instance, f"late reply: saga is {instance.status}")
    state = instance.steps[step.name]
    compensation = event.kind is MessageKind.COMPENSATION
    waiting = StepStatus.COMPENSATING if compensation else StepStatus.RUNNING
    current = state.compensation_attempt if compensation else state.attempt
    if event.attempt != current:
        reason = f"stale attempt: reply to attempt {event.attempt}, step {step.name!r} is at {current}"
        return _ignored(instance, reason)
    if state.status is not waiting:
        duplicate = state.status in (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.COMPENSATED)
        what = "duplicate reply" if duplicate else "late reply: saga moved on"
        return _ignored(instance, f"{what}; step {step.name!r} is {state.status}")
    if compensation:
        _on_compensation_reply(txn, step, event)
        return txn.finish()
    return _on_command_reply(txn, step, event)


def _on_command_reply(txn: _Txn, step: StepDefinition, event: ReplyReceived) -> Decision:
    detail = event.reason or event.type
    if event.outcome is Outcome.RETRY:
        _retry_or_give_up(txn, step, f"retryable failure: {detail}", reply_type=event.type)
    elif event.outcome is Outcome.SUCCESS and event.type in step.success_types:
        _succeeded(txn, step, event)
    elif event.outcome is Outcome.FAILURE and event.type in step.failure_types:
        _business_failure(txn, step, detail, reply_type=event.type)
    else:
        expected = f"{', '.join(step.success_types)} (success) or {', '.join(step.failure_types)} (failure)"
        return _rejected(
            txn.base,
            f"unexpected reply type {event.type!r} (outcome {event.outcome}) for step {step.name!r}, "
            f"expected one of {expected}",
        )
    return txn.finish()


def _on_compensation_reply(txn: _Txn, step: StepDefinition, event: ReplyReceived) -> None:
    if event.outcome is Outcome.SUCCESS and event.type in step.compensation_success_types:
        txn.update(step.name, status=StepStatus.COMPENSATED, error=None)
        txn.record("compensation.succeeded", step.name, event.attempt, reply_type=event.type)
        _advance_compensation(txn)
        return
    reason = f"{event.outcome}: {event.reason or event.type}"
    txn.record("compensation.failed", step.name, event.attempt, reason=reason, reply_type=event.type)
    _compensation_retry_or_park(txn, step, reason)


# ---- timers -------------------------------------------------------------------------------------------


def _on_timer(txn: _Txn, event: TimerFired) -> Decision:
    instance = txn.base
    if event.timer_id != timer_id(instance.id, event.timer, event.step, event.attempt):
        return _rejected(instance, f"timer id {event.timer_id!r} does not match its kind, step and attempt")
    if event.timer is TimerKind.DEADLINE:
        return _on_deadline(txn, event)
    if event.step is None or event.step not in instance.steps:
        return _rejected(instance, f"unknown step {event.step!r}")
    if instance.status.is_settled:
        return _ignored(instance, f"stale timer: saga is {instance.status}")
    step = txn.definition.step(event.step)
    state = instance.steps[step.name]
    compensation = event.timer in (TimerKind.COMPENSATION_TIMEOUT, TimerKind.COMPENSATION_RETRY)
    current = state.compensation_attempt if compensation else state.attempt
    if state.status is not _TIMER_STATUS[event.timer] or event.attempt != current:
        return _ignored(instance, f"stale timer: step {step.name!r} is {state.status} at attempt {current}")
    if event.timer is TimerKind.STEP_TIMEOUT:
        txn.record("step.timed_out", step.name, current, timeout=step.timeout)
        _retry_or_give_up(txn, step, f"no reply within {step.timeout}s")
    elif event.timer is TimerKind.STEP_RETRY:
        _send_step(txn, step, current + 1, retry=True)
    elif event.timer is TimerKind.COMPENSATION_TIMEOUT:
        txn.record("compensation.timed_out", step.name, current, timeout=step.timeout)
        _compensation_retry_or_park(txn, step, f"no reply within {step.timeout}s")
    else:
        _send_compensation(txn, step, current + 1, retry=True)
    return txn.finish(consumed_timer=event.timer_id)


def _on_deadline(txn: _Txn, event: TimerFired) -> Decision:
    instance = txn.base
    if instance.deadline_at is None:  # never had one, or parked since (which dropped it)
        return _ignored(instance, "stale timer: the saga has no deadline pending")
    if instance.status is not SagaStatus.RUNNING:
        return _ignored(instance, f"deadline passed while the saga is {instance.status}")
    passed = _no_way_back(txn)
    if passed is not None:
        entry = HistoryEntry(at=txn.now, type="deadline.ignored_after_pivot", step=passed[0].name)
        return _ignored(instance, f"deadline passed after {passed[1]}", entry)
    pivot = _pivot_in_flight(txn)
    if pivot is not None:  # its outcome decides the direction; its own retry policy bounds the wait
        entry = HistoryEntry(at=txn.now, type="deadline.ignored_pivot_in_flight", step=pivot.name)
        return _ignored(instance, f"deadline passed while pivot {pivot.name!r} is in flight", entry)
    _abort(txn, f"deadline of {txn.definition.deadline}s exceeded")
    return txn.finish(consumed_timer=event.timer_id)


def _abort(txn: _Txn, reason: str) -> None:
    """Give up going forward: whatever of the current stage is in flight has an unknown outcome."""
    for step in txn.stage_steps():
        state = txn.steps[step.name]
        if state.status in _IN_FLIGHT:
            txn.update(step.name, status=StepStatus.UNKNOWN, error=reason, finished_at=txn.now)
            txn.record("step.unknown", step.name, state.attempt, reason=reason)
    _begin_compensation(txn, reason)


# ---- operator commands --------------------------------------------------------------------------------


def _on_operator(txn: _Txn, event: OperatorCommand) -> Decision:
    handlers = {"abort": _operator_abort, "retry": _operator_retry, "skip": _operator_skip}
    refusal = handlers[event.action](txn, event)
    if refusal is not None:
        return _rejected(txn.base, f"cannot {event.action}: {refusal}")
    return txn.finish()


def _who(event: OperatorCommand) -> dict[str, Any]:
    """What the history keeps of an operator command: why, who, and its id (when it has one)."""
    who: dict[str, Any] = {"reason": event.reason, "operator": event.operator}
    if event.command_id is not None:
        who["command_id"] = event.command_id
    return who


def _parked_in_compensation(txn: _Txn) -> bool:
    stuck = any(s.status in _COMPENSATION_IN_FLIGHT for s in txn.steps.values())
    return stuck and txn.status is SagaStatus.FAILED


def _operator_abort(txn: _Txn, event: OperatorCommand) -> str | None:
    if _parked_in_compensation(txn):
        return "saga is parked in compensation; retry or skip the stuck compensation"
    if txn.status not in (SagaStatus.RUNNING, SagaStatus.FAILED):
        return f"saga is {txn.status}"
    passed = _no_way_back(txn)
    if passed is not None:
        return f"{passed[1]}; the saga can only go forward"
    pivot = _pivot_in_flight(txn) if txn.status is SagaStatus.RUNNING else None
    if pivot is not None:
        return f"pivot {pivot.name!r} is in flight; wait for its outcome"
    txn.record("operator.abort", **_who(event))
    _abort(txn, f"aborted by {event.operator}: {event.reason or 'no reason given'}")
    return None


def _operator_retry(txn: _Txn, event: OperatorCommand) -> str | None:
    if txn.status is not SagaStatus.FAILED:
        return f"saga is {txn.status}; only a parked saga can be retried"
    who = _who(event)
    if _parked_in_compensation(txn):
        steps = txn.definition.iter_steps()
        stuck = [s for s in steps if txn.steps[s.name].status in _COMPENSATION_IN_FLIGHT]
        txn.record("operator.retry", steps=[s.name for s in stuck], direction="compensation", **who)
        txn.status = SagaStatus.COMPENSATING
        for step in stuck:
            used = txn.steps[step.name].compensation_attempt
            txn.update(step.name, compensation_attempt_offset=used)  # a fresh budget for the policy
            _send_compensation(txn, step, used + 1, operator=event.operator)
        return None
    stuck = [s for s in txn.stage_steps() if txn.steps[s.name].status in _STUCK_FORWARD]
    if not stuck:
        return "no stuck step in the current stage"
    txn.record("operator.retry", steps=[s.name for s in stuck], direction="forward", **who)
    txn.status, txn.failure = SagaStatus.RUNNING, None
    for step in stuck:
        if txn.status is not SagaStatus.RUNNING:
            break
        used = txn.steps[step.name].attempt
        txn.update(step.name, attempt_offset=used)
        _send_step(txn, step, used + 1, operator=event.operator)
    _send_pending(txn)  # members an earlier member's failure kept from going out
    return None


def _operator_skip(txn: _Txn, event: OperatorCommand) -> str | None:
    if event.step is None or event.step not in txn.steps:
        return f"unknown step {event.step!r}"
    step = txn.definition.step(event.step)
    state = txn.steps[step.name]
    who = _who(event)
    parked_back = _parked_in_compensation(txn)
    forward = txn.status is SagaStatus.RUNNING or (txn.status is SagaStatus.FAILED and not parked_back)
    backward = txn.status is SagaStatus.COMPENSATING or parked_back
    if forward and state.status in _STUCK_FORWARD and txn.definition.stage_of(step.name) == txn.stage:
        txn.completions += 1
        txn.update(
            step.name, status=StepStatus.SKIPPED, finished_at=txn.now, completed_order=txn.completions,
            error=f"skipped by {event.operator}",
            output=dict(event.output) if event.output is not None else state.output,
        )  # fmt: skip
        if event.output is not None:
            who["output"] = event.output
        txn.record("operator.skip", step.name, state.attempt, direction="forward", **who)
        _resume_if_unstuck(txn, SagaStatus.RUNNING, _STUCK_FORWARD, txn.stage_steps())
        _continue(txn)
        return None
    if backward and event.output is not None:
        return "an output is only given when skipping a step forward"
    if backward and state.status in _COMPENSATION_IN_FLIGHT:
        txn.update(step.name, status=StepStatus.COMPENSATED, error=f"skipped by {event.operator}")
        txn.record("operator.skip", step.name, state.compensation_attempt, direction="compensation", **who)
        everything = tuple(txn.definition.iter_steps())
        _resume_if_unstuck(txn, SagaStatus.COMPENSATING, _COMPENSATION_IN_FLIGHT, everything)
        _continue(txn)
        return None
    return f"step {step.name!r} is {state.status} while the saga is {txn.status}: it is not stuck"


def _resume_if_unstuck(
    txn: _Txn, direction: SagaStatus, stuck: frozenset[StepStatus], steps: tuple[StepDefinition, ...]
) -> None:
    """A parked saga resumes once the operator has dealt with every stuck step; until then it stays parked."""
    if txn.status is SagaStatus.FAILED and not any(txn.steps[s.name].status in stuck for s in steps):
        txn.status = direction
        if direction is SagaStatus.RUNNING:
            txn.failure = None

"""The invariants `sagas explore` checks on every transition and state it finds, and the findings it locates.

Kept apart from the search (`sagas.engine.explore`) so that each list reads on its own: what a correct machine must
never do, checked on decisions and instances only, computed independently of the machine's own helpers (a broken
machine must not be judged by its own broken code).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from sagas.definitions.checks import context_reads
from sagas.definitions.model import SagaDefinition, StepDefinition, StepKind
from sagas.definitions.source import Path
from sagas.engine.state import (
    Decision,
    Event,
    MessageKind,
    OutgoingCommand,
    SagaInstance,
    SagaStatus,
    StepStatus,
    TimerFired,
    TimerKind,
    message_id,
    timer_id,
)

Severity = Literal["error", "warning"]
Witness = Callable[[], tuple[str, ...]]
"""The path to where a check runs, built only when something is recorded (most checks find nothing)."""


@dataclass(frozen=True)
class Violation:
    """An invariant the machine broke, with the shortest path (in words) that shows it."""

    message: str
    witness: tuple[str, ...]


@dataclass(frozen=True)
class ExploreFinding:
    """A problem of the definition at a field path (`steps[1].compensation.payload.id`), with a witness path."""

    path: Path
    message: str
    severity: Severity
    witness: tuple[str, ...]


_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})
_IN_FLIGHT = frozenset({StepStatus.RUNNING, StepStatus.BACKOFF})
COMPENSATION_IN_FLIGHT = frozenset({StepStatus.COMPENSATING, StepStatus.COMPENSATION_BACKOFF})
STUCK_FORWARD = frozenset({StepStatus.RUNNING, StepStatus.BACKOFF, StepStatus.UNKNOWN, StepStatus.FAILED})
"""A parked saga's steps in these are what an operator retries or skips."""
_TOOK_EFFECT = frozenset({StepStatus.SUCCEEDED, StepStatus.UNKNOWN, StepStatus.SKIPPED})
"""A compensatable step in one of these may have changed something: it must be undone before "compensated"."""
_NOT_UNDONE = _TOOK_EFFECT | COMPENSATION_IN_FLIGHT
_TIMER_OF = {
    StepStatus.RUNNING: TimerKind.STEP_TIMEOUT,
    StepStatus.BACKOFF: TimerKind.STEP_RETRY,
    StepStatus.COMPENSATING: TimerKind.COMPENSATION_TIMEOUT,
    StepStatus.COMPENSATION_BACKOFF: TimerKind.COMPENSATION_RETRY,
}
_NO_ANSWER: tuple[str, Severity] = ("had no definite answer (it timed out, or the deadline cut it off)", "error")
_WHY_MISSING: dict[StepStatus, tuple[str, Severity]] = {
    StepStatus.FAILED: ("failed", "error"),
    StepStatus.SKIPPED: ("was skipped by an operator without an output (sagas skip --output gives one)", "warning"),
}


def implied_timers(instance: SagaInstance) -> set[str]:
    """The step timers an instance's state calls for (the deadline aside); a settled saga has none."""
    if instance.status.is_settled:
        return set()
    timers = set()
    for name, state in instance.steps.items():
        kind = _TIMER_OF.get(state.status)
        if kind is not None:
            compensation = state.status in COMPENSATION_IN_FLIGHT
            attempt = state.compensation_attempt if compensation else state.attempt
            timers.add(timer_id(instance.id, kind, name, attempt))
    return timers


def no_way_back(definition: SagaDefinition, instance: SagaInstance) -> str | None:
    """Why the saga can only go forward: its pivot is done, or a retriable step went out."""
    for step in definition.all_steps:
        state = instance.steps[step.name]
        if step.kind is StepKind.PIVOT and state.status in _DONE:
            return f"the pivot {step.name} succeeded"
        if step.kind is StepKind.RETRIABLE and (state.started_at is not None or state.status in _DONE):
            return f"the retriable step {step.name} was sent"
    return None


class Checks:
    """Collects violations and findings, each once, with the first (so shortest) witness found for it."""

    def __init__(self, definition: SagaDefinition, paths: dict[str, Path]) -> None:
        self.definition = definition
        self.paths = paths
        self.sent: set[tuple[str, MessageKind]] = set()
        self.unrendered: set[str] = set()
        """Steps whose payload failed to render with the sample data somewhere (so coverage cannot blame them)."""
        self._violations: dict[str, Violation] = {}
        self._findings: dict[tuple[Path, str], ExploreFinding] = {}
        self._reads: dict[tuple[str, MessageKind], list[tuple[Path, str]]] = {}
        for step in definition.all_steps:
            for kind, base, mapping in self._mappings(step):
                reads = [((*base, *leaf), chain[1]) for leaf, chain in context_reads(mapping)
                         if len(chain) >= 2 and chain[0] == "steps"]  # fmt: skip
                self._reads[(step.name, kind)] = reads

    def _mappings(self, step: StepDefinition) -> Iterable[tuple[MessageKind, Path, dict[str, Any]]]:
        path = self.paths[step.name]
        yield MessageKind.COMMAND, (*path, "payload"), step.payload
        if step.compensation is not None:
            yield MessageKind.COMPENSATION, (*path, "compensation", "payload"), step.compensation.payload

    # ---- recording ----

    def violation(self, message: str, where: Witness) -> None:
        if message not in self._violations:
            self._violations[message] = Violation(message, where())

    def finding(self, path: Path, message: str, severity: Severity, where: Witness) -> None:
        if (path, message) not in self._findings:
            self._findings[(path, message)] = ExploreFinding(path, message, severity, where())

    def violations(self) -> tuple[Violation, ...]:
        return tuple(self._violations.values())

    def findings(self) -> tuple[ExploreFinding, ...]:
        return tuple(sorted(self._findings.values(), key=lambda f: (f.severity != "error", f.path, f.message)))

    # ---- per transition ----

    def transition(
        self,
        before: SagaInstance | None,
        decision: Decision,
        event: Event | None,
        where: Witness,
        before_timers: frozenset[str] | None = None,
    ) -> None:
        """Check one decision; `before_timers` is `implied_timers(before)` when the caller has it already."""
        after = decision.instance
        if decision.outcome != "applied":
            changed = before is not None and after != before
            if changed or decision.commands or decision.timers or decision.cancel_timers:
                self.violation(f"an {decision.outcome} event changed the saga or sent something", where)
            return
        if before_timers is None:
            before_timers = frozenset(implied_timers(before)) if before is not None else frozenset()
        self._timers(before_timers, decision, event, where)
        going_back = before is not None and any(
            s.status in COMPENSATION_IN_FLIGHT or s.status is StepStatus.COMPENSATED for s in before.steps.values()
        )
        for command in decision.commands:
            self.sent.add((command.step, command.kind))
            if command.id != message_id(after.id, command.step, command.kind, command.attempt):
                self.violation(f"command {command.id} is not named by its saga, step, kind and attempt", where)
            if not self._same_command(after, command):
                # A participant deduplicates by saga, step and kind: every attempt must be that same command.
                self.violation(f"{command.kind} {command.id} is not the one its step defines (type, topic, saga): "
                               "its retries would not share one idempotency key", where)  # fmt: skip
            if command.kind is MessageKind.COMPENSATION:
                failed = {h.step for h in decision.history if h.type == "step.failed" and h.step is not None}
                self._compensation(before, after, command.step, failed, where)
            elif going_back:
                self.violation(f"{command.step} was sent forward after compensation began", where)
            self._references(before, after, command.step, command.kind, where)
        self._render_failures(decision, where)

    def _same_command(self, after: SagaInstance, command: OutgoingCommand) -> bool:
        step = self.definition.step(command.step)
        compensation = command.kind is MessageKind.COMPENSATION
        expected = step.compensation.command if compensation and step.compensation else step.command
        return (command.saga_id, command.type, command.topic) == (after.id, expected, step.command_topic)

    def _timers(self, before: frozenset[str], decision: Decision, event: Event | None, where: Witness) -> None:
        pending = set(before)
        if isinstance(event, TimerFired):
            pending.discard(event.timer_id)
        pending -= set(decision.cancel_timers)
        pending |= {t.id for t in decision.timers if t.timer is not TimerKind.DEADLINE}
        wanted = implied_timers(decision.instance)
        if pending - wanted:
            self.violation(f"timers left pending that nothing waits for: {sorted(pending - wanted)}", where)
        if wanted - pending:
            self.violation(f"a step waits for a timer that was never set: {sorted(wanted - pending)}", where)

    def _compensation(
        self, before: SagaInstance | None, after: SagaInstance, name: str, failed_now: set[str], where: Witness
    ) -> None:
        definition = self.definition
        step = definition.step(name)
        if step.kind is not StepKind.COMPENSATABLE:
            self.violation(f"the {step.kind} step {name} was compensated; nothing at or after the pivot is", where)
        if before is None:
            return
        passed = no_way_back(definition, before)
        if passed is not None:
            self.violation(f"{name} was compensated after {passed}: there is no way back past it", where)
        previous = before.steps[name].status
        if name in failed_now:  # failed in this very decision
            previous = StepStatus.FAILED
        if previous is StepStatus.COMPENSATED:
            self.violation(f"{name} was compensated twice", where)
        elif previous is StepStatus.FAILED or previous is StepStatus.PENDING:
            what = "failed (a business failure has no effect)" if previous is StepStatus.FAILED else "was never sent"
            self.violation(f"{name} was compensated although it {what}", where)
        stage = definition.stage_of(name)
        for other in definition.all_steps:
            later = definition.stage_of(other.name)
            status = after.steps[other.name].status
            if later >= stage and status in _IN_FLIGHT:
                self.violation(f"{name} was compensated while {other.name} was still in flight", where)
            if later > stage and other.compensation is not None and status in _NOT_UNDONE:
                self.violation(
                    f"{name} was compensated before {other.name}, which completed after it "
                    "(compensations run in reverse order of completion)",
                    where,
                )

    def _references(
        self, before: SagaInstance | None, after: SagaInstance, name: str, kind: MessageKind, where: Witness
    ) -> None:
        """A payload leaf reading `steps.<x>` where x has no reply on this path (JMESPath would quietly give null)."""
        for path, read in self._reads[(name, kind)]:
            state = after.steps.get(read)
            if state is None or state.output is not None:
                continue
            statuses = {state.status, before.steps[read].status if before is not None else state.status}
            cause = next((s for s in (StepStatus.SKIPPED, StepStatus.FAILED) if s in statuses), None)
            why, severity = _WHY_MISSING.get(cause, _NO_ANSWER) if cause is not None else _NO_ANSWER
            what = "the compensation of" if kind is MessageKind.COMPENSATION else "the command of"
            self.finding(
                path, f"{what} {name} reads steps.{read}, which does not exist on a path where {read} {why}; "
                "JMESPath would quietly give null", severity, where,
            )  # fmt: skip

    def _render_failures(self, decision: Decision, where: Witness) -> None:
        """A payload that failed to render with the explorer's sample data: a real path, worth a look."""
        for entry in decision.history:
            reason = str(entry.detail.get("reason", ""))
            if entry.type == "step.failed" and entry.step and reason.startswith("payload could not be rendered"):
                self.unrendered.add(entry.step)
                path = (*self.paths[entry.step], "payload")
                self.finding(path, f"{reason} (with the explorer's sample input and replies)", "warning", where)
            elif entry.type == "saga.parked" and "compensation payload of step" in reason:
                for name, state in decision.instance.steps.items():
                    if state.error and state.error in reason:
                        path = (*self.paths[name], "compensation", "payload")
                        self.finding(path, f"{state.error} (with the explorer's sample input and replies)",
                                     "warning", where)  # fmt: skip

    # ---- per state ----

    def state(self, instance: SagaInstance, witness: Witness) -> None:
        status = instance.status
        steps = instance.steps
        if status is SagaStatus.COMPLETED:
            undone = [n for n, s in steps.items() if s.status not in _DONE]
            if undone:
                self.violation(f"completed while {', '.join(undone)} did not succeed", witness)
        elif status is SagaStatus.COMPENSATED:
            for step in self.definition.all_steps:
                state = steps[step.name]
                if step.compensation is not None and state.status in _NOT_UNDONE:
                    self.violation(f"compensated, but {step.name} ({state.status}) was never undone", witness)
                if state.status in _IN_FLIGHT:
                    self.violation(f"compensated while {step.name} is still in flight", witness)
            passed = no_way_back(self.definition, instance)
            if passed is not None:
                self.violation(f"compensated although {passed}", witness)

    # ---- over the whole search ----

    def deadline_reach(self) -> None:
        """Attempts that can never go out before the deadline: even with every earlier step answering at once, the
        timeouts and shortest backoffs of the attempts before them add up past it (the pivot, waited for past the
        deadline, and the retriable steps after it, which the deadline no longer stops, aside)."""
        deadline = self.definition.deadline
        if deadline is None:
            return
        for step in self.definition.all_steps:
            if step.kind is not StepKind.COMPENSATABLE:
                continue
            earliest = 0.0
            for attempt in range(2, step.retry.max_attempts + 1):
                earliest += step.timeout + step.retry.backoff(min(attempt - 1, 64), 0.0)
                if earliest >= deadline:
                    self.finding(
                        (*self.paths[step.name], "retry", "max_attempts"),
                        f"attempt {attempt} of {step.name} goes out {earliest:g}s after it starts at the earliest, "
                        f"past the saga deadline of {deadline:g}s: only {attempt - 1} of its "
                        f"{step.retry.max_attempts} attempts can ever be sent",
                        "warning",
                        tuple,
                    )
                    break

    def coverage(self) -> None:
        """Every step goes out on some path: no combination of timeouts and deadline may make one unreachable."""
        for step in self.definition.all_steps:
            if (step.name, MessageKind.COMMAND) not in self.sent:
                stage = self.definition.stage_of(step.name)
                blocking = sorted(n for n in self.unrendered if self.definition.stage_of(n) <= stage)
                if blocking:  # with other input and replies it may well go out
                    message = (f"step {step.name} is sent on no path with the explorer's sample data: the payload "
                               f"of {', '.join(blocking)} never rendered")  # fmt: skip
                    self.finding(self.paths[step.name], message, "warning", tuple)
                else:
                    self.finding(self.paths[step.name], f"step {step.name} is sent on no path", "error", tuple)
            elif step.compensation is not None and (step.name, MessageKind.COMPENSATION) not in self.sent:
                path = (*self.paths[step.name], "compensation")
                self.finding(path, f"the compensation of {step.name} runs on no path", "warning", tuple)

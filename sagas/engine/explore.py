"""`sagas explore`: drive the pure core through everything the world can do to a saga, and check every path.

The machine is pure (`start` / `decide`), so the reachable states of one saga can be searched exhaustively: from
every state, each event the world can produce is decided by the real machine (or one passed in: the mutation tests
pass broken ones) — a success, each declared business failure, a retryable failure, a timeout (its reply may still
come late), the deadline, a compensation failing or timing out, and on a parked saga the operator's retry, skip and
abort. Parallel members are answered in every order. States that only differ where the machine's future does not
depend on them (attempt numbers of settled steps, times, error texts, the completion counter) share one canonical
form, so the search is exhaustive but small. A retry chain longer than `max_attempts` is summarised: its middle
attempts, which all fail the same way, are one transition; endless retries (retriable steps) become a loop.

Each transition is checked as it is found (invariants in `_Checks`); duplicate and late replies are offered at every
state and must change nothing. What comes out is an `Exploration`: the outcomes with their path counts and shortest
witnesses, the invariant violations and the located findings (a reply read where it does not exist, ...).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from sagas.definitions.checks import context_reads
from sagas.definitions.model import SagaDefinition, StepDefinition, StepKind
from sagas.definitions.source import Path
from sagas.engine.explore_checks import (
    COMPENSATION_IN_FLIGHT,
    STUCK_FORWARD,
    Checks,
    ExploreFinding,
    Severity,
    Violation,
    Witness,
    implied_timers,
)
from sagas.engine.state import (
    Decision,
    Event,
    MessageKind,
    OperatorCommand,
    Outcome,
    ReplyReceived,
    SagaInstance,
    SagaStatus,
    StepState,
    StepStatus,
    TimerFired,
    TimerKind,
    evolve,
    message_id,
    timer_id,
)

__all__ = ["Ending", "Exploration", "ExploreFinding", "Machine", "Severity", "Violation", "WayOut", "explore"]

SAGA_ID = "explore"
_FINISHED = frozenset({StepStatus.FAILED, StepStatus.COMPENSATED, StepStatus.PENDING})
_FINISHED_KEY = ("finished",)
_UNDOING = COMPENSATION_IN_FLIGHT | {StepStatus.COMPENSATED}


class Machine(Protocol):
    """What the explorer drives: `sagas.engine.machine` itself, or a broken copy of it in the mutation tests."""

    def start(
        self,
        definition: SagaDefinition,
        *,
        saga_id: str,
        input: dict[str, Any],
        now: float,
        idempotency_key: str | None = None,
    ) -> Decision: ...

    def decide(self, definition: SagaDefinition, instance: SagaInstance, event: Event, *, now: float) -> Decision: ...


@dataclass(frozen=True)
class WayOut:
    """An operator command the machine accepts on a parked saga, and the outcomes the saga can reach after it."""

    action: str
    leads_to: tuple[str, ...]


@dataclass(frozen=True)
class Ending:
    """Where paths end: "completed", "compensated", or a parked state ("parked: charge_payment unknown")."""

    label: str
    status: SagaStatus
    paths: int
    witness: tuple[str, ...]
    ways_out: tuple[WayOut, ...] = ()

    @property
    def parked(self) -> bool:
        return self.status is SagaStatus.FAILED


@dataclass(frozen=True)
class Transition:
    label: str
    target: int
    operator: bool


@dataclass
class _Node:
    instance: SagaInstance
    deadline_pending: bool
    parent: tuple[int, str] | None
    timers: frozenset[str]
    edges: list[Transition] = field(default_factory=list)


@dataclass(frozen=True)
class Exploration:
    """What `explore` found for one definition."""

    definition: SagaDefinition
    states: int
    transitions: int
    max_attempts: int
    complete: bool
    """False when the search stopped at `max_states` (then the outcomes are a lower bound)."""
    endings: tuple[Ending, ...]
    violations: tuple[Violation, ...]
    findings: tuple[ExploreFinding, ...]
    _nodes: tuple[_Node, ...] = field(repr=False, compare=False)
    _back: frozenset[tuple[int, int]] = field(repr=False, compare=False)
    _reaches: tuple[frozenset[str], ...] = field(repr=False, compare=False)
    """Per state, the endings a path from it reaches without going round a loop."""

    @property
    def ok(self) -> bool:
        """No invariant violated, no error-level finding, and the search was exhaustive."""
        return self.complete and not self.violations and not any(f.severity == "error" for f in self.findings)

    def ending(self, label: str) -> Ending:
        """The ending called `label`; `KeyError` naming the ones there are when none is."""
        for ending in self.endings:
            if ending.label == label:
                return ending
        raise KeyError(f"no ending {label!r}; the endings are {[e.label for e in self.endings]}")

    @property
    def parks(self) -> tuple[Ending, ...]:
        return tuple(e for e in self.endings if e.parked)

    def paths(self, ending: str | None = None, *, limit: int = 10_000) -> Iterator[tuple[tuple[str, ...], str]]:
        """Paths from the start as (events in words, the ending they reach), each state visited once per path
        (a retry loop is not gone round again); only those reaching `ending` when given; at most `limit`."""
        yielded = 0
        stack: list[tuple[int, tuple[str, ...]]] = [(0, ())] if self._nodes else []
        while stack and yielded < limit:
            index, words = stack.pop()
            node = self._nodes[index]
            label = _ending_label(node.instance)
            if label is not None and (ending is None or ending == label):
                yielded += 1
                yield words, label
            for number, edge in reversed(list(enumerate(node.edges))):
                reaches = self._reaches[edge.target]
                if (index, number) not in self._back and (ending in reaches if ending is not None else reaches):
                    stack.append((edge.target, (*words, edge.label)))


def explore(
    definition: SagaDefinition,
    *,
    machine: Machine | ModuleType | None = None,
    max_attempts: int = 3,
    max_states: int = 50_000,
    input: dict[str, Any] | None = None,
) -> Exploration:
    """Search every path the world and an operator can drive `definition` down, checking invariants on each.

    Args:
        machine: the pure core to drive (`sagas.engine.machine` by default; tests pass deliberately broken ones).
        max_attempts: attempts explored one by one; a longer retry chain's middle attempts are one transition.
        max_states: stop (and say so: `complete` is False) after this many canonical states.
        input: the saga input the payloads are rendered with (default `{}`).
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if machine is None:
        from sagas.engine import machine as core

        machine = core
    search = _Search(definition, machine, max_attempts, max_states, dict(input or {}))
    search.run()
    return search.result()


def _ending_label(instance: SagaInstance) -> str | None:
    status = instance.status
    if status is SagaStatus.COMPLETED or status is SagaStatus.COMPENSATED:
        return str(status)
    if status is not SagaStatus.FAILED:
        return None
    stuck_back = [name for name, s in instance.steps.items() if s.status in COMPENSATION_IN_FLIGHT]
    if stuck_back:
        return f"parked in compensation: {', '.join(stuck_back)} not undone"
    stuck = [f"{name} {s.status}" for name, s in instance.steps.items() if s.status in STUCK_FORWARD]
    return f"parked: {', '.join(stuck)}" if stuck else "parked"


def step_paths(definition: SagaDefinition) -> dict[str, Path]:
    """Where each step is in the definition's data: `("steps", 2)` or `("steps", 0, "parallel", 1)`."""
    paths: dict[str, Path] = {}
    for index, stage in enumerate(definition.stages):
        grouped = len(stage) > 1 or getattr(definition.steps[index], "parallel", None) is not None
        for position, step in enumerate(stage):
            paths[step.name] = ("steps", index, "parallel", position) if grouped else ("steps", index)
    return paths


class _Search:
    """Breadth first over canonical states: the first path found to a state is a shortest one."""

    def __init__(
        self,
        definition: SagaDefinition,
        machine: Machine | ModuleType,
        max_attempts: int,
        max_states: int,
        input: dict[str, Any],
    ) -> None:
        self.definition = definition
        self.machine = machine
        self.max_attempts = max_attempts
        self.max_states = max_states
        self.input = input
        self.steps = definition.all_steps
        self.stage_of = [(step, definition.stage_of(step.name)) for step in self.steps]
        self.reads_own = {
            step.name for step in self.steps if step.compensation is not None
            and any(c[:2] == ("steps", step.name) for _, c in context_reads(step.compensation.payload))
        }  # fmt: skip
        self.nodes: list[_Node] = []
        self.index: dict[tuple[Any, ...], int] = {}
        self.queue: deque[int] = deque()
        self.now = 0.0
        self.complete = True
        self.replies = _sample_replies(definition)
        self._events: dict[tuple[str, MessageKind, int, Outcome, str], ReplyReceived] = {}
        self.checks = Checks(definition, step_paths(definition))

    # ---- the search ----

    def run(self) -> None:
        try:
            decision = self.machine.start(self.definition, saga_id=SAGA_ID, input=self.input, now=self.now)
        except Exception as exc:  # a broken machine is a finding, not a crash of the explorer
            self.checks.violation(f"start raised {type(exc).__name__}: {exc}", tuple)
            return
        self.checks.transition(None, decision, None, tuple)
        self._node(decision.instance, decision.instance.deadline_at is not None, None)
        while self.queue:
            if len(self.nodes) > self.max_states:
                self.complete = False
                break
            self._expand(self.queue.popleft())

    def _node(self, instance: SagaInstance, deadline_pending: bool, parent: tuple[int, str] | None) -> int:
        pending = deadline_pending and instance.deadline_at is not None and instance.status is SagaStatus.RUNNING
        key = self._key(instance, pending)
        found = self.index.get(key)
        if found is not None:
            return found
        number = len(self.nodes)
        self.index[key] = number
        self.nodes.append(_Node(instance, pending, parent, frozenset(implied_timers(instance))))
        self.queue.append(number)
        self.checks.state(instance, lambda: self.witness(number))
        self._probe(number)
        return number

    def _key(self, instance: SagaInstance, deadline_pending: bool) -> tuple[Any, ...]:
        """What the machine's future depends on: statuses, attempts used while a step is in flight (capped for
        endless retries), which replies exist, whether a retriable step went out, and the pending deadline.

        Going back, a compensatable step of a stage above the one being compensated that failed, was compensated or
        never went out is finished with, whichever it was: the saga in which step 9 failed and the one in which
        step 7 did are one state once both compensate step 3."""
        saga_status = instance.status
        going_back = saga_status is SagaStatus.COMPENSATING or saga_status is SagaStatus.FAILED
        parts: list[Any] = [saga_status, instance.stage, deadline_pending]
        for step, stage in self.stage_of:
            state = instance.steps[step.name]
            status = state.status
            if going_back and stage > instance.stage and status in _FINISHED and step.kind is StepKind.COMPENSATABLE:
                parts.append(_FINISHED_KEY)
                continue
            used = 0
            if status is StepStatus.RUNNING or status is StepStatus.BACKOFF:
                used = state.attempt - state.attempt_offset
                if step.kind is StepKind.RETRIABLE:
                    used = min(used, self.max_attempts)
            elif status in COMPENSATION_IN_FLIGHT:
                used = state.compensation_attempt - state.compensation_attempt_offset
            sent = step.kind is StepKind.RETRIABLE and state.started_at is not None
            # Going back, only a step's own compensation can still read its reply (later steps are undone first,
            # siblings cannot read each other): whether it has one matters for no other step.
            reply = state.output is not None and (status not in _UNDOING or step.name in self.reads_own)
            parts.append((status, used, reply, sent))
        return tuple(parts)

    def witness(self, number: int) -> tuple[str, ...]:
        words: list[str] = []
        parent = self.nodes[number].parent
        while parent is not None:
            words.append(parent[1])
            parent = self.nodes[parent[0]].parent
        return tuple(reversed(words))

    def _decide(self, instance: SagaInstance, event: Event, where: Witness) -> Decision | None:
        self.now += 1.0
        try:
            return self.machine.decide(self.definition, instance, event, now=self.now)
        except Exception as exc:
            self.checks.violation(f"decide raised {type(exc).__name__}: {exc}", where)
            return None

    def _try(
        self, number: int, event: Event, label: str, *, operator: bool = False, instance: SagaInstance | None = None
    ) -> bool:
        """Decide `event` in state `number` (or on `instance`, a summarised form of it); True if it was applied."""
        node = self.nodes[number]
        before = instance or node.instance

        def where() -> tuple[str, ...]:
            return (*self.witness(number), label)

        decision = self._decide(before, event, where)
        if decision is None:
            return False
        timers = node.timers if instance is None else None
        self.checks.transition(before, decision, event, where, timers)
        deadline = isinstance(event, TimerFired) and event.timer is TimerKind.DEADLINE
        if decision.outcome != "applied":
            if decision.outcome == "rejected" and not operator:
                self.checks.violation(f"the machine refused an event the world can produce: {decision.reason}", where)
            if not deadline:
                return False
            label = f"{label} (ignored: {decision.reason})"  # the deadline timer is spent all the same
        target = self._node(decision.instance, node.deadline_pending and not deadline, (number, label))
        node.edges.append(Transition(label, target, operator))
        return True

    def _expand(self, number: int) -> None:
        node = self.nodes[number]
        instance = node.instance
        if instance.status.is_final:
            for event, label in self._operator_events(instance):
                if self._try(number, event, label, operator=True):
                    self.checks.violation(f"{instance.status} saga moved on when {label}", lambda: self.witness(number))
            return
        if instance.status is SagaStatus.FAILED:
            moved = [self._try(number, event, label, operator=True) for event, label in self._operator_events(instance)]
            if not any(moved):
                self.checks.violation("parked with no way out: the operator's retry, skip and abort are all refused",
                                      lambda: self.witness(number))  # fmt: skip
            return
        moved = []
        for step in self.steps:
            moved += [self._try(number, event, label) for event, label in self._world_events(step, instance)]
        summary = self._summaries(number, instance)
        moved += [self._try(number, event, label, instance=changed) for changed, event, label in summary]
        if node.deadline_pending:
            moved.append(self._try(number, self._timer(TimerKind.DEADLINE, None, 0), "the deadline passes"))
        if not any(moved):
            self.checks.violation(f"stuck: the saga is {instance.status} and nothing the world does moves it",
                                  lambda: self.witness(number))  # fmt: skip

    # ---- what can happen ----

    def _world_events(self, step: StepDefinition, instance: SagaInstance) -> Iterator[tuple[Event, str]]:
        state = instance.steps[step.name]
        name, status = step.name, state.status
        if status is StepStatus.RUNNING:
            yield self._reply(step, MessageKind.COMMAND, state.attempt, Outcome.SUCCESS, step.success_types[0]), \
                f"{name} ok"  # fmt: skip
            for failure in step.failure_types:
                yield self._reply(step, MessageKind.COMMAND, state.attempt, Outcome.FAILURE, failure), \
                    f"{name} fails ({failure})"  # fmt: skip
            yield self._timer(TimerKind.STEP_TIMEOUT, name, state.attempt), f"{name} times out"
            yield self._reply(step, MessageKind.COMMAND, state.attempt, Outcome.RETRY, f"{step.command}.retry"), \
                f"{name} asks to retry"  # fmt: skip
        elif status is StepStatus.BACKOFF and not self._summarised(step, state):
            yield (
                self._timer(TimerKind.STEP_RETRY, name, state.attempt),
                f"{name} retried (attempt {state.attempt + 1})",
            )
        elif status is StepStatus.COMPENSATING and step.compensation is not None:
            attempt = state.compensation_attempt
            success = step.compensation_success_types[0]
            yield self._reply(step, MessageKind.COMPENSATION, attempt, Outcome.SUCCESS, success), f"undo {name} ok"
            failed = f"{step.compensation.command}.failed"
            yield self._reply(step, MessageKind.COMPENSATION, attempt, Outcome.FAILURE, failed), f"undo {name} fails"
            yield self._timer(TimerKind.COMPENSATION_TIMEOUT, name, attempt), f"undo {name} times out"
        elif status is StepStatus.COMPENSATION_BACKOFF and not self._summarised(step, state):
            attempt = state.compensation_attempt
            yield (
                self._timer(TimerKind.COMPENSATION_RETRY, name, attempt),
                f"undo {name} retried (attempt {attempt + 1})",
            )

    def _summarised(self, step: StepDefinition, state: StepState) -> bool:
        return self._skip(step, state) > 0

    def _skip(self, step: StepDefinition, state: StepState) -> int:
        """How many attempts of a retry chain to pass over: those between `max_attempts` and the policy's last."""
        if state.status is StepStatus.BACKOFF and step.kind is not StepKind.RETRIABLE:
            used, limit = state.attempt - state.attempt_offset, step.retry.max_attempts
        elif state.status is StepStatus.COMPENSATION_BACKOFF:
            used = state.compensation_attempt - state.compensation_attempt_offset
            limit = self.definition.compensation_retry.max_attempts
        else:
            return 0
        return limit - 1 - used if used == self.max_attempts and limit - 1 > used else 0

    def _summaries(self, number: int, instance: SagaInstance) -> Iterator[tuple[SagaInstance, Event, str]]:
        """The middle of a long retry chain in one go: its attempts fail as the last explored one did, so the step
        is moved to its policy's last attempt and retried from there."""
        for step in self.steps:
            state = instance.steps[step.name]
            skip = self._skip(step, state)
            if not skip:
                continue
            if state.status is StepStatus.BACKOFF:
                moved = evolve(state, {"attempt": state.attempt + skip})
                last = moved.attempt + 1
                event = self._timer(TimerKind.STEP_RETRY, step.name, moved.attempt)
                label = f"{step.name} {_attempts(state.attempt + 1, last - 1)} (summarised), retried ({last})"
            else:
                moved = evolve(state, {"compensation_attempt": state.compensation_attempt + skip})
                last = moved.compensation_attempt + 1
                event = self._timer(TimerKind.COMPENSATION_RETRY, step.name, moved.compensation_attempt)
                first = state.compensation_attempt + 1
                label = f"undo {step.name} {_attempts(first, last - 1)} (summarised), retried ({last})"
            yield evolve(instance, {"steps": {**instance.steps, step.name: moved}}), event, label

    def _operator_events(self, instance: SagaInstance) -> Iterator[tuple[Event, str]]:
        yield OperatorCommand(action="retry", reason="explore", operator="explore"), "operator: retry"
        yield OperatorCommand(action="abort", reason="explore", operator="explore"), "operator: abort"
        stuck = STUCK_FORWARD | COMPENSATION_IN_FLIGHT
        for step in self.steps:
            if instance.steps[step.name].status in stuck:
                command = OperatorCommand(action="skip", step=step.name, reason="explore", operator="explore")
                yield command, f"operator: skip {step.name}"

    def _probe(self, number: int) -> None:
        """Replies the saga is not waiting for change nothing: a duplicate of the last reply of a step the
        transition here changed, or, while it is retried, one arriving late for the attempt before; on a settled
        saga, any reply at all."""
        node = self.nodes[number]
        instance = node.instance
        settled = instance.status.is_settled
        parent = self.nodes[node.parent[0]].instance.steps if node.parent is not None else {}
        for step in self.steps:
            state = instance.steps[step.name]
            if parent.get(step.name) is state and not settled:
                continue  # offered where it changed
            status = state.status
            offered = False
            attempts = (state.attempt - 1, state.attempt) if status is StepStatus.RUNNING else (state.attempt,)
            for attempt in attempts:
                if attempt >= 1 and (settled or status is not StepStatus.RUNNING or attempt != state.attempt):
                    offered = self._offer(number, step, MessageKind.COMMAND, attempt, state.attempt)
            attempt = state.compensation_attempt
            if attempt >= 1 and step.compensation is not None and (settled or status is not StepStatus.COMPENSATING):
                offered = self._offer(number, step, MessageKind.COMPENSATION, attempt, attempt)
            if settled and offered:
                return  # the machine ignores every reply to a settled saga alike: one is enough

    def _offer(self, number: int, step: StepDefinition, kind: MessageKind, attempt: int, current: int) -> bool:
        instance = self.nodes[number].instance
        if kind is MessageKind.COMPENSATION:
            reply = self._reply(step, kind, attempt, Outcome.SUCCESS, step.compensation_success_types[0])
            words = f"undo {step.name} ok again (attempt {attempt})"
        else:
            reply = self._reply(step, kind, attempt, Outcome.SUCCESS, step.success_types[0])
            words = f"{step.name} ok again (attempt {attempt})"

        def where() -> tuple[str, ...]:
            return (*self.witness(number), words)

        decision = self._decide(instance, reply, where)
        if decision is not None and decision.outcome == "applied":
            status = instance.steps[step.name].status
            answered = status in (StepStatus.SUCCEEDED, StepStatus.COMPENSATED) and attempt == current
            what = "a duplicate reply" if answered else "a late reply"
            self.checks.violation(f"{what} was applied: {words} while {step.name} is {status}", where)
        return True

    def _reply(
        self, step: StepDefinition, kind: MessageKind, attempt: int, outcome: Outcome, type_: str
    ) -> ReplyReceived:
        """The participant's reply (built once: the same events are offered from many states); a success of a
        command carries the sample data later payloads read."""
        key = (step.name, kind, attempt, outcome, type_)
        reply = self._events.get(key)
        if reply is None:
            causation = message_id(SAGA_ID, step.name, kind, attempt)
            command = kind is MessageKind.COMMAND and outcome is Outcome.SUCCESS
            data = dict(self.replies.get(step.name, {})) if command else {}
            reply = ReplyReceived(
                message_id=f"reply/{causation}/{outcome}", causation_id=causation, step=step.name, attempt=attempt,
                kind=kind, outcome=outcome, type=type_, data=data, reason="explore",
            )  # fmt: skip
            self._events[key] = reply
        return reply

    @staticmethod
    @functools.lru_cache(maxsize=65536)
    def _timer(kind: TimerKind, step: str | None, attempt: int) -> TimerFired:
        return TimerFired(timer_id=timer_id(SAGA_ID, kind, step, attempt), timer=kind, step=step, attempt=attempt)

    # ---- the result ----

    def result(self) -> Exploration:
        back, order = self._back_edges()
        counts = [0] * len(self.nodes)
        if self.nodes:
            counts[0] = 1
        for number in order:  # reverse post-order: a topological order once back edges are left out
            for position, edge in enumerate(self.nodes[number].edges):
                if (number, position) not in back:
                    counts[edge.target] += counts[number]
        reaches: list[frozenset[str]] = [frozenset()] * len(self.nodes)
        interned: dict[frozenset[str], frozenset[str]] = {}
        for number in reversed(order):
            label = _ending_label(self.nodes[number].instance)
            found = {label} if label is not None else set()
            for position, edge in enumerate(self.nodes[number].edges):
                if (number, position) not in back:
                    found |= reaches[edge.target]
            key = frozenset(found)
            reaches[number] = interned.setdefault(key, key)
        if self.complete:  # a step not reached yet is no finding when the search stopped early
            self.checks.coverage()
        self.checks.deadline_reach()
        return Exploration(
            definition=self.definition, states=len(self.nodes), transitions=sum(len(n.edges) for n in self.nodes),
            max_attempts=self.max_attempts, complete=self.complete, endings=self._endings(counts),
            violations=self.checks.violations(), findings=self.checks.findings(),
            _nodes=tuple(self.nodes), _back=frozenset(back), _reaches=tuple(reaches),
        )  # fmt: skip

    def _back_edges(self) -> tuple[set[tuple[int, int]], list[int]]:
        """Edges closing a loop (found by a depth-first walk), and the reverse post-order of that walk."""
        back: set[tuple[int, int]] = set()
        post: list[int] = []
        if not self.nodes:
            return back, post
        colour = [0] * len(self.nodes)  # 0 unseen, 1 on the stack, 2 done
        stack: list[tuple[int, int]] = [(0, 0)]
        colour[0] = 1
        while stack:
            number, position = stack[-1]
            edges = self.nodes[number].edges
            if position == len(edges):
                stack.pop()
                colour[number] = 2
                post.append(number)
                continue
            stack[-1] = (number, position + 1)
            target = edges[position].target
            if colour[target] == 1:
                back.add((number, position))
            elif colour[target] == 0:
                colour[target] = 1
                stack.append((target, 0))
        post.reverse()
        return back, post

    def _endings(self, counts: list[int]) -> tuple[Ending, ...]:
        labels = [_ending_label(node.instance) for node in self.nodes]
        reach = self._reachable(labels)
        found: dict[str, tuple[SagaStatus, int, int, dict[str, set[str]]]] = {}
        for number, label in enumerate(labels):
            if label is None:
                continue
            status, paths, first, outs = found.setdefault(label, (self.nodes[number].instance.status, 0, number, {}))
            found[label] = (status, paths + counts[number], first, outs)
            for edge in self.nodes[number].edges:
                if edge.operator:
                    outs.setdefault(edge.label.removeprefix("operator: "), set()).update(reach[edge.target])
        order = {"completed": 0, "compensated": 1}
        endings = [
            Ending(label, status, paths, self.witness(first),
                   tuple(WayOut(action, tuple(sorted(leads, key=lambda t: (order.get(t, 2), t))))
                         for action, leads in sorted(outs.items())))
            for label, (status, paths, first, outs) in found.items()
        ]  # fmt: skip
        return tuple(sorted(endings, key=lambda e: (order.get(e.label, 2), e.label)))

    def _reachable(self, labels: list[str | None]) -> list[set[str]]:
        """For every state, the endings reachable from it (a parked state counts as reached, not gone past)."""
        incoming: list[list[int]] = [[] for _ in self.nodes]
        for number, node in enumerate(self.nodes):
            for edge in node.edges:
                if not edge.operator:
                    incoming[edge.target].append(number)
        reach: list[set[str]] = [set() for _ in self.nodes]
        for label in {label for label in labels if label is not None}:
            pending = [n for n, own in enumerate(labels) if own == label]
            seen = set(pending)
            while pending:
                number = pending.pop()
                reach[number].add(label)
                for source in incoming[number]:
                    if source not in seen:
                        seen.add(source)
                        pending.append(source)
        return reach


def _attempts(first: int, last: int) -> str:
    return f"attempt {first} fails too" if first == last else f"attempts {first}-{last} fail too"


def _sample_replies(definition: SagaDefinition) -> dict[str, dict[str, Any]]:
    """The reply data the explorer answers with: every field some payload reads of a step, as the number 1 (a
    number suits the amounts and sums payloads compute; plain paths take anything)."""
    replies: dict[str, dict[str, Any]] = {}
    for step in definition.all_steps:
        mappings = [step.payload, step.compensation.payload if step.compensation else {}]
        for mapping in mappings:
            for _, chain in context_reads(mapping):
                if len(chain) >= 2 and chain[0] == "steps":
                    fields = replies.setdefault(chain[1], {})
                    if len(chain) >= 3:
                        fields[chain[2]] = 1
    return replies

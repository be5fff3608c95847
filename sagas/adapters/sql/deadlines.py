"""Step timeouts kept on the saga's own row, not as a timers row per step.

The machine emits a timer intent for every step timeout it arms (`TimerSpec`, kind ``step_timeout`` or
``compensation_timeout``) and cancels it when the step moves on. Written as timers rows, that is an upsert and a
delete in the timers table (and its two indexes) per step. The instance's row is rewritten at every step anyway, so
the store keeps a saga's pending timeouts there instead: ``step_timeouts`` (JSON, ``[[kind, step, attempt, due_at],
...]`` soonest first), ``step_deadline`` (the soonest due time, NULL when none, in a partial index) and
``deadline_claimed_until`` (the claim's lease, as ``timers.claimed_until``). Retry backoffs and saga deadlines stay
rows of the timers table.

What a unit of work leaves on a row is what it would leave in the timers table: the timeouts stored that it does
not cancel (a fired timer is consumed whatever was decided), then those it sets. The stored ones are read first
only when the saga's final state in the unit implies a timeout the unit neither sets nor cancels (a parallel
step's; `implied`: a RUNNING step its timeout at its attempt, a COMPENSATING step its compensation's): the machine
cancels every timer its new state no longer implies, so otherwise none of the stored ones survives the unit, and
the row needs no read. A saga whose timeouts the unit does not touch keeps its columns as they are, claim included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from sagas.engine.state import SagaInstance, StepStatus, TimerKind, TimerSpec, timer_id, trusted

ON_ROW = frozenset({TimerKind.STEP_TIMEOUT, TimerKind.COMPENSATION_TIMEOUT})
"""The timer kinds kept on the instance's row."""
_MARKERS = tuple((kind, f"/timer/{kind}/") for kind in ON_ROW)


def implied(instance: SagaInstance) -> set[str]:
    """The ids of the step timeouts `instance`'s state implies (the machine's `_live_timers`, timeouts only)."""
    if instance.status.is_settled:
        return set()
    ids: set[str] = set()
    saga_id = instance.id
    for name, state in instance.steps.items():
        status = state.status
        if status is StepStatus.RUNNING:
            ids.add(timer_id(saga_id, TimerKind.STEP_TIMEOUT, name, state.attempt))
        elif status is StepStatus.COMPENSATING:
            ids.add(timer_id(saga_id, TimerKind.COMPENSATION_TIMEOUT, name, state.compensation_attempt))
    return ids


def saga_of(timer: str) -> str | None:
    """The saga id of a timeout's timer id; None for any other timer."""
    for kind, marker in _MARKERS:
        at = timer.rfind(marker)
        if at > 0:
            step, _, attempt = timer[at + len(marker):].rpartition("/")
            saga_id = timer[:at]
            if attempt.isdigit() and timer_id(saga_id, kind, step, int(attempt)) == timer:
                return saga_id
    return None


def encode(specs: Iterable[TimerSpec]) -> tuple[float | None, str | None]:
    """`step_deadline` and `step_timeouts` for these timeouts (NULL, NULL for none)."""
    ordered = sorted(specs, key=lambda s: (s.due_at, s.id))
    if not ordered:
        return None, None
    text = orjson.dumps([[str(s.timer), s.step, s.attempt, s.due_at] for s in ordered]).decode()
    return ordered[0].due_at, text


def decode(saga_id: str, text: str | None) -> list[TimerSpec]:
    """The timeouts of a ``step_timeouts`` value."""
    if not text:
        return []
    specs: list[TimerSpec] = []
    for kind_name, step, attempt, due_at in orjson.loads(text):
        kind = TimerKind(kind_name)
        specs.append(trusted(TimerSpec, {
            "id": timer_id(saga_id, kind, step, attempt), "saga_id": saga_id, "timer": kind, "step": step,
            "attempt": int(attempt), "due_at": float(due_at),
        }))  # fmt: skip
    return specs


@dataclass
class Plan:
    """How a unit of work's timer intents are written."""

    rows: list[TimerSpec] = field(default_factory=list)
    """Timers for the timers table (every kind not in `ON_ROW`)."""
    row_cancels: list[str] = field(default_factory=list)
    """Ids to delete from the timers table."""
    written: dict[str, tuple[SagaInstance, list[TimerSpec], set[str]]] = field(default_factory=dict)
    """Sagas the unit writes whose timeouts it touches: final instance, timeouts set, timeout ids cancelled."""
    elsewhere: dict[str, tuple[list[TimerSpec], set[str]]] = field(default_factory=dict)
    """Sagas the unit does not write whose timeouts it sets or cancels (a fired timeout that changed nothing)."""

    def needs_stored(self, inserted: set[str]) -> list[str]:
        """The updated sagas whose stored timeouts decide what their row keeps (`inserted`: ids new in the unit)."""
        needed = []
        for saga_id, (instance, sets, cancels) in self.written.items():
            if saga_id not in inserted and implied(instance) - {s.id for s in sets} - cancels:
                needed.append(saga_id)
        return sorted(needed)

    def values(self, stored: dict[str, str | None]) -> dict[str, tuple[float | None, str | None]]:
        """`step_deadline` and `step_timeouts` of each written saga, given the stored ones read for
        `needs_stored`: those stored that the unit does not cancel, then those it sets."""
        return {
            saga_id: edited(saga_id, stored.get(saga_id), sets, cancels)
            for saga_id, (_, sets, cancels) in self.written.items()
        }


def plan(
    timers: Sequence[TimerSpec], cancels: Sequence[str], written: dict[str, SagaInstance]
) -> Plan:
    """Sort a unit's timer intents; `written` is each saga the unit inserts or updates, at its last version."""
    result = Plan()
    for timer in cancels:
        saga_id = saga_of(timer)
        if saga_id is None:
            result.row_cancels.append(timer)
        elif saga_id in written:
            _entry(result, saga_id, written[saga_id])[2].add(timer)
        else:
            result.elsewhere.setdefault(saga_id, ([], set()))[1].add(timer)
    for spec in timers:
        if spec.timer not in ON_ROW:
            result.rows.append(spec)
        elif spec.saga_id in written:
            _entry(result, spec.saga_id, written[spec.saga_id])[1].append(spec)
        else:
            result.elsewhere.setdefault(spec.saga_id, ([], set()))[0].append(spec)
    return result


def _entry(
    result: Plan, saga_id: str, instance: SagaInstance
) -> tuple[SagaInstance, list[TimerSpec], set[str]]:
    entry = result.written.get(saga_id)
    if entry is None:
        entry = result.written[saga_id] = (instance, [], set())
    return entry


def edited(
    saga_id: str, stored: str | None, sets: list[TimerSpec], cancels: set[str]
) -> tuple[float | None, str | None]:
    """A row's timeouts after a unit that does not write the saga set or cancelled some (cancels first)."""
    kept = {s.id: s for s in decode(saga_id, stored) if s.id not in cancels}
    kept.update((s.id, s) for s in sets)
    return encode(kept.values())

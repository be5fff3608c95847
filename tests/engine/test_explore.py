"""`sagas explore` over the real pure core, and over copies of it broken on purpose (the mutation tests)."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from sagas.definitions import load_file, load_python, loads
from sagas.definitions.model import SagaDefinition, StepKind
from sagas.engine import machine
from sagas.engine.explore import Exploration
from sagas.engine.state import (
    Event,
    MessageKind,
    ReplyReceived,
    SagaInstance,
    SagaStatus,
    StepStatus,
    evolve,
)
from sagas.testing import explore
from tests.definitions.support import SAMPLES, VALID_YAML
from tests.engine.machine_support import group, saga, step
from tests.engine.support import three_steps
from tests.engine.test_machine_properties import definitions

_copies = itertools.count()


def mutant(change: Callable[[ModuleType], None]) -> ModuleType:
    """A private copy of `sagas.engine.machine` changed by `change`; the real module is left alone."""
    name = f"_explore_mutant_{next(_copies)}"
    spec = importlib.util.spec_from_file_location(name, machine.__file__)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the copy is executed
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    change(module)
    return module


def violations(result: Exploration) -> list[str]:
    return [v.message for v in result.violations]


def caught(result: Exploration, fragment: str) -> tuple[str, ...]:
    """The witness of the violation whose message holds `fragment` (failing with all of them if none does)."""
    for violation in result.violations:
        if fragment in violation.message:
            assert violation.witness, "a violation comes with the path that shows it"
            return violation.witness
    raise AssertionError(f"no violation mentions {fragment!r}: {violations(result)}")


LINEAR = saga(step("a"), step("b"), step("p", kind=StepKind.PIVOT), step("r", kind=StepKind.RETRIABLE), deadline=60.0)
GROUPED = saga(step("a"), group("g", step("b"), step("c")), step("d"), deadline=60.0)


# ---- the real machine ----


@pytest.mark.parametrize("definition", [LINEAR, GROUPED], ids=["linear", "grouped"])
def test_the_real_machine_breaks_no_invariant(definition: SagaDefinition) -> None:
    """Explored exhaustively, the real machine ends every path completed, compensated or parked with a way out."""
    result = explore(definition)
    assert result.complete
    assert violations(result) == []
    assert {"completed", "compensated"} <= {e.label for e in result.endings}
    for park in result.parks:
        assert park.ways_out, f"{park.label} has no way out"
        assert park.paths > 0


def test_every_interleaving_of_a_parallel_group_is_a_path() -> None:
    """Both orders in which two group members can succeed lead to the completed ending (and are counted)."""
    result = explore(saga(group("g", step("b"), step("c"))))
    successes = [
        tuple(w for w in words if w.endswith(" ok"))
        for words, _ in result.paths("completed")
        if all(w.endswith(" ok") for w in words)
    ]
    assert ("b ok", "c ok") in successes
    assert ("c ok", "b ok") in successes


def test_the_report_names_each_ending_with_a_shortest_witness_in_words() -> None:
    """The compensated ending's witness is a shortest path: the second step declined, the first undone."""
    result = explore(saga(step("hold_flight"), step("hold_room")))
    compensated = result.ending("compensated")
    assert compensated.witness == ("hold_room fails (hold_room.do.failed)",) or compensated.witness == (
        "hold_flight fails (hold_flight.do.failed)",
    )
    witnesses = [w for w, _ in result.paths("compensated") if "hold_room fails (hold_room.do.failed)" in w]
    assert ("hold_flight ok", "hold_room fails (hold_room.do.failed)", "undo hold_flight ok") in witnesses


def test_a_parked_pivot_lists_the_operators_ways_out() -> None:
    """A pivot with no definite answer parks; retry, skip and abort each lead somewhere the issue promises."""
    result = explore(LINEAR)
    park = result.ending("parked: p unknown")
    ways = {w.action: set(w.leads_to) for w in park.ways_out}
    assert "completed" in ways["skip p"]
    assert "compensated" in ways["abort"]
    assert "completed" in ways["retry"]
    assert park.witness[-1] in ("p asks to retry", "p times out")


def test_long_retry_chains_are_summarised_not_enumerated() -> None:
    """A policy of 50 attempts is explored as 2 attempts plus one summarised transition, and still exhausts."""
    from sagas.definitions.model import RetryPolicy

    long = RetryPolicy(max_attempts=50, initial_backoff=1.0, max_backoff=1.0, jitter=0.0)
    result = explore(saga(step("a", retry=long), step("p", kind=StepKind.PIVOT, retry=long)), max_attempts=2)
    assert result.complete
    assert violations(result) == []
    assert result.states < 200
    park = result.ending("parked: p unknown")
    assert any("attempts 3-49 fail too (summarised)" in w for w in park.witness)


@pytest.mark.parametrize("form", ["saga.yaml", "saga_dsl.py"])
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_the_samples_explore_with_no_violation(sample: str, form: str) -> None:
    """Both samples, in both forms, break no invariant and have no error-level finding."""
    file = SAMPLES[sample] / form
    (definition,) = [load_file(file)] if form.endswith(".yaml") else load_python(file)
    result = _explored_once(definition)
    assert result.ok, (violations(result), result.findings)
    assert {"completed", "compensated"} <= {e.label for e in result.endings}


_EXPLORED: dict[str, Exploration] = {}


def _explored_once(definition: SagaDefinition) -> Exploration:
    """Both forms of a sample have one digest (a test pins it): explore each content once."""
    if definition.digest not in _EXPLORED:
        _EXPLORED[definition.digest] = explore(definition)
    return _EXPLORED[definition.digest]


@pytest.mark.parametrize(
    "definition",
    [three_steps(), three_steps(deadline=60.0, max_attempts=1, comp_attempts=1), loads(VALID_YAML)],
    ids=["three_steps", "three_steps_deadline", "valid_yaml"],
)
def test_the_test_definitions_explore_with_no_violation(definition: SagaDefinition) -> None:
    """The definitions the engine's own tests use break no invariant on any path."""
    result = explore(definition)
    assert result.complete
    assert violations(result) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definitions(failing_payloads=True))
def test_generated_definitions_explore_without_error(definition: SagaDefinition) -> None:
    """Any definition the property tests generate is explored to the end, with no violation and no crash."""
    result = explore(definition, max_attempts=1, input={"n": 7})
    assert result.complete
    assert violations(result) == []
    assert result.endings


# ---- findings ----


def test_a_compensation_reading_the_reply_of_a_step_that_can_time_out_is_an_error_at_the_mapping() -> None:
    """`steps.reserve.id` in reserve's own compensation is missing once reserve timed out: an error, located."""
    result = explore(loads(VALID_YAML))
    (finding,) = [f for f in result.findings if f.severity == "error"]
    assert finding.path == ("steps", 0, "compensation", "payload", "reservation")
    assert "steps.reserve" in finding.message
    assert "no definite answer" in finding.message
    assert not result.ok
    assert finding.witness[-1] in ("reserve asks to retry", "reserve times out")


def test_reading_the_reply_of_a_skipped_step_is_a_warning() -> None:
    """A step after a pivot an operator skipped without an output reads nothing: a warning, not an error."""
    definition = saga(
        step("a"), step("p", kind=StepKind.PIVOT), step("r", kind=StepKind.RETRIABLE, payload={"id": "steps.p.id"})
    )
    result = explore(definition)
    (finding,) = result.findings
    assert (finding.severity, finding.path) == ("warning", ("steps", 2, "payload", "id"))
    assert finding.witness[-1] == "operator: skip p"
    assert result.ok


# ---- mutation tests: machines broken on purpose are caught, each with a witness ----


def _upward(m: ModuleType) -> None:
    """Compensate from the first stage up instead of from the failed stage down."""

    def begin(txn: Any, reason: str) -> None:
        txn.status, txn.failure, txn.stage = SagaStatus.COMPENSATING, reason, 0
        txn.record("saga.compensating", reason=reason, stage=0)
        advance(txn)

    def advance(txn: Any) -> None:
        while True:
            stage = txn.stage_steps()
            if any(txn.steps[s.name].status in m._COMPENSATION_IN_FLIGHT for s in stage):
                return
            targets = [s for s in stage if m._needs_compensation(s, txn.steps[s.name])]
            if targets:
                for target in targets:
                    m._send_compensation(txn, target, txn.steps[target.name].compensation_attempt + 1)
                return
            if txn.stage == len(txn.definition.stages) - 1:
                break
            txn.stage += 1
        txn.status = SagaStatus.COMPENSATED
        txn.record("saga.compensated", failure=txn.failure)

    m._begin_compensation, m._advance_compensation = begin, advance


def test_mutant_compensation_order_swapped_is_caught() -> None:
    """Undoing the first step before the second (which completed after it) is reported with its path."""
    definition = saga(step("a"), step("b"), step("c"))
    assert violations(explore(definition)) == []
    witness = caught(explore(definition, machine=mutant(_upward)), "reverse order of completion")
    assert witness[:2] == ("a ok", "b ok")


def test_mutant_compensating_past_the_pivot_is_caught() -> None:
    """A machine that forgets the point of no return compensates after the pivot succeeded: caught."""

    def no_pivot(m: ModuleType) -> None:
        m._no_way_back = lambda txn: None

    original = machine._no_way_back
    witness = caught(explore(LINEAR, machine=mutant(no_pivot)), "the pivot p succeeded")
    assert "p ok" in witness
    assert machine._no_way_back is original, "the real machine is left alone"
    assert violations(explore(LINEAR)) == []


def test_mutant_applying_a_duplicate_reply_twice_is_caught() -> None:
    """A machine that applies a reply again to a step that already succeeded is caught by the duplicate probe."""

    def twice(m: ModuleType) -> None:
        real = m.decide

        def decide(definition: SagaDefinition, instance: SagaInstance, event: Event, *, now: float) -> Any:
            state = instance.steps.get(event.step) if isinstance(event, ReplyReceived) else None
            if (
                state is not None
                and isinstance(event, ReplyReceived)
                and event.kind is MessageKind.COMMAND
                and state.status is StepStatus.SUCCEEDED
                and not instance.status.is_settled
            ):
                running = evolve(state, {"status": StepStatus.RUNNING})
                instance = evolve(instance, {"steps": {**instance.steps, event.step: running}})
            return real(definition, instance, event, now=now)

        m.decide = decide

    witness = caught(explore(GROUPED, machine=mutant(twice)), "a duplicate reply was applied")
    assert witness[-1].endswith("ok again (attempt 1)")


def test_mutant_parked_state_with_no_way_out_is_caught() -> None:
    """A machine refusing both retry and skip on a saga parked in compensation leaves it stuck: caught."""

    def stuck(m: ModuleType) -> None:
        retry, skip = m._operator_retry, m._operator_skip
        m._operator_retry = lambda txn, event: "refused" if m._parked_in_compensation(txn) else retry(txn, event)
        m._operator_skip = lambda txn, event: "refused" if m._parked_in_compensation(txn) else skip(txn, event)

    witness = caught(explore(LINEAR, machine=mutant(stuck)), "parked with no way out")
    assert witness[-1].startswith("undo ")
    assert witness[-1].endswith(("fails", "times out"))


def test_mutant_skipping_the_compensation_of_a_timed_out_step_is_caught() -> None:
    """A machine that does not undo a step whose outcome is unknown (it timed out) is caught at "compensated"."""

    def forget_unknown(m: ModuleType) -> None:
        m._TO_COMPENSATE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})

    witness = caught(explore(LINEAR, machine=mutant(forget_unknown)), "(unknown) was never undone")
    assert any("times out" in w or "deadline" in w for w in witness)


def test_a_machine_that_raises_is_a_violation_not_a_crash() -> None:
    """An exception from the machine under exploration is reported with the path that triggers it."""

    def explode(m: ModuleType) -> None:
        def fail(txn: Any, reason: str) -> None:
            raise RuntimeError("boom")

        m._begin_compensation = fail

    result = explore(saga(step("a"), step("b")), machine=mutant(explode))
    assert caught(result, "decide raised RuntimeError: boom")
    assert violations(explore(saga(step("a"), step("b")))) == []


def test_attempts_the_deadline_always_cuts_off_are_a_warning_at_the_retry_policy() -> None:
    """Five attempts of 10 s each cannot all go out within a 20 s deadline: the explorer says how many can."""
    from sagas.definitions.model import RetryPolicy

    five = RetryPolicy(max_attempts=5, initial_backoff=1.0, multiplier=1.0, max_backoff=1.0, jitter=0.0)
    result = explore(saga(step("a", retry=five, timeout=10.0), step("b"), deadline=20.0))
    (finding,) = [f for f in result.findings if f.path == ("steps", 0, "retry", "max_attempts")]
    assert finding.severity == "warning"
    assert "attempt 3 of a goes out 22s after it starts at the earliest" in finding.message
    assert "only 2 of its 5 attempts can ever be sent" in finding.message
    assert result.ok


def test_a_payload_the_sample_data_cannot_render_is_a_warning_not_a_missing_step() -> None:
    """`length(steps.a.v)` fails on the explorer's sample reply (v = 1): a warning, and b unsent is no error."""
    result = explore(saga(step("a"), step("b", payload={"n": "length(steps.a.v)"})))
    assert violations(result) == []
    assert {f.severity for f in result.findings} == {"warning"}
    paths = {f.path for f in result.findings}
    assert ("steps", 1, "payload") in paths
    assert any("sent on no path with the explorer's sample data" in f.message for f in result.findings)
    assert result.ok


def test_mutant_compensating_a_failed_step_is_caught() -> None:
    """A business failure has no effect: a machine that undoes the failed step anyway is caught."""

    def undo_failed(m: ModuleType) -> None:
        m._TO_COMPENSATE = m._TO_COMPENSATE | {StepStatus.FAILED}

    witness = caught(explore(LINEAR, machine=mutant(undo_failed)), "a was compensated although it failed")
    assert witness[0].startswith("a fails")


def test_mutant_forgetting_a_step_timeout_is_caught() -> None:
    """A machine that sends a command without its timeout timer would wait for ever: caught at the send."""

    def no_timeout(m: ModuleType) -> None:
        real = m._Txn.timer

        def timer(txn: Any, kind: Any, *args: Any) -> None:
            if kind is not m.TimerKind.STEP_TIMEOUT:
                real(txn, kind, *args)

        m._Txn.timer = timer

    result = explore(saga(step("a"), step("b")), machine=mutant(no_timeout))
    assert caught(result, "a timer that was never set: ['explore/timer/step_timeout/b/1']") == ("a ok",)

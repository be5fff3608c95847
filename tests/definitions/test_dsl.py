"""The Python DSL builds the same model as YAML and reports mistakes at the line of the call."""

from __future__ import annotations

import inspect

import pytest

from sagas.definitions import SagaBuilder, StepKind, literal, loads, saga
from sagas.errors import DefinitionError
from tests.definitions.support import VALID_YAML


def shop() -> SagaBuilder:
    return (
        saga("shop", 1)
        .step("reserve")
        .invoke("inventory", "inventory.reserve", {"sku": "input.sku"})
        .with_compensation("inventory.release", {"reservation": "steps.reserve.id"})
        .step("charge")
        .pivot()
        .invoke("payments", "payment.charge", {"amount": "input.amount", "reservation": "steps.reserve.id"})
    )


def test_dsl_and_yaml_give_equal_models_with_defaults_filled_the_same_way() -> None:
    """A DSL definition equals the YAML one, including every default the model fills in."""
    built = shop().build()
    assert built == loads(VALID_YAML)
    assert built.step("reserve").success_types == ("inventory.reserve.succeeded",)
    assert built.step("reserve").command_topic == "inventory.commands"


def test_literal_marks_a_value_as_data() -> None:
    """literal() wraps a value so the renderer returns it unchanged instead of evaluating it."""
    definition = (
        saga("lit", 1)
        .step("only")
        .retriable()
        .invoke("p", "c.do", {"currency": literal("input.currency"), "n": 3})
        .build()
    )
    assert definition.step("only").payload == {"currency": {"literal": "input.currency"}, "n": 3}


def test_every_option_reaches_the_model() -> None:
    """Saga- and step-level options set through the builder appear in the model, durations converted."""
    definition = (
        saga("full", 2, description="all options")
        .input_schema({"type": "object"})
        .deadline("5m")
        .compensation_retry(max_attempts=7, initial_backoff="250ms", multiplier=3, max_backoff="1m", jitter=0)
        .parallel("group")
        .step("a")
        .invoke("pa", "a.do", topic="custom.topic")
        .replies(success=["a.ok"], failure=["a.no"])
        .timeout("10s")
        .retry(max_attempts=2, initial_backoff=0.5)
        .with_compensation("a.undo")
        .step("b")
        .invoke("pb", "b.do")
        .with_compensation("b.undo")
        .end_parallel()
        .step("c")
        .kind("pivot")
        .invoke("pc", "c.do", {"a": "steps.a.x", "b": "steps.b.y"})
        .build()
    )
    a = definition.step("a")
    assert (definition.deadline, definition.compensation_retry.initial_backoff) == (300.0, 0.25)
    assert definition.compensation_retry.max_attempts == 7
    assert (a.command_topic, a.success_types, a.failure_types) == ("custom.topic", ("a.ok",), ("a.no",))
    assert a.timeout == 10.0
    assert (a.retry.max_attempts, a.retry.initial_backoff) == (2, 0.5)
    assert [len(stage) for stage in definition.stages] == [2, 1]
    assert definition.step("c").kind is StepKind.PIVOT


def test_problems_point_at_the_line_of_the_offending_call() -> None:
    """A DSL mistake is reported with this file and the line and column of the call that made it."""
    builder = saga("bad", 1).step("first").invoke("p", "first.do")
    line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
    builder.step("second").invoke("p", "second.do", {"x": "steps.third.x"}).retriable()
    with pytest.raises(DefinitionError) as caught:
        builder.build()
    by_path = {p.path: p for p in caught.value.problems}
    assert set(by_path) == {"steps[0].compensation", "steps[1].payload.x"}
    compensation = by_path["steps[0].compensation"]
    assert compensation.file == __file__
    assert "needs a compensation" in compensation.message
    reference = by_path["steps[1].payload.x"]
    assert (reference.file, reference.line) == (__file__, line)
    assert reference.column is not None
    assert reference.column > 1
    assert "no step named 'third'" in reference.message


def test_usage_mistakes_are_collected_and_raised_by_build() -> None:
    """Calling step methods before step(), or one twice, is reported by build() with everything else."""
    builder = saga("usage", 1).timeout("5s").step("a").invoke("p", "a.do").pivot().retriable()
    with pytest.raises(DefinitionError) as caught:
        builder.build()
    messages = [p.message for p in caught.value.problems]
    assert "timeout() must follow step(name)" in messages
    assert "kind() called twice for step 'a'" in messages
    assert all(p.file == __file__ and p.line for p in caught.value.problems)


def test_model_validation_errors_keep_dsl_paths() -> None:
    """Type and range errors from the model come back with the same field paths as for YAML."""
    with pytest.raises(DefinitionError) as caught:
        saga("types", 0).step("a").invoke("p", "a.do").timeout("soon").retriable().build()
    paths = {p.path for p in caught.value.problems}
    assert paths == {"version", "steps[0].timeout"}


def test_build_is_repeatable_and_does_not_share_state() -> None:
    """Two build() calls give equal, independent models; mutating the input dicts later changes neither."""
    payload = {"sku": "input.sku"}
    builder = saga("again", 1).step("a").retriable().invoke("p", "a.do", payload)
    first = builder.build()
    payload["sku"] = "input.other"
    assert builder.build() == first
    assert first.step("a").payload == {"sku": "input.sku"}


def test_end_parallel_without_parallel_is_reported() -> None:
    """Closing a group that was never opened is a usage problem, not a silent no-op."""
    with pytest.raises(DefinitionError, match=r"end_parallel\(\) without parallel\(\)"):
        saga("g", 1).step("a").retriable().invoke("p", "a.do").end_parallel().build()

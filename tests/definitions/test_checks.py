"""Static checks: which context fields a mapping may read, and the order of step kinds."""

from __future__ import annotations

import pytest

from sagas.definitions import SagaBuilder, loads, saga
from sagas.errors import DefinitionError


def three_stages(expression: str, *, in_compensation: bool = False) -> SagaBuilder:
    """first -> (left | right) -> last, with `expression` mapped in right's payload or compensation."""
    mapping = {"value": expression}
    builder = (
        saga("refs", 1)
        .step("first")
        .invoke("p", "first.do")
        .with_compensation("first.undo")
        .parallel("pair")
        .step("left")
        .invoke("p", "left.do")
        .with_compensation("left.undo")
        .step("right")
        .invoke("p", "right.do", None if in_compensation else mapping)
        .with_compensation("right.undo", mapping if in_compensation else None)
        .end_parallel()
        .step("last")
        .pivot()
        .invoke("p", "last.do")
    )
    return builder


def messages(builder: SagaBuilder) -> list[str]:
    try:
        builder.build()
    except DefinitionError as exc:
        return [p.message for p in exc.problems]
    return []


@pytest.mark.parametrize(
    "expression",
    [
        "input.a",
        "input",
        "steps.first.order_id",
        "steps.first.items[*].sku",
        "steps.first.items[0].sku",
        "input.items[?price > `3`].name",
        "sort_by(input.items, &price)[0]",
        "{a: input.a, b: steps.first.b}",
        "[input.a, saga.id]",
        "input.a || steps.first.a",
        "input | items",
        "length(steps.first.items)",
        "saga.name",
        "@.input.a",
        "`42`",
        "'text'",
        'steps."first".x',
    ],
)
def test_expressions_reading_the_input_earlier_steps_and_saga_are_accepted(expression: str) -> None:
    """Every JMESPath shape that reads only input, earlier steps or saga metadata passes."""
    assert messages(three_stages(expression)) == []


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("steps.last.x", "step 'last' runs after 'right'"),
        ("steps.left.x", "step 'left' runs in parallel with 'right'"),
        ("steps.right.x", "cannot read its own reply"),
        ("steps.frist.x", "no step named 'frist'; did you mean 'first'?"),
        ("steps.*.x", "name the step whose reply you read"),
        ("steps", "name the step whose reply you read"),
        ("imput.a", "unknown root 'imput'"),
        ("saga.owner", "saga has only id, name and version"),
        ("@", "'@' reads the whole context"),
        ("length(steps.last)", "step 'last' runs after 'right'"),
        ("{a: input.a, b: steps.last.b}", "step 'last' runs after 'right'"),
        ("input.a || steps.last.a", "step 'last' runs after 'right'"),
        ("steps.last.items[0].sku", "step 'last' runs after 'right'"),
        ("steps.last | x", "step 'last' runs after 'right'"),
        ("input.a[", "invalid JMESPath"),
        ("", "cannot be empty"),
    ],
)
def test_expressions_reading_anything_else_are_refused(expression: str, expected: str) -> None:
    """Later steps, parallel siblings, unknown roots and broken syntax are each reported with a reason."""
    found = messages(three_stages(expression))
    assert len(found) == 1
    assert expected in found[0]


def test_a_compensation_may_read_its_own_steps_reply() -> None:
    """A compensation payload may read the reply of the step it undoes, unlike the step's own payload."""
    assert messages(three_stages("steps.right.id", in_compensation=True)) == []
    assert "runs after" in messages(three_stages("steps.last.id", in_compensation=True))[0]


def test_expressions_inside_filters_read_elements_not_the_context() -> None:
    """Names inside a projection or filter refer to list elements, so they are not checked as roots."""
    assert messages(three_stages("input.items[?steps == `1`].anything")) == []
    assert messages(three_stages("input.items[*].whatever.deeper")) == []


def test_nested_mappings_and_lists_are_checked_leaf_by_leaf() -> None:
    """Every leaf of nested payload mappings and lists is checked, and literals are left alone."""
    builder = (
        saga("nest", 1)
        .step("a")
        .retriable()
        .invoke("p", "a.do", {"outer": {"list": ["input.x", "steps.zz.y", {"literal": "steps.zz"}]}, "n": None})
    )
    with pytest.raises(DefinitionError) as caught:
        builder.build()
    (problem,) = caught.value.problems
    assert problem.path == "steps[0].payload.outer.list[1]"


def test_payload_values_that_are_not_json_are_refused() -> None:
    """A Python object in a DSL payload is refused: payloads are JSON-like data, nothing callable."""
    with pytest.raises(DefinitionError, match="; got builtin_function_or_method"):
        saga("obj", 1).step("a").retriable().invoke("p", "a.do", {"f": len}).build()
    with pytest.raises(DefinitionError, match="literal must be JSON"):
        saga("obj", 1).step("a").retriable().invoke("p", "a.do", {"f": {"literal": {1, 2}}}).build()


KIND_ORDER = [
    (["compensatable", "pivot", "retriable"], []),
    (["compensatable", "compensatable"], []),
    (["pivot", "retriable", "retriable"], []),
    (["retriable", "retriable"], []),
    (["compensatable", "retriable"], []),
    (["pivot", "compensatable"], ["after the pivot"]),
    (["pivot", "pivot"], ["a second pivot"]),
    (["retriable", "compensatable"], ["after retriable step"]),
    (["retriable", "pivot"], ["pivot 's1' after retriable step"]),
]


@pytest.mark.parametrize(("kinds", "expected"), KIND_ORDER, ids=["-".join(k) for k, _ in KIND_ORDER])
def test_kinds_come_in_order_compensatable_pivot_retriable(kinds: list[str], expected: list[str]) -> None:
    """Compensatable steps come first, then at most one pivot, then retriable steps; anything else is reported."""
    builder = saga("kinds", 1)
    for index, kind in enumerate(kinds):
        builder.step(f"s{index}").invoke("p", f"s{index}.do").kind(kind)
        if kind == "compensatable":
            builder.with_compensation(f"s{index}.undo")
    found = messages(builder)
    assert len(found) == len(expected)
    for message, fragment in zip(found, expected, strict=True):
        assert fragment in message


def test_a_parallel_group_may_not_mix_compensatable_and_retriable_steps() -> None:
    """A group is undone as a whole or retried as a whole, so mixing the two kinds is refused."""
    builder = (
        saga("mix", 1)
        .parallel("g")
        .step("a")
        .invoke("p", "a.do")
        .with_compensation("a.undo")
        .step("b")
        .invoke("p", "b.do")
        .retriable()
        .end_parallel()
    )
    (message,) = messages(builder)
    assert "mixes compensatable and retriable" in message


def test_a_group_name_may_not_repeat_a_step_name() -> None:
    """Group names share the namespace of step names, so graphs and messages stay unambiguous."""
    builder = (
        saga("names", 1)
        .step("a")
        .retriable()
        .invoke("p", "a.do")
        .parallel("a")
        .step("b")
        .retriable()
        .invoke("p", "b.do")
        .step("c")
        .retriable()
        .invoke("p", "c.do")
    )
    (message,) = messages(builder)
    assert "duplicate step name 'a'" in message


def test_all_problems_are_reported_at_once_across_kinds_of_check() -> None:
    """A file with a type error, a typo and a cross-step error reports all three in one run, in line order."""
    text = """\
name: several
version: one
steps:
  - name: a
    participant: p
    command: a.do
    kind: retriable
    payload: {x: steps.b.y}
    tiemout: 5s
  - name: b
    participant: p
    command: b.do
    kind: retriable
"""
    with pytest.raises(DefinitionError) as caught:
        loads(text, "several.yaml")
    assert [(p.line, p.path) for p in caught.value.problems] == [
        (2, "version"),
        (8, "steps[0].payload.x"),
        (9, "steps[0].tiemout"),
    ]

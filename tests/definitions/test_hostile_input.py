"""Definitions written carelessly or on purpose to break the reader: each gets a located problem, never a crash,
a hang, a network request or a definition that passes the checks and then fails at run time."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagas.cli import app
from sagas.definitions import DefinitionRegistry, SagaDefinition, checks, load_python, loads, saga
from sagas.definitions.expressions import render_payload
from sagas.errors import DefinitionError, UnknownDefinition
from tests.definitions.support import SAMPLES, VALID_YAML


def problems_of(text: str) -> list[str]:
    with pytest.raises(DefinitionError) as caught:
        loads(textwrap.dedent(text), "t.yaml")
    return [str(problem) for problem in caught.value.problems]


def one_step(payload: str = "{v: input.v}", **extra: str) -> str:
    more = "".join(f"\n    {key}: {value}" for key, value in extra.items())
    return f"""\
name: s
version: 1
steps:
  - name: a
    participant: p
    command: a.do
    payload: {payload}
    compensation: {{command: a.undo}}{more}
"""


def test_a_yaml_directive_is_read() -> None:
    text = (SAMPLES["order_payment"] / "saga.yaml").read_text()
    assert loads("%YAML 1.2\n---\n" + text).name == "order_payment"


@pytest.mark.parametrize(
    ("value", "problem"),
    [("!!int one", "'one' is not a valid !!int"), ("!!bool maybe", "'maybe' is not a valid !!bool"),
     ("!!float ''", "'' is not a valid !!float")],
)
def test_an_explicit_tag_on_the_wrong_text_is_a_located_problem(value: str, problem: str) -> None:
    found = problems_of(one_step(timeout=value, kind="bogus"))
    assert f"t.yaml:9:14: steps[0].timeout: {problem}" in found
    assert any("steps[0].kind" in problem for problem in found)  # the other problems are still reported


@pytest.mark.timeout(30)
def test_the_nesting_prescan_is_linear_in_the_size_of_a_line() -> None:
    """A comment of `"\\` pairs made the quote-skipping regex quadratic (31 s at 80 KB, hours at 1 MiB)."""
    text = one_step() + "# " + '"\\' * 500_000 + "\n"
    assert loads(text).name == "s"


def test_a_deeply_nested_or_very_long_expression_is_a_problem_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    deep = "(" * 500 + "input.a" + ")" * 500
    assert any("expression longer than 1000 characters" in p for p in problems_of(one_step(f"{{v: '{deep}'}}")))

    def exhausted(expression: str) -> None:  # what JMESPath's recursive parser does on deep enough nesting
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(checks, "compile_expression", exhausted)
    assert any("nested too deeply" in p for p in problems_of(one_step("{v: '((input.a))'}")))


@pytest.mark.parametrize("expression", ["'*'", "'*.later.id'", "'@'", "'values(@)'"])
def test_an_expression_over_the_whole_context_is_refused(expression: str) -> None:
    """`*` projects over the whole context (every later step's reply included), as `@` reads it."""
    assert any("reads the whole context" in p for p in problems_of(one_step(f"{{v: {expression}}}")))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("timeout", "true", "not a duration"), ("retry", "{jitter: true}", "not a number"),
     ("retry", "{multiplier: false}", "not a number")],
)
def test_booleans_are_neither_numbers_nor_durations(field: str, value: str, message: str) -> None:
    assert any(message in p for p in problems_of(one_step(**{field: value})))


def test_a_payload_that_is_a_literal_is_refused_not_failed_at_run_time() -> None:
    assert any("a payload is a mapping of fields" in p for p in problems_of(one_step("{literal: hello}")))
    assert loads(one_step("{literal: {fixed: 1}}")).steps[0].payload == {"literal": {"fixed": 1}}


def test_a_dsl_tuple_renders_like_the_yaml_list_with_the_same_digest() -> None:
    from_dsl = saga("s", 1).step("a").invoke("p", "a.do", {"xs": ("input.a", "input.b")}).with_compensation(
        "a.undo").build()
    from_yaml = loads(one_step("{xs: [input.a, input.b]}"))
    assert from_dsl.digest == from_yaml.digest
    context = {"input": {"a": 1, "b": 2}, "steps": {}, "saga": {}}
    assert render_payload(from_dsl.steps[0].payload, context) == render_payload(from_yaml.steps[0].payload, context)


def test_problems_after_malformed_entries_are_still_found() -> None:
    """A malformed entry has no stage but keeps its index: later references are checked against the right steps."""
    text = """\
        name: s
        version: 1
        steps:
          - oops
          - oops2
          - {name: a, participant: p, command: a.do, payload: {v: steps.b.x}, compensation: {command: a.undo}}
          - {name: b, participant: p, command: b.do, compensation: {command: b.undo}}
        """
    assert any("step 'b' runs after 'a'" in p for p in problems_of(text))


def test_a_dsl_module_of_unchecked_models_is_refused(tmp_path: Path) -> None:
    module = tmp_path / "direct.py"
    module.write_text(textwrap.dedent("""\
        from sagas.definitions import SagaDefinition
        bad = SagaDefinition.model_validate({"name": "x", "version": 1, "steps": [
            {"name": "a", "participant": "p", "command": "a.do"}]})
    """))
    with pytest.raises(DefinitionError, match="needs a compensation") as caught:
        load_python(module)
    assert caught.value.problems[0].file == str(module)


def test_validate_finds_one_name_and_version_with_two_contents_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(VALID_YAML)
    (tmp_path / "b.yaml").write_text(VALID_YAML.replace("input.amount", "input.total"))
    result = CliRunner().invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 1
    assert "shop v1 is also defined in" in result.stdout


@pytest.mark.parametrize(
    ("schema", "message"),
    [("{type: object, patternProperties: {'[': {type: string}}}", "is not a 'regex'"),
     ("{$ref: 'http://127.0.0.1:9/x.json'}", "only references inside the schema"),
     ("{$ref: '#/$defs/missing'}", "does not resolve inside the schema")],
)
def test_an_input_schema_that_could_not_check_an_input_is_refused(schema: str, message: str) -> None:
    """Found by `sagas validate`, not at the first start; a remote $ref is never fetched."""
    assert any(message in p for p in problems_of(one_step() + f"input_schema: {schema}\n"))


def test_a_tab_inside_a_block_scalar_does_not_hide_the_real_syntax_error() -> None:
    text = "name: s\nversion: 1\ndescription: |\n  one\n  \ttwo\nsteps: [{name: a\n"
    (found,) = problems_of(text)
    assert "YAML syntax error" in found
    assert "tab character" not in found


@pytest.mark.parametrize(("text", "number"), [("9ms", "0.009"), ("1.1h", "3960"), ("66m", "3960")])
def test_a_duration_has_one_digest_however_it_is_written(text: str, number: str) -> None:
    assert loads(one_step(timeout=text)).digest == loads(one_step(timeout=number)).digest


def test_a_refused_definition_leaves_no_trace_in_the_registry() -> None:
    registry = DefinitionRegistry()
    bad = SagaDefinition.model_validate(
        {"name": "bad", "version": 1, "steps": [{"name": "a", "participant": "p", "command": "a.do"}]}
    )
    with pytest.raises(DefinitionError):
        registry.register(bad)
    assert "bad" not in registry
    with pytest.raises(UnknownDefinition, match=r"registered: none"):
        registry.get("other")

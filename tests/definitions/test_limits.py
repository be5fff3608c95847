"""Bounds on definitions: every limit is named once, documented in one table, and enforced with a located problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagas.cli import app
from sagas.definitions import limits, loads, saga
from sagas.errors import DefinitionError
from tests.definitions.support import LIMITED_FIELDS, REPO, bounded_yaml

runner = CliRunner()
POWER = "2³¹ \N{MINUS SIGN} 1"  # how the docs write VERSION_MAX


def test_a_definition_with_every_field_at_its_limit_is_valid() -> None:
    """Names, types, topic and version exactly at their limits build a definition."""
    definition = loads(bounded_yaml())
    assert definition.version == limits.VERSION_MAX
    assert len(definition.name) == limits.NAME_CHARS
    first = definition.all_steps[0]
    assert len(first.command) == limits.COMMAND_TYPE_CHARS
    assert len(first.command_topic) == limits.TOPIC_CHARS
    assert all(len(t) == limits.REPLY_TYPE_CHARS for t in (*first.success_types, *first.failure_types))


def test_default_reply_types_of_the_longest_command_are_reply_types() -> None:
    """`<command>.succeeded` / `.failed` of a command at its limit still fit the reply-type limit."""
    step = loads(bounded_yaml()).all_steps[0].model_copy(update={"success": (), "failure": ()})
    assert max(map(len, (*step.success_types, *step.failure_types))) <= limits.REPLY_TYPE_CHARS


@pytest.mark.parametrize("field", sorted(LIMITED_FIELDS))
def test_one_character_past_a_limit_is_a_located_problem(field: str) -> None:
    """A field one character past its limit is the one problem reported, at its line and column, with the limit."""
    limit = getattr(limits, LIMITED_FIELDS[field])
    with pytest.raises(DefinitionError) as caught:
        loads(bounded_yaml(field), file="big.yaml")
    (problem,) = caught.value.problems
    assert problem.path == field
    assert problem.file == "big.yaml"
    assert problem.line is not None
    assert problem.column is not None
    assert problem.message == f"at most {limit} characters, has {limit + 1}"


@pytest.mark.parametrize(
    ("version", "message"),
    [(limits.VERSION_MAX + 1, f"must be at most {limits.VERSION_MAX}"), (3_000_000_000, "must be at most"),
     (2**64, "must be at most"), (0, "must be at least 1")],
)
def test_a_version_outside_1_to_2_31_minus_1_is_a_located_problem(version: int, message: str) -> None:
    """`version` past PostgreSQL's INTEGER (or below 1) is refused at its place, not at the first insert."""
    with pytest.raises(DefinitionError) as caught:
        loads(bounded_yaml(version=version), file="v.yaml")
    (problem,) = caught.value.problems
    assert (problem.path, problem.line, problem.column) == ("version", 2, 10)
    assert problem.message.startswith(message)


def test_the_dsl_enforces_the_same_bounds() -> None:
    """A DSL definition one past a limit is refused like the YAML one."""
    builder = saga("s" * (limits.NAME_CHARS + 1), version=limits.VERSION_MAX + 1).step("a").retriable().invoke(
        "p", "c")
    with pytest.raises(DefinitionError) as caught:
        builder.build()
    assert sorted(p.path for p in caught.value.problems) == ["name", "version"]


def test_sagas_validate_prints_each_bound_problem_with_file_line_column_and_field(tmp_path: Path) -> None:
    """`sagas validate` reports a too-long command as `file:line:column: field: message` and exits 1."""
    path = tmp_path / "long.yaml"
    path.write_text(bounded_yaml("steps[0].command"), encoding="utf-8")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    limit = limits.COMMAND_TYPE_CHARS
    assert result.stdout.strip() == f"{path}:6:14: steps[0].command: at most {limit} characters, has {limit + 1}"
    path.write_text(bounded_yaml(), encoding="utf-8")
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0


def test_docs_list_every_limit_in_one_table() -> None:
    """docs/definitions.md's limits table names every constant of `sagas.definitions.limits` with its value."""
    text = (REPO / "docs" / "definitions.md").read_text(encoding="utf-8")
    rows = dict(re.findall(rf"^\| `([A-Z_]+)` \| ([0-9,]+|{POWER}) \|", text, flags=re.MULTILINE))
    constants = {name: getattr(limits, name) for name in dir(limits) if name.isupper() and name[0] != "_"}
    bounds = {name: value for name, value in constants.items() if isinstance(value, int)}
    assert set(rows) == set(bounds)
    for name, shown in rows.items():
        value = limits.VERSION_MAX if shown == POWER else int(shown.replace(",", ""))
        assert value == bounds[name], name

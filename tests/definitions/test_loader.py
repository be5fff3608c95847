"""Finding and importing definitions: YAML files, DSL files, module names and directories."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sagas.definitions import discover, load_file, load_python, loads
from sagas.errors import DefinitionError
from tests.definitions.support import MALFORMED, SAMPLES, VALID_YAML


def test_load_python_by_path_collects_module_level_definitions() -> None:
    """Importing a DSL file by path returns the SagaDefinition objects defined at its top level."""
    (definition,) = load_python(SAMPLES["order_payment"] / "saga_dsl.py")
    assert definition == load_file(SAMPLES["order_payment"] / "saga.yaml")


def test_load_python_by_module_name() -> None:
    """A dotted module name is imported normally and gives the same definitions as the file path."""
    (by_name,) = load_python("samples.travel_booking.saga_dsl")
    (by_path,) = load_python(SAMPLES["travel_booking"] / "saga_dsl.py")
    assert by_name == by_path


def test_load_python_reports_dsl_problems_with_the_file_as_given(tmp_path: Path) -> None:
    """A DSL module whose definition is broken raises DefinitionError pointing into that file by line."""
    module = tmp_path / "broken_dsl.py"
    module.write_text(
        "from sagas.definitions import saga\n"
        "\n"
        "broken = (\n"
        '    saga("broken", 1)\n'
        '    .step("a").invoke("p", "a.do")\n'
        "    .build()\n"
        ")\n",
        encoding="utf-8",
    )
    with pytest.raises(DefinitionError) as caught:
        load_python(module)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.path) == (str(module), 5, "steps[0].compensation")
    assert not [name for name in sys.modules if name.startswith("_sagas_dsl_") and "broken" in name]


def test_load_python_turns_import_failures_into_problems(tmp_path: Path) -> None:
    """A syntax error or an exception while importing a DSL file is a located problem, not a traceback."""
    syntax = tmp_path / "syntax_dsl.py"
    syntax.write_text("x = (\n", encoding="utf-8")
    with pytest.raises(DefinitionError, match="Python syntax error") as caught:
        load_python(syntax)
    assert caught.value.problems[0].line == 1
    failing = tmp_path / "failing_dsl.py"
    failing.write_text("import os\n\nraise RuntimeError('boom')\n", encoding="utf-8")
    with pytest.raises(DefinitionError, match="RuntimeError: boom") as caught:
        load_python(failing)
    assert caught.value.problems[0].line == 3


def test_discover_reads_yaml_and_python_from_directories() -> None:
    """discover() walks directories, reading YAML as data and importing .py files as DSL modules."""
    found = discover([SAMPLES["order_payment"], SAMPLES["travel_booking"] / "saga.yaml"])
    assert sorted(d.name for d in found) == ["order_payment", "order_payment", "travel_booking"]


def test_discover_reports_problems_of_all_files_together(tmp_path: Path) -> None:
    """Problems in several files come back in one DefinitionError, each naming its file."""
    good = tmp_path / "good.yaml"
    good.write_text(VALID_YAML, encoding="utf-8")
    bad_files = [MALFORMED / "typo_step_key.yaml", MALFORMED / "version_float.yaml"]
    with pytest.raises(DefinitionError) as caught:
        discover([good, *bad_files])
    assert {p.file for p in caught.value.problems} == {str(f) for f in bad_files}


def test_yaml_scalars_follow_yaml_1_2() -> None:
    """Hex ints, underscores and timestamps read as YAML 1.2 says; timestamps stay text, not datetime objects."""
    text = VALID_YAML.replace("  - name: charge", "  - name: charge\n    retry: {max_attempts: 0x10}").replace(
        "sku: input.sku", "sku: input.sku\n      when: {literal: 2024-01-01}"
    )
    definition = loads(text)
    assert definition.step("charge").retry.max_attempts == 16
    assert definition.step("reserve").payload["when"] == {"literal": "2024-01-01"}

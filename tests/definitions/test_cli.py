"""The definition commands of the CLI: validate, schema, graph."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagas.cli import app
from sagas.definitions import load_file, to_json_schema
from tests.definitions.support import MALFORMED, SAMPLES

runner = CliRunner()
SAMPLE_FILES = [SAMPLES[name] / file for name in sorted(SAMPLES) for file in ("saga.yaml", "saga_dsl.py")]


def sagas_executable() -> str:
    found = Path(sys.executable).parent / "sagas"
    return str(found) if found.exists() else shutil.which("sagas") or pytest.fail("console script missing")


def test_validate_prints_ok_with_digest_for_each_valid_file() -> None:
    """Valid files, YAML or DSL, each print `OK name vN (digest)` and the exit code is 0."""
    result = runner.invoke(app, ["validate", *map(str, SAMPLE_FILES)])
    assert result.exit_code == 0, result.output
    expected = []
    for name in sorted(SAMPLES):
        definition = load_file(SAMPLES[name] / "saga.yaml")
        expected += [f"OK {definition.name} v{definition.version} ({definition.digest})"] * 2
    assert result.stdout.splitlines() == expected


def test_validate_json_output_for_scripts() -> None:
    """--json prints one document with identities for valid files and located problems for the rest."""
    bad = MALFORMED / "duplicate_step_names.yaml"
    good = SAMPLES["order_payment"] / "saga.yaml"
    result = runner.invoke(app, ["validate", "--json", str(good), str(bad)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report[0] == {"file": str(good), "ok": True, "definitions": [load_file(good).identity]}
    (problem,) = report[1]["problems"]
    assert (problem["file"], problem["path"]) == (str(bad), "steps[1].name")
    assert problem["line"] > 0
    assert problem["column"] > 0


def test_schema_prints_the_model_schema() -> None:
    """`sagas schema` prints the JSON Schema generated from the model."""
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == to_json_schema()


@pytest.mark.parametrize("file", SAMPLE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_graph_renders_both_formats(file: Path) -> None:
    """`sagas graph` prints Mermaid by default and DOT with --format dot, naming every step."""
    definition = load_file(file.with_name("saga.yaml"))
    mermaid = runner.invoke(app, ["graph", str(file)])
    dot = runner.invoke(app, ["graph", str(file), "--format", "dot"])
    assert mermaid.exit_code == 0
    assert dot.exit_code == 0
    assert mermaid.stdout.startswith("flowchart TD\n")
    assert dot.stdout.startswith("digraph ")
    for step in definition.iter_steps():
        assert step.name in mermaid.stdout
        assert step.name in dot.stdout


def test_graph_of_a_malformed_file_prints_problems_and_exits_1() -> None:
    """`sagas graph` on a broken file prints its problems to stderr and exits 1."""
    result = runner.invoke(app, ["graph", str(MALFORMED / "bad_kind.yaml")])
    assert result.exit_code == 1
    assert "steps[1].kind" in result.stderr
    assert not result.stdout


def test_console_script_validates_in_a_real_process() -> None:
    """The installed `sagas` script validates files in a subprocess with the documented output and exit codes."""
    good = subprocess.run(
        [sagas_executable(), "validate", str(SAMPLES["travel_booking"] / "saga.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("OK travel_booking v1 (")
    bad_file = MALFORMED / "missing_compensation.yaml"
    bad = subprocess.run(
        [sagas_executable(), "validate", str(bad_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 1
    assert bad.stdout.startswith(f"{bad_file}:13:5: steps[1].compensation: ")
    assert "Traceback" not in bad.stderr


def test_validate_refuses_a_python_file_without_definitions(tmp_path: Path) -> None:
    """A DSL file that defines no saga (say, a forgotten build()) is a problem, not a silent success."""
    module = tmp_path / "empty_dsl.py"
    module.write_text("from sagas.definitions import saga\n\nbuilder = saga('x', 1)\n", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(module)])
    assert result.exit_code == 1
    assert result.stdout == f"{module}:1:1: <root>: no saga definitions found at module level\n"

"""`sagas explore` and `sagas validate --explore` on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from sagas.cli import app
from tests.definitions.support import MALFORMED, SAMPLES, VALID_YAML

runner = CliRunner()
ORDER = SAMPLES["order_payment"] / "saga.yaml"


def own_reply_file(tmp_path: Path) -> tuple[Path, str]:
    """VALID_YAML (reserve's compensation reads reserve's reply) and where that mapping's value is, `line:col`."""
    file = tmp_path / "shop.yaml"
    file.write_text(VALID_YAML)
    lines = VALID_YAML.splitlines()
    number = next(i for i, line in enumerate(lines) if "reservation: steps.reserve.id" in line)
    return file, f"{number + 1}:{lines[number].index('steps.reserve.id') + 1}"


def test_explore_prints_each_ending_with_its_paths_and_a_witness() -> None:
    """The table lists completed, compensated and the parked states with a witness; exit 0 with no violation."""
    result = runner.invoke(app, ["explore", str(ORDER)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("order_payment v1: ")
    assert "\ncompleted " in out
    assert "\ncompensated " in out
    assert "e.g. create_order ok → reserve_inventory ok → charge_payment ok →" in out
    assert "operator skip charge_payment → completed" in out
    assert "no invariant violated" in out
    table = out.split("FINDINGS")[0]
    assert max(len(line) for line in table.splitlines()) <= 80, "the table reads at 80 columns"


def test_explore_reports_a_compensation_reading_a_missing_reply_at_file_line_col(tmp_path: Path) -> None:
    """A compensation reading the reply of a step that can time out is an error at the mapping: exit 1."""
    file, position = own_reply_file(tmp_path)
    result = runner.invoke(app, ["explore", str(file)])
    assert result.exit_code == 1
    assert f"{file}:{position}: steps[0].compensation.payload.reservation: the compensation of reserve reads " \
        "steps.reserve, which does not exist" in result.stdout  # fmt: skip


def test_explore_json_for_scripts(tmp_path: Path) -> None:
    """--json prints one document per definition: endings with counts and witnesses, located findings."""
    file, position = own_reply_file(tmp_path)
    result = runner.invoke(app, ["explore", "--json", str(ORDER), str(file)])
    assert result.exit_code == 1
    order, shop = json.loads(result.stdout)
    assert order["ok"] is True
    assert order["complete"] is True
    assert order["violations"] == []
    completed = next(e for e in order["endings"] if e["ending"] == "completed")
    assert completed["paths"] > 0
    assert completed["witness"][0] == "create_order ok"
    assert shop["ok"] is False
    (error,) = [f for f in shop["findings"] if f["severity"] == "error"]
    assert (error["file"], f"{error['line']}:{error['column']}") == (str(file), position)
    assert error["path"] == "steps[0].compensation.payload.reservation"


def test_explore_draws_the_outcome_graph_in_mermaid() -> None:
    """--format mermaid draws the start, every ending with its path count, and the operator's ways out."""
    result = runner.invoke(app, ["explore", "--format", "mermaid", str(ORDER)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("%% order_payment@v1#")
    assert lines[1] == "flowchart LR"
    assert '    e0(["completed"])' in lines
    assert any(line.startswith('    start -->|"') and line.endswith("| e0") for line in lines)
    assert any('-.->|"skip charge_payment"| e0' in line for line in lines)


def test_max_attempts_is_at_least_one_and_bad_files_fail_cleanly() -> None:
    """--max-attempts 0 is a usage error; a malformed definition prints its located problems and exits 1."""
    assert runner.invoke(app, ["explore", "--max-attempts", "0", str(ORDER)]).exit_code == 2
    bad = MALFORMED / "duplicate_step_names.yaml"
    result = runner.invoke(app, ["explore", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:" in result.stderr


def test_validate_explore_adds_the_findings_of_explore(tmp_path: Path) -> None:
    """`validate --explore` fails a file with an error-level finding and passes one with warnings only."""
    file, position = own_reply_file(tmp_path)
    failed = runner.invoke(app, ["validate", "--explore", str(file)])
    assert failed.exit_code == 1
    assert f"{file}:{position}: steps[0].compensation.payload.reservation:" in failed.stdout
    assert runner.invoke(app, ["validate", str(file)]).exit_code == 0, "without --explore the file is valid"
    passed = runner.invoke(app, ["validate", "--explore", "--json", str(ORDER)])
    assert passed.exit_code == 0, passed.output
    (report,) = json.loads(passed.stdout)
    assert report["ok"] is True
    assert [w["path"] for w in report["warnings"]] == ["steps[3].payload.payment_id"]
    assert report["warnings"][0]["message"].startswith("warning: ")


def _section() -> str:
    text = (SAMPLES["order_payment"].parents[1] / "docs" / "definitions.md").read_text(encoding="utf-8")
    return text.split("## Exploring every path")[1].split("\n## ")[0]


def test_the_documented_exploration_is_what_the_command_prints(tmp_path: Path, monkeypatch: Any) -> None:
    """docs/definitions.md shows `sagas explore trip.yaml` on its own example exactly as the command prints it."""
    section = _section()
    yaml = section.split("```yaml\n")[1].split("```")[0]
    console = section.split("```console\n$ sagas explore trip.yaml\n")[1].split("```")[0]
    (tmp_path / "trip.yaml").write_text(yaml)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["explore", "trip.yaml"])
    assert result.exit_code == 1  # the example's finding is an error
    assert result.stdout == console


def test_the_documented_library_example_runs() -> None:
    """The pytest example of docs/definitions.md passes on the order_payment sample."""
    from sagas.definitions import load_file

    code = _section().split("```python\n")[1].split("```")[0]
    namespace: dict[str, Any] = {"order_payment": load_file(ORDER)}
    exec(compile(code, "docs/definitions.md", "exec"), namespace)  # the doc's own example code
    namespace["test_the_order_saga_has_no_dead_end"]()


def test_a_dsl_findings_point_at_the_builder_call() -> None:
    """In a Python DSL module a finding points at the line of the builder call holding the mapping."""
    file = SAMPLES["order_payment"] / "saga_dsl.py"
    result = runner.invoke(app, ["explore", str(file)])
    assert result.exit_code == 0, result.output
    lines = file.read_text().splitlines()
    call = next(i for i, line in enumerate(lines) if '"payment_id": "steps.charge_payment.payment_id"' in line)
    invoke = max(i for i in range(call) if ".invoke(" in lines[i])
    assert f"{file}:{invoke + 1}:" in result.stdout
    assert "steps[3].payload.payment_id: warning:" in result.stdout


def test_input_and_max_states_options(tmp_path: Path) -> None:
    """--input renders payloads with the given input (a bad one is a usage error); --max-states stops early: exit 1."""
    file = tmp_path / "sum.yaml"
    file.write_text(VALID_YAML.replace("sku: input.sku", "total: sum(input.prices)"))
    without = runner.invoke(app, ["explore", "--json", str(file)])
    assert any("could not be rendered" in f["message"] for f in json.loads(without.stdout)[0]["findings"])
    given = runner.invoke(app, ["explore", "--json", "--input", '{"prices": [1, 2]}', str(file)])
    assert not any("could not be rendered" in f["message"] for f in json.loads(given.stdout)[0]["findings"])
    assert runner.invoke(app, ["explore", "--input", "[1]", str(file)]).exit_code == 2
    partial = runner.invoke(app, ["explore", "--max-states", "5", str(ORDER)])
    assert partial.exit_code == 1
    assert "search stopped early" in partial.stdout

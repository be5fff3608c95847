"""Every malformed definition under malformed/ is refused with the problems its `# expect:` lines list."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagas.cli import app
from sagas.definitions import load_file, loads
from sagas.definitions.yaml_source import MAX_DEPTH, MAX_EVENTS, MAX_FILE_BYTES
from sagas.errors import DefinitionError
from tests.definitions.support import MALFORMED, VALID_YAML

FIXTURES = sorted(MALFORMED.glob("*.yaml"))
QUICK = 3.0
"""Seconds: generous for a loaded CI machine, yet far below what expanding or parsing the input would take."""


def expected(path: Path) -> list[str]:
    return [
        f"{path}:{line.removeprefix('# expect: ')}"
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("# expect: ")
    ]


def test_there_are_at_least_25_malformed_definitions() -> None:
    """The suite of malformed definitions covers at least 25 distinct files, each with an expectation."""
    assert len(FIXTURES) >= 25
    assert all(expected(path) for path in FIXTURES)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_malformed_definition_reports_exactly_the_expected_problems(path: Path) -> None:
    """Loading a malformed file raises DefinitionError listing each expected problem with file:line:col: path."""
    with pytest.raises(DefinitionError) as caught:
        load_file(path)
    assert [str(problem) for problem in caught.value.problems] == expected(path)
    for problem in caught.value.problems:
        assert problem.file == str(path)
        assert problem.line is not None
        assert problem.line >= 1
        assert problem.column is not None
        assert problem.column >= 1
        assert problem.message


def test_cli_reports_every_problem_of_every_file_and_exits_1() -> None:
    """`sagas validate` on all malformed files prints every expected line and exits 1 without a traceback."""
    result = CliRunner().invoke(app, ["validate", *map(str, FIXTURES)])
    assert result.exit_code == 1
    printed = result.stdout.splitlines()
    for path in FIXTURES:
        for line in expected(path):
            assert line in printed
    assert "Traceback" not in result.output
    assert f"{len(FIXTURES)} of {len(FIXTURES)} file(s) have problems" in result.stderr


def test_a_10_mib_file_is_refused_before_parsing(tmp_path: Path) -> None:
    """A file over the 1 MiB limit is refused from its size alone, quickly, with a clear message at 1:1."""
    big = tmp_path / "big.yaml"
    padding = "# " + "x" * 1021 + "\n"
    big.write_text(VALID_YAML + padding * (10 * 1024), encoding="utf-8")
    assert big.stat().st_size > 10 * MAX_FILE_BYTES
    started = time.monotonic()
    with pytest.raises(DefinitionError) as caught:
        load_file(big)
    assert time.monotonic() - started < QUICK
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.column) == (str(big), 1, 1)
    assert f"{big.stat().st_size:,} bytes" in problem.message
    assert "limited to 1,048,576 bytes" in problem.message


def test_text_just_over_the_limit_is_refused_and_just_under_is_read() -> None:
    """The size limit applies to text given directly as well, at the byte boundary."""
    under = VALID_YAML + "#" * (MAX_FILE_BYTES - len(VALID_YAML) - 1) + "\n"
    assert loads(under).name == "shop"
    with pytest.raises(DefinitionError, match="limited to"):
        loads(under + "#")


def test_alias_bomb_is_refused_quickly() -> None:
    """A billion-laughs document stops at the node bound within seconds instead of expanding 10**9 values."""
    started = time.monotonic()
    with pytest.raises(DefinitionError, match="alias bomb"):
        load_file(MALFORMED / "alias_bomb.yaml")
    assert time.monotonic() - started < QUICK


def test_deep_nesting_is_refused_before_parsing() -> None:
    """Deep flow nesting is refused at the first bracket past the limit, before the parser sees it."""
    text = "name: shop\nversion: 1\nsteps: " + "[" * 5000 + "]" * 5000 + "\n"
    started = time.monotonic()
    with pytest.raises(DefinitionError) as caught:
        loads(text, "deep.yaml")
    assert time.monotonic() - started < QUICK
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.column) == ("deep.yaml", 3, 8 + MAX_DEPTH)
    assert "nested deeper than 64 levels" in problem.message


def test_brackets_inside_quotes_do_not_count_as_nesting() -> None:
    """Quoted strings full of brackets are data, not nesting, and load normally."""
    text = VALID_YAML.replace("description", "x") + "description: '" + "[" * 100 + "'\n"
    assert loads(text).description == "[" * 100


def test_a_file_with_too_many_values_stops_at_the_event_bound() -> None:
    """A small file with a huge flat list is cut off at MAX_EVENTS, pointing at where it stopped."""
    text = "name: shop\nversion: 1\nsteps: [" + "x, " * (MAX_EVENTS * 2) + "]\n"
    with pytest.raises(DefinitionError) as caught:
        loads(text, "wide.yaml")
    (problem,) = caught.value.problems
    assert problem.line == 3
    assert problem.column is not None
    assert problem.column > 3 * (MAX_EVENTS // 2)
    assert f"more than {MAX_EVENTS:,} YAML values" in problem.message


def test_non_utf8_file_is_a_problem(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 give a located problem rather than a UnicodeDecodeError."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(DefinitionError, match="not UTF-8"):
        load_file(path)


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    """A path that does not exist gives a problem naming it."""
    with pytest.raises(DefinitionError, match="cannot read"):
        load_file(tmp_path / "nope.yaml")

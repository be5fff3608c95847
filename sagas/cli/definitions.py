"""`sagas validate`, `sagas schema`, `sagas graph`: the definition commands."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sagas.cli.app import app
from sagas.errors import DefinitionError, Problem

if TYPE_CHECKING:
    from sagas.definitions import SagaDefinition

# The YAML reader, the DSL and the graph writers are imported by the commands that use them: the other commands
# (`sagas list`, `show`...) start without them.


class GraphFormat(StrEnum):
    MERMAID = "mermaid"
    DOT = "dot"


@app.command()
def validate(
    paths: Annotated[
        list[Path],
        typer.Argument(help="YAML definitions (*.yaml, *.yml), Python DSL modules (*.py), or folders of them."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document for scripts.")] = False,
    explore: Annotated[
        bool, typer.Option("--explore", help="Also explore every path (see `sagas explore`); its findings count.")
    ] = False,
) -> None:
    """Check definitions; print `OK name vN (digest)` or every problem as `file:line:col: path: message`."""
    from sagas.definitions.loader import expand

    report: list[dict[str, Any]] = []
    failed = 0
    files = expand(paths)
    named = {Path(path) for path in paths}
    seen: dict[tuple[str, int], tuple[str, Path]] = {}  # (name, version) -> (digest, first file)
    for file in files:
        definitions, problems = _check(file)
        if file not in named and [p.message for p in problems] == [_NOTHING_DEFINED]:
            continue  # a helper module found in a folder (participants, a demo), not a definition
        for definition in definitions:  # deployed together, these would be refused by the registry
            first = seen.setdefault((definition.name, definition.version), (definition.digest, file))
            if first[0] != definition.digest:
                problems.append(Problem(
                    "", f"{definition.name} v{definition.version} is also defined in {first[1]} with other content; "
                    "a changed definition needs a new version", str(file), 1, 1,
                ))
        if explore and not problems:
            problems += _explored(file, definitions)
        errors = [p for p in problems if not p.message.startswith("warning: ")]  # only explore warns
        if errors:
            definitions = []
        if errors:
            failed += 1
            report.append({"file": str(file), "ok": False, "problems": [_problem_json(p) for p in problems]})
        else:
            report.append({"file": str(file), "ok": True, "definitions": [d.identity for d in definitions]})
            if problems:
                report[-1]["warnings"] = [_problem_json(p) for p in problems]
        if not as_json:
            for problem in problems:
                typer.echo(str(problem))
            for definition in definitions:
                typer.echo(f"OK {definition.name} v{definition.version} ({definition.digest})")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    elif failed:
        typer.echo(f"{failed} of {len(files)} file(s) have problems", err=True)
    if failed:
        raise typer.Exit(1)


_NOTHING_DEFINED = "no saga definitions found at module level"


def _explored(file: Path, definitions: list[SagaDefinition]) -> list[Problem]:
    from sagas.cli.explore import exploration_problems, explore_definitions

    found: list[Problem] = []
    for exploration, source in explore_definitions(file, definitions, max_attempts=3):
        found += exploration_problems(exploration, source, file)
    return found


def _check(file: Path) -> tuple[list[SagaDefinition], list[Problem]]:
    from sagas.definitions.loader import load_any

    try:
        definitions = load_any(file)
    except DefinitionError as exc:
        return [], list(exc.problems)
    if not definitions:
        # A DSL file that defines nothing is almost always a forgotten `.build()` or a wrong path.
        return [], [Problem("", _NOTHING_DEFINED, str(file), 1, 1)]
    return definitions, []


def _problem_json(problem: Problem) -> dict[str, Any]:
    return {
        "file": problem.file,
        "line": problem.line,
        "column": problem.column,
        "path": problem.path,
        "message": problem.message,
    }


@app.command()
def schema() -> None:
    """Print the JSON Schema of the YAML definition format."""
    from sagas.definitions import to_json_schema

    typer.echo(json.dumps(to_json_schema(), indent=2))


@app.command()
def graph(
    file: Annotated[Path, typer.Argument(help="A YAML definition or a Python DSL module.")],
    output_format: Annotated[GraphFormat, typer.Option("--format", "-f", help="Output format.")] = GraphFormat.MERMAID,
    name: Annotated[str | None, typer.Option(help="Which definition, when the file holds several.")] = None,
) -> None:
    """Draw the steps, their compensations, the pivot and parallel groups."""
    from sagas.definitions import to_dot, to_mermaid
    from sagas.definitions.loader import load_any

    try:
        definitions = load_any(file)
    except DefinitionError as exc:
        for problem in exc.problems:
            typer.echo(str(problem), err=True)
        raise typer.Exit(1) from None
    chosen = _choose(definitions, name, file)
    typer.echo(to_mermaid(chosen) if output_format is GraphFormat.MERMAID else to_dot(chosen), nl=False)


def _choose(definitions: list[SagaDefinition], name: str | None, file: Path) -> SagaDefinition:
    matching = [d for d in definitions if name is None or d.name == name]
    if len(matching) == 1:
        return matching[0]
    names = ", ".join(d.name for d in definitions) or "none"
    reason = "holds several definitions; pick one with --name" if matching else f"has no definition {name!r}"
    typer.echo(f"{file} {reason} (found: {names})", err=True)
    raise typer.Exit(1)

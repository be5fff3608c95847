"""`sagas explore`: every failure path of a definition, checked before it runs (and `sagas validate --explore`)."""

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
    from sagas.definitions.source import SourceMap
    from sagas.engine.explore import Exploration


class ExploreFormat(StrEnum):
    TABLE = "table"
    MERMAID = "mermaid"


def source_of(file: Path, definition: SagaDefinition) -> SourceMap | None:
    """Positions of a definition's fields, so findings point at file:line:col: the YAML file's, or the DSL builder
    calls' when that file built it; None when neither is known."""
    from sagas.definitions.dsl import built_source
    from sagas.definitions.loader import YAML_SUFFIXES
    from sagas.definitions.yaml_source import read_yaml

    if file.suffix not in YAML_SUFFIXES:
        source = built_source(definition)
        same = source is not None and source.file is not None and Path(source.file).resolve() == file.resolve()
        return source if same else None
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):  # it loaded a moment ago; a file changed since gets path-only findings
        return None
    return read_yaml(text, str(file))[1]


def explore_definitions(
    file: Path, definitions: list[SagaDefinition], max_attempts: int = 3, **options: Any
) -> list[tuple[Exploration, SourceMap | None]]:
    from sagas.engine.explore import explore

    return [(explore(d, max_attempts=max_attempts, **options), source_of(file, d)) for d in definitions]


def _input(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--input") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("a saga's input is a JSON object", param_hint="--input")
    return value


def exploration_problems(exploration: Exploration, source: SourceMap | None, file: Path) -> list[Problem]:
    """Violations (pointed at the file's start) and findings (at their field) as problems for `validate`."""
    from sagas.definitions.source import file_problem
    from sagas.engine.explore_report import problems, words

    found = [
        file_problem(str(file), f"explore: invariant violated: {v.message} (path: {words(v.witness)})")
        for v in exploration.violations
    ]
    if not exploration.complete:
        found.append(file_problem(str(file), "explore: the search stopped early; its results are partial"))
    return found + problems(exploration, source, str(file))


@app.command()
def explore(
    paths: Annotated[
        list[Path],
        typer.Argument(help="YAML definitions (*.yaml, *.yml), Python DSL modules (*.py), or folders of them."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document for scripts.")] = False,
    output_format: Annotated[
        ExploreFormat, typer.Option("--format", "-f", help="table: endings and witnesses; mermaid: outcome graph.")
    ] = ExploreFormat.TABLE,
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", min=1, help="Attempts explored one by one; longer retries summarised.")
    ] = 3,
    max_states: Annotated[
        int, typer.Option("--max-states", min=1, help="Stop (results partial, exit 1) after this many states.")
    ] = 50_000,
    input_json: Annotated[
        str | None, typer.Option("--input", help="The saga input payloads are rendered with (JSON; default {}).")
    ] = None,
) -> None:
    """Drive each definition through every outcome the world and an operator can produce, and check every path.

    Prints each ending with its paths and a shortest witness, the ways out of parked states, violations, findings.

    Exit code 1 on an invariant violation, an error-level finding or a definition that does not load.
    """
    from sagas.definitions.loader import expand, load_any
    from sagas.engine.explore_report import to_json, to_mermaid, to_table

    options = {"max_states": max_states, "input": _input(input_json)}
    failed = False
    report: list[dict[str, Any]] = []
    for file in expand(paths):
        try:
            definitions = load_any(file)
        except DefinitionError as exc:
            failed = True
            report.append({"file": str(file), "problems": [str(p) for p in exc.problems]})
            if not as_json:
                for problem in exc.problems:
                    typer.echo(str(problem), err=True)
            continue
        for exploration, source in explore_definitions(file, definitions, max_attempts, **options):
            failed = failed or not exploration.ok
            if as_json:
                report.append({"file": str(file), **to_json(exploration, source, str(file))})
            elif output_format is ExploreFormat.MERMAID:
                typer.echo(f"%% {exploration.definition.identity} ({file})")
                typer.echo(to_mermaid(exploration), nl=False)
            else:
                typer.echo(to_table(exploration, source, str(file)))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    if failed:
        raise typer.Exit(1)

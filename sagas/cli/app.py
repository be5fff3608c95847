"""The typer application every CLI module registers its commands on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sagas",
    help="Saga orchestration engine: validate definitions, run the engine, inspect and repair sagas.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

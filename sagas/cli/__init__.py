"""The `sagas` command line: a thin shell over the library."""

from __future__ import annotations

import importlib

from sagas.cli.app import app

# Each module registers its commands on `app` when imported.
for _module in ("sagas.cli.definitions", "sagas.cli.operate"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:  # a module not written yet must not break the others
        if exc.name != _module:
            raise


def main() -> None:
    # Library log lines must never mix with what a command prints (`--json` output is parsed by scripts), and a
    # command says itself what went wrong (a rejected replay, a refused retry): errors only;
    # `sagas serve` reconfigures logging for the engine.
    from sagas.logs import configure_logging

    configure_logging(level="ERROR")
    app()


__all__ = ["app", "main"]

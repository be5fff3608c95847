"""The `sagas` command line: a thin shell over the library."""

from __future__ import annotations

import importlib

from sagas.cli.app import app

# Each module registers its commands on `app` when imported.
for _module in ("sagas.cli.definitions", "sagas.cli.explore", "sagas.cli.operate", "sagas.cli.top"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:  # a module not written yet must not break the others
        if exc.name != _module:
            raise


def main() -> None:
    # Library log lines must never mix with what a command prints (`--json` output is parsed by scripts), and a
    # command says itself what went wrong (a rejected replay, a refused retry): errors only;
    # `sagas serve` reconfigures logging for the engine.
    import sys

    from sagas.logs import configure_logging

    # As `python -m` does, and uvicorn or celery: DSL modules given to `serve` / `validate` may import the packages
    # of the directory the command runs in (`from samples.order_payment.participants import ...`).
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    configure_logging(level="ERROR")
    app()


__all__ = ["app", "main"]

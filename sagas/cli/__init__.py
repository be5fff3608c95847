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
    app()


__all__ = ["app", "main"]

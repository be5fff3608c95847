"""Lazy public names for packages (PEP 562): a package lists name -> defining module and imports each on first use.

Kept out of `sagas/__init__.py` so that `sagas.definitions` (and anything else using it) never imports the package
root, and the import-linter contracts in pyproject.toml can hold.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any


def lazy_export(package: str, exports: Mapping[str, str], name: str) -> Any:
    """The public name `name` of `package`, imported from its module (`exports`: name -> module) and kept in the
    package's namespace. A submodule's name imports the submodule (``import sagas; sagas.testing`` worked when
    the package imported everything); anything else is an AttributeError."""
    defining = exports.get(name)
    if defining is not None:
        value = getattr(importlib.import_module(defining), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
        value = importlib.import_module(f"{package}.{name}")
    else:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    setattr(sys.modules[package], name, value)
    return value


def public_dir(namespace: Mapping[str, Any], exports: Mapping[str, str]) -> list[str]:
    """`dir()` of a package with lazy names: its public names, submodules already imported, and dunders (not the
    helpers the package itself imports)."""
    submodules = (n for n, v in namespace.items() if isinstance(v, ModuleType) and v.__name__.startswith("sagas."))
    return sorted({*exports, *submodules, *(n for n in namespace if n.startswith("__"))})

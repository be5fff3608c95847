"""Find and read definitions: YAML files as data, Python files and modules as DSL code."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from sagas.definitions.build import build_definition
from sagas.definitions.model import SagaDefinition
from sagas.definitions.registry import verify
from sagas.definitions.source import file_problem
from sagas.definitions.yaml_source import MAX_FILE_BYTES, read_yaml, too_big_problem
from sagas.errors import DefinitionError, Problem

YAML_SUFFIXES = (".yaml", ".yml")


def loads(text: str, file: str = "<string>") -> SagaDefinition:
    """Read a definition from YAML text; `file` names it in messages."""
    data, source, problems = read_yaml(text, file)
    if data is None:
        raise DefinitionError(problems)
    return build_definition(data, source, problems)


def load_file(path: str | Path) -> SagaDefinition:
    """Read a YAML definition. Raises `DefinitionError` with every problem, each with file:line:column."""
    name = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise DefinitionError([too_big_problem(name, size)])  # refused before reading a byte
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DefinitionError([file_problem(name, f"cannot read the file: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DefinitionError([file_problem(name, f"the file is not UTF-8 (byte {exc.start})")]) from None
    return loads(text, name)


def load_python(target: str | Path) -> list[SagaDefinition]:
    """Import a DSL module (a .py path or a module name) and return its module-level definitions, in order."""
    path = Path(target)
    is_file = path.suffix == ".py" or path.exists() or len(path.parts) > 1
    module = _import_path(path) if is_file else _import_module(str(target))
    found: dict[str, SagaDefinition] = {}
    for value in vars(module).values():
        if isinstance(value, SagaDefinition):
            found.setdefault(value.identity, value)
    # `build()` ran the checks; a model made with SagaDefinition.model_validate did not.
    problems: list[Problem] = []
    for definition in found.values():
        try:
            verify(definition, where=str(target))
        except DefinitionError as exc:
            problems += exc.problems
    if problems:
        raise DefinitionError(problems)
    return list(found.values())


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):  # the module itself, not one it imports
            raise DefinitionError([file_problem(name, "no such file, folder or Python module")]) from None
        raise DefinitionError([file_problem(name, f"importing the module failed: {exc}")]) from exc
    except Exception as exc:
        problem = file_problem(name, f"importing the module failed: {type(exc).__name__}: {exc}")
        raise DefinitionError([problem]) from exc


def _import_path(path: Path) -> ModuleType:
    resolved = path.resolve()
    if not resolved.is_file():
        raise DefinitionError([file_problem(str(path), "no such file" if not resolved.exists() else "not a file")])
    # A private, path-derived name: the same file imports once, two files never clash.
    name = "_sagas_dsl_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise DefinitionError([file_problem(str(path), "cannot import this file as a Python module")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except DefinitionError as exc:
        del sys.modules[name]
        # Problems from a DSL module point into it; name the file as the user gave it.
        raise DefinitionError(
            [replace(p, file=str(path)) if p.file == str(resolved) else p for p in exc.problems]
        ) from None
    except Exception as exc:
        del sys.modules[name]
        raise DefinitionError([_import_problem(exc, path, resolved)]) from exc
    return module


def _import_problem(exc: Exception, path: Path, resolved: Path) -> Problem:
    """Where in the DSL file importing it failed, so `sagas validate` can report it like any other problem."""
    if isinstance(exc, SyntaxError) and exc.filename == str(resolved):
        return Problem("", f"Python syntax error: {exc.msg}", str(path), exc.lineno, exc.offset)
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == str(resolved):
            line = lineno
    return Problem("", f"importing the module failed: {type(exc).__name__}: {exc}", str(path), line or 1, 1)


def load_any(path: str | Path) -> list[SagaDefinition]:
    """One file: YAML as data, anything else as a Python DSL module."""
    if Path(path).suffix in YAML_SUFFIXES:
        return [load_file(path)]
    return load_python(path)


def discover(paths: Iterable[str | Path]) -> list[SagaDefinition]:
    """Definitions from files and directories (searched recursively for *.yaml, *.yml and *.py).

    Raises one `DefinitionError` with the problems of every file that has any.
    """
    definitions: list[SagaDefinition] = []
    errors: list[Problem] = []
    for path in expand(paths):
        try:
            definitions += load_any(path)
        except DefinitionError as exc:
            errors += exc.problems
    if errors:
        raise DefinitionError(errors)
    return definitions


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """The definition files `paths` name: files as given, folders searched recursively for *.yaml, *.yml, *.py."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files += sorted(
                p
                for p in entry.rglob("*")
                if p.suffix in (*YAML_SUFFIXES, ".py") and p.name != "__init__.py" and "__pycache__" not in p.parts
            )
        else:
            files.append(entry)
    return files

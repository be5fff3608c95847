"""The public face of the package is deliberate: this list changes only on purpose."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import sagas


def test_public_names_are_pinned() -> None:
    """`sagas.__all__` is exactly the supported API, and every name in it is importable."""
    assert sorted(sagas.__all__) == sorted([
        "BrokerError", "BrokerMessage", "Broker", "BusinessFailure", "CommandMessage", "ConcurrencyConflict",
        "Consumer", "DefinitionConflict", "DefinitionError", "DefinitionRegistry", "Delivery", "Engine",
        "EngineSettings", "IdempotencyConflict", "InvalidInput", "OperatorCommand", "OperatorError", "Participant",
        "SagaAdmin",
        "SagaDefinition", "SagaError", "SagaHarness", "SagaInstance", "SagaReport", "SagaStatus", "SagasSettings",
        "StepDefinition", "StepKind", "StepStatus", "Store", "StoreError", "UnknownDeadLetter", "UnknownDefinition",
        "UnknownSaga", "VirtualClock", "discover", "literal", "load_file", "load_python", "loads", "open_broker",
        "open_store", "saga", "validate_input",
    ])
    for name in sagas.__all__:
        assert getattr(sagas, name) is not None


def test_every_library_error_is_a_saga_error() -> None:
    """Callers can catch everything the library raises on purpose with one `except SagaError`."""
    errors = [getattr(sagas, n) for n in sagas.__all__ if isinstance(getattr(sagas, n), type)
              and issubclass(getattr(sagas, n), Exception) and n != "BusinessFailure"]
    assert errors
    assert all(issubclass(e, sagas.SagaError) for e in errors)


def test_every_exported_name_is_public_and_defined_where_the_map_says() -> None:
    """The lazy map names exactly the public names of `sagas` and `sagas.definitions`, each found in its module."""
    import sagas.definitions

    for package in (sagas, sagas.definitions):
        exports = package._EXPORTS  # type: ignore[attr-defined]
        assert sorted(exports) == sorted(package.__all__)
        for name, module in exports.items():
            assert getattr(package, name) is getattr(importlib.import_module(module), name)
        assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        sagas.Engin  # type: ignore[attr-defined]  # noqa: B018
    assert "importlib" not in dir(sagas)


def test_a_submodule_is_reachable_from_the_package_as_before() -> None:
    """`import sagas` then `sagas.testing...` keeps working now that the package imports its parts on first use."""
    out = subprocess.run(
        [sys.executable, "-c", "import sagas; print(sagas.testing.SagaHarness.__name__, sagas.errors.__name__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == ["SagaHarness", "sagas.errors"]


def _imported_by(code: str) -> set[str]:
    """The modules (and their top-level packages) a fresh interpreter has imported after running `code`."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    names = set(out.split())
    return names | {name.partition(".")[0] for name in names}


def test_importing_the_package_or_the_cli_imports_only_what_it_uses() -> None:
    """`import sagas` loads no dependency; the CLI (`sagas list` and the rest) loads no migration tool, no Kafka or
    PostgreSQL driver: they are imported when a command needs them (a new database, a kafka:// URL)."""
    assert _imported_by("import sagas").isdisjoint({"sqlalchemy", "pydantic", "structlog", "jsonschema"})
    assert _imported_by("import sagas.cli").isdisjoint({"alembic", "aiokafka", "asyncpg", "sqlalchemy.ext"})
    assert "alembic" not in _imported_by("import sagas.engine.runtime, sagas.adapters.sql")

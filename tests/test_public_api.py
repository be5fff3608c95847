"""The public face of the package is deliberate: this list changes only on purpose."""

from __future__ import annotations

import sagas


def test_public_names_are_pinned() -> None:
    """`sagas.__all__` is exactly the supported API, and every name in it is importable."""
    assert sorted(sagas.__all__) == sorted([
        "BrokerError", "BrokerMessage", "Broker", "BusinessFailure", "CommandMessage", "ConcurrencyConflict",
        "Consumer", "DefinitionConflict", "DefinitionError", "DefinitionRegistry", "Delivery", "Engine",
        "EngineSettings", "InvalidInput", "OperatorCommand", "OperatorError", "Participant", "SagaAdmin",
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

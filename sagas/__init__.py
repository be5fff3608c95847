"""sagas: a saga orchestration engine.

    from sagas import Engine, SagaHarness, load_file, open_broker, open_store, saga

The names below are the supported public API; everything else may change without notice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagas._lazy import lazy_export, public_dir

if TYPE_CHECKING:
    from sagas.adapters import open_broker, open_store
    from sagas.definitions import (
        DefinitionRegistry,
        SagaDefinition,
        StepDefinition,
        StepKind,
        discover,
        literal,
        load_file,
        load_python,
        loads,
        saga,
        validate_input,
    )
    from sagas.engine.admin import SagaAdmin, SagaReport
    from sagas.engine.ports import Broker, BrokerMessage, Consumer, Delivery, Store
    from sagas.engine.runtime import Engine, EngineSettings
    from sagas.engine.state import OperatorCommand, SagaInstance, SagaStatus, StepStatus
    from sagas.engine.wire import CommandMessage
    from sagas.errors import (
        BrokerError,
        ConcurrencyConflict,
        DefinitionConflict,
        DefinitionError,
        IdempotencyConflict,
        InvalidInput,
        OperatorError,
        SagaError,
        StoreError,
        UnknownDeadLetter,
        UnknownDefinition,
        UnknownSaga,
    )
    from sagas.participant import BusinessFailure, Participant
    from sagas.settings import SagasSettings
    from sagas.testing import SagaHarness, VirtualClock

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("open_broker", "open_store"), "sagas.adapters"),
    **dict.fromkeys(("Broker", "BrokerMessage", "Consumer", "Delivery", "Store"), "sagas.engine.ports"),
    **dict.fromkeys(
        (
            "DefinitionRegistry", "SagaDefinition", "StepDefinition", "StepKind", "discover", "literal", "load_file",
            "load_python", "loads", "saga", "validate_input"
        ),
        "sagas.definitions",
    ),
    **dict.fromkeys(("SagaAdmin", "SagaReport"), "sagas.engine.admin"),
    **dict.fromkeys(("Engine", "EngineSettings"), "sagas.engine.runtime"),
    **dict.fromkeys(("OperatorCommand", "SagaInstance", "SagaStatus", "StepStatus"), "sagas.engine.state"),
    **dict.fromkeys(("CommandMessage",), "sagas.engine.wire"),
    **dict.fromkeys(
        (
            "BrokerError", "ConcurrencyConflict", "DefinitionConflict", "DefinitionError", "IdempotencyConflict",
            "InvalidInput", "OperatorError", "SagaError", "StoreError", "UnknownDeadLetter", "UnknownDefinition",
            "UnknownSaga"
        ),
        "sagas.errors",
    ),
    **dict.fromkeys(("BusinessFailure", "Participant"), "sagas.participant"),
    **dict.fromkeys(("SagasSettings",), "sagas.settings"),
    **dict.fromkeys(("SagaHarness", "VirtualClock"), "sagas.testing"),
}
"""Public name -> the module defining it. Each is imported when first read (PEP 562), so that `import sagas.cli` or
`import sagas.engine.state` does not import every part of the package: the CLI starts in a fraction of the time."""


if not TYPE_CHECKING:  # type checkers read the imports above, which also catch misspelt names

    def __getattr__(name: str) -> Any:
        return lazy_export(__name__, _EXPORTS, name)

    def __dir__() -> list[str]:
        return public_dir(globals(), _EXPORTS)


__all__ = [  # noqa: RUF022 - grouped by topic under comment headings, on purpose
    # definitions
    "DefinitionRegistry",
    "SagaDefinition",
    "StepDefinition",
    "StepKind",
    "discover",
    "literal",
    "load_file",
    "load_python",
    "loads",
    "saga",
    "validate_input",
    # running sagas
    "Engine",
    "EngineSettings",
    "SagaAdmin",
    "SagaReport",
    "SagasSettings",
    "OperatorCommand",
    "SagaInstance",
    "SagaStatus",
    "StepStatus",
    # adapters
    "Broker",
    "BrokerMessage",
    "Consumer",
    "Delivery",
    "Store",
    "open_broker",
    "open_store",
    # participants and tests
    "BusinessFailure",
    "CommandMessage",
    "Participant",
    "SagaHarness",
    "VirtualClock",
    # errors
    "BrokerError",
    "ConcurrencyConflict",
    "DefinitionConflict",
    "DefinitionError",
    "IdempotencyConflict",
    "InvalidInput",
    "OperatorError",
    "SagaError",
    "StoreError",
    "UnknownDeadLetter",
    "UnknownDefinition",
    "UnknownSaga",
]

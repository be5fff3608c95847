"""sagas: a saga orchestration engine.

    from sagas import Engine, SagaHarness, load_file, open_broker, open_store, saga

The names below are the supported public API; everything else may change without notice.
"""

from __future__ import annotations

from sagas.adapters import open_broker, open_store
from sagas.adapters.ports import Broker, BrokerMessage, Consumer, Delivery, Store
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
from sagas.engine.runtime import Engine, EngineSettings
from sagas.engine.state import OperatorCommand, SagaInstance, SagaStatus, StepStatus
from sagas.engine.wire import CommandMessage
from sagas.errors import (
    BrokerError,
    ConcurrencyConflict,
    DefinitionConflict,
    DefinitionError,
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
    "InvalidInput",
    "OperatorError",
    "SagaError",
    "StoreError",
    "UnknownDeadLetter",
    "UnknownDefinition",
    "UnknownSaga",
]

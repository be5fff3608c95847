"""The exceptions of `sagas`.

Every exception the library raises on purpose derives from `SagaError`::

    SagaError
    ├── DefinitionError (ValueError)        a definition is malformed; carries every problem found
    ├── DefinitionConflict (ValueError)     same name + version registered with different content
    ├── UnknownDefinition (LookupError)     no definition with that name (and version)
    ├── UnknownSaga (LookupError)           no saga instance with that id
    │   └── AmbiguousSagaId                 a short id that begins more than one saga's id
    ├── UnknownDeadLetter (LookupError)     no dead letter with that id
    ├── InvalidInput (ValueError)           a saga's input, key or id is malformed or out of bounds
    ├── IdempotencyConflict (ValueError)    a key already started a saga of that name with a different input
    ├── OperatorError (ValueError)          an operator command does not fit the saga's state
    ├── ConcurrencyConflict                 an instance was changed by someone else (stale version)
    ├── StoreError                          the database failed; `retriable` says if trying again may help
    └── BrokerError                         the broker failed; `retriable` says if trying again may help
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SagaError(Exception):
    """Base class of every error raised by `sagas`."""


@dataclass(frozen=True)
class Problem:
    """One problem in a definition, located as precisely as the source allows."""

    path: str
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file or "<definition>"
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        field = self.path or "<root>"
        return f"{where}: {field}: {self.message}"


class DefinitionError(SagaError, ValueError):
    """A saga definition is malformed. `problems` lists every problem found, not only the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class DefinitionConflict(SagaError, ValueError):
    """A definition with the same name and version but different content is already registered."""


class UnknownDefinition(SagaError, LookupError):
    """No saga definition is registered under that name (and version)."""


class UnknownSaga(SagaError, LookupError):
    """No saga instance has that id."""


class AmbiguousSagaId(UnknownSaga):
    """A short id (a prefix) that begins the ids of several sagas: give more of it."""


class UnknownDeadLetter(SagaError, LookupError):
    """No dead letter has that id."""


class InvalidInput(SagaError, ValueError):
    """What a saga is started with is refused: its input does not satisfy the definition's input schema, or its
    input, idempotency key or id is beyond a limit (`sagas.definitions.limits`)."""


class IdempotencyConflict(SagaError, ValueError):
    """The idempotency key already started a saga of that name, with a different input. (The same key with the
    same input returns the saga it started.) `saga_id` is that saga."""

    def __init__(self, message: str, *, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(message)


class OperatorError(SagaError, ValueError):
    """An operator command (retry, abort, skip) does not fit the saga's current state."""


class ConcurrencyConflict(SagaError):
    """An instance changed under us: its stored version is not the one we read."""

    def __init__(self, saga_ids: Sequence[str]) -> None:
        self.saga_ids = tuple(saga_ids)
        super().__init__(f"stale write rejected for saga(s) {', '.join(self.saga_ids)}")


class StoreError(SagaError):
    """The store failed. `retriable` is True when the same call may succeed later (lost connection)."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        self.retriable = retriable
        super().__init__(message)


class BrokerError(SagaError):
    """The broker failed. `retriable` is True when the same call may succeed later (lost connection)."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        self.retriable = retriable
        super().__init__(message)

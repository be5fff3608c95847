"""Values the pure core works on: the saga instance, the events it reacts to, and the decision it returns.

Times are floats, seconds since the epoch, taken from a clock the caller passes in (a virtual one in tests).
Every value here is frozen; `decide` returns new values and never mutates.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

_setattr = object.__setattr__


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


V = TypeVar("V", bound=_Value)


def evolve(value: V, changes: Mapping[str, Any]) -> V:
    """`value.model_copy(update=changes)`: the same object (no validation, like model_copy), built directly.

    The pure core copies a step state or an instance several times per event; pydantic's generic `model_copy`
    (copy.copy of three attributes, config look-ups) costs three times as much. A `_Value` has no extra fields
    (extra="forbid") and no private attributes, which is all this relies on.
    """
    cls = type(value)
    new = cls.__new__(cls)
    fields = value.__dict__.copy()
    fields.update(changes)
    _setattr(new, "__dict__", fields)
    _setattr(new, "__pydantic_fields_set__", _all_fields(cls))
    _setattr(new, "__pydantic_extra__", None)
    _setattr(new, "__pydantic_private__", None)
    return new


@functools.cache
def _all_fields(cls: type[_Value]) -> set[str]:
    """What `model_fields_set` says of the core's own values: every field (nothing here tells an explicit value
    from a default, and building a set per copy was a tenth of the cost of a copy). One set shared by every value
    of `cls`: pydantic copies it before changing it (`model_copy`), and a frozen model never changes its own."""
    return set(cls.model_fields)


def trusted(cls: type[V], fields: dict[str, Any]) -> V:
    """An instance built from values that are already exactly what validation would produce, without validating.

    Only for the pure core's own values, whose types it controls: `fields` must hold every field of `cls` (defaults
    included), with the types validation gives (a float for a float field, enum members, tuples for tuples). It
    takes ownership of `fields`. Validating them costs more than the rest of a decision.
    """
    new = cls.__new__(cls)
    _setattr(new, "__dict__", fields)
    _setattr(new, "__pydantic_fields_set__", _all_fields(cls))
    _setattr(new, "__pydantic_extra__", None)
    _setattr(new, "__pydantic_private__", None)
    return new


class SagaStatus(StrEnum):
    """Where a saga stands. COMPLETED and COMPENSATED are final; FAILED is parked until an operator acts."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in _FINAL

    @property
    def is_settled(self) -> bool:
        """Nothing will happen without an operator: final, or parked."""
        return self in _SETTLED


# Module constants, not tuples of members: looking a member up on an Enum class costs four times a plain class
# attribute, and these are asked several times per event.
_FINAL = frozenset((SagaStatus.COMPLETED, SagaStatus.COMPENSATED))
_SETTLED = frozenset((*_FINAL, SagaStatus.FAILED))


class StepStatus(StrEnum):
    """Where one step stands."""

    PENDING = "pending"  # not sent yet
    RUNNING = "running"  # command sent, waiting for the reply of `attempt`
    BACKOFF = "backoff"  # retryable failure or timeout; waiting for the retry timer
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # business failure: the step had no effect, nothing to compensate
    UNKNOWN = "unknown"  # no definite answer (retries exhausted on timeouts): compensated to be safe
    COMPENSATING = "compensating"  # compensation sent, waiting for its reply
    COMPENSATION_BACKOFF = "compensation_backoff"
    COMPENSATED = "compensated"
    SKIPPED = "skipped"  # an operator marked it done without a reply


class MessageKind(StrEnum):
    COMMAND = "command"
    COMPENSATION = "compensation"
    REPLY = "reply"


class Outcome(StrEnum):
    """What a reply says happened."""

    SUCCESS = "success"
    FAILURE = "failure"  # business failure: definite, not retried
    RETRY = "retry"  # transient failure: retried by the step's policy


class TimerKind(StrEnum):
    STEP_TIMEOUT = "step_timeout"
    STEP_RETRY = "step_retry"
    COMPENSATION_TIMEOUT = "compensation_timeout"
    COMPENSATION_RETRY = "compensation_retry"
    DEADLINE = "deadline"


class StepState(_Value):
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    compensation_attempt: int = 0
    attempt_offset: int = Field(
        0, description="Attempts made before the last operator retry; not counted by the policy."
    )
    compensation_attempt_offset: int = 0
    output: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    completed_order: int | None = Field(None, description="Order in which the step completed (for compensation).")


class SagaInstance(_Value):
    id: str
    definition: str
    definition_version: int
    status: SagaStatus = SagaStatus.RUNNING
    stage: int = Field(0, description="Index of the stage (step or parallel group) being run or compensated.")
    steps: dict[str, StepState]
    input: dict[str, Any]
    failure: str | None = Field(None, description="Why the saga compensates or is parked.")
    idempotency_key: str | None = None
    version: int = Field(0, description="Optimistic-concurrency version; the store bumps it on every write.")
    created_at: float
    updated_at: float
    deadline_at: float | None = None
    completions: int = Field(0, description="Counter handing out StepState.completed_order.")

    @property
    def context(self) -> dict[str, Any]:
        """What payload mappings see: the input, each completed step's reply data, and the saga itself."""
        return {
            "input": self.input,
            "steps": {name: s.output for name, s in self.steps.items() if s.output is not None},
            "saga": {"id": self.id, "name": self.definition, "version": self.definition_version},
        }


# ---- events -------------------------------------------------------------------------------------------


class ReplyReceived(_Value):
    """A participant's reply to a command or compensation."""

    event: Literal["reply"] = "reply"
    message_id: str
    causation_id: str = Field(description="Id of the command this replies to.")
    step: str
    attempt: int
    kind: Literal[MessageKind.COMMAND, MessageKind.COMPENSATION]
    outcome: Outcome
    type: str
    data: dict[str, Any] = Field(default_factory=dict)
    reason: str | None = None


class TimerFired(_Value):
    event: Literal["timer"] = "timer"
    timer_id: str
    timer: TimerKind
    step: str | None = None
    attempt: int = 0


class OperatorCommand(_Value):
    """An operator's repair: retry a parked saga, abort (compensate) a running one, or skip a stuck step."""

    event: Literal["operator"] = "operator"
    action: Literal["retry", "abort", "skip"]
    step: str | None = None
    reason: str = ""
    operator: str = "operator"
    output: dict[str, Any] | None = Field(
        None, description="skip: the step's reply data, as later steps' payloads read it (steps.<step>)."
    )
    command_id: str | None = Field(
        None, description="Recorded with the command in the history: a retry after a lost COMMIT answer finds it."
    )


Event = Annotated[ReplyReceived | TimerFired | OperatorCommand, Field(discriminator="event")]


# ---- actions ------------------------------------------------------------------------------------------


class OutgoingCommand(_Value):
    """A command or compensation to publish. `id` is stable: saga id, step, kind and attempt."""

    id: str
    saga_id: str
    saga_name: str
    step: str
    kind: Literal[MessageKind.COMMAND, MessageKind.COMPENSATION]
    attempt: int
    topic: str
    type: str
    payload: dict[str, Any]


class TimerSpec(_Value):
    id: str
    saga_id: str
    timer: TimerKind
    step: str | None = None
    attempt: int = 0
    due_at: float


class HistoryEntry(_Value):
    """One line of a saga's timeline."""

    at: float
    type: str
    step: str | None = None
    attempt: int | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class Decision(_Value):
    """What `decide` concluded. With outcome "ignored" or "rejected" the instance is unchanged."""

    instance: SagaInstance
    outcome: Literal["applied", "ignored", "rejected"] = "applied"
    reason: str | None = None
    commands: tuple[OutgoingCommand, ...] = ()
    timers: tuple[TimerSpec, ...] = ()
    cancel_timers: tuple[str, ...] = ()
    history: tuple[HistoryEntry, ...] = ()


def message_id(saga_id: str, step: str, kind: MessageKind | str, attempt: int) -> str:
    """The stable id of a command: the same saga, step, kind and attempt always give the same id."""
    return f"{saga_id}/{step}/{kind}/{attempt}"


def timer_id(saga_id: str, timer: TimerKind, step: str | None, attempt: int) -> str:
    return f"{saga_id}/timer/{timer}/{step or '-'}/{attempt}"

"""The neutral, frozen model of a saga definition.

YAML files and the Python DSL both produce a `SagaDefinition`; nothing downstream knows which form was used.
Field-level checks live here (types, ranges, unknown keys); checks that need the whole definition
(names, ordering of kinds, references between steps) live in `sagas.definitions.checks`.

Durations are seconds (float). The readers accept `"250ms"`, `"30s"`, `"5m"`, `"1h"` as well as numbers.

Payload mappings are JSON-like dicts whose leaves say where a value comes from:
- a string is a JMESPath expression over the context ``{input, steps: {<step>: <reply data>}, saga: {id, name,
  version}}``;
- ``{"literal": X}`` is the literal X (any JSON value);
- numbers, booleans and null are literals;
- any other dict is a nested mapping, lists map element-wise.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    WithJsonSchema,
    model_validator,
)

from sagas.definitions.limits import COMMAND_TYPE_CHARS, NAME_CHARS, REPLY_TYPE_CHARS, TOPIC_CHARS, VERSION_MAX

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
TYPE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """Turn "250ms" / "30s" / "5m" / "1h" / 12 into seconds; leave anything else for pydantic to reject."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use a number of seconds or e.g. '250ms', '30s', '5m', '1h')")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a duration (use a number of seconds or e.g. '250ms', '30s', '5m', '1h')"
            )
        # Rounded to the microsecond: "9ms" is then the same number as 0.009, and "1.1h" as "66m" (same digest).
        return round(float(match.group(1)) * _UNIT[match.group(2)], 6)
    return value


def _not_bool(value: Any) -> Any:
    """YAML's true/false are not numbers here (pydantic would read true as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    return value


def _duration_schema(minimum: dict[str, float], maximum: float) -> WithJsonSchema:
    """Durations are numbers or text like "30s" in YAML; the generated schema must accept both for editors."""
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", **minimum, "maximum": maximum},
                {"type": "string", "pattern": _DURATION.pattern},
            ],
            "description": "Seconds, or a duration such as '250ms', '30s', '5m', '1h'.",
        }
    )


_MAX_SECONDS = 31 * 24 * 3600
_MAX_BACKOFF = 24 * 3600
Seconds = Annotated[
    float,
    BeforeValidator(parse_duration),
    Field(gt=0, le=_MAX_SECONDS),
    _duration_schema({"exclusiveMinimum": 0}, _MAX_SECONDS),
]
Backoff = Annotated[
    float,
    BeforeValidator(parse_duration),
    Field(ge=0, le=_MAX_BACKOFF),
    _duration_schema({"minimum": 0}, _MAX_BACKOFF),
]
Number = Annotated[float, BeforeValidator(_not_bool)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=NAME_CHARS)]
CommandType = Annotated[str, Field(pattern=TYPE_PATTERN, max_length=COMMAND_TYPE_CHARS)]
ReplyType = Annotated[str, Field(pattern=TYPE_PATTERN, max_length=REPLY_TYPE_CHARS)]
Topic = Annotated[str, Field(pattern=TYPE_PATTERN, max_length=TOPIC_CHARS)]


_PAYLOAD = (
    "Mapping of the command's payload: a string is a JMESPath expression over {input, steps, saga}; "
    "{literal: X} is X; numbers, booleans and null are themselves."
)


class _Frozen(BaseModel):
    """Frozen, so derived values are computed once: `functools.cached_property` stores them in `__dict__`
    beside the fields (pydantic ignores them for validation, dumps and equality)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, populate_by_name=True)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with changed fields must not keep the cached values derived from the old ones."""
        copied = super().model_copy(update=update, deep=deep)
        if update:
            for key in copied.__dict__.keys() - type(self).model_fields.keys():
                del copied.__dict__[key]
        return copied


class StepKind(StrEnum):
    """How a step takes part in compensation."""

    COMPENSATABLE = "compensatable"
    """Has a compensation; undone if a later step fails."""
    PIVOT = "pivot"
    """The point of no return: once it succeeds the saga only goes forward."""
    RETRIABLE = "retriable"
    """After the pivot: retried until it succeeds, never compensated."""


class RetryPolicy(_Frozen):
    """When and how often a command is sent again after a timeout or a retryable failure."""

    max_attempts: StrictInt = Field(3, ge=1, le=1000)
    initial_backoff: Backoff = 1.0
    multiplier: Number = Field(2.0, ge=1.0, le=100.0)
    max_backoff: Backoff = 60.0
    jitter: Number = Field(0.1, ge=0.0, le=1.0, description="Fraction of the backoff added or removed at random.")

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RetryPolicy:
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must be at least initial_backoff")
        return self

    def backoff(self, attempt: int, unit_random: float) -> float:
        """Delay before attempt `attempt + 1`, given a number in [0, 1) to place the jitter."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, attempt - 1))
        return max(0.0, base * (1.0 + self.jitter * (2.0 * unit_random - 1.0)))


class CompensationDefinition(_Frozen):
    """The command that undoes a step."""

    command: CommandType = Field(description="Command type; its success reply is '<command>.succeeded'.")
    payload: dict[str, Any] = Field(default_factory=dict, description=_PAYLOAD)


class StepDefinition(_Frozen):
    """One local transaction in a participant service."""

    name: Name = Field(description="Unique within the saga; later payloads read its reply as steps.<name>.")
    participant: Name = Field(description="The service that runs the step.")
    command: CommandType = Field(description="Command type sent to the participant.")
    topic: Topic | None = Field(None, description="Command topic; defaults to '<participant>.commands'.")
    payload: dict[str, Any] = Field(default_factory=dict, description=_PAYLOAD)
    success: tuple[ReplyType, ...] = Field(
        default=(), description="Reply types that mean success; default '<command>.succeeded'."
    )
    failure: tuple[ReplyType, ...] = Field(
        default=(), description="Reply types that mean business failure; default '<command>.failed'."
    )
    compensation: CompensationDefinition | None = Field(
        None, description="Required for compensatable steps; pivot and retriable steps have none."
    )
    timeout: Seconds = Field(30.0, description="How long to wait for a reply before retrying.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    kind: StepKind = Field(
        StepKind.COMPENSATABLE,
        description="compensatable steps, then at most one pivot, then retriable steps.",
    )

    @cached_property
    def command_topic(self) -> str:
        return self.topic or f"{self.participant}.commands"

    @cached_property
    def success_types(self) -> tuple[str, ...]:
        return self.success or (f"{self.command}.succeeded",)

    @cached_property
    def failure_types(self) -> tuple[str, ...]:
        return self.failure or (f"{self.command}.failed",)

    @cached_property
    def compensation_success_types(self) -> tuple[str, ...]:
        return (f"{self.compensation.command}.succeeded",) if self.compensation else ()


class ParallelGroup(_Frozen):
    """Steps sent together; the group succeeds when all succeed."""

    name: Name
    parallel: tuple[StepDefinition, ...] = Field(min_length=2, description="Steps sent together (no pivot).")


def _step_or_group(value: Any) -> str:
    if isinstance(value, dict):
        return "group" if "parallel" in value else "step"
    return "group" if isinstance(value, ParallelGroup) else "step"


StageDefinition = Annotated[
    Annotated[StepDefinition, Tag("step")] | Annotated[ParallelGroup, Tag("group")],
    Discriminator(_step_or_group),
]


class SagaDefinition(_Frozen):
    """A saga: ordered steps, each with the compensation that undoes it."""

    name: Name
    version: StrictInt = Field(ge=1, le=VERSION_MAX, description="Integer; changed content needs a new version.")
    description: str = ""
    input_schema: dict[str, Any] | None = Field(None, description="JSON Schema the saga's input must satisfy.")
    steps: tuple[StageDefinition, ...] = Field(
        min_length=1, description="In order; an entry with 'parallel' is a group of steps sent together."
    )
    deadline: Seconds | None = Field(None, description="Whole-saga timeout; before the pivot it aborts the saga.")
    compensation_retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(max_attempts=5, initial_backoff=1.0, max_backoff=60.0)
    )
    on_compensation_exhausted: Literal["park"] = Field(
        "park",
        description="What happens when a compensation keeps failing: the saga is parked for an operator.",
    )

    @cached_property
    def stages(self) -> tuple[tuple[StepDefinition, ...], ...]:
        """The steps in execution order; a parallel group is one stage of several steps."""
        return tuple(s.parallel if isinstance(s, ParallelGroup) else (s,) for s in self.steps)

    @cached_property
    def all_steps(self) -> tuple[StepDefinition, ...]:
        """Every step in execution order (what `iter_steps` yields)."""
        return tuple(step for stage in self.stages for step in stage)

    @cached_property
    def _step_index(self) -> dict[str, tuple[StepDefinition, int]]:
        """Step name -> (step, stage index); the first step of a name wins, as a scan in order would."""
        index: dict[str, tuple[StepDefinition, int]] = {}
        for number, stage in enumerate(self.stages):
            for step in stage:
                index.setdefault(step.name, (step, number))
        return index

    def iter_steps(self) -> Iterator[StepDefinition]:
        return iter(self.all_steps)

    def step(self, name: str) -> StepDefinition:
        return self._step_index[name][0]

    def stage_of(self, name: str) -> int:
        return self._step_index[name][1]

    @cached_property
    def digest(self) -> str:
        """A stable content digest: same content, same digest, whichever form it came from."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @cached_property
    def identity(self) -> str:
        return f"{self.name}@v{self.version}#{self.digest}"

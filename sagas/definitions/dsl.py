"""A fluent Python builder for saga definitions, in the spirit of Eventuate's
`step().invokeParticipant(..).withCompensation(..)`::

    order = (
        saga("order", version=1)
        .step("create_order")
            .invoke("orders", "order.create", {"customer_id": "input.customer_id"})
            .with_compensation("order.reject", {"order_id": "steps.create_order.order_id"})
        .step("charge_payment")
            .invoke("payments", "payment.charge", {"amount": "input.amount", "currency": literal("EUR")})
            .pivot()
        .build()
    )

The builder only records plain data, the same shape a YAML file has, and `build()` sends it through the same
validation as YAML: the two forms cannot drift apart. Mistakes are collected and raised together by `build()`,
each pointing at the line of the call it concerns.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from sagas.definitions.build import build_definition
from sagas.definitions.expressions import LITERAL_KEY
from sagas.definitions.model import SagaDefinition, StepKind
from sagas.definitions.source import Path, SourceMap, format_path
from sagas.errors import Problem

Duration = float | str
"""Seconds, or text such as "250ms", "30s", "5m", "1h"."""


def literal(value: Any) -> dict[str, Any]:
    """A payload value taken as is rather than read as a JMESPath expression."""
    return {LITERAL_KEY: value}


def saga(name: str, version: int, description: str | None = None) -> SagaBuilder:
    """Start a definition; chain `.step(...)` calls and finish with `.build()`."""
    return SagaBuilder(name, version, description)


def _policy(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class SagaBuilder:
    """Records a definition call by call. Step methods apply to the step last started with `step()`."""

    def __init__(self, name: str, version: int, description: str | None = None) -> None:
        file, line, column = _caller()
        self._file = file
        self._data: dict[str, Any] = {"name": name, "version": version}
        if description is not None:
            self._data["description"] = description
        self._steps: list[dict[str, Any]] = []
        self._group: list[dict[str, Any]] | None = None
        self._step: dict[str, Any] | None = None
        self._step_path: Path = ("steps",)
        self._positions: dict[Path, tuple[int, int]] = {(): (line, column)}
        self._problems: list[Problem] = []

    # -- saga level -------------------------------------------------------------------------------------

    def describe(self, text: str) -> SagaBuilder:
        return self._saga_set("description", text, "describe")

    def input_schema(self, schema: Mapping[str, Any]) -> SagaBuilder:
        """JSON Schema the input must satisfy when a saga starts."""
        return self._saga_set("input_schema", dict(schema), "input_schema")

    def deadline(self, duration: Duration) -> SagaBuilder:
        """Whole-saga timeout."""
        return self._saga_set("deadline", duration, "deadline")

    def compensation_retry(
        self,
        *,
        max_attempts: int | None = None,
        initial_backoff: Duration | None = None,
        multiplier: float | None = None,
        max_backoff: Duration | None = None,
        jitter: float | None = None,
    ) -> SagaBuilder:
        """How compensations are retried before the saga is parked for an operator."""
        policy = _policy(
            max_attempts=max_attempts,
            initial_backoff=initial_backoff,
            multiplier=multiplier,
            max_backoff=max_backoff,
            jitter=jitter,
        )
        return self._saga_set("compensation_retry", policy, "compensation_retry")

    def on_compensation_exhausted(self, action: str) -> SagaBuilder:
        return self._saga_set("on_compensation_exhausted", action, "on_compensation_exhausted")

    # -- structure --------------------------------------------------------------------------------------

    def step(self, name: str) -> SagaBuilder:
        """Start a step (inside an open parallel group, a member of it)."""
        self._step = {"name": name}
        if self._group is not None:
            self._step_path = (*self._step_path[:2], "parallel", len(self._group))
            self._group.append(self._step)
        else:
            self._step_path = ("steps", len(self._steps))
            self._steps.append(self._step)
        self._mark(self._step_path)
        return self

    def parallel(self, name: str) -> SagaBuilder:
        """Open a parallel group: the following `step()`s are sent together, until `end_parallel()`."""
        if self._group is not None:
            self._usage("parallel() inside a parallel group; call end_parallel() first")
        self._group = []
        self._step = None
        self._step_path = ("steps", len(self._steps))
        self._steps.append({"name": name, "parallel": self._group})
        self._mark(self._step_path)
        return self

    def end_parallel(self) -> SagaBuilder:
        if self._group is None:
            self._usage("end_parallel() without parallel()")
        self._group = None
        self._step = None
        return self

    # -- the current step -------------------------------------------------------------------------------

    def invoke(
        self,
        participant: str,
        command: str,
        payload: Mapping[str, Any] | None = None,
        *,
        topic: str | None = None,
    ) -> SagaBuilder:
        """Send `command` to `participant` (on `<participant>.commands` unless `topic` is given)."""
        self._step_set("participant", participant, "invoke")
        self._step_set("command", command, "invoke", check=False)
        if payload is not None:
            self._step_set("payload", dict(payload), "invoke", check=False)
        if topic is not None:
            self._step_set("topic", topic, "invoke", check=False)
        return self

    def with_compensation(self, command: str, payload: Mapping[str, Any] | None = None) -> SagaBuilder:
        """The command that undoes this step; its payload may read this step's own reply."""
        compensation: dict[str, Any] = {"command": command}
        if payload is not None:
            compensation["payload"] = dict(payload)
        return self._step_set("compensation", compensation, "with_compensation")

    def replies(self, *, success: Iterable[str] | None = None, failure: Iterable[str] | None = None) -> SagaBuilder:
        """Reply types meaning success / business failure; default '<command>.succeeded' / '.failed'."""
        if success is not None:
            self._step_set("success", list(success), "replies")
        if failure is not None:
            self._step_set("failure", list(failure), "replies")
        return self

    def timeout(self, duration: Duration) -> SagaBuilder:
        return self._step_set("timeout", duration, "timeout")

    def retry(
        self,
        *,
        max_attempts: int | None = None,
        initial_backoff: Duration | None = None,
        multiplier: float | None = None,
        max_backoff: Duration | None = None,
        jitter: float | None = None,
    ) -> SagaBuilder:
        """Retry policy for timeouts and retryable failures of this step."""
        policy = _policy(
            max_attempts=max_attempts,
            initial_backoff=initial_backoff,
            multiplier=multiplier,
            max_backoff=max_backoff,
            jitter=jitter,
        )
        return self._step_set("retry", policy, "retry")

    def kind(self, kind: StepKind | str) -> SagaBuilder:
        return self._step_set("kind", str(kind), "kind")

    def pivot(self) -> SagaBuilder:
        """Mark this step as the point of no return."""
        return self.kind(StepKind.PIVOT)

    def retriable(self) -> SagaBuilder:
        """Mark this step as retried until it succeeds, never compensated (it comes after the pivot)."""
        return self.kind(StepKind.RETRIABLE)

    # -- result -----------------------------------------------------------------------------------------

    def build(self) -> SagaDefinition:
        """Validate and return the definition; raises `DefinitionError` with every problem found."""
        data = copy.deepcopy({**self._data, "steps": self._steps})
        source = SourceMap(file=self._file, values=dict(self._positions))
        definition = build_definition(data, source, list(self._problems))
        _BUILT[definition.identity] = source
        while len(_BUILT) > _MAX_BUILT:  # bounded: the oldest builds are forgotten first
            del _BUILT[next(iter(_BUILT))]
        return definition

    # -- internals --------------------------------------------------------------------------------------

    def _saga_set(self, key: str, value: Any, method: str) -> SagaBuilder:
        if key in self._data:
            self._usage(f"{method}() called twice", (key,))
        self._data[key] = value
        self._mark((key,))
        return self

    def _step_set(self, key: str, value: Any, method: str, *, check: bool = True) -> SagaBuilder:
        if self._step is None:
            self._usage(f"{method}() must follow step(name)")
            return self
        if check and key in self._step:
            self._usage(f"{method}() called twice for step {self._step['name']!r}", (*self._step_path, key))
        self._step[key] = value
        self._mark((*self._step_path, key))
        return self

    def _mark(self, path: Path) -> None:
        file, line, column = _caller()
        if file == self._file:
            self._positions[path] = (line, column)

    def _usage(self, message: str, path: Path | None = None) -> None:
        file, line, column = _caller()
        where = path if path is not None else self._step_path
        self._problems.append(Problem(format_path(where), message, file, line, column))


_BUILT: dict[str, SourceMap] = {}
_MAX_BUILT = 1024


def built_source(definition: SagaDefinition) -> SourceMap | None:
    """Where the builder calls of the last DSL build of this content were (for `sagas explore`'s findings), or None
    for a definition the builder did not make."""
    return _BUILT.get(definition.identity)


def _caller() -> tuple[str, int, int]:
    """File, line and column of the call into this module, so problems point at the user's code."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    line, column = frame.f_lineno, 1
    positions = list(frame.f_code.co_positions())
    index = frame.f_lasti // 2
    if 0 <= index < len(positions):
        start_line, _, start_column, _ = positions[index]
        if start_line is not None and start_column is not None:
            line, column = start_line, start_column + 1
    return frame.f_code.co_filename, line, column

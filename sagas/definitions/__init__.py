"""What a saga is: the neutral model, YAML reader, Python DSL, validation, JSON Schema and graphs."""

from __future__ import annotations

from sagas.definitions.dsl import SagaBuilder, literal, saga
from sagas.definitions.expressions import compile_expression, render, render_payload
from sagas.definitions.graph import to_dot, to_mermaid
from sagas.definitions.loader import discover, load_file, load_python, loads
from sagas.definitions.model import (
    CompensationDefinition,
    ParallelGroup,
    RetryPolicy,
    SagaDefinition,
    StepDefinition,
    StepKind,
)
from sagas.definitions.registry import DefinitionRegistry
from sagas.definitions.schema import to_json_schema, validate_input

__all__ = [
    "CompensationDefinition",
    "DefinitionRegistry",
    "ParallelGroup",
    "RetryPolicy",
    "SagaBuilder",
    "SagaDefinition",
    "StepDefinition",
    "StepKind",
    "compile_expression",
    "discover",
    "literal",
    "load_file",
    "load_python",
    "loads",
    "render",
    "render_payload",
    "saga",
    "to_dot",
    "to_json_schema",
    "to_mermaid",
    "validate_input",
]

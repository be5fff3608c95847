"""What a saga is: the neutral model, YAML reader, Python DSL, validation, JSON Schema and graphs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagas._lazy import lazy_export, public_dir

if TYPE_CHECKING:
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

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("SagaBuilder", "literal", "saga"), "sagas.definitions.dsl"),
    **dict.fromkeys(("compile_expression", "render", "render_payload"), "sagas.definitions.expressions"),
    **dict.fromkeys(("to_dot", "to_mermaid"), "sagas.definitions.graph"),
    **dict.fromkeys(("discover", "load_file", "load_python", "loads"), "sagas.definitions.loader"),
    **dict.fromkeys(
        ("CompensationDefinition", "ParallelGroup", "RetryPolicy", "SagaDefinition", "StepDefinition", "StepKind"),
        "sagas.definitions.model",
    ),
    **dict.fromkeys(("DefinitionRegistry",), "sagas.definitions.registry"),
    **dict.fromkeys(("to_json_schema", "validate_input"), "sagas.definitions.schema"),
}
"""Public name -> the module defining it, imported when first read (as in `sagas`): the engine's modules import
`sagas.definitions.model` without the YAML reader, the DSL and the graph writers."""

if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        return lazy_export(__name__, _EXPORTS, name)

    def __dir__() -> list[str]:
        return public_dir(globals(), _EXPORTS)


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

"""Plain data -> `SagaDefinition`, or a `DefinitionError` with every problem found.

Both readers (YAML and the Python DSL) end here, so they produce the same model and the same messages.
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from sagas.definitions.checks import check, suggest
from sagas.definitions.model import ParallelGroup, SagaDefinition, StepDefinition, StepKind
from sagas.definitions.source import Finding, Path, SourceMap, ordered
from sagas.errors import DefinitionError, Problem

# The discriminated union of steps and parallel groups adds its tag to error locations.
_UNION_TAGS: dict[str, type[BaseModel]] = {"step": StepDefinition, "group": ParallelGroup}


# pydantic speaks of Python types; definitions are YAML or JSON.
_PLAIN_MESSAGES = {
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "string_type": "expected a string",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "int_parsing": "expected an integer",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
}

_BOUNDS = {
    "greater_than": ("gt", "greater than"),
    "greater_than_equal": ("ge", "at least"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "at most"),
}


def build_definition(data: Any, source: SourceMap, problems: list[Problem] | None = None) -> SagaDefinition:
    """Validate `data` with the model and the static checks; raise `DefinitionError` listing all problems."""
    found = list(problems or [])
    definition: SagaDefinition | None = None
    try:
        definition = SagaDefinition.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        found += [source.problem(f) for f in _relevant(errors, source)]
    found += [source.problem(finding) for finding in check(data)]
    if found or definition is None:
        raise DefinitionError(ordered(found))
    return definition


def _relevant(errors: list[ErrorDetails], source: SourceMap) -> list[Finding]:
    """Drop the echoes: a list "too short" only because its bad items were dropped, a refused YAML value."""
    findings = [(error["type"], _finding(error)) for error in errors]
    kept = []
    for kind, finding in findings:
        if any(finding.path[: len(p)] == p for p in source.reported):
            continue
        echo = kind == "too_short" and any(
            other.path[: len(finding.path)] == finding.path and len(other.path) > len(finding.path)
            for _, other in findings
        )
        if not echo:
            kept.append(finding)
    return kept


def _finding(error: ErrorDetails) -> Finding:
    path, model = _walk(error["loc"])
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        key = str(path[-1])
        fields = _fields(model)
        hint = suggest(key, fields) or (f"; allowed: {', '.join(fields)}" if fields else "")
        return Finding(path, f"unknown key {key!r}{hint}", at="key")
    if kind == "missing":
        return Finding(path, f"missing required key {path[-1]!r}", at="key")
    if kind.startswith("value_error") or kind == "assertion_error":
        message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind == "enum" and path and path[-1] == "kind":
        choices = [k.value for k in StepKind]
        message = f"kind must be one of {', '.join(choices)}{suggest(str(error['input']), choices)}"
    elif kind in ("int_type", "int_from_float", "int_parsing") and path == ("version",):
        message = "version must be an integer (1, 2, ...)"
    elif kind == "too_short":
        context = error.get("ctx", {})
        message = f"needs at least {context.get('min_length')} entries, has {context.get('actual_length')}"
    elif kind == "string_too_long":
        limit = error.get("ctx", {}).get("max_length")
        message = f"at most {limit} characters, has {len(error['input'])}"
    elif kind == "string_pattern_mismatch":
        message = f"must match {error.get('ctx', {}).get('pattern')}"
    elif kind in _BOUNDS:
        bound = error.get("ctx", {}).get(_BOUNDS[kind][0])
        message = f"must be {_BOUNDS[kind][1]} {bound}"
    elif kind in _PLAIN_MESSAGES:
        message = _PLAIN_MESSAGES[kind]
    if not kind.startswith("value_error") and _is_scalar(error["input"]) and kind not in ("enum", "string_too_long"):
        message += f" (got {_show(error['input'])})"
    return Finding(path, message)


def _walk(loc: tuple[int | str, ...]) -> tuple[Path, type[BaseModel] | None]:
    """Drop union tags from a pydantic location and find the model that owns its last key."""
    path: list[str | int] = []
    model: type[BaseModel] | None = SagaDefinition
    owner: type[BaseModel] | None = SagaDefinition
    for part in loc:
        if isinstance(part, str) and part in _UNION_TAGS and path and isinstance(path[-1], int):
            model = _UNION_TAGS[part]
            continue
        owner = model
        path.append(part)
        if isinstance(part, str):
            model = _field_model(model, part)
    return tuple(path), owner


def _field_model(model: type[BaseModel] | None, name: str) -> type[BaseModel] | None:
    if model is None or name not in model.model_fields:
        return None
    pending = [model.model_fields[name].annotation]
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        if get_origin(annotation) is not None or get_args(annotation):
            pending += [a for a in get_args(annotation) if a is not Ellipsis]
    return None


def _fields(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    names = list(model.model_fields)
    if model is StepDefinition:
        names.append("parallel")  # a typo'd "parallel" makes the entry look like a step
    return names


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    if value is None:
        text = "null"
    return text if len(text) <= 60 else text[:57] + "..."

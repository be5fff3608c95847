"""JSON Schemas: the schema of the definition format, and checking a saga's input against its schema."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jsonschema
import jsonschema.exceptions
import pydantic_core

from sagas.definitions.limits import IDEMPOTENCY_KEY_CHARS, INPUT_BYTES, INPUT_DEPTH, SAGA_ID_CHARS
from sagas.definitions.model import SagaDefinition
from sagas.errors import InvalidInput

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = "docs/saga-definition.schema.json"
_MAX_REPORTED = 10


def to_json_schema() -> dict[str, Any]:
    """The JSON Schema of the YAML format, generated from the model; editors use it to complete and check.

    It checks shape and types; the cross-step rules (`sagas validate`) are beyond what JSON Schema can say.
    """
    schema = SagaDefinition.model_json_schema(mode="validation")
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "Saga definition",
        **{k: v for k, v in schema.items() if k != "title"},
    }


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)


def validate_start(
    definition: SagaDefinition, data: Any, *, key: str | None = None, saga_id: str | None = None
) -> None:
    """Check what a saga is started with: its idempotency key and id (if given), then its input.

    Raises:
        InvalidInput: one line saying which value is out of bounds (see `sagas.definitions.limits`), or what
            `validate_input` says of the input.
    """
    for what, value, limit in (("idempotency key", key, IDEMPOTENCY_KEY_CHARS), ("saga id", saga_id, SAGA_ID_CHARS)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"the {what} must be a string, not {type(value).__name__}")
        if len(value) > limit:
            raise InvalidInput(f"the {what} has {len(value):,} characters; the limit is {limit}")
        if "\x00" in value:
            raise InvalidInput(f"the {what} contains a NUL character (\\u0000)")
    if saga_id == "":
        raise InvalidInput("the saga id is empty")
    validate_input(definition, data)


def validate_input(definition: SagaDefinition, data: Any) -> None:
    """Check a saga's input: a JSON object within the bounds of `sagas.definitions.limits` that matches the
    definition's input schema.

    Raises:
        InvalidInput: listing where and why the input does not match (up to ten places), or saying that it is too
            large, nested too deeply, or holds a NUL character (PostgreSQL cannot store one in text).
    """
    label = f"input of {definition.name} v{definition.version}"
    if not isinstance(data, dict):
        raise InvalidInput(f"{label} must be a JSON object, not {type(data).__name__}")
    if _depth(data, INPUT_DEPTH) > INPUT_DEPTH:
        raise InvalidInput(f"{label} is nested deeper than {INPUT_DEPTH} levels")
    try:
        size = len(pydantic_core.to_json(data))
    except pydantic_core.PydanticSerializationError as exc:
        raise InvalidInput(f"{label} is not JSON: {str(exc).splitlines()[0]}") from None
    if size > INPUT_BYTES:
        raise InvalidInput(f"{label} is {size:,} bytes of JSON; the limit is {INPUT_BYTES:,}")
    if has_nul(data):
        raise InvalidInput(f"{label} contains a NUL character (\\u0000)")
    if definition.input_schema is None:
        return
    validator = _validator(json.dumps(definition.input_schema, sort_keys=True))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        return
    details = "; ".join(f"{_where(e)}: {e.message}" for e in errors[:_MAX_REPORTED])
    more = f" (and {len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
    raise InvalidInput(f"input of {definition.name} v{definition.version} does not match its schema: {details}{more}")


def _depth(value: Any, limit: int) -> int:
    """How deeply `value`'s objects and lists nest (1 for a flat object), counting no further than `limit + 1`:
    without recursion, so that no input can exhaust the stack."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children)
    return deepest


def has_nul(value: Any) -> bool:
    """Whether a JSON value holds a NUL character in any of its strings (keys included)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(has_nul, value))
    return False


def _where(error: jsonschema.exceptions.ValidationError) -> str:
    path = "input"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path

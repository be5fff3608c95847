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


_BY_IDENTITY: dict[str, jsonschema.protocols.Validator] = {}


def _validator_of(definition: SagaDefinition) -> jsonschema.protocols.Validator:
    """The input schema's validator, found by the definition's identity: serializing the schema to look it up cost
    a tenth of a start's validation."""
    found = _BY_IDENTITY.get(definition.identity)
    if found is None:
        if len(_BY_IDENTITY) >= 256:  # bounded, as `_validator` is
            _BY_IDENTITY.clear()
        found = _BY_IDENTITY[definition.identity] = _validator(json.dumps(definition.input_schema, sort_keys=True))
    return found


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
    depth, nul = _scan(data, INPUT_DEPTH)
    if depth > INPUT_DEPTH:
        raise InvalidInput(f"{label} is nested deeper than {INPUT_DEPTH} levels")
    try:
        size = len(pydantic_core.to_json(data))
    except pydantic_core.PydanticSerializationError as exc:
        raise InvalidInput(f"{label} is not JSON: {str(exc).splitlines()[0]}") from None
    if size > INPUT_BYTES:
        raise InvalidInput(f"{label} is {size:,} bytes of JSON; the limit is {INPUT_BYTES:,}")
    if nul:
        raise InvalidInput(f"{label} contains a NUL character (\\u0000)")
    if definition.input_schema is None:
        return
    validator = _validator_of(definition)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        return
    details = "; ".join(f"{_where(e)}: {e.message}" for e in errors[:_MAX_REPORTED])
    more = f" (and {len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
    raise InvalidInput(f"input of {definition.name} v{definition.version} does not match its schema: {details}{more}")


def _scan(value: Any, limit: int) -> tuple[int, bool]:
    """How deeply `value`'s objects and lists nest (1 for a flat object), counted no further than `limit + 1`, and
    whether a string in it (keys included) holds a NUL; in one walk without recursion, so that no input can exhaust
    the stack."""
    deepest, nul = 0, False
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            nul = nul or "\x00" in item
            continue
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return depth, nul
        if isinstance(item, dict):
            nul = nul or any("\x00" in key for key in item if isinstance(key, str))
            pending.extend((child, depth + 1) for child in item.values())
        else:
            pending.extend((child, depth + 1) for child in item)
    return deepest, nul


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

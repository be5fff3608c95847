"""JSON Schemas: the schema of the definition format, and checking a saga's input against its schema."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jsonschema
import jsonschema.exceptions

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


def validate_input(definition: SagaDefinition, data: Any) -> None:
    """Check a saga's input against the definition's input schema.

    Raises:
        InvalidInput: listing where and why the input does not match (up to ten places), or saying that it holds
            a NUL character (PostgreSQL's JSONB cannot store one, so such a saga could never be saved there).
    """
    if has_nul(data):
        raise InvalidInput(f"input of {definition.name} v{definition.version} contains a NUL character (\\u0000)")
    if definition.input_schema is None:
        return
    validator = _validator(json.dumps(definition.input_schema, sort_keys=True))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        return
    details = "; ".join(f"{_where(e)}: {e.message}" for e in errors[:_MAX_REPORTED])
    more = f" (and {len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
    raise InvalidInput(f"input of {definition.name} v{definition.version} does not match its schema: {details}{more}")


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

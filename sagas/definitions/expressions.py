"""Payload mappings: JMESPath over the saga context, plus literals. Nothing here can run code.

See `sagas.definitions.model` for the mapping format.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jmespath
from jmespath.parser import ParsedResult

LITERAL_KEY = "literal"


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> ParsedResult:
    """Parse once; raises jmespath.exceptions.ParseError (a ValueError) on bad syntax."""
    return jmespath.compile(expression)


def is_literal(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and LITERAL_KEY in value


def render(mapping: Any, context: dict[str, Any]) -> Any:
    """Evaluate a payload mapping against a context; a missing path yields None, as JMESPath does."""
    if isinstance(mapping, str):
        return compile_expression(mapping).search(context)
    if is_literal(mapping):
        return mapping[LITERAL_KEY]
    if isinstance(mapping, dict):
        return {key: render(value, context) for key, value in mapping.items()}
    if isinstance(mapping, list):
        return [render(item, context) for item in mapping]
    return mapping  # numbers, booleans, null


def render_payload(mapping: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    rendered = render(mapping, context)
    assert isinstance(rendered, dict)
    return rendered

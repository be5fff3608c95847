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


def _field_path(node: Any) -> tuple[str, ...] | None:
    """The keys of an expression made only of field lookups (`input.order_id`), or None."""
    if node["type"] == "field":
        return (node["value"],)
    if node["type"] != "subexpression":
        return None
    keys: list[str] = []
    for child in node["children"]:
        part = _field_path(child)
        if part is None:
            return None
        keys.extend(part)
    return tuple(keys)


@lru_cache(maxsize=4096)
def _evaluator(expression: str) -> tuple[str, ...] | ParsedResult:
    """Most payload leaves are plain paths: those are looked up directly, the way JMESPath's field visitor does
    (`value.get(key)`, None where there is no mapping), without its tree walk."""
    parsed = compile_expression(expression)
    path = _field_path(parsed.parsed)
    return parsed if path is None else path


def search(expression: str, context: Any) -> Any:
    """`jmespath.search`, parsed once per expression."""
    evaluator = _evaluator(expression)
    if isinstance(evaluator, tuple):
        value = context
        for key in evaluator:
            try:
                value = value.get(key)
            except AttributeError:
                return None
        return value
    return evaluator.search(context)


def is_literal(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and LITERAL_KEY in value


def render(mapping: Any, context: dict[str, Any]) -> Any:
    """Evaluate a payload mapping against a context; a missing path yields None, as JMESPath does."""
    if isinstance(mapping, str):
        return search(mapping, context)
    if is_literal(mapping):
        return mapping[LITERAL_KEY]
    if isinstance(mapping, dict):
        return {key: render(value, context) for key, value in mapping.items()}
    if isinstance(mapping, list | tuple):  # the DSL may write a tuple where YAML has a list
        return [render(item, context) for item in mapping]
    return mapping  # numbers, booleans, null


def render_payload(mapping: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    rendered = render(mapping, context)
    if not isinstance(rendered, dict):  # refused by the checks: only a model built without them gets here
        raise TypeError(f"a payload must render to a mapping, not {type(rendered).__name__}")
    return rendered

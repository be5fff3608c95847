"""Checks that need the whole definition: names, kinds and their order, references between steps, values.

They run on the plain data (what the YAML reader or the DSL produced), not on the model, so that a file
with a wrong type in one place still gets its cross-step problems reported in the same run. Every check
therefore guards against values of the wrong type and leaves those to the model's own validation.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
from jmespath.exceptions import JMESPathError

from sagas.definitions.expressions import LITERAL_KEY, compile_expression, is_literal
from sagas.definitions.model import StepKind, parse_duration
from sagas.definitions.source import Finding, Path, format_path

ROOTS = ("input", "steps", "saga")
SAGA_FIELDS = ("id", "name", "version")
MAX_EXPRESSION_CHARS = 1_000
"""Payload expressions are short paths; a long one is a mistake (and deep nesting would exhaust the parser)."""

# Nodes whose first child is evaluated against the current value and whose other children are not.
_CHAINS = {
    "subexpression",
    "index_expression",
    "projection",
    "filter_projection",
    "value_projection",
    "flatten",
    "pipe",
}


@dataclass(frozen=True)
class _Step:
    path: Path
    data: dict[str, Any]
    name: str | None
    stage: int
    group: str | None

    @property
    def kind(self) -> str | None:
        kind = self.data.get("kind", StepKind.COMPENSATABLE.value)
        return kind if kind in {k.value for k in StepKind} else None


def suggest(word: str, choices: Sequence[str]) -> str:
    """`; did you mean 'x'?` when one of `choices` is close to `word`, else the empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check(data: Any) -> list[Finding]:
    """Every cross-field problem in a definition's plain data."""
    if not isinstance(data, dict):
        return []
    stages = list(_stages(data.get("steps")))
    findings: list[Finding] = []
    findings += _check_names(data.get("steps"), stages)
    findings += _check_kinds(stages)
    for stage in stages:
        for step in stage:
            findings += _check_step(step, stages)
    findings += _check_deadline(data.get("deadline"), stages)
    findings += _check_input_schema(data.get("input_schema"))
    return findings


def _stages(steps: Any) -> Iterator[list[_Step]]:
    if not isinstance(steps, list | tuple):
        return
    for index, entry in enumerate(steps):
        if not isinstance(entry, dict):
            continue
        members = entry.get("parallel")
        if "parallel" in entry:
            group = entry.get("name") if isinstance(entry.get("name"), str) else None
            if isinstance(members, list | tuple):
                yield [
                    _Step(("steps", index, "parallel", position), member, _name(member), index, group)
                    for position, member in enumerate(members)
                    if isinstance(member, dict)
                ]
        else:
            yield [_Step(("steps", index), entry, _name(entry), index, None)]


def _name(data: dict[str, Any]) -> str | None:
    name = data.get("name")
    return name if isinstance(name, str) else None


def _check_names(steps: Any, stages: list[list[_Step]]) -> Iterator[Finding]:
    seen: dict[str, Path] = {}
    named: list[tuple[Path, str]] = []
    for index, entry in enumerate(steps if isinstance(steps, list | tuple) else ()):
        if isinstance(entry, dict) and "parallel" in entry and isinstance(entry.get("name"), str):
            named.append((("steps", index), entry["name"]))
    named += [(step.path, step.name) for stage in stages for step in stage if step.name is not None]
    for path, name in sorted(named, key=lambda item: item[0]):
        if name in seen:
            other = format_path(seen[name])
            yield Finding((*path, "name"), f"duplicate step name {name!r} (also used by {other})")
        else:
            seen[name] = path


def _check_kinds(stages: list[list[_Step]]) -> Iterator[Finding]:
    pivot: str | None = None
    retriable: str | None = None
    for stage in stages:
        group = stage[0].group if stage else None
        kinds = {step.kind for step in stage} - {None}
        if group is not None and {"compensatable", "retriable"} <= kinds:
            yield Finding(
                ("steps", stage[0].stage),
                f"parallel group {group!r} mixes compensatable and retriable steps; "
                "a group is either undone as a whole or retried until it succeeds",
            )
        for step in stage:
            yield from _check_compensation(step)
            where = (*step.path, "kind") if "kind" in step.data else step.path
            label = repr(step.name) if step.name else "this step"
            if step.kind == "pivot" and group is not None:
                yield Finding(
                    where,
                    f"a pivot step cannot be in a parallel group ({group!r}): the pivot is the one point of no return",
                )
            elif step.kind == "compensatable" and pivot is not None:
                yield Finding(
                    where,
                    f"compensatable step {label} after the pivot {pivot!r}; steps after the pivot are never "
                    "compensated, so make it retriable or move it before the pivot",
                )
            elif step.kind == "compensatable" and retriable is not None:
                yield Finding(
                    where,
                    f"compensatable step {label} after retriable step {retriable!r}; "
                    "order is compensatable steps, then at most one pivot, then retriable steps",
                )
            elif step.kind == "pivot" and pivot is not None:
                yield Finding(where, f"a second pivot {label}; {pivot!r} is already the pivot (at most one)")
            elif step.kind == "pivot" and retriable is not None:
                yield Finding(
                    where,
                    f"pivot {label} after retriable step {retriable!r}; retriable steps come after the pivot",
                )
        for step in stage:
            if step.kind == "pivot" and group is None and pivot is None:
                pivot = step.name or "?"
            if step.kind == "retriable" and retriable is None:
                retriable = step.name or "?"


def _check_compensation(step: _Step) -> Iterator[Finding]:
    compensation = step.data.get("compensation")
    if step.kind == "compensatable" and compensation is None:
        yield Finding(
            (*step.path, "compensation"),
            "a compensatable step needs a compensation (or declare kind: pivot or kind: retriable)",
            at="key",
        )
    elif step.kind in ("pivot", "retriable") and compensation is not None:
        yield Finding(
            (*step.path, "compensation"),
            f"a {step.kind} step is never compensated; remove its compensation",
            at="key",
        )


def _check_step(step: _Step, stages: list[list[_Step]]) -> Iterator[Finding]:
    # By position in `steps`, not in `stages`: a malformed entry has no stage but still has its index.
    earlier = {s.name: s for stage in stages for s in stage if s.name and s.stage < step.stage}
    known = {s.name: s for stage in stages for s in stage if s.name}
    payload = step.data.get("payload")
    if isinstance(payload, dict) and is_literal(payload) and not isinstance(payload[LITERAL_KEY], dict):
        yield Finding((*step.path, "payload"), "a payload is a mapping of fields; put {literal: ...} inside it")
    elif isinstance(payload, dict):
        yield from _check_payload(payload, (*step.path, "payload"), step, earlier, known, own_allowed=False)
    compensation = step.data.get("compensation")
    if isinstance(compensation, dict) and isinstance(compensation.get("payload"), dict):
        path = (*step.path, "compensation", "payload")
        yield from _check_payload(compensation["payload"], path, step, earlier, known, own_allowed=True)
    success, failure = step.data.get("success"), step.data.get("failure")
    if isinstance(success, list | tuple) and isinstance(failure, list | tuple):
        for index, reply in enumerate(failure):
            if isinstance(reply, str) and reply in success:
                yield Finding(
                    (*step.path, "failure", index),
                    f"reply type {reply!r} is listed as both success and failure",
                )


def _check_payload(
    value: Any,
    path: Path,
    step: _Step,
    earlier: dict[str, _Step],
    known: dict[str, _Step],
    *,
    own_allowed: bool,
) -> Iterator[Finding]:
    if isinstance(value, str):
        yield from _check_expression(value, path, step, earlier, known, own_allowed=own_allowed)
    elif is_literal(value):
        if not _is_json(value[LITERAL_KEY]):
            yield Finding((*path, LITERAL_KEY), "a literal must be JSON: strings, numbers, booleans, null, lists, maps")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                yield Finding(path, f"payload keys must be strings, not {type(key).__name__} ({key!r})")
                continue
            yield from _check_payload(item, (*path, key), step, earlier, known, own_allowed=own_allowed)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _check_payload(item, (*path, index), step, earlier, known, own_allowed=own_allowed)
    elif isinstance(value, float) and not math.isfinite(value):
        yield Finding(path, f"{value} is not a JSON number")
    elif value is not None and not isinstance(value, bool | int | float):
        yield Finding(
            path,
            "a payload value is a JMESPath string, {literal: ...}, a number, a boolean, null, a mapping "
            f"or a list; got {type(value).__name__}",
        )


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_is_json(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _check_expression(
    expression: str,
    path: Path,
    step: _Step,
    earlier: dict[str, _Step],
    known: dict[str, _Step],
    *,
    own_allowed: bool,
) -> Iterator[Finding]:
    if len(expression) > MAX_EXPRESSION_CHARS:
        yield Finding(path, f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        return
    try:
        parsed: dict[str, Any] = dict(compile_expression(expression).parsed)
        chains = list(_root_chains(parsed))
    except JMESPathError as exc:
        yield Finding(path, f"invalid JMESPath {expression!r}: {_reason(exc)}")
        return
    except RecursionError:
        yield Finding(path, "expression nested too deeply")
        return
    for chain in chains:
        message = _reference_problem(chain, step, earlier, known, own_allowed=own_allowed)
        if message:
            yield Finding(path, f"{expression!r}: {message}")


def _reason(exc: JMESPathError) -> str:
    """The useful part of jmespath's multi-line message, and where in the expression it went wrong."""
    reason = str(exc).splitlines()[0]
    for prefix in (
        "Invalid jmespath expression: ",
        "Bad jmespath expression: ",
        "Invalid JMESPath expression: ",
    ):
        reason = reason.removeprefix(prefix)
    reason = reason.split(": Parse error at")[0].rstrip(":. ")
    position = getattr(exc, "lex_position", None)
    if isinstance(position, int):
        reason += f" at offset {position}"
    if "empty" in reason:
        reason += "; write {literal: ''} for an empty string"
    return reason


def _leading(node: dict[str, Any]) -> tuple[str, ...] | None:
    """The field names a path starts with (`steps.x.items[0]` -> steps, x, items); None if not a path."""
    kind = node.get("type")
    children: list[dict[str, Any]] = node.get("children", [])
    if kind == "field":
        return (node["value"],)
    if kind in ("current", "identity"):  # `@`, and what `*` projects over: the whole context
        return ()
    if kind == "subexpression":
        chain: tuple[str, ...] = ()
        for child in children:
            part = _leading(child)
            if part is None:
                return chain or None
            chain += part
            if child["type"] not in ("field", "current"):
                break  # what follows a projection or index applies to elements, not to the context
        return chain
    if kind in _CHAINS:
        return _leading(children[0])
    return None


def _root_chains(node: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """The leading field names of every part of the expression that reads the context itself."""
    lead = _leading(node)
    if lead is not None:
        yield lead
        return
    kind = node.get("type")
    children: list[dict[str, Any]] = node.get("children", [])
    if kind in _CHAINS:
        # Only the first child sees the context; the rest see its result.
        yield from _root_chains(children[0])
    elif kind not in ("expref", "literal", "index", "slice"):
        for child in children:
            yield from _root_chains(child)


def context_reads(mapping: Any, path: Path = ()) -> Iterator[tuple[Path, tuple[str, ...]]]:
    """Every context path a payload mapping reads (`("steps", "hold", "id")`), with the path of the leaf that reads
    it. For `sagas explore`, which checks on every path that the replies read exist; bad expressions (reported by
    `check`) are passed over."""
    if isinstance(mapping, str):
        try:
            chains = list(_root_chains(dict(compile_expression(mapping).parsed)))
        except (JMESPathError, RecursionError):
            return
        for chain in chains:
            yield path, chain
    elif is_literal(mapping):
        return
    elif isinstance(mapping, dict):
        for key, item in mapping.items():
            yield from context_reads(item, (*path, key))
    elif isinstance(mapping, list | tuple):
        for index, item in enumerate(mapping):
            yield from context_reads(item, (*path, index))


def _reference_problem(
    chain: tuple[str, ...],
    step: _Step,
    earlier: dict[str, _Step],
    known: dict[str, _Step],
    *,
    own_allowed: bool,
) -> str | None:
    if not chain:
        return "'@' reads the whole context; start from input, steps.<step> or saga"
    root = chain[0]
    if root not in ROOTS:
        return f"unknown root {root!r}: expressions start with input, steps.<step> or saga{suggest(root, ROOTS)}"
    if root == "saga" and len(chain) > 1 and chain[1] not in SAGA_FIELDS:
        return f"saga has only id, name and version, not {chain[1]!r}"
    if root != "steps":
        return None
    if len(chain) == 1:
        return "name the step whose reply you read: steps.<step>.<field>"
    name = chain[1]
    if name == step.name:
        return None if own_allowed else f"a step cannot read its own reply ({name!r}) in its command payload"
    if name in earlier:
        return None
    other = known.get(name)
    if other is None:
        return f"no step named {name!r}{suggest(name, sorted(known))}"
    if other.stage == step.stage:
        return f"step {name!r} runs in parallel with {step.name!r}, so its reply is not available"
    return f"step {name!r} runs after {step.name!r}; only the input and earlier steps can be read"


def _seconds(value: Any) -> float | None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return None
    return float(seconds) if isinstance(seconds, int | float) and not isinstance(seconds, bool) else None


def _check_deadline(deadline: Any, stages: list[list[_Step]]) -> Iterator[Finding]:
    limit = _seconds(deadline)
    if limit is None:
        return
    for stage in stages:
        for step in stage:
            timeout = _seconds(step.data.get("timeout", 30.0))
            if timeout is not None and timeout > limit:
                yield Finding(
                    (*step.path, "timeout"),
                    f"timeout {timeout:g}s is longer than the saga deadline {limit:g}s; it could never fire",
                )


def _check_input_schema(schema: Any) -> Iterator[Finding]:
    if not isinstance(schema, dict):
        return
    validator = jsonschema.validators.validator_for(schema)
    meta = validator(validator.META_SCHEMA, format_checker=validator.FORMAT_CHECKER)  # patterns are regexes
    found = False
    for error in meta.iter_errors(schema):
        found = True
        where: Path = ("input_schema", *(p for p in error.absolute_path))
        yield Finding(where, f"not a valid JSON Schema: {error.message}")
    if found:
        return
    resource = referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)
    resolver = referencing.Registry().with_resource(_INPUT, resource).resolver(base_uri=_INPUT)
    for where, ref in _refs(schema, ("input_schema",)):
        if not ref.startswith("#"):  # never fetched: a definition must not make the engine reach the network
            yield Finding(where, f"$ref {ref!r}: only references inside the schema (#/...) are allowed")
            continue
        try:
            resolver.lookup(ref)
        except referencing.exceptions.Unresolvable as exc:
            yield Finding(where, f"$ref {ref!r} does not resolve inside the schema ({type(exc).__name__})")


_INPUT = "urn:sagas:input-schema"


def _refs(value: Any, path: Path) -> Iterator[tuple[Path, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                yield (*path, key), item
            else:
                yield from _refs(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _refs(item, (*path, index))

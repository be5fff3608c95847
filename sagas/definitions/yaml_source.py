"""Read YAML safely into plain data plus a `SourceMap`.

Nothing here builds Python objects from tags: the text is only composed into nodes by ruamel.yaml, and we
turn nodes into dicts, lists and scalars ourselves. That is also where the limits live: file size, number of
nodes after alias expansion (a "billion laughs" file stops after `MAX_NODES`), nesting depth, duplicate keys.
"""

from __future__ import annotations

import re
from typing import Any, cast

from ruamel.yaml import YAML
from ruamel.yaml.docinfo import DocInfo
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sagas.definitions.source import Finding, Path, SourceMap, file_problem, format_path
from sagas.errors import Problem

MAX_FILE_BYTES = 1024 * 1024
"""Definitions are a few kilobytes; anything above a mebibyte is a mistake or an attack."""
MAX_NODES = 20_000
"""Upper bound on values after alias expansion; the samples have about 150."""
MAX_DEPTH = 64
MAX_INDENT = 256
MAX_EVENTS = 10_000
"""Upper bound on YAML parser events (about two per value); the samples need about 250."""

_YAML = "tag:yaml.org,2002:"
_SCALARS = {f"{_YAML}{name}" for name in ("str", "int", "float", "bool", "null", "timestamp")}
_TAB_INDENT = re.compile(r"^ *\t")


class _Limit(Exception):
    """Composing stops: the document is too big, too deep or recursive."""

    def __init__(self, finding: Finding, position: tuple[int, int]) -> None:
        self.finding = finding
        self.position = position


class _TooManyEvents(Exception):
    def __init__(self, line: int, column: int) -> None:
        self.line, self.column = line, column
        super().__init__(f"more than {MAX_EVENTS:,} YAML values; a saga definition is far smaller")


def _compose(text: str) -> Node | None:
    """ruamel.yaml's compose, stopped after `MAX_EVENTS` parser events.

    The pure-Python parser needs about a tenth of a millisecond per event, so without a bound a 1 MiB file of
    tiny list items keeps a process busy for a minute or more.
    """
    yaml = YAML(typ="rt")
    yaml.doc_infos.append(DocInfo(requested_version=None))  # as YAML.compose does: a %YAML directive records here
    constructor, parser = yaml.get_constructor_parser(text)
    next_event = parser.get_event
    count = 0

    def counted() -> Any:
        nonlocal count
        count += 1
        event = next_event()
        if count > MAX_EVENTS:
            raise _TooManyEvents(event.start_mark.line + 1, event.start_mark.column + 1)
        return event

    parser.get_event = counted
    try:
        return cast(Node | None, constructor.composer.get_single_node())
    finally:
        parser.dispose()


def _nesting_problem(text: str, file: str | None) -> Problem | None:
    """Refuse deep flow nesting before parsing: the scanner's cost grows with the square of the depth.

    One pass over the characters: brackets inside a quoted scalar or a comment do not count. A quote runs to
    its closing quote or the end of its line (a backslash escapes in double quotes, '' in single quotes).
    """
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        quote = ""
        index, length = 0, len(line)
        while index < length:
            char = line[index]
            if quote:
                if quote == '"' and char == "\\":
                    index += 1
                elif char == quote:
                    if quote == "'" and line[index + 1 : index + 2] == "'":
                        index += 1
                    else:
                        quote = ""
            elif char in "'\"":
                quote = char
            elif char in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    return Problem("", f"nested deeper than {MAX_DEPTH} levels", file, number, index + 1)
            elif char in "]}":
                depth = max(0, depth - 1)
            elif char == "#" and (index == 0 or line[index - 1] in " \t"):
                break
            index += 1
        indent = length - len(line.lstrip(" "))
        if indent > MAX_INDENT:
            return Problem("", f"indented more than {MAX_INDENT} columns", file, number, indent + 1)
    return None


def _position(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Converter:
    """Nodes -> plain data, recording positions and structural problems."""

    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.findings: list[Finding] = []
        self.nodes = 0
        self._active: set[int] = set()
        # Only its scalar parsers are used (YAML 1.2 ints, floats, booleans); nothing here builds objects.
        self._scalars = YAML(typ="rt").constructor

    def convert(self, node: Node, path: Path) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Limit(
                Finding(path, f"more than {MAX_NODES:,} values after expanding aliases (an alias bomb?); refused"),
                _position(node),
            )
        if len(path) > MAX_DEPTH:
            raise _Limit(Finding(path, f"nested deeper than {MAX_DEPTH} levels"), _position(node))
        if id(node) in self._active:
            raise _Limit(
                Finding(path, "an alias refers to a value that contains it (recursive alias)"),
                _position(node),
            )
        self.source.values.setdefault(path, _position(node))
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                self._check_tag(node, f"{_YAML}seq", path)
                return [self.convert(item, (*path, index)) for index, item in enumerate(node.value)]
            return self._scalar(node, path)
        finally:
            self._active.discard(id(node))

    def _check_tag(self, node: Node, expected: str, path: Path) -> None:
        if node.tag != expected:
            self.source.reported.add(path)
            self.findings.append(Finding(path, f"tag {_short(node.tag)} is not allowed: definitions are plain data"))

    def _mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        self._check_tag(node, f"{_YAML}map", path)
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.findings.append(Finding(path, "keys must be plain strings, not lists or mappings"))
                continue
            key = str(key_node.value)
            key_path = (*path, key)
            if key_node.tag == f"{_YAML}merge":
                self.findings.append(
                    Finding(key_path, "merge keys (<<) are not supported; repeat the values or use the Python DSL")
                )
                continue
            if key_node.tag != f"{_YAML}str":
                self.findings.append(Finding(key_path, f"key {key!r} must be a string; quote it", at="key"))
            if key in result:
                first = self.source.keys.get(key_path)
                where = f" (first at line {first[0]})" if first else ""
                self.source.keys[key_path] = _position(key_node)
                self.findings.append(Finding(key_path, f"duplicate key {key!r}{where}", at="key"))
                continue
            self.source.keys[key_path] = _position(key_node)
            result[key] = self.convert(value_node, key_path)
        return result

    def _scalar(self, node: Node, path: Path) -> Any:
        tag = node.tag
        if tag not in _SCALARS:
            self.source.reported.add(path)
            self.findings.append(Finding(path, f"tag {_short(tag)} is not allowed: definitions are plain data"))
            return None
        try:
            if tag.endswith(":int"):
                return int(self._scalars.construct_yaml_int(node))
            if tag.endswith(":float"):
                return float(self._scalars.construct_yaml_float(node))
            if tag.endswith(":bool"):
                return bool(self._scalars.construct_yaml_bool(node))
        except (ValueError, KeyError, IndexError):  # an explicit tag on text that is not one (`!!int one`)
            self.source.reported.add(path)
            self.findings.append(Finding(path, f"{node.value!r} is not a valid {_short(tag)}"))
            return None
        if tag.endswith(":null"):
            return None
        return str(node.value)  # str, and timestamps kept as the text the author wrote


def _short(tag: Any) -> str:
    text = str(tag)
    return "!!" + text[len(_YAML) :] if text.startswith(_YAML) else text


def _tab_problems(text: str, file: str | None) -> list[Problem]:
    return [
        Problem(
            path="",
            message="tab character in indentation; YAML indents with spaces only",
            file=file,
            line=number,
            column=line.index("\t") + 1,
        )
        for number, line in enumerate(text.splitlines(), start=1)
        if _TAB_INDENT.match(line)
    ]


def _syntax_problem(exc: MarkedYAMLError, file: str | None) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    message = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem and exc.context_mark:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    return Problem(path="", message=f"YAML syntax error: {message}", file=file, line=line, column=column)


def read_yaml(text: str, file: str | None) -> tuple[Any, SourceMap, list[Problem]]:
    """Parse `text`. Returns (data, positions, problems); data is None when nothing usable could be read."""
    source = SourceMap(file=file)
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_FILE_BYTES:
        return None, source, [file_problem(file, _too_big(size))]
    too_deep = _nesting_problem(text, file)
    if too_deep:
        return None, source, [too_deep]
    try:
        root = _compose(text)
    except _TooManyEvents as exc:
        return None, source, [Problem("", str(exc), file, exc.line, exc.column)]
    except MarkedYAMLError as exc:
        syntax = _syntax_problem(exc, file)
        tabs = _tab_problems(text, file)
        # A tab inside a block scalar is text, not indentation: blame tabs only where the parser stopped.
        return None, source, tabs if any(t.line == syntax.line for t in tabs) else [syntax]
    except YAMLError as exc:
        return None, source, [file_problem(file, f"YAML syntax error: {exc}")]
    except RecursionError:
        return None, source, [file_problem(file, "YAML nested too deeply")]
    if root is None:
        return None, source, [file_problem(file, "the file is empty; a saga definition is a mapping")]
    converter = _Converter(source)
    try:
        data = converter.convert(root, ())
    except _Limit as limit:
        line, column = limit.position
        finding = limit.finding
        return None, source, [Problem(format_path(finding.path), finding.message, file, line, column)]
    problems = [source.problem(finding) for finding in converter.findings]
    if not isinstance(data, dict):
        problems.append(source.problem(Finding((), "a saga definition is a mapping with name, version and steps")))
        return None, source, problems
    return data, source, problems


def _too_big(size: int) -> str:
    return f"file is {size:,} bytes; definitions are limited to {MAX_FILE_BYTES:,} bytes (1 MiB)"


def too_big_problem(file: str, size: int) -> Problem:
    return file_problem(file, _too_big(size))

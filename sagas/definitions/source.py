"""Where things are in a definition's source: field paths, their positions, and `Problem`s built from them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from sagas.errors import Problem

Path = tuple[str | int, ...]
Anchor = Literal["key", "value"]
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_path(path: Iterable[str | int]) -> str:
    """`("steps", 2, "compensation", "command")` -> `steps[2].compensation.command`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}" if out else part
        else:
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


@dataclass(frozen=True)
class Finding:
    """A problem located by field path only; a `SourceMap` turns it into a `Problem` with a position.

    `at` says whether the key (missing or unknown fields) or the value (wrong values) is the place to point.
    """

    path: Path
    message: str
    at: Anchor = "value"


@dataclass
class SourceMap:
    """1-based (line, column) of keys and values by field path; empty when the source has no positions."""

    file: str | None = None
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    reported: set[Path] = field(default_factory=set)
    """Values the reader already complained about (a refused tag): the model need not repeat it."""

    def locate(self, path: Path, at: Anchor = "value") -> tuple[int, int] | None:
        """The position of `path`, or of its nearest ancestor that has one (a missing field: its parent)."""
        first: Mapping[Path, tuple[int, int]] = self.keys if at == "key" else self.values
        second: Mapping[Path, tuple[int, int]] = self.values if at == "key" else self.keys
        if path in first:
            return first[path]
        if path in second:
            return second[path]
        for end in range(len(path) - 1, -1, -1):
            prefix = path[:end]
            # The parent's key ("compensation:") reads better than the first line of its value.
            found = self.keys.get(prefix) or self.values.get(prefix)
            if found:
                return found
        return None

    def problem(self, finding: Finding) -> Problem:
        position = self.locate(finding.path, finding.at)
        line, column = position if position else (None, None)
        return Problem(
            path=format_path(finding.path), message=finding.message, file=self.file, line=line, column=column
        )


def file_problem(file: str | None, message: str) -> Problem:
    """A problem with the file as a whole, pointed at its start so every message has a position."""
    return Problem(path="", message=message, file=file, line=1, column=1)


def ordered(problems: Iterable[Problem]) -> list[Problem]:
    """Problems without duplicates, in source order (stable for problems without positions)."""
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.file or "", p.line or 0, p.column or 0))

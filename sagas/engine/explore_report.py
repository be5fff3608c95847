"""What `sagas explore` prints: the endings as a table, a Mermaid graph of them, JSON, and located problems."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from typing import Any

from sagas.definitions.source import Finding, SourceMap, format_path
from sagas.engine.explore import Ending, Exploration
from sagas.engine.explore_checks import ExploreFinding
from sagas.errors import Problem

__all__ = ["problems", "to_json", "to_mermaid", "to_table", "words"]

ARROW = " → "
WIDTH = 80


def words(witness: tuple[str, ...], end: str | None = None) -> str:
    """A path in words: "hold_flight ok → hold_room fails (room.declined) → undo hold_flight ok → compensated"."""
    return ARROW.join((*witness, end) if end else witness) or "(at the start)"


def _count(paths: int) -> str:
    return f"{paths:,}" if paths < 10**9 else f"{paths:.2e}"


def problems(exploration: Exploration, source: SourceMap | None = None, file: str | None = None) -> list[Problem]:
    """The findings as `file:line:col: path: message` problems (warnings say so), each with its witness path."""
    # Named as the caller named the file (a DSL module's positions carry its resolved path).
    where = replace(source, file=file or source.file) if source is not None else SourceMap(file=file)
    if where.file is None:
        where.file = f"<{exploration.definition.name} v{exploration.definition.version}>"
    return [where.problem(Finding(f.path, _finding_message(f))) for f in exploration.findings]


def _finding_message(finding: ExploreFinding) -> str:
    prefix = "warning: " if finding.severity == "warning" else ""
    witness = f" (path: {words(finding.witness)})" if finding.witness else ""
    return f"{prefix}{finding.message}{witness}"


def to_table(exploration: Exploration, source: SourceMap | None = None, file: str | None = None) -> str:
    """The report for people: each ending with its paths and a shortest witness, the operator's ways out of each
    parked state, then violations and findings; lines fit 80 columns."""
    definition = exploration.definition
    searched = "every path explored" if exploration.complete else "search stopped early: results are partial"
    title = (
        f"{definition.name} v{definition.version}: {exploration.states:,} states, "
        f"{exploration.transitions:,} transitions; {searched} (--max-attempts {exploration.max_attempts})"
    )
    lines = [*_wrapped(title, ""), "", f"{'ENDING':<60} {'PATHS':>19}"]
    for ending in exploration.endings:
        lines.append(f"{_clip(ending.label, 60):<60} {_count(ending.paths):>19}")
        lines += _wrapped("e.g. " + words(ending.witness, ending.label), "  ")
        for way in ending.ways_out:
            lines += _wrapped(f"operator {way.action} → " + (", ".join(way.leads_to) or "nothing"), "  ")
        if ending.parked and not ending.ways_out:
            lines.append("  no operator command gets it out")
    lines.append("")
    if exploration.violations:
        lines.append(f"VIOLATIONS ({len(exploration.violations)})")
        for violation in exploration.violations:
            lines += _wrapped(violation.message, "  ")
            lines += _wrapped("path: " + words(violation.witness), "    ")
    else:
        lines.append("no invariant violated")
    found = problems(exploration, source, file)
    if found:
        lines.append(f"FINDINGS ({len(found)})")
        lines += [str(problem) for problem in found]
    return "\n".join(lines) + "\n"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrapped(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ", break_on_hyphens=False)


def _mermaid(text: str) -> str:
    """Mermaid label text: quotes and markup characters as entities (names come from the definition)."""
    for raw, entity in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(raw, entity)
    return text


def to_mermaid(exploration: Exploration) -> str:
    """A Mermaid flowchart of the outcome graph: the start, each ending with its path count, and the operator's
    ways out of each parked state to the endings it can reach."""
    ids = {ending.label: f"e{number}" for number, ending in enumerate(exploration.endings)}
    out = ["flowchart LR", "    start([start])"]
    for ending in exploration.endings:
        node = ids[ending.label]
        text = _mermaid(ending.label)
        out.append(f'    {node}{{{{"{text}"}}}}' if ending.parked else f'    {node}(["{text}"])')
    for ending in exploration.endings:
        if ending.paths:
            out.append(f'    start -->|"{_count(ending.paths)} paths"| {ids[ending.label]}')
    for ending in exploration.endings:
        for way in ending.ways_out:
            for target in way.leads_to:
                if target != ending.label:
                    out.append(f'    {ids[ending.label]} -.->|"{_mermaid(way.action)}"| {ids[target]}')
    out.append("    classDef parked stroke:#c00")
    parked = [ids[e.label] for e in exploration.endings if e.parked]
    if parked:
        out.append(f"    class {','.join(parked)} parked")
    return "\n".join(out) + "\n"


def _ending_json(ending: Ending) -> dict[str, Any]:
    return {
        "ending": ending.label,
        "status": str(ending.status),
        "paths": ending.paths,
        "witness": list(ending.witness),
        "ways_out": [{"action": w.action, "leads_to": list(w.leads_to)} for w in ending.ways_out],
    }


def to_json(exploration: Exploration, source: SourceMap | None = None, file: str | None = None) -> dict[str, Any]:
    """One JSON document for scripts."""
    definition = exploration.definition
    located = problems(exploration, source, file)
    return {
        "definition": definition.identity,
        "ok": exploration.ok,
        "complete": exploration.complete,
        "states": exploration.states,
        "transitions": exploration.transitions,
        "max_attempts": exploration.max_attempts,
        "endings": [_ending_json(e) for e in exploration.endings],
        "violations": [{"message": v.message, "witness": list(v.witness)} for v in exploration.violations],
        "findings": [
            {
                "severity": f.severity, "path": format_path(f.path), "message": f.message, "witness": list(f.witness),
                "file": p.file, "line": p.line, "column": p.column,
            }
            for f, p in zip(exploration.findings, located, strict=True)
        ],
    }  # fmt: skip

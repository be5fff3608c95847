"""Graphs: Mermaid and DOT drawings name every step and compensation and are well-formed."""

from __future__ import annotations

import re

from sagas.definitions import SagaDefinition, StepKind, saga, to_dot, to_mermaid

ID = r"[A-Za-z_][A-Za-z0-9_]*"
SHAPES = [(r'\(\["', r'"\]\)'), (r'\["', r'"\]'), (r'\{\{"', r'"\}\}'), (r'\[\["', r'"\]\]')]
NODE = re.compile(rf"^\s+({ID})(?:" + "|".join(f'{o}[^"]*{c}' for o, c in SHAPES) + r")$")
SUBGRAPH = re.compile(rf'^\s+subgraph ({ID})\["[^"]*"\]$')
EDGE = re.compile(rf"^\s+({ID}) (?:-->|-\.->|-\. [^.\"]+ \.->|-->\|[^|\"]+\|) ({ID})$")
CLASS = re.compile(rf"^\s+(?:classDef {ID} .+|class {ID}(?:,{ID})* {ID})$")


def parse_mermaid(text: str) -> tuple[dict[str, str], set[str], list[tuple[str, str]]]:
    """Check Mermaid flowchart syntax line by line; return node labels, subgraph ids and edges."""
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    nodes: dict[str, str] = {}
    subgraphs: set[str] = set()
    edges: list[tuple[str, str]] = []
    depth = 0
    for line in lines[1:]:
        if match := NODE.match(line):
            assert match.group(1) not in nodes, f"node declared twice: {line}"
            nodes[match.group(1)] = line
        elif match := SUBGRAPH.match(line):
            subgraphs.add(match.group(1))
            depth += 1
        elif line.strip() == "end":
            depth -= 1
            assert depth >= 0, "end without subgraph"
        elif match := EDGE.match(line):
            edges.append((match.group(1), match.group(2)))
        else:
            assert CLASS.match(line), f"not a Mermaid flowchart statement: {line!r}"
        unquoted = re.sub(r'"[^"]*"', "", line)
        for opening, closing in ("[]", "()", "{}"):
            assert unquoted.count(opening) == unquoted.count(closing), f"unbalanced {opening}{closing}: {line}"
    assert depth == 0, "subgraph without end"
    declared = set(nodes) | subgraphs
    for source, target in edges:
        assert {source, target} <= declared, f"edge to an undeclared node: {source} -> {target}"
    return nodes, subgraphs, edges


def test_mermaid_is_well_formed_and_names_every_step_and_compensation(
    sample: tuple[SagaDefinition, SagaDefinition],
) -> None:
    """Each sample's Mermaid graph parses structurally and labels every step and compensation command."""
    definition = sample[0]
    text = to_mermaid(definition)
    nodes, subgraphs, edges = parse_mermaid(text)
    labels = "\n".join(nodes.values())
    for step in definition.iter_steps():
        assert f'"{step.name}<br/>' in labels
        if step.compensation is not None:
            assert f"undo {step.name}<br/>{step.participant}: {step.compensation.command}" in labels
    pivots = [line for line in nodes.values() if "{{" in line]
    assert len(pivots) == sum(step.kind is StepKind.PIVOT for step in definition.iter_steps())
    groups = [e for e in definition.steps if hasattr(e, "parallel")]
    assert len([s for s in subgraphs if s.startswith("group_")]) == len(groups)
    assert ("start", "done") not in edges
    assert any(target == "done" for _, target in edges)


def test_mermaid_draws_a_failure_path_from_every_non_retriable_step(
    sample: tuple[SagaDefinition, SagaDefinition],
) -> None:
    """Every step that can fail has a dashed edge into compensation; retriable steps have none."""
    definition = sample[0]
    text = to_mermaid(definition)
    nodes, _, _ = parse_mermaid(text)
    failing = {line.split()[0] for line in text.splitlines() if " -. failed .-> " in line}
    for node_id, line in nodes.items():
        if re.fullmatch(r"s\d+(?:_\d+)?", node_id):
            retriable = "(retriable)" in line
            assert (node_id in failing) is not retriable


def test_dot_is_balanced_and_names_every_step_and_compensation(
    sample: tuple[SagaDefinition, SagaDefinition],
) -> None:
    """Each sample's DOT graph is one balanced digraph whose edges join declared nodes only."""
    definition = sample[0]
    text = to_dot(definition)
    assert text.startswith(f'digraph "{definition.name}" {{')
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    assert unquoted.count("{") == unquoted.count("}")
    assert unquoted.count("[") == unquoted.count("]")
    declared = set(re.findall(rf"^\s+({ID}) \[label=", text, re.MULTILINE))
    edges = re.findall(rf"^\s+({ID}) -> ({ID})", text, re.MULTILINE)
    assert edges
    assert all({a, b} <= declared for a, b in edges)
    for step in definition.iter_steps():
        assert f'"{step.name}\\n{step.participant}: {step.command}' in text
        if step.compensation is not None:
            assert f"undo {step.name}\\n{step.participant}: {step.compensation.command}" in text


def test_a_first_step_failure_goes_straight_to_compensated() -> None:
    """When the first step fails nothing needs undoing, so its failure edge ends at 'compensated'."""
    definition = (
        saga("two", 1)
        .step("a")
        .invoke("p", "a.do")
        .with_compensation("a.undo")
        .step("b")
        .invoke("p", "b.do")
        .with_compensation("b.undo")
        .build()
    )
    _, _, edges = parse_mermaid(to_mermaid(definition))
    assert ("s0", "compensated") in edges
    assert ("s1", "c0") in edges
    assert ("c1", "c0") in edges
    assert ("c0", "compensated") in edges

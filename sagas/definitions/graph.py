"""Draw a definition: the forward path of steps, and the compensations a failure at each point runs.

Both renderers draw the same picture from one neutral list of nodes and edges:
compensatable steps are boxes, the pivot a hexagon, retriable steps double-bordered; a parallel group is a
cluster; solid edges are the happy path, dashed edges lead from a failing step into the compensations it
triggers, which run in reverse order down to "compensated".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sagas.definitions.model import ParallelGroup, SagaDefinition, StepDefinition, StepKind

Shape = Literal["terminal", "step", "pivot", "retriable", "compensation"]


@dataclass(frozen=True)
class Node:
    id: str
    lines: tuple[str, ...]
    shape: Shape
    cluster: str | None = None


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    label: str = ""
    failure: bool = False


@dataclass(frozen=True)
class Graph:
    title: str
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    clusters: dict[str, str]


def build_graph(definition: SagaDefinition) -> Graph:
    """The nodes and edges both renderers draw. An edge may end at a cluster: the whole parallel group."""
    nodes = [Node("start", (f"{definition.name} v{definition.version}",), "terminal")]
    clusters: dict[str, str] = {}
    stage_ends: list[str] = []  # per stage, the node (or group cluster) the happy path runs through
    undo_ends: list[str | None] = []  # per stage, what undoes it, if anything
    for index, entry in enumerate(definition.steps):
        group = entry if isinstance(entry, ParallelGroup) else None
        members: tuple[StepDefinition, ...] = entry.parallel if isinstance(entry, ParallelGroup) else (entry,)
        cluster, undo_cluster = (f"group_{index}", f"undo_{index}") if group else (None, None)
        undo: list[str] = []
        for position, step in enumerate(members):
            node_id = f"s{index}_{position}" if group else f"s{index}"
            nodes.append(Node(node_id, _step_lines(step), _shape(step), cluster))
            if step.compensation is not None:
                lines = (f"undo {step.name}", f"{step.participant}: {step.compensation.command}")
                nodes.append(Node("c" + node_id[1:], lines, "compensation", undo_cluster))
                undo.append("c" + node_id[1:])
        if group and cluster and undo_cluster:
            clusters[cluster] = f"parallel: {group.name}"
            if undo:
                clusters[undo_cluster] = f"undo {group.name}"
        stage_ends.append(cluster or f"s{index}")
        undo_ends.append((undo_cluster if group else undo[0]) if undo else None)
    nodes += [Node("done", ("completed",), "terminal"), Node("compensated", ("compensated",), "terminal")]
    edges = [Edge(a, b) for a, b in zip(["start", *stage_ends], [*stage_ends, "done"], strict=True)]

    def undo_from(stage: int) -> str:
        """Where compensation starts when everything up to `stage` (inclusive) must be undone."""
        return next((u for u in reversed(undo_ends[: stage + 1]) if u), "compensated")

    for index, stage in enumerate(definition.stages):
        grouped = isinstance(definition.steps[index], ParallelGroup)
        for position, step in enumerate(stage):
            if step.kind is StepKind.RETRIABLE:
                continue  # retried until it succeeds
            # A failed group member leaves succeeded siblings to undo; a failed single step only earlier ones.
            target = undo_from(index if grouped else index - 1)
            edges.append(Edge(f"s{index}_{position}" if grouped else f"s{index}", target, "failed", failure=True))
        undone_by = undo_ends[index]
        if undone_by:
            edges.append(Edge(undone_by, undo_from(index - 1), failure=True))
    return Graph(definition.name, tuple(nodes), tuple(edges), clusters)


def _shape(step: StepDefinition) -> Shape:
    if step.kind is StepKind.PIVOT:
        return "pivot"
    return "retriable" if step.kind is StepKind.RETRIABLE else "step"


def _step_lines(step: StepDefinition) -> tuple[str, ...]:
    lines = [step.name, f"{step.participant}: {step.command}"]
    if step.kind is not StepKind.COMPENSATABLE:
        lines.append(f"({step.kind.value})")
    return tuple(lines)


# -- Mermaid --------------------------------------------------------------------------------------------

_MERMAID_SHAPES = {
    "terminal": ('(["', '"])'),
    "step": ('["', '"]'),
    "pivot": ('{{"', '"}}'),
    "retriable": ('[["', '"]]'),
    "compensation": ('["', '"]'),
}


def _mermaid_text(lines: tuple[str, ...]) -> str:
    return "<br/>".join(line.replace('"', "#quot;") for line in lines)


def to_mermaid(definition: SagaDefinition) -> str:
    """A Mermaid flowchart of the definition."""
    graph = build_graph(definition)
    out = ["flowchart TD"]
    for node in graph.nodes:
        if node.cluster is None:
            out.append(f"    {_mermaid_node(node)}")
    for cluster, title in graph.clusters.items():
        out.append(f'    subgraph {cluster}["{_mermaid_text((title,))}"]')
        out += [f"        {_mermaid_node(node)}" for node in graph.nodes if node.cluster == cluster]
        out.append("    end")
    for edge in graph.edges:
        if edge.failure:
            arrow = f"-. {edge.label} .->" if edge.label else "-.->"
        else:
            arrow = f"-->|{edge.label}|" if edge.label else "-->"
        out.append(f"    {edge.source} {arrow} {edge.target}")
    out.append("    classDef compensation stroke-dasharray: 4 2")
    compensations = [node.id for node in graph.nodes if node.shape == "compensation"]
    if compensations:
        out.append(f"    class {','.join(compensations)} compensation")
    return "\n".join(out) + "\n"


def _mermaid_node(node: Node) -> str:
    opening, closing = _MERMAID_SHAPES[node.shape]
    return f"{node.id}{opening}{_mermaid_text(node.lines)}{closing}"


# -- Graphviz DOT ---------------------------------------------------------------------------------------

_DOT_SHAPES = {
    "terminal": "shape=oval",
    "step": "shape=box",
    "pivot": "shape=hexagon",
    "retriable": "shape=box, peripheries=2",
    "compensation": "shape=box, style=dashed",
}


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dot_string(*lines: str) -> str:
    return '"' + "\\n".join(_dot_escape(line) for line in lines) + '"'


def to_dot(definition: SagaDefinition) -> str:
    """A Graphviz digraph of the definition."""
    graph = build_graph(definition)
    out = [f"digraph {_dot_string(graph.title)} {{", "    rankdir=TB;", '    node [fontname="Helvetica"];']
    for node in graph.nodes:
        if node.cluster is None:
            out.append(f"    {_dot_node(node)}")
    for cluster, title in graph.clusters.items():
        out.append(f"    subgraph cluster_{cluster} {{")
        out.append(f"        label={_dot_string(title)};")
        out += [f"        {_dot_node(node)}" for node in graph.nodes if node.cluster == cluster]
        out.append("    }")
    members = {c: [n.id for n in graph.nodes if n.cluster == c] for c in graph.clusters}
    for edge in graph.edges:
        attributes = []
        if edge.label:
            attributes.append(f"label={_dot_string(edge.label)}")
        if edge.failure:
            attributes.append("style=dashed, color=red")
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        # DOT edges join nodes, so an edge to or from a group joins each of its members.
        for source in members.get(edge.source, [edge.source]):
            out += [f"    {source} -> {target}{suffix};" for target in members.get(edge.target, [edge.target])]
    out.append("}")
    return "\n".join(out) + "\n"


def _dot_node(node: Node) -> str:
    return f"{node.id} [label={_dot_string(*node.lines)}, {_DOT_SHAPES[node.shape]}];"

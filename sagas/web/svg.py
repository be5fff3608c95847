"""A definition's graph as inline SVG, with one saga's position marked on it (no Graphviz, no JavaScript).

The layout is the saga's own shape: stages top to bottom (a parallel group's members side by side), each step's
compensation to its right, "completed" below the last stage and "compensated" below the compensations. Each box is
classed by where the saga stands on it: done, compensated, failed, in flight, not reached. Every text is escaped.
"""

from __future__ import annotations

from html import escape

from sagas.definitions.graph import build_graph
from sagas.definitions.model import SagaDefinition
from sagas.engine.state import SagaInstance, SagaStatus, StepStatus

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 190, 46, 30, 28, 12

MARKS = {
    StepStatus.SUCCEEDED: "done", StepStatus.SKIPPED: "done",
    StepStatus.COMPENSATED: "compensated",
    StepStatus.FAILED: "failed", StepStatus.UNKNOWN: "failed",
    StepStatus.RUNNING: "inflight", StepStatus.BACKOFF: "inflight",
    # The step itself was done; its undoing is marked on its compensation's box.
    StepStatus.COMPENSATING: "done", StepStatus.COMPENSATION_BACKOFF: "done",
    StepStatus.PENDING: "unreached",
}
LEGEND = (("done", "done"), ("compensated", "compensated"), ("failed", "failed"), ("inflight", "in flight"),
          ("unreached", "not reached"))


def _mark(definition: SagaDefinition, node_id: str, instance: SagaInstance | None) -> str:
    """The class of a node for this saga."""
    if instance is None:
        return "plain"
    if node_id == "done":
        return "done" if instance.status is SagaStatus.COMPLETED else "unreached"
    if node_id == "compensated":
        return "compensated" if instance.status is SagaStatus.COMPENSATED else "unreached"
    if node_id == "start":
        return "done"
    stage, _, position = node_id[1:].partition("_")
    step = definition.stages[int(stage)][int(position or 0)]
    state = instance.steps.get(step.name)
    if state is None:
        return "unreached"
    if node_id.startswith("c"):  # the compensation of the step
        if state.status is StepStatus.COMPENSATED:
            return "done"
        if state.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_BACKOFF):
            return "failed" if instance.status is SagaStatus.FAILED else "inflight"
        return "unreached"
    if state.status in (StepStatus.RUNNING, StepStatus.BACKOFF) and instance.status is SagaStatus.FAILED:
        return "failed"  # parked on this step
    return MARKS[state.status]


def render_svg(definition: SagaDefinition, instance: SagaInstance | None = None) -> str:
    graph = build_graph(definition)
    stages = definition.stages
    width_units = max(len(stage) for stage in stages)
    positions: dict[str, tuple[float, float]] = {}
    left = PAD
    right = PAD + width_units * (BOX_W + GAP_X) + GAP_X
    positions["start"] = (left, PAD)
    for index, stage in enumerate(stages):
        row = float(PAD + (index + 1) * (BOX_H + GAP_Y))
        for position in range(len(stage)):
            suffix = f"{index}_{position}" if len(stage) > 1 else f"{index}"
            x_offset = position * (BOX_W + GAP_X)
            positions[f"s{suffix}"] = (left + x_offset, row)
            positions[f"c{suffix}"] = (right + x_offset, row)
    bottom = PAD + (len(stages) + 1) * (BOX_H + GAP_Y)
    positions["done"] = (left, bottom)
    positions["compensated"] = (right, bottom)
    width = right + width_units * (BOX_W + GAP_X) + PAD
    height = bottom + BOX_H + PAD + 26
    title = f"{definition.name} v{definition.version}" + (f": saga {instance.id}" if instance else "")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="saga-graph" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
    ]
    members = {c: [n.id for n in graph.nodes if n.cluster == c] for c in graph.clusters}
    for edge in graph.edges:
        for source in members.get(edge.source, [edge.source]):
            for target in members.get(edge.target, [edge.target]):
                if source in positions and target in positions:
                    out.append(_edge(positions[source], positions[target], failure=edge.failure))
    for node in graph.nodes:
        if node.id not in positions:
            continue
        x, y = positions[node.id]
        mark = _mark(definition, node.id, instance)
        lines = node.lines[:2]
        out.append(f'<g class="node {node.shape} {mark}" data-node="{escape(node.id)}" data-mark="{mark}">')
        rx = 22 if node.shape == "terminal" else 4
        dash = ' stroke-dasharray="5 3"' if node.shape == "compensation" else ""
        out.append(f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="{rx}"{dash}/>')
        for i, line in enumerate(lines):
            ty = y + (BOX_H / 2 + 5 if len(lines) == 1 else 18 + i * 16)
            shown = line if len(line) <= 28 else line[:27] + "…"
            out.append(f'<text x="{x + BOX_W / 2}" y="{ty}" text-anchor="middle">{escape(shown)}</text>')
        out.append(f"<title>{escape(' / '.join(node.lines))} ({mark})</title></g>")
    if instance is not None:
        at = PAD
        for mark, label in LEGEND:
            out.append(f'<g class="legend {mark}"><rect x="{at}" y="{height - 22}" width="14" height="14" rx="3"/>'
                       f'<text x="{at + 19}" y="{height - 10}">{label}</text></g>')
            at += 24 + 8 * len(label) + 14
    out.append("</svg>")
    return "\n".join(out)


def _edge(a: tuple[float, float], b: tuple[float, float], *, failure: bool) -> str:
    (ax, ay), (bx, by) = a, b
    if abs(ax - bx) < 1:  # same column: bottom to top
        x1, y1, x2, y2 = ax + BOX_W / 2, ay + BOX_H, bx + BOX_W / 2, by
        if by < ay:
            y1, y2 = ay, by + BOX_H
    elif bx > ax:  # to the right
        x1, y1, x2, y2 = ax + BOX_W, ay + BOX_H / 2, bx, by + BOX_H / 2
    else:
        x1, y1, x2, y2 = ax, ay + BOX_H / 2, bx + BOX_W, by + BOX_H / 2
    style = "edge failure" if failure else "edge"
    return f'<line class="{style}" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" marker-end="url(#arrow)"/>'

"""A picture of a pipeline: its actions as a layered dependency graph, drawn as SVG.

Layout is plain arithmetic over plain data, so it is tested without a browser. Every
action sits in the column after its deepest dependency; within a column, actions are
ordered by where their dependencies (then their dependents) sit, which keeps most edges
short and uncrossed. Status is shown by colour *and* by an icon and a word.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

NODE_WIDTH = 210
NODE_HEIGHT = 46
COLUMN_GAP = 56
ROW_GAP = 14
MARGIN = 8
MAX_LABEL = 25

ICONS = {
    "succeeded": "✓",
    "failed": "✗",
    "running": "▶",
    "pending": "…",
    "nothing_to_do": "—",
    None: "○",
}


@dataclass(frozen=True)
class Node:
    name: str
    needs: tuple[str, ...] = ()
    state: str | None = None  # pending, running, succeeded, failed; None: never run
    label: str = "Not run"  # the status in words
    href: str | None = None


@dataclass(frozen=True)
class Placed:
    node: Node
    column: int
    row: int
    x: float
    y: float


def columns(nodes: list[Node]) -> list[list[str]]:
    """Action names by column: each one column after its deepest dependency.

    Unknown dependencies are ignored and a cycle cannot loop forever (project.yaml
    validation refuses both, but a picture must never be the thing that fails).
    """
    by_name = {node.name: node for node in nodes}
    depth: dict[str, int] = {}

    def visit(name: str, path: frozenset[str]) -> int:
        if name in depth:
            return depth[name]
        needs = [n for n in by_name[name].needs if n in by_name and n not in path]
        depth[name] = 1 + max((visit(n, path | {name}) for n in needs), default=-1)
        return depth[name]

    for node in nodes:
        visit(node.name, frozenset())
    result: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for node in nodes:  # project.yaml order is the starting order within a column
        result[depth[node.name]].append(node.name)
    return _order(result, by_name)


def _order(cols: list[list[str]], by_name: dict[str, Node]) -> list[list[str]]:
    """Reorder each column by the mean row of neighbours (a barycentre sweep, twice)."""
    dependents: dict[str, list[str]] = {name: [] for name in by_name}
    for node in by_name.values():
        for need in node.needs:
            if need in dependents:
                dependents[need].append(node.name)

    def sweep(order: list[int], neighbours: dict[str, list[str]] | None) -> None:
        for i in order:
            rows = {name: r for col in cols for r, name in enumerate(col)}

            def key(name: str, rows: dict[str, int] = rows) -> float:
                near = neighbours[name] if neighbours is not None else list(by_name[name].needs)
                placed = [rows[n] for n in near if n in rows]
                return sum(placed) / len(placed) if placed else rows[name]

            cols[i] = sorted(cols[i], key=key)

    for _ in range(2):
        sweep(list(range(1, len(cols))), None)
        sweep(list(range(len(cols) - 2, -1, -1)), dependents)
    return cols


def layout(nodes: list[Node]) -> tuple[list[Placed], float, float]:
    """Where each node goes, and the width and height of the whole picture."""
    by_name = {node.name: node for node in nodes}
    placed = []
    cols = columns(nodes)
    tallest = max((len(col) for col in cols), default=0)
    height = 2 * MARGIN + tallest * NODE_HEIGHT + max(0, tallest - 1) * ROW_GAP
    for c, col in enumerate(cols):
        # centre short columns vertically so edges stay gentle
        offset = (tallest - len(col)) * (NODE_HEIGHT + ROW_GAP) / 2
        for r, name in enumerate(col):
            x = MARGIN + c * (NODE_WIDTH + COLUMN_GAP)
            y = MARGIN + offset + r * (NODE_HEIGHT + ROW_GAP)
            placed.append(Placed(by_name[name], c, r, x, y))
    width = 2 * MARGIN + len(cols) * NODE_WIDTH + max(0, len(cols) - 1) * COLUMN_GAP
    return placed, width, height


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"


def render_svg(nodes: list[Node], title: str = "Pipeline") -> Markup:
    """The graph as an inline SVG element; every text in it is escaped."""
    placed, width, height = layout(nodes)
    where = {p.node.name: p for p in placed}
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.label] = counts.get(node.label, 0) + 1
    summary = ", ".join(f"{n} {label.lower()}" for label, n in counts.items())
    description = f"{title}: {len(nodes)} action{'s' if len(nodes) != 1 else ''}"
    if summary:
        description += f" ({summary})"
    parts = [
        f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="{escape(description)}" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">',
        f"<title>{escape(description)}</title>",
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="6" refY="4" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" '
        'class="arrow"/></marker></defs>',
    ]
    for p in placed:
        for need in p.node.needs:
            source = where.get(need)
            if source is None or source.column >= p.column:
                continue
            x1, y1 = source.x + NODE_WIDTH, source.y + NODE_HEIGHT / 2
            x2, y2 = p.x, p.y + NODE_HEIGHT / 2
            bend = COLUMN_GAP / 2
            parts.append(
                f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} '
                f'{x2 - bend:.1f},{y2:.1f} {x2 - 4:.1f},{y2:.1f}" marker-end="url(#arrow)"/>'
            )
    for p in placed:
        node = p.node
        state = node.state or "none"
        box = (
            f'<g class="node node-{escape(state)}" data-action="{escape(node.name)}">'
            f"<title>{escape(node.name)}: {escape(node.label)}</title>"
            f'<rect x="{p.x:.1f}" y="{p.y:.1f}" width="{NODE_WIDTH}" height="{NODE_HEIGHT}" '
            f'rx="6"/>'
            f'<text class="name" x="{p.x + 10:.1f}" y="{p.y + 19:.1f}">'
            f"{escape(_short(node.name))}</text>"
            f'<text class="status" x="{p.x + 10:.1f}" y="{p.y + 36:.1f}">'
            f"{ICONS.get(node.state, ICONS[None])} {escape(_short(node.label))}</text></g>"
        )
        if node.href:
            box = f'<a href="{escape(node.href)}" tabindex="-1">{box}</a>'
        parts.append(box)
    parts.append("</svg>")
    return Markup("".join(parts))

"""A picture of a pipeline: its actions as a layered dependency graph, drawn as SVG.

Layout is plain arithmetic over plain data, so it is tested without a browser. Every
action sits in the column after its deepest dependency; within a column, actions are
ordered by where their dependencies (then their dependents) sit, which keeps most edges
short and uncrossed. Status is shown by colour *and* by an icon and a word.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from markupsafe import Markup, escape

NODE_WIDTH = 210
NODE_HEIGHT = 46
COLUMN_GAP = 56
ROW_GAP = 14
MARGIN = 8
MAX_LABEL = 25
WAYPOINT_HEIGHT = 12

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
class Waypoint:
    """Where an edge that skips columns crosses one of them: it takes a slot there, so the
    edge runs between nodes instead of through them."""

    source: str
    target: str
    column: int


Item = str | Waypoint  # an action's name, or a waypoint


@dataclass(frozen=True)
class Placed:
    node: Node
    column: int
    row: int
    x: float
    y: float


@dataclass(frozen=True)
class Layout:
    nodes: list[Placed]
    edges: list[list[tuple[float, float]]]  # each from its source's right to its target's left
    width: float
    height: float


def _depths(nodes: list[Node]) -> dict[str, int]:
    """Each action's column: one after its deepest dependency.

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
    return depth


def _chains(nodes: list[Node], depth: dict[str, int]) -> list[list[Item]]:
    """Every edge as the items it passes: source, a waypoint per skipped column, target."""
    chains = []
    for node in nodes:
        for need in dict.fromkeys(node.needs):
            if need in depth and depth[need] < depth[node.name]:
                skipped = range(depth[need] + 1, depth[node.name])
                chains.append([need, *(Waypoint(need, node.name, c) for c in skipped), node.name])
    return chains


def _columns(nodes: list[Node]) -> tuple[list[list[Item]], list[list[Item]]]:
    depth = _depths(nodes)
    chains = _chains(nodes, depth)
    cols: list[list[Item]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for node in nodes:  # project.yaml order is the starting order within a column
        cols[depth[node.name]].append(node.name)
    before: dict[Item, list[Item]] = {item: [] for col in cols for item in col}
    after: dict[Item, list[Item]] = {item: [] for col in cols for item in col}
    for chain in chains:
        for item in chain[1:-1]:
            assert isinstance(item, Waypoint)
            cols[item.column].append(item)
            before[item], after[item] = [], []
        for a, b in itertools.pairwise(chain):
            after[a].append(b)
            before[b].append(a)
    _order(cols, before, after)
    return cols, chains


def _order(
    cols: list[list[Item]], before: dict[Item, list[Item]], after: dict[Item, list[Item]]
) -> None:
    """Reorder each column by the mean row of its neighbours in the next column over
    (a barycentre sweep right, then left; twice), which uncrosses most edges."""

    rows = {item: r for col in cols for r, item in enumerate(col)}

    def key(item: Item, neighbours: dict[Item, list[Item]]) -> float:
        near = [rows[n] for n in neighbours[item]]
        return sum(near) / len(near) if near else rows[item]

    def sweep(order: list[int], neighbours: dict[Item, list[Item]]) -> None:
        for i in order:
            cols[i] = sorted(cols[i], key=lambda item: key(item, neighbours))
            rows.update((item, r) for r, item in enumerate(cols[i]))

    for _ in range(2):
        sweep(list(range(1, len(cols))), before)
        sweep(list(range(len(cols) - 2, -1, -1)), after)


def _height(item: Item) -> float:
    return NODE_HEIGHT if isinstance(item, str) else WAYPOINT_HEIGHT


def layout(nodes: list[Node]) -> Layout:
    """Where each node and edge goes, and the size of the whole picture."""
    by_name = {node.name: node for node in nodes}
    spots, edges, width, height = _geometry(tuple((node.name, node.needs) for node in nodes))
    placed = [Placed(by_name[name], c, r, x, y) for name, c, r, x, y in spots]
    return Layout(placed, [list(points) for points in edges], width, height)


@functools.lru_cache(maxsize=64)
def _geometry(shape: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple:
    # the picture depends only on the actions and their needs, which a polled page redraws
    # with new states every few seconds: each shape is laid out once
    cols, chains = _columns([Node(name, needs) for name, needs in shape])
    column_heights = [
        sum(_height(item) for item in col) + max(0, len(col) - 1) * ROW_GAP for col in cols
    ]
    tallest = max(column_heights, default=0)
    top: dict[Item, tuple[float, float]] = {}  # item -> (x, y of its top)
    spots = []
    for c, col in enumerate(cols):
        x = MARGIN + c * (NODE_WIDTH + COLUMN_GAP)
        y = MARGIN + (tallest - column_heights[c]) / 2  # short columns are centred
        for r, item in enumerate(col):
            top[item] = (x, y)
            if isinstance(item, str):
                spots.append((item, c, r, x, y))
            y += _height(item) + ROW_GAP
    edges = []
    for chain in chains:
        points = []
        for i, item in enumerate(chain):
            x, y = top[item]
            middle = y + _height(item) / 2
            if i > 0:
                points.append((x, middle))
            if i < len(chain) - 1:
                points.append((x + NODE_WIDTH, middle))
        edges.append(tuple(points))
    width = 2 * MARGIN + len(cols) * NODE_WIDTH + max(0, len(cols) - 1) * COLUMN_GAP
    return tuple(spots), tuple(edges), width, 2 * MARGIN + tallest


def _path(points: list[tuple[float, float]]) -> str:
    """Curves across the gaps between columns, straight lines through waypoints."""
    (x, y), *rest = points
    d = [f"M{x:.1f},{y:.1f}"]
    for i, (nx, ny) in enumerate(rest):
        last = i == len(rest) - 1
        end_x = nx - 4 if last else nx  # leave room for the arrow head
        if i % 2 == 0:  # across a gap
            bend = COLUMN_GAP / 2
            d.append(f"C{x + bend:.1f},{y:.1f} {nx - bend:.1f},{ny:.1f} {end_x:.1f},{ny:.1f}")
        else:  # through a waypoint's column
            d.append(f"L{end_x:.1f},{ny:.1f}")
        x, y = nx, ny
    return " ".join(d)


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"


def render_svg(nodes: list[Node], title: str = "Pipeline") -> Markup:
    """The graph as an inline SVG element; every text in it is escaped."""
    drawn = layout(nodes)
    width, height = drawn.width, drawn.height
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
    for points in drawn.edges:
        parts.append(f'<path class="edge" d="{_path(points)}" marker-end="url(#arrow)"/>')
    for p in drawn.nodes:
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

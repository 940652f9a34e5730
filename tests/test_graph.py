"""The pipeline picture: layered layout and safe, readable SVG."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET

from jobsite.graph import COLUMN_GAP, NODE_HEIGHT, NODE_WIDTH, Node, layout, render_svg

SVG = "{http://www.w3.org/2000/svg}"


def columns(nodes: list[Node]) -> list[list[str]]:
    """Action names by column as drawn, left to right, each top to bottom."""
    by_x: dict[float, list] = {}
    for placed in layout(nodes).nodes:
        by_x.setdefault(placed.x, []).append(placed)
    return [
        [p.node.name for p in sorted(col, key=lambda p: p.y)] for _, col in sorted(by_x.items())
    ]


def test_each_action_sits_one_column_after_its_deepest_dependency():
    nodes = [
        Node("extract"),
        Node("clean", ("extract",)),
        Node("model", ("clean", "extract")),
        Node("codelists"),
        Node("report", ("model", "codelists")),
    ]
    cols = columns(nodes)
    assert [sorted(c) for c in cols] == [
        ["codelists", "extract"],
        ["clean"],
        ["model"],
        ["report"],
    ]


def test_columns_are_ordered_to_keep_edges_straight():
    # b2 needs a2 which is second in column 0: b2 should sit below b1
    nodes = [
        Node("a1"),
        Node("a2"),
        Node("b2", ("a2",)),
        Node("b1", ("a1",)),
    ]
    assert columns(nodes) == [["a1", "a2"], ["b1", "b2"]]


def test_a_cycle_or_unknown_dependency_still_draws():
    nodes = [Node("a", ("b",)), Node("b", ("a",)), Node("c", ("missing",))]
    drawn = layout(nodes)
    assert {p.node.name for p in drawn.nodes} == {"a", "b", "c"}
    assert drawn.width > 0 and drawn.height > 0
    ET.fromstring(render_svg(nodes))  # still well-formed


def test_no_actions_is_an_empty_picture():
    assert layout([]).nodes == []
    ET.fromstring(render_svg([]))


def test_layout_places_columns_left_to_right_without_overlap():
    nodes = [Node(f"a{i}") for i in range(3)] + [Node("z", ("a0", "a1", "a2"))]
    drawn = layout(nodes)
    by_name = {p.node.name: p for p in drawn.nodes}
    assert by_name["z"].x == by_name["a0"].x + NODE_WIDTH + COLUMN_GAP
    ys = sorted(by_name[f"a{i}"].y for i in range(3))
    assert all(b - a >= NODE_HEIGHT for a, b in itertools.pairwise(ys))
    assert drawn.width >= by_name["z"].x + NODE_WIDTH
    assert drawn.height >= ys[-1] + NODE_HEIGHT
    # the single node in column 1 is centred against column 0
    assert by_name["z"].y == ys[1]


def test_an_edge_that_skips_columns_runs_between_the_nodes_it_passes():
    nodes = [
        Node("extract"),
        Node("clean", ("extract",)),
        Node("model", ("clean",)),
        Node("report", ("model", "extract")),
    ]
    drawn = layout(nodes)
    by_name = {p.node.name: p for p in drawn.nodes}
    (long_edge,) = [e for e in drawn.edges if len(e) > 2]
    # it enters and leaves one waypoint in each skipped column (clean's and model's)
    assert len(long_edge) == 2 + 2 * 2
    for name in ("clean", "model"):
        box = by_name[name]
        crossing = [y for x, y in long_edge if box.x <= x <= box.x + NODE_WIDTH]
        assert crossing and all(not box.y <= y <= box.y + NODE_HEIGHT for y in crossing)
    assert long_edge[0] == (by_name["extract"].x + NODE_WIDTH, by_name["extract"].y + 23)
    assert long_edge[-1][0] == by_name["report"].x


def test_svg_shows_status_by_colour_class_icon_and_words():
    nodes = [
        Node("extract", state="succeeded", label="Succeeded", href="/jobs/abc"),
        Node("model", ("extract",), state="failed", label="Nonzero exit"),
        Node("report", ("model",)),
    ]
    svg = str(render_svg(nodes))
    root = ET.fromstring(svg)
    assert root.get("role") == "img"
    assert root.get("aria-label") == (
        "Pipeline: 3 actions (1 succeeded, 1 nonzero exit, 1 not run)"
    )
    groups = {g.get("data-action"): g for g in root.iter(f"{SVG}g")}
    assert groups["extract"].get("class") == "node node-succeeded"
    assert groups["model"].get("class") == "node node-failed"
    assert groups["report"].get("class") == "node node-none"
    status = [t.text for t in groups["model"].iter(f"{SVG}text") if t.get("class") == "status"]
    assert status == ["✗ Nonzero exit"]
    assert len(list(root.iter(f"{SVG}path"))) == 2 + 1  # two edges and the arrow head
    links = [a.get("href") for a in root.iter(f"{SVG}a")]
    assert links == ["/jobs/abc"]


def test_long_names_are_shortened_but_kept_whole_in_the_tooltip():
    name = "generate_dataset_for_the_whole_population_2020"
    root = ET.fromstring(str(render_svg([Node(name)])))
    texts = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "name"]
    assert texts[0].endswith("…") and len(texts[0]) < len(name)
    titles = [t.text for t in root.iter(f"{SVG}title")]
    assert f"{name}: Not run" in titles


def test_every_text_is_escaped():
    evil = '<script>alert("x")</script>&'
    svg = str(render_svg([Node(evil, label=evil, href=f"/jobs/{evil}"), Node("b", (evil,))]))
    assert "<script>" not in svg
    root = ET.fromstring(svg)  # well-formed: nothing broke out of its attribute or element
    assert any(g.get("data-action") == evil for g in root.iter(f"{SVG}g"))
    assert re.search(r"&lt;script&gt;", svg)

"""Looking at outputs rather than downloading them: the outputs list by action, and a
preview page per file (CSV as a table, images inline, HTML reports in a sandboxed frame,
text as text), made by real jobs from a real repo. Files are hostile: nothing in them runs,
and nothing outside the workspace is ever read."""

from __future__ import annotations

import base64
import os
import re
import time
import urllib.parse

import pytest
from helpers import setup_workspace, submit, wait_for_request

pytestmark = pytest.mark.usefixtures("docker_cleanup")

# a 1x1 PNG
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
    '<script>parent.document.title = "pwned"</script><rect width="40" height="20" fill="teal"/>'
    "</svg>"
)
REPORT = "<h1>Cohort report</h1><script>parent.document.title = 'pwned'</script>"
NOTES = "# Notes\n\n<b>bold?</b> & more\n"
PROJECT = """\
version: "4"
actions:
  tables:
    run: python:v2 -c "mkdir -p output && cp analysis/*.csv analysis/*.md output/"
    outputs:
      moderately_sensitive:
        tables: output/*.csv
        notes: output/*.md
  figures:
    run: >-
      python:v2 -c "mkdir -p output && cp analysis/*.png analysis/*.svg analysis/*.html output/
      && echo secret > output/ids.rds"
    outputs:
      moderately_sensitive:
        figures: output/*.png
        drawings: output/*.svg
        report: output/*.html
      highly_sensitive:
        ids: output/ids.rds
"""


def big_csv(rows: int) -> str:
    lines = ["n,name,note"] + [f"{i},row {i},<i>{i}</i>" for i in range(1, rows + 1)]
    return "\n".join(lines) + "\n"


@pytest.fixture
async def outputs(client, make_user, make_repo, settings):
    """A workspace whose two actions ran; returns the API headers of its output viewer."""
    headers = await make_user("alice")
    repo = make_repo(
        {
            "project.yaml": PROJECT,
            "analysis/counts.csv": big_csv(1200),
            "analysis/notes.md": NOTES,
            "analysis/plot.svg": SVG,
            "analysis/report.html": REPORT,
        }
    )
    (repo.path / "analysis/plot.png").write_bytes(PNG)
    repo.git("add", "-A")
    repo.git("commit", "--quiet", "-m", "a figure")
    await setup_workspace(client, headers, repo)
    done = await wait_for_request(client, headers, await submit(client, headers, ["run_all"]))
    assert done["status"] == "succeeded", done
    return headers


def plain(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


async def test_the_outputs_list_groups_files_by_action_with_size_level_and_when(
    client, outputs, make_repo
):
    page = (await client.get("/ws1/outputs/", headers=outputs)).text
    figures, tables = page.index('data-action="figures"'), page.index('data-action="tables"')
    assert figures < tables  # actions in name order, each with its own files
    assert page.index("output/plot.png") > figures and page.index("output/counts.csv") > tables
    text = plain(page)
    assert "output/ids.rds not shown: highly_sensitive outputs are never shown" in text
    assert "highly sensitive" in text and "moderately sensitive" in text
    assert f"{len(PNG)} Bytes" in text
    assert re.search(r"Made by job [0-9a-f]{16} at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text)
    assert 'href="/ws1/outputs/output/counts.csv?download=1"' in page
    assert "Out of date" not in text


async def test_a_csv_is_previewed_as_a_table_of_its_first_thousand_rows(client, outputs):
    response = await client.get("/ws1/outputs/output/counts.csv", headers=outputs)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    text = plain(response.text)
    assert "1,200 rows and 3 columns; the first 1,000 rows are shown." in text
    assert "<td>1000</td>" in response.text and "<td>1001</td>" not in response.text
    assert "<td>&lt;i&gt;7&lt;/i&gt;</td>" in response.text  # cells are text, never markup
    assert "<i>7</i>" not in response.text


async def test_images_are_shown_inline_and_svg_scripts_never_run(client, outputs):
    for name, media_type, data in (
        ("plot.png", "image/png", PNG),
        ("plot.svg", "image/svg+xml", SVG.encode()),
    ):
        page = (await client.get(f"/ws1/outputs/output/{name}", headers=outputs)).text
        assert f'<img class="preview-image" src="/ws1/output-files/output/{name}"' in page
        assert "<svg" not in page and "<script>parent" not in page  # never inline markup
        raw = await client.get(f"/ws1/output-files/output/{name}", headers=outputs)
        assert raw.status_code == 200 and raw.content == data
        assert raw.headers["content-type"] == media_type
        assert raw.headers["content-security-policy"].startswith("sandbox;")
        assert "script-src" not in raw.headers["content-security-policy"]
        assert raw.headers["x-content-type-options"] == "nosniff"


async def test_an_html_report_is_shown_in_a_sandboxed_frame(client, outputs):
    page = (await client.get("/ws1/outputs/output/report.html", headers=outputs)).text
    frame = re.search(r"<iframe[^>]*>", page).group(0)
    assert " sandbox " in frame and 'src="/ws1/output-files/output/report.html"' in frame
    assert "Cohort report" not in page
    raw = await client.get("/ws1/output-files/output/report.html", headers=outputs)
    assert raw.text == REPORT
    policy = raw.headers["content-security-policy"]
    assert policy.split(";")[0] == "sandbox" and "frame-ancestors 'self'" in policy


async def test_text_and_markdown_are_shown_escaped(client, outputs):
    page = (await client.get("/ws1/outputs/output/notes.md", headers=outputs)).text
    assert "# Notes\n\n&lt;b&gt;bold?&lt;/b&gt; &amp; more" in page
    assert "<b>bold?</b>" not in page


async def test_download_gives_the_file_itself_as_an_attachment(client, outputs):
    response = await client.get("/ws1/outputs/output/counts.csv?download=1", headers=outputs)
    assert response.content.decode() == big_csv(1200)
    assert response.headers["content-disposition"] == "attachment; filename*=utf-8''counts.csv"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-type"] == "application/octet-stream"


async def test_outputs_that_are_not_shown_are_refused_everywhere(client, outputs, make_user):
    for url in (
        "/ws1/outputs/output/ids.rds",
        "/ws1/outputs/output/ids.rds?download=1",
        "/ws1/output-files/output/ids.rds",
    ):
        response = await client.get(url, headers=outputs)
        assert response.status_code in (403, 404), url
        assert "secret" not in response.text
    response = await client.get("/ws1/output-files/output/counts.csv", headers=outputs)
    assert response.status_code == 404 and "download it from its preview page" in response.text
    bob = await make_user("bob")  # not a member: may not see outputs at all
    for url in (
        "/ws1/outputs/",
        "/ws1/outputs/output/counts.csv",
        "/ws1/output-files/output/plot.png",
    ):
        assert (await client.get(url, headers=bob)).status_code == 403, url


async def test_a_file_swapped_after_the_job_is_not_followed_or_waited_on(
    client, outputs, settings, intact
):
    ws = settings.data_dir / "workspaces/ws1"
    outside = settings.data_dir.parent / "outside.csv"
    outside.write_text("n\nstolen\n")
    (ws / "output/counts.csv").unlink()
    (ws / "output/counts.csv").symlink_to(outside)
    (ws / "output/plot.png").unlink()
    os.mkfifo(ws / "output/plot.png")  # reading it would block for ever
    (ws / "output").rename(ws / "real-output")
    (ws / "output").symlink_to(ws / "real-output")  # a linked directory, too
    started = time.monotonic()
    for url in (
        "/ws1/outputs/output/counts.csv",
        "/ws1/outputs/output/counts.csv?download=1",
        "/ws1/output-files/output/plot.png",
        "/ws1/outputs/output/notes.md",
    ):
        response = await client.get(url, headers=outputs)
        assert response.status_code == 404, url
        assert "stolen" not in response.text
        assert "no longer in the workspace" in response.text
    assert time.monotonic() - started < 10
    (ws / "output").unlink()
    (ws / "real-output").rename(ws / "output")
    response = await client.get("/ws1/output-files/output/plot.png", headers=outputs)
    assert response.status_code == 404  # a fifo is not a file
    await intact.check(client, allowed=lambda path: path == "outside.csv")


HOSTILE_NAMES = """\
version: "4"
actions:
  names:
    run: >-
      python:v2 -c "mkdir -p output && echo 'a,b' > 'output/x\\"><img src=y onerror=alert(1)>.csv'
      && echo 'c,d' > 'output/q?a=1#z.csv'"
    outputs:
      moderately_sensitive:
        tables: output/*.csv
"""


async def test_hostile_file_names_are_escaped_and_still_reachable(
    client, make_user, make_repo, intact
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": HOSTILE_NAMES}))
    done = await wait_for_request(client, headers, await submit(client, headers, ["names"]))
    assert done["status"] == "succeeded", done
    listing = (await client.get("/ws1/outputs/", headers=headers)).text
    assert "<img src=y" not in listing
    assert "&lt;img src=y onerror=alert(1)&gt;.csv" in listing
    for name, first_row in (('x"><img src=y onerror=alert(1)>.csv', "a"), ("q?a=1#z.csv", "c")):
        quoted = urllib.parse.quote(f"output/{name}")
        assert f'href="/ws1/outputs/{quoted}"' in listing
        page = await client.get(f"/ws1/outputs/{quoted}", headers=headers)
        assert page.status_code == 200, name
        assert "<img src=y" not in page.text
        assert f'<th scope="col">{first_row}</th>' in page.text
        download = await client.get(f"/ws1/outputs/{quoted}?download=1", headers=headers)
        disposition = download.headers["content-disposition"]
        assert disposition == f"attachment; filename*=utf-8''{urllib.parse.quote(name)}"
        assert '"' not in disposition and "<" not in disposition
    await intact.check(client, allowed=lambda path: path.startswith("repos"))  # the test's repo

"""A researcher looks at outputs in Chromium: the outputs list by action, a CSV as a table,
a figure inline, an HTML report in a sandboxed frame whose script never runs, and the
workspace page marking an action whose outputs are out of date."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from playwright.sync_api import Browser, expect

from .helpers import PASSWORD, LiveServer, PageProblems, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.docker]

PNG = base64.b64decode(  # a 2x2 teal PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGNgYGD4z8DAwMDAwMDAAAANBAED"
    "0Sm6XQAAAABJRU5ErkJggg=="
)
SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="240" height="120">'
    '<script>top.document.title = "pwned"</script>'
    '<rect width="240" height="120" fill="teal"/>'
    '<text x="20" y="66" fill="white">rate by year</text>'
    "</svg>"
)
REPORT = (
    "<h1>Cohort report</h1><p>Counts by region.</p>"
    "<script>top.document.title = 'pwned'; document.body.innerHTML = 'pwned'</script>"
)
COUNTS = "region,patients,rate\n" + "".join(
    f"region {i},{i * 37},{i * 0.4:.1f}\n" for i in range(1, 1301)
)
PROJECT = """\
version: "4"
actions:
  counts:
    run: python:v2 -c "mkdir -p output && cp analysis/counts.csv output/"
    outputs:
      moderately_sensitive:
        counts: output/counts.csv
  figures:
    run: >-
      python:v2 -c "mkdir -p output && cp analysis/rate.svg analysis/report.html analysis/plot.png
      output/"
    needs: [counts]
    outputs:
      moderately_sensitive:
        rate: output/rate.svg
        report: output/report.html
        plot: output/plot.png
"""


def test_a_researcher_previews_outputs_and_sees_which_are_out_of_date(
    browser: Browser, live_server: LiveServer, make_repo: Any
) -> None:
    repo = make_repo(
        {
            "project.yaml": PROJECT,
            "analysis/counts.csv": COUNTS,
            "analysis/rate.svg": SVG,
            "analysis/report.html": REPORT,
        }
    )
    (repo.path / "analysis/plot.png").write_bytes(PNG)
    repo.git("add", "-A")
    repo.git("commit", "--quiet", "-m", "a figure")
    live_server.add_user("alice")
    slug = live_server.api("POST", "/api/v1/projects", json={"name": "Heart Study"}).json()["slug"]
    response = live_server.api(
        "POST",
        f"/api/v1/projects/{slug}/workspaces",
        json={"name": "heart-main", "repo": repo.url, "branch": "main", "database": "sample"},
    )
    assert response.status_code == 201, response.text
    response = live_server.api(
        "POST", "/api/v1/workspaces/heart-main/job-requests", json={"actions": ["figures"]}
    )
    request_id = response.json()["id"]
    wait_until(
        lambda: (
            live_server.api("GET", f"/api/v1/job-requests/{request_id}").json()["status"]
            == "succeeded"
        ),
        60,
        "the job request to succeed",
    )

    context = browser.new_context(base_url=live_server.url, viewport={"width": 1200, "height": 800})
    context.set_default_timeout(15_000)
    watcher = PageProblems()
    watcher.watch(context)
    page = context.new_page()
    page.goto("/login")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()

    page.goto("/heart-main/outputs/")
    counts = page.locator('section[data-action="counts"]')
    figures = page.locator('section[data-action="figures"]')
    expect(counts.get_by_role("heading", name="counts")).to_be_visible()
    expect(counts.get_by_role("link", name="output/counts.csv", exact=True)).to_be_visible()
    expect(figures.get_by_role("link", name="output/report.html", exact=True)).to_be_visible()
    expect(figures).to_contain_text(re.compile(r"Made by job [0-9a-f]{16} at \d{4}-"))
    expect(page.locator(".stale")).to_have_count(0)
    screenshot(page, "outputs")

    counts.get_by_role("link", name="output/counts.csv", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("output/counts.csv")
    expect(
        page.get_by_text("1,300 rows and 3 columns; the first 1,000 rows are shown.")
    ).to_be_visible()
    table = page.locator(".preview-table table")
    expect(table.locator("thead th")).to_have_text(["region", "patients", "rate"])
    expect(table.locator("tbody tr")).to_have_count(1000)
    expect(table.locator("tbody tr").first).to_contain_text("region 1")
    screenshot(page, "output-preview")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename == "counts.csv"
    assert Path(download.value.path()).read_text() == COUNTS

    page.goto("/heart-main/outputs/output/rate.svg")
    figure = page.get_by_role("img", name=re.compile(r"^output.rate\.svg"))
    expect(figure).to_be_visible()
    wait_until(lambda: figure.evaluate("img => img.complete && img.naturalWidth") == 240)
    page.goto("/heart-main/outputs/output/plot.png")
    png = page.get_by_role("img", name=re.compile(r"^output.plot\.png"))
    wait_until(lambda: png.evaluate("img => img.complete && img.naturalWidth") == 2)

    page.goto("/heart-main/outputs/output/report.html")
    report = page.frame_locator("iframe.preview-frame")
    expect(report.get_by_role("heading", name="Cohort report")).to_be_visible()
    expect(report.get_by_text("Counts by region.")).to_be_visible()
    assert "pwned" not in page.title()

    # the counts action changes: its outputs and those of figures, which read them, are stale
    repo.commit(
        {"project.yaml": PROJECT.replace("cp analysis/counts.csv", "cp -p analysis/counts.csv")}
    )
    page.goto("/heart-main/")
    stale = page.locator('[data-out-of-date="counts"]')
    expect(stale).to_contain_text("Outputs out of date: the run command of counts has changed")
    expect(page.locator('[data-out-of-date="figures"]')).to_contain_text(
        "the outputs of counts, which it read, are out of date"
    )
    screenshot(page, "workspace-out-of-date")
    page.goto("/heart-main/outputs/")
    expect(page.locator('section[data-action="figures"] .stale')).to_contain_text("Out of date")

    problems = watcher.report()
    context.close()
    # the only complaint is the browser refusing the report's script: that is the sandbox
    blocked = [p for p in problems if "Blocked script execution" in p and "output-files" in p]
    assert blocked and len(blocked) == len(problems), problems

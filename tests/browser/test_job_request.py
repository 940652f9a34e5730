"""The job request page in Chromium, against the real server and real Docker: what a
request ran (project.yaml at its commit, counts, total runtime), what changed since the
last success, running it again, choosing a commit and changing the workspace's branch."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from .helpers import PASSWORD, LiveServer, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.docker]

PROJECT_YAML = """\
version: "5"
actions:
  prepare:
    run: python:v2 -c "mkdir -p output; cat analysis/rows.txt > output/raw.csv"
    outputs:
      moderately_sensitive:
        raw: output/raw.csv
  summarise:
    run: python:v2 -c "wc -l < output/raw.csv > output/n.txt"
    needs: [prepare]
    outputs:
      moderately_sensitive:
        n: output/n.txt
"""


def sign_in(page: Page, username: str) -> None:
    page.goto("/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def status_of(page: Page) -> Any:
    return page.locator("#job-request .status-line .pill")


def test_a_researcher_reads_a_job_request_and_runs_it_again(
    page: Page, live_server: LiveServer, make_repo: Any
) -> None:
    repo = make_repo({"project.yaml": PROJECT_YAML, "analysis/rows.txt": "1\n2\n"})
    first_commit = repo.git("rev-parse", "HEAD")
    live_server.add_user("alice")
    slug = live_server.api("POST", "/api/v1/projects", json={"name": "Heart Study"}).json()
    response = live_server.api(
        "POST",
        f"/api/v1/projects/{slug['slug']}/workspaces",
        json={"name": "heart", "repo": repo.url, "branch": "main", "database": "sample"},
    )
    assert response.status_code == 201, response.text

    sign_in(page, "alice")
    page.goto("/heart/")
    page.get_by_role("checkbox", name="Run summarise", exact=True).check()
    page.get_by_role("button", name="Submit", exact=True).click()
    expect(status_of(page)).to_have_attribute("data-status", "succeeded", timeout=40_000)
    expect(page.locator("#job-counts")).to_contain_text("2 succeeded")
    expect(page.locator("#job-counts")).to_contain_text("total runtime")
    expect(page.locator("#no-previous")).to_be_visible()
    first_request = page.url

    # the code changes; the next request says what changed since the one that succeeded
    repo.commit({"analysis/rows.txt": "1\n2\n3\n", "analysis/notes.md": "why\n"})
    page.goto("/heart/")
    page.get_by_role("checkbox", name="Run summarise", exact=True).check()
    page.get_by_role("button", name="Submit", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Scheduled 1 job: summarise")
    changed = page.locator("#changed-files")
    expect(changed.locator('[data-change="M"]')).to_contain_text("analysis/rows.txt")
    expect(changed.locator('[data-change="A"]')).to_contain_text("analysis/notes.md")
    expect(page.get_by_text("2 files changed")).to_be_visible()
    page.get_by_text(re.compile(r"^project\.yaml at")).click()
    expect(page.locator("#project-yaml pre")).to_contain_text("wc -l < output/raw.csv")
    expect(status_of(page)).to_have_attribute("data-status", "succeeded", timeout=40_000)
    screenshot(page, "job-request")

    # run the first request's actions again: at the branch head, with its options
    page.goto(first_request)
    page.get_by_role("button", name="Run these actions again").click()
    expect(page.get_by_role("status")).to_contain_text("Scheduled")
    assert page.url != first_request
    expect(status_of(page)).to_have_attribute("data-status", "succeeded", timeout=40_000)

    # an earlier commit, chosen on the workspace page
    page.goto("/heart/")
    page.get_by_role("checkbox", name="Run prepare", exact=True).check()
    page.get_by_label("Commit", exact=True).fill(first_commit[:7])
    page.get_by_role("button", name="Submit", exact=True).click()
    expect(page.locator("dl.facts")).to_contain_text(first_commit[:7])
    expect(status_of(page)).to_have_attribute("data-status", "succeeded", timeout=40_000)
    assert live_server.api("GET", "/api/v1/workspaces/heart").json()["branch"] == "main"

    # the workspace moves to another branch; the change is shown
    repo.branch("dev")
    repo.commit({"analysis/rows.txt": "4\n"})
    page.goto("/heart/")
    page.get_by_label("Run another branch of the repo").fill("nope")
    page.get_by_role("button", name="Change branch").click()
    expect(page.get_by_role("alert")).to_contain_text("branch 'nope' not found")
    page.get_by_label("Run another branch of the repo").fill("dev")
    page.get_by_role("button", name="Change branch").click()
    expect(page.get_by_role("status")).to_contain_text("now runs branch dev")
    expect(page.locator("#workspace-changes")).to_contain_text("Branch changed from main to dev")

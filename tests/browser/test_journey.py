"""A researcher's whole journey through the site, in Chromium, against the real server and
real Docker: sign in, create a workspace, run actions and watch them, read logs, cancel,
meet a broken project.yaml, sign out."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Locator, Page, expect

from .helpers import PASSWORD, LiveServer, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.docker]

# Short sleeps: generate and summarise run for longer than one poll of the pages (2 s),
# and prepare holds them pending while the page that shows them loads.
PROJECT_YAML = """\
version: "5"
actions:
  prepare:
    run: python:v2 -c "sleep 2; mkdir -p output; seq 3 > output/raw.csv"
    outputs:
      moderately_sensitive:
        raw: output/raw.csv
  generate:
    run: python:v2 -c "sleep 3; cp output/raw.csv output/table.csv; echo generated the table"
    needs: [prepare]
    outputs:
      moderately_sensitive:
        table: output/table.csv
  summarise:
    run: python:v2 -c "sleep 3; echo summarised $(wc -l <output/table.csv) rows | tee output/n.txt"
    needs: [generate]
    outputs:
      moderately_sensitive:
        summary: output/n.txt
  long:
    run: python:v2 -c "sleep 30; echo done > output/long.txt"
    outputs:
      moderately_sensitive:
        long: output/long.txt
"""
BROKEN_YAML = """\
version: "5"
actions:
  generate:
    run: python:v2 -c "echo hi"
    outputs: [unclosed
"""

PENDING = {"created", "waiting_on_dependencies", "waiting_on_workers", "waiting_on_docker"}
RUNNING = {"preparing", "executing", "finalizing"}

# Installed in a page: records every status each action's pill shows, in order, for as long
# as the page lives. The marker and the record vanish if the page is reloaded or left.
RECORD_PILLS = """() => {
  window.journeyMarker = "still the same page";
  window.pillHistory = {};
  const record = () => {
    for (const row of document.querySelectorAll("[data-action]")) {
      const pill = row.querySelector(".pill");
      if (!pill) continue;
      const seen = (window.pillHistory[row.dataset.action] ??= []);
      if (seen[seen.length - 1] !== pill.dataset.status) seen.push(pill.dataset.status);
    }
  };
  record();
  new MutationObserver(record).observe(document.body, {
    subtree: true, childList: true, attributes: true, attributeFilter: ["data-status"],
  });
}"""


def phase(status: str) -> str:
    if status in PENDING:
        return "pending"
    if status in RUNNING:
        return "running"
    return status


def phases(history: list[str]) -> list[str]:
    result: list[str] = []
    for status in history:
        if not result or result[-1] != phase(status):
            result.append(phase(status))
    return result


def action_row(page: Page, action: str) -> Locator:
    return page.locator(f'[data-action="{action}"]')


def pill(page: Page, action: str) -> Locator:
    return action_row(page, action).locator(".pill")


def sign_in(page: Page, username: str) -> None:
    page.goto("/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def create_workspace(page: Page, project: str, name: str, repo: str, branch: str) -> None:
    page.goto(f"/projects/{project}/")
    page.get_by_role("link", name="New workspace").click()
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Repo").fill(repo)
    page.get_by_label("Repo").press("Tab")  # the repo's branches load into the Branch list
    page.get_by_label("Branch").select_option(branch)
    page.get_by_role("radio", name=re.compile(r"^sample\b")).check()
    page.get_by_role("button", name="Create workspace").click()


def submit(page: Page, *actions: str) -> None:
    """Ticks the actions on the workspace page and submits; waits for their pills to leave
    "not run" (on whichever page the site shows them after submitting)."""
    for action in actions:
        page.get_by_role("checkbox", name=f"Run {action}", exact=True).check()
    page.get_by_role("button", name="Submit", exact=True).click()
    for action in actions:
        expect(pill(page, action)).not_to_have_attribute("data-status", "not_run")
    page.wait_for_load_state()


def test_a_researcher_runs_a_pipeline_and_watches_it(
    page: Page, live_server: LiveServer, make_repo: Any
) -> None:
    repo = make_repo({"project.yaml": PROJECT_YAML})
    repo.branch("broken")
    repo.commit({"project.yaml": BROKEN_YAML}, "break the pipeline")
    live_server.add_user("alice")
    response = live_server.api("POST", "/api/v1/projects", json={"name": "Heart Study"})
    assert response.status_code == 201, response.text
    project = response.json()["slug"]

    sign_in(page, "alice")
    create_workspace(page, project, "heart-main", repo.url, "main")
    expect(page.get_by_role("heading", level=1)).to_have_text("heart-main")
    workspace_url = page.url

    summarise = action_row(page, "summarise")
    summarise.locator("summary, button").filter(has_text=re.compile(r"^\s*Needs")).click()
    expect(summarise.get_by_text("generate", exact=True)).to_be_visible()
    for action in ("prepare", "generate", "summarise", "long"):
        expect(pill(page, action)).to_have_attribute("data-status", "not_run")
    for option in ("Run all", "Force run dependencies", "Notify me"):
        expect(page.get_by_role("checkbox", name=option, exact=True)).not_to_be_checked()

    # generate needs prepare, which has never run: the request runs prepare first, so
    # generate and summarise (which needs generate) are seen pending, running, succeeded.
    submit(page, "generate", "summarise")
    job_request_path = urlparse(page.url).path
    page.evaluate(RECORD_PILLS)
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    watcher = page.context.new_page()
    watcher.goto(workspace_url)
    expect(pill(watcher, "generate")).to_have_attribute(
        "data-status", re.compile("|".join(RUNNING)), timeout=20_000
    )
    screenshot(watcher, "workspace-running")

    for action in ("prepare", "generate", "summarise"):
        expect(pill(page, action)).to_have_attribute("data-status", "succeeded", timeout=40_000)
    assert navigations == [], f"the page reloaded or navigated while jobs ran: {navigations}"
    assert page.evaluate("window.journeyMarker") == "still the same page"
    history = page.evaluate("window.pillHistory")
    for action in ("generate", "summarise"):
        assert phases(history[action]) == ["pending", "running", "succeeded"], history

    expect(pill(watcher, "summarise")).to_have_attribute("data-status", "succeeded")
    expect(pill(watcher, "prepare")).to_have_attribute("data-status", "succeeded")
    screenshot(watcher, "workspace-finished")
    watcher.close()

    page.goto(workspace_url)
    page.get_by_role("link", name="Logs", exact=True).click()
    expect(page.locator(f'a[href="{job_request_path}"]').first).to_be_visible()
    expect(page.locator('.pill[data-status="succeeded"]').first).to_be_visible()
    screenshot(page, "logs")

    page.locator(f'a[href="{job_request_path}"]').first.click()
    action_row(page, "summarise").locator('a[href^="/jobs/"]').first.click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("summarise")
    expect(page.locator("pre.log")).to_contain_text("summarised 3 rows")
    screenshot(page, "job")

    page.goto(workspace_url)
    submit(page, "long")
    expect(pill(page, "long")).to_have_attribute("data-status", "executing", timeout=20_000)
    page.get_by_role("button", name=re.compile(r"^Cancel")).first.click()
    # well before the 30 s sleep could end on its own
    expect(pill(page, "long")).to_have_attribute("data-status", "cancelled_by_user", timeout=15_000)

    create_workspace(page, project, "heart-broken", repo.url, "broken")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("project.yaml")
    expect(alert).to_contain_text("line")
    screenshot(page, "broken-project-yaml")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("link", name="Sign in", exact=True).first).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)


def test_a_wrong_password_is_explained_and_signs_no_one_in(
    page: Page, live_server: LiveServer
) -> None:
    live_server.add_user("alice")
    page.goto("/login")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("do not match")
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    expect(page.get_by_label("Username")).to_have_value("alice")


def test_a_visitor_sees_a_workspace_but_cannot_run_it(
    page: Page, live_server: LiveServer, make_repo: Any
) -> None:
    repo = make_repo({"project.yaml": PROJECT_YAML})
    live_server.add_user("alice")
    response = live_server.api("POST", "/api/v1/projects", json={"name": "Heart Study"})
    project = response.json()["slug"]
    response = live_server.api(
        "POST",
        f"/api/v1/projects/{project}/workspaces",
        json={"name": "heart-main", "repo": repo.url, "branch": "main", "database": "sample"},
    )
    assert response.status_code == 201, response.text

    page.goto("/heart-main/")
    expect(page.get_by_role("heading", level=1)).to_have_text("heart-main")
    for action in ("prepare", "generate", "summarise", "long"):
        expect(pill(page, action)).to_have_attribute("data-status", "not_run")
    expect(page.get_by_role("checkbox", name=re.compile("^Run "))).to_have_count(0)
    expect(page.get_by_role("button", name="Submit")).to_have_count(0)
    expect(page.get_by_role("link", name="Sign in", exact=True).first).to_be_visible()

"""The HTML pages, driven as a browser would: signed-in sessions posting forms, htmx polls."""

from __future__ import annotations

import html
import re

import pytest
from helpers import text, until

from jobsite import auth
from jobsite.outputs import Manifest

PROJECT_YAML = """\
version: "4"
actions:
  prepare:
    run: python:v2 -c "mkdir -p output && echo 'n' > output/a.csv"
    outputs:
      moderately_sensitive:
        a: output/a.csv
  analyse:
    run: python:v2 -c "echo analysing"
    needs: [prepare]
    outputs:
      moderately_sensitive:
        b: output/b.csv
"""

HX = {"HX-Request": "true"}


async def add_member(app, project_slug: str, username: str, *roles: str) -> None:
    db = app.state.db
    user_id = await db.fetchval("SELECT id FROM users WHERE username = ?", (username,))
    if user_id is None:
        user_id = await auth.create_user(db, username, "pw-1234567")
    project_id = await db.fetchval("SELECT id FROM projects WHERE slug = ?", (project_slug,))
    for role in roles:
        await db.execute(
            "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, ?)",
            (project_id, user_id, role),
        )


@pytest.fixture
def paused(app):
    """The scheduler starts nothing: jobs stay pending, so no Docker is needed."""

    async def pause() -> None:
        await app.state.scheduler.set_paused(True)

    return pause


@pytest.fixture
async def study(app, browser, make_repo, paused):
    """alice (developer) with project "Study" and workspace ws1 on a two-action pipeline."""
    await paused()
    repo = make_repo({"project.yaml": PROJECT_YAML})
    alice = await browser("alice")
    response = await alice.post("/projects/", {"name": "Study"})
    assert response.status_code == 303, response.text
    response = await alice.post(
        "/projects/study/new-workspace",
        {"name": "ws1", "repo": repo.url, "branch": "main", "database": "sample"},
    )
    assert response.status_code == 303, response.text
    await alice.get("/ws1/")  # shows (and so clears) the messages so far
    return {"alice": alice, "repo": repo}


async def count(app, table: str) -> int:
    return await app.state.db.fetchval(f"SELECT count(*) FROM {table}")


def test_times_read_as_people_say_them():
    from jobsite.views.base import ago, human_duration, local_path

    assert [ago(1000 - d, 1000) for d in (5, 60, 150)] == ["just now", "1 min ago", "2 min ago"]
    assert [ago(0, 7300), ago(1, 3 * 86400 + 1)] == ["", "3 days ago"]
    assert [human_duration(s) for s in (5, 94, 3700)] == ["5s", "1m 34s", "1h 01m"]
    assert local_path("/jobs/x", "/") == "/jobs/x"
    assert [local_path(t, "/d") for t in ("//evil.example", "https://evil.example", None)] == [
        "/d",
        "/d",
        "/d",
    ]


# -- home and projects --------------------------------------------------------------------


async def test_home_for_a_visitor_lists_projects_and_offers_sign_in(app, browser, study):
    visitor = await browser()
    response = await visitor.get("/")
    assert response.status_code == 200
    assert "Vary" in response.headers and "HX-Request" in response.headers["Vary"]
    assert 'href="/projects/study/"' in response.text
    assert response.text.count('href="/login"') == 1
    assert "Register a project" not in response.text


async def test_home_follows_your_recent_job_requests_until_they_finish(app, browser, study):
    alice = study["alice"]
    home = await alice.get("/")
    assert "You have not run anything yet" in text(home)
    assert (await alice.get("/", headers=HX)).status_code == 286
    await alice.post("/ws1/", [("actions", "prepare")])
    home = await alice.get("/")
    assert re.search(r'<div id="recent" hx-get="/" hx-trigger="every 3s"', home.text)
    assert 'href="/ws1/logs/1"' in home.text and 'data-status="pending"' in home.text
    live = await alice.get("/", headers=HX)
    assert live.status_code == 200 and live.text.lstrip().startswith('<div id="recent"')
    restore = await alice.get("/", headers={**HX, "HX-History-Restore-Request": "true"})
    assert "<html" in restore.text  # history restore gets the whole page
    await app.state.db.execute("UPDATE jobs SET state = 'succeeded', status_code = 'succeeded'")
    done = await alice.get("/", headers=HX)
    assert done.status_code == 286 and 'data-status="succeeded"' in done.text


async def test_register_a_project_from_home(app, browser):
    bob = await browser("bob")
    response = await bob.post("/projects/", {"name": "Flu Vaccines 2024"})
    assert response.status_code == 303
    assert response.headers["location"] == "/projects/flu-vaccines-2024/"
    page = await bob.get("/projects/flu-vaccines-2024/")
    assert "Project Flu Vaccines 2024 registered" in text(page)
    assert "<h1>Flu Vaccines 2024</h1>" in page.text
    assert "bob" in text(page) and "developer" in text(page)
    # the flash is shown once
    assert "registered" not in text(await bob.get("/projects/flu-vaccines-2024/"))
    home = await bob.get("/")
    assert "Your projects" in text(home) and "Flu Vaccines 2024" in text(home)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("flu vaccines 2024", "a project named 'flu vaccines 2024' already exists"),
        ("  ", "a project name needs at least one letter or digit"),
        ("!!!", "a project name needs at least one letter or digit"),
    ],
)
async def test_a_bad_project_name_is_refused_and_nothing_is_made(app, browser, name, message):
    bob = await browser("bob")
    await bob.post("/projects/", {"name": "Flu Vaccines 2024"})
    response = await bob.post("/projects/", {"name": name})
    assert response.status_code == 400
    assert message in text(response)
    assert 'role="alert"' in response.text
    assert await count(app, "projects") == 1


async def test_registering_needs_a_session_and_a_csrf_token(app, browser):
    visitor = await browser()
    response = await visitor.post("/projects/", {"name": "X"})
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login")
    bob = await browser("bob")
    response = await bob.client.post("/projects/", data={"name": "X", "csrf_token": "forged"})
    assert response.status_code == 403
    assert "reload the page" in text(response)
    assert await count(app, "projects") == 0


async def test_project_page_lists_workspaces_and_members(app, browser, study):
    page = await study["alice"].get("/projects/study/")
    assert 'href="/ws1/"' in page.text
    assert 'href="/projects/study/new-workspace"' in page.text
    assert "alice" in text(page)
    visitor = await browser()
    page = await visitor.get("/projects/study/")
    assert page.status_code == 200 and 'href="/ws1/"' in page.text
    assert "new-workspace" not in page.text


async def test_a_private_site_shows_projects_to_members_only(app, browser, study):
    app.state.settings.public_status = False
    visitor = await browser()
    home = await visitor.get("/")
    assert "shown to their members only" in text(home) and "Study" not in text(home)
    response = await visitor.get("/projects/study/")
    assert response.status_code == 404 and "/login?next=/projects/study/" in response.text
    carol = await browser("carol")
    assert (await carol.get("/ws1/")).status_code == 404
    assert "Study" not in text(await carol.get("/"))
    await add_member(app, "study", "carol", "collaborator")
    assert (await carol.get("/ws1/")).status_code == 200
    # a poll that finds the session gone sends the browser to sign in, not into the fragment
    poll = await visitor.get("/ws1/", headers=HX)
    assert poll.status_code == 401 and poll.headers["HX-Redirect"] == "/login?next=/ws1/"


# -- new workspace ----------------------------------------------------------------------


async def test_only_developers_open_the_new_workspace_page(app, browser, study):
    visitor = await browser()
    response = await visitor.get("/projects/study/new-workspace")
    assert response.status_code == 303 and response.headers["location"].startswith("/login")
    await add_member(app, "study", "carol", "collaborator", "output_viewer")
    carol = await browser("carol")
    response = await carol.get("/projects/study/new-workspace")
    assert response.status_code == 403
    assert "developer role" in text(response)
    page = await study["alice"].get("/projects/study/new-workspace")
    assert page.status_code == 200
    for label in ("Name", "Repo", "Branch", "Database", "Purpose"):
        assert re.search(rf"<(label|legend)[^>]*>\s*{label}", page.text), label
    assert "Enter the repo first" in page.text


async def test_branches_load_for_the_repo_with_main_or_master_preselected(
    app, browser, study, make_repo
):
    alice = study["alice"]
    study["repo"].git("branch", "develop")
    response = await alice.get(
        "/projects/study/new-workspace/branches", params={"repo": study["repo"].url}, headers=HX
    )
    assert response.status_code == 200
    assert "<html" not in response.text
    assert re.findall(r'<option value="([^"]+)"', response.text) == ["develop", "main"]
    assert '<option value="main" selected>' in response.text

    old = make_repo({"project.yaml": PROJECT_YAML}, name="old", branch="master")
    old.git("branch", "aaa")
    response = await alice.get(
        "/projects/study/new-workspace/branches", params={"repo": old.url}, headers=HX
    )
    assert '<option value="master" selected>' in response.text

    response = await alice.get(
        "/projects/study/new-workspace/branches",
        params={"repo": "/nowhere/repo"},
        headers=HX,
    )
    assert response.status_code == 200  # htmx swaps the inline error in
    assert "is not allowed on this site" in text(response)
    assert 'role="alert"' in response.text

    missing = str(study["repo"].path.parent / "missing")
    response = await alice.get(
        "/projects/study/new-workspace/branches", params={"repo": missing}, headers=HX
    )
    assert "could not clone" in text(response)


async def test_without_javascript_load_branches_refills_the_form(app, browser, study):
    response = await study["alice"].post(
        "/projects/study/new-workspace",
        {"name": "ws2", "repo": study["repo"].url, "load_branches": "1", "purpose": "kept"},
    )
    assert response.status_code == 200
    assert '<option value="main" selected>' in response.text
    assert 'value="ws2"' in response.text and ">kept</textarea>" in response.text
    assert await count(app, "workspaces") == 1


async def test_a_new_workspace_is_created_with_its_settings(app, browser, study):
    response = await study["alice"].post(
        "/projects/study/new-workspace",
        {
            "name": "ws-2_b",
            "repo": study["repo"].url,
            "branch": "main",
            "database": "full",
            "purpose": "Checking the full data",
            "notify_default": "1",
        },
    )
    assert response.status_code == 303 and response.headers["location"] == "/ws-2_b/"
    row = await app.state.db.fetchone("SELECT * FROM workspaces WHERE name = 'ws-2_b'")
    assert (row["database"], row["purpose"], row["notify_default"]) == (
        "full",
        "Checking the full data",
        1,
    )
    page = await study["alice"].get("/ws-2_b/")
    assert "Workspace ws-2_b created" in text(page)
    assert re.search(r'name="notify" value="1"\s+checked', page.text)


@pytest.mark.parametrize(
    ("fields", "messages"),
    [
        ({"name": "Bad Name"}, ["lowercase letters"]),
        ({"name": "admin"}, ["'admin' is used by the site itself"]),
        ({"name": "ws1"}, ["a workspace named 'ws1' already exists"]),
        ({"branch": "nope"}, ["branch 'nope' not found", "branches: main"]),
        ({"repo": "/elsewhere/repo"}, ["is not allowed on this site"]),
        ({"database": "big"}, ["database must be one of: full, sample"]),
        ({"name": "", "database": ""}, ["lowercase letters", "database must be one of"]),
    ],
)
async def test_bad_workspace_fields_are_explained_and_nothing_is_created(
    app, browser, study, fields, messages
):
    form = {"name": "ws2", "repo": study["repo"].url, "branch": "main", "database": "sample"}
    response = await study["alice"].post("/projects/study/new-workspace", {**form, **fields})
    assert response.status_code == 400
    assert "The workspace was not created" in text(response)
    for message in messages:
        assert message in text(response)
    if set(fields) & {"name", "repo", "branch"}:
        assert 'aria-invalid="true"' in response.text
    assert await count(app, "workspaces") == 1
    # what was typed is kept
    assert f'value="{html.escape({**form, **fields}["repo"])}"' in response.text


async def test_a_repo_without_project_yaml_is_refused(app, browser, study, make_repo):
    bare = make_repo({"README.md": "nothing"}, name="bare")
    response = await study["alice"].post(
        "/projects/study/new-workspace",
        {"name": "ws2", "repo": bare.url, "branch": "main", "database": "sample"},
    )
    assert response.status_code == 400
    assert "project.yaml not found" in text(response)
    assert await count(app, "workspaces") == 1


# -- workspace page ---------------------------------------------------------------------


async def test_workspace_page_shows_actions_needs_pills_and_the_graph(app, browser, study):
    page = await study["alice"].get("/ws1/")
    assert page.status_code == 200
    assert "<h1>ws1</h1>" in page.text
    for action in ("prepare", "analyse"):
        row = re.search(rf'<tr data-action="{action}">.*?</tr>', page.text, re.S).group(0)
        assert f'aria-label="Run {action}"' in row
        assert re.search(r"<summary>Needs", row)
        assert 'class="pill pill-none" data-status="not_run"' in row
        assert "Not run" in row
    analyse = re.search(r'<tr data-action="analyse">.*?</tr>', page.text, re.S).group(0)
    assert "Needs (1)" in analyse and "<code>prepare</code>" in analyse
    for label in ("Run all", "Force run dependencies", "Notify me"):
        assert re.search(rf'<input type="checkbox"[^>]*>\s*{label}</label>', page.text), label
    assert re.search(r'<button type="submit" class="primary">Submit</button>', page.text)
    # the pipeline picture: both actions, an edge, status in words as well as colour
    svg = re.search(r"<svg.*?</svg>", page.text, re.S).group(0)
    assert svg.count('class="node node-none"') == 2
    assert svg.count('class="edge"') == 1
    assert "Not run" in svg
    assert 'aria-label="Pipeline: 2 actions (2 not run)"' in svg
    # no polling while nothing runs
    assert "hx-trigger" not in re.search(r'<p id="workspace-live".*?</p>', page.text, re.S)[0]


async def test_people_without_the_developer_role_see_no_run_controls(app, browser, study):
    await add_member(app, "study", "carol", "collaborator")
    for session in (await browser(), await browser("carol")):
        page = await session.get("/ws1/")
        assert page.status_code == 200
        assert 'data-action="prepare"' in page.text
        assert 'type="checkbox"' not in page.text
        assert "Submit" not in text(page)
        response = await session.post("/ws1/", {"actions": "prepare"})
        assert response.status_code in (303, 403)
    assert await count(app, "job_requests") == 0


async def test_submit_schedules_jobs_and_says_what(app, browser, study):
    alice = study["alice"]
    response = await alice.post("/ws1/", [("actions", "analyse"), ("notify", "1")])
    assert response.status_code == 303
    location = response.headers["location"]
    assert re.fullmatch(r"/ws1/logs/\d+", location)
    page = await alice.get(location)
    flash = re.search(r'<p class="flash[^"]*" role="status">(.*?)</p>', page.text, re.S)
    assert flash and "Scheduled" in flash.group(1) and "analyse" in flash.group(1)
    assert re.search(r'<tr data-action="prepare">.*?data-status="created"', page.text, re.S)
    assert re.search(
        r'<tr data-action="analyse">.*?data-status="(created|waiting_on_dependencies)"',
        page.text,
        re.S,
    )
    request = await app.state.db.fetchone("SELECT * FROM job_requests")
    assert request["notify"] == 1

    # the workspace page now polls, and its fragment carries the pills out of band
    page = await alice.get("/ws1/")
    assert 'hx-get="/ws1/" hx-trigger="every 2s"' in page.text
    fragment = await alice.get("/ws1/", headers=HX)
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and "<h1>" not in fragment.text
    assert 'hx-swap-oob="true"' in fragment.text
    # created, or already told it waits (the paused queue's statuses are written meanwhile)
    assert re.search(r'data-status="(created|waiting_on_workers)"', fragment.text)
    assert 'id="graph" hx-swap-oob="true"' in fragment.text


async def test_run_all_with_everything_done_says_nothing_to_do(app, browser, study):
    db = app.state.db
    alice = study["alice"]
    await alice.post("/ws1/", [("actions", "prepare")])
    # pretend both actions ran successfully, outputs and all
    workspace_dir = app.state.settings.data_dir / "workspaces" / "ws1"
    (workspace_dir / "output").mkdir(parents=True)
    manifest = Manifest()
    for action, file in (("prepare", "output/a.csv"), ("analyse", "output/b.csv")):
        (workspace_dir / file).write_text("n\n")
        manifest.record_action(action, "x", "sha", {file: {"level": "moderately_sensitive"}})
    (workspace_dir / "metadata").mkdir(parents=True, exist_ok=True)
    (workspace_dir / "metadata/manifest.json").write_text(manifest.dumps())
    await db.execute("UPDATE jobs SET state = 'succeeded', status_code = 'succeeded'")
    await alice.post("/ws1/", [("actions", "analyse")])
    await db.execute("UPDATE jobs SET state = 'succeeded', status_code = 'succeeded'")

    response = await alice.post("/ws1/", [("actions", "run_all")])
    assert response.status_code == 303
    page = await alice.get(response.headers["location"])
    assert "All actions have already completed successfully" in text(page)
    assert 'class="flash flash-warning"' in page.text


async def test_submit_without_actions_explains_and_keeps_the_choices(app, browser, study):
    response = await study["alice"].post("/ws1/", [("force_run_dependencies", "1")])
    assert response.status_code == 400
    assert 'role="alert"' in response.text
    assert "Nothing was scheduled" in text(response)
    assert re.search(r'name="force_run_dependencies" value="1"\s+checked', response.text)
    assert await count(app, "job_requests") == 0


async def test_an_unknown_action_is_refused_with_its_name(app, browser, study):
    response = await study["alice"].post("/ws1/", [("actions", "nope"), ("actions", "prepare")])
    assert response.status_code == 400
    assert "nope" in text(response)
    assert re.search(r'aria-label="Run prepare"\s+checked', response.text)
    assert await count(app, "jobs") == 0


async def test_a_broken_project_yaml_is_shown_with_what_to_do(app, browser, study):
    study["repo"].commit({"project.yaml": "actions: [not, a, mapping"})
    page = await study["alice"].get("/ws1/")
    assert page.status_code == 200
    alert = re.search(r'<div class="error-box" role="alert">.*?</div>', page.text, re.S).group(0)
    assert "project.yaml" in alert and "push" in alert
    assert "Submit" not in text(page)


async def test_a_missing_branch_is_shown_with_what_to_do(app, browser, study):
    study["repo"].branch("other")
    study["repo"].git("branch", "-D", "main")
    page = await study["alice"].get("/ws1/")
    alert = re.search(r'<div class="error-box" role="alert">.*?</div>', page.text, re.S).group(0)
    assert "Branch main is missing" in " ".join(
        html.unescape(re.sub("<[^>]+>", " ", alert)).split()
    )
    assert "Push the branch again" in alert


async def test_archived_workspaces_run_nothing_until_unarchived(app, browser, study):
    alice = study["alice"]
    response = await alice.post("/ws1/archive", {"archived": "1"})
    assert response.status_code == 303
    page = await alice.get("/ws1/")
    assert "This workspace is archived" in text(page)
    assert "Submit" not in text(page)
    response = await alice.post("/ws1/", [("actions", "prepare")])
    assert response.status_code == 400 and "archived" in text(response)
    assert await count(app, "job_requests") == 0
    assert "Archived" in text(await alice.get("/projects/study/"))
    await alice.post("/ws1/archive", {"archived": "0"})
    assert "Submit" in text(await alice.get("/ws1/"))
    await add_member(app, "study", "carol", "collaborator")
    carol = await browser("carol")
    assert (await carol.post("/ws1/archive", {"archived": "1"})).status_code == 403


# -- logs, job requests, jobs -----------------------------------------------------------


async def test_logs_are_newest_first_paged_and_searchable(app, browser, study):
    alice = study["alice"]
    for i in range(23):
        await app.state.db.execute("UPDATE jobs SET state = 'failed', status_code = 'nonzero_exit'")
        await alice.post("/ws1/", [("actions", "prepare" if i % 2 else "analyse")])
    page = await alice.get("/ws1/logs")
    ids = [int(i) for i in re.findall(r'data-job-request="(\d+)"', page.text)]
    assert ids == list(range(23, 3, -1))
    assert 'rel="next"' in page.text and 'rel="prev"' not in page.text
    assert "alice" in text(page)
    assert "0/1 jobs succeeded" in text(page) and "0/2 jobs succeeded" in text(page)
    older = re.search(r'<a rel="next" href="([^"]+)"', page.text)[1].replace("&amp;", "&")
    page2 = await alice.get(older)
    assert [int(i) for i in re.findall(r'data-job-request="(\d+)"', page2.text)] == [3, 2, 1]
    assert 'rel="prev"' in page2.text and 'rel="next"' not in page2.text
    assert (await alice.get("/ws1/logs?before=99999999999999999999")).status_code == 400
    found = await alice.get("/ws1/logs", params={"q": "analy"})
    ids = [int(i) for i in re.findall(r'data-job-request="(\d+)"', found.text)]
    assert ids and all(i % 2 == 1 for i in ids)  # odd ids asked for analyse
    none = await alice.get("/ws1/logs", params={"q": "%"})
    assert "No job request ran an action matching" in text(none)
    # the list is one fragment for htmx, polled while anything is unfinished
    fragment = await alice.get("/ws1/logs", params={"q": "analy"}, headers=HX)
    assert fragment.status_code == 200
    assert fragment.text.lstrip().startswith('<div id="logs-list"')
    await app.state.db.execute("UPDATE jobs SET state = 'failed', status_code = 'nonzero_exit'")
    fragment = await alice.get("/ws1/logs", headers=HX)
    assert fragment.status_code == 286
    assert "hx-trigger" not in fragment.text


async def test_cancel_a_job_request_and_polling_stops(app, browser, study):
    alice = study["alice"]
    response = await alice.post("/ws1/", [("actions", "analyse"), ("actions", "prepare")])
    location = response.headers["location"]
    page = await alice.get(location)
    assert re.search(r"<button[^>]*>Cancel all unfinished jobs</button>", page.text)
    assert re.search(r"<button[^>]*>Cancel prepare</button>", page.text)
    live = await alice.get(location, headers=HX)
    assert live.status_code == 200 and "every 2s" in live.text

    await add_member(app, "study", "carol", "collaborator", "output_viewer")
    carol = await browser("carol")
    page = await carol.get(location)
    assert "Cancel" not in text(page)
    assert (await carol.post(f"{location}/cancel")).status_code == 403

    response = await alice.post(f"{location}/cancel", [("actions", "analyse")])
    assert response.status_code == 303
    page = await alice.get(location)
    assert "Cancelled 1 job." in text(page)
    assert re.search(r'data-action="analyse">.*?data-status="cancelled_by_user"', page.text, re.S)
    response = await alice.post(f"{location}/cancel")
    page = await alice.get(response.headers["location"])
    assert "Cancelled 1 job." in text(page)
    done = await alice.get(location, headers=HX)
    assert done.status_code == 286
    assert "every 2s" not in done.text
    assert not re.search(r"<button[^>]*>Cancel", done.text)
    response = await alice.post(f"{location}/cancel")
    assert "Nothing to cancel" in text(await alice.get(response.headers["location"]))


async def test_job_page_shows_timeline_and_the_log_to_output_viewers(app, browser, study):
    alice = study["alice"]
    await alice.post("/ws1/", [("actions", "prepare")])
    job_id = await app.state.db.fetchval("SELECT id FROM jobs")
    page = await alice.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    assert "<h1>prepare</h1>" in page.text
    assert "python:v2 -c" in text(page)
    assert re.search(r'<ol class="timeline">.*Created', page.text, re.S)
    assert '<pre class="log"' in page.text and "The log appears here" in page.text
    assert re.search(r"<button[^>]*>Cancel this job</button>", page.text)

    # the log grows while the job runs: the fragment follows it
    log = app.state.settings.data_dir / "logs" / f"{job_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("step 1\n")
    fragment = await alice.get(f"/jobs/{job_id}/log", headers=HX)
    assert fragment.status_code == 200 and "step 1" in fragment.text
    assert fragment.text.startswith('<pre class="log"')
    log.write_text("step 1\nstep 2\n")
    await app.state.db.execute(
        "UPDATE jobs SET state = 'succeeded', status_code = 'succeeded', started_at = 1, "
        "completed_at = 95"
    )
    fragment = await alice.get(f"/jobs/{job_id}/log", headers=HX)
    assert fragment.status_code == 286 and "step 2" in fragment.text
    status = await alice.get(f"/jobs/{job_id}", headers=HX)
    assert status.status_code == 286 and "1m 34s" in text(status)
    raw = await alice.get(f"/jobs/{job_id}/log")
    assert raw.text == "step 1\nstep 2\n"
    assert raw.headers["content-type"].startswith("text/plain")

    await add_member(app, "study", "carol", "collaborator")
    carol = await browser("carol")
    page = await carol.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and "pre" not in re.sub(r"<pre class=\"log", "", page.text)[:0]
    assert '<pre class="log"' not in page.text
    assert (await carol.get(f"/jobs/{job_id}/log")).status_code == 403
    assert (await carol.get(f"/jobs/{job_id}/log", headers=HX)).status_code == 403


async def test_a_long_log_shows_its_end_on_the_page(app, browser, study):
    alice = study["alice"]
    await alice.post("/ws1/", [("actions", "prepare")])
    job_id = await app.state.db.fetchval("SELECT id FROM jobs")
    log = app.state.settings.data_dir / "logs" / f"{job_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("FIRST\n" + "x" * 400_000 + "\nLAST\n")
    page = await alice.get(f"/jobs/{job_id}")
    assert "LAST" in page.text and "FIRST" not in page.text
    assert "showing the last 256 KB" in page.text
    assert "FIRST" in (await alice.get(f"/jobs/{job_id}/log")).text


async def test_script_in_action_names_branches_and_logs_is_escaped(app, browser, make_repo, paused):
    await paused()
    evil = "<script>alert(1)</script>"
    repo = make_repo({"project.yaml": PROJECT_YAML})
    repo.branch("<script>alert(2)<x")
    alice = await browser("alice")
    await alice.post("/projects/", {"name": f"Study {evil}"})
    slug = await app.state.db.fetchval("SELECT slug FROM projects")
    response = await alice.post(
        f"/projects/{slug}/new-workspace",
        {"name": "ws1", "repo": repo.url, "branch": "<script>alert(2)<x", "database": "sample"},
    )
    assert response.status_code == 303, response.text
    pages = [await alice.get("/"), await alice.get(f"/projects/{slug}/"), await alice.get("/ws1/")]
    submitted = await alice.post("/ws1/", [("actions", "prepare")])
    job_id = await app.state.db.fetchval("SELECT id FROM jobs")
    log = app.state.settings.data_dir / "logs" / f"{job_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"line {evil}\n")
    pages += [
        await alice.get(submitted.headers["location"]),
        await alice.get(f"/jobs/{job_id}"),
        await alice.get(f"/jobs/{job_id}/log", headers=HX),
        await alice.get("/ws1/logs"),
        await alice.get(
            f"/projects/{slug}/new-workspace/branches", params={"repo": repo.url}, headers=HX
        ),
    ]
    repo.commit({"project.yaml": PROJECT_YAML.replace("analyse:", '"a<script>alert(1)</script>":')})
    pages.append(await alice.get("/ws1/"))
    for page in pages:
        assert "<script>alert" not in page.text, page.url
    workspace = pages[2].text
    assert "&lt;script&gt;alert(2)&lt;x" in workspace  # the branch
    assert "&lt;script&gt;alert(1)" in pages[-1].text  # the error naming the action
    assert "line &lt;script&gt;alert(1)&lt;/script&gt;" in pages[4].text


# -- outputs ------------------------------------------------------------------------------


@pytest.fixture
def outputs(app, study):
    """Outputs of ws1 as a finished job would leave them, recorded in the manifest."""
    ws = app.state.settings.data_dir / "workspaces" / "ws1"
    files = {
        "output/ok.csv": ("moderately_sensitive", True, None, "n\n1\n"),
        "output/rows.csv": (
            "moderately_sensitive",
            False,
            "has a patient_id column",
            "patient_id\n",
        ),
        "output/secret.csv": ("highly_sensitive", False, "never shown", "patient_id\n1\n"),
        "output/page.html": ("moderately_sensitive", True, None, "<script>alert(1)</script>"),
    }
    manifest = Manifest()
    for path, (level, visible, reason, content) in files.items():
        (ws / path).parent.mkdir(parents=True, exist_ok=True)
        (ws / path).write_text(content)
        manifest.record_action(
            "prepare",
            "job1",
            "sha",
            {
                **manifest.data["files"],
                path: {
                    "action": "prepare",
                    "job": "job1",
                    "level": level,
                    "size": len(content),
                    "visible": visible,
                    "not_visible_because": reason,
                },
            },
        )
    (ws / "metadata").mkdir(parents=True, exist_ok=True)
    (ws / "metadata/manifest.json").write_text(manifest.dumps())
    (app.state.settings.data_dir / "secret.txt").write_text("not yours")
    return ws


async def test_output_viewers_download_visible_moderately_sensitive_files(
    app, browser, study, outputs
):
    alice = study["alice"]
    listing = await alice.get("/ws1/outputs/")
    assert listing.status_code == 200
    assert 'href="/ws1/outputs/output/ok.csv"' in listing.text
    assert 'href="/ws1/outputs/output/secret.csv"' not in listing.text
    assert "has a patient_id column" in text(listing)
    response = await alice.get("/ws1/outputs/output/ok.csv?download=1")
    assert response.status_code == 200 and response.text == "n\n1\n"
    assert response.headers["content-disposition"].startswith("attachment")
    page = await alice.get("/ws1/outputs/output/page.html?download=1")
    assert page.headers["content-disposition"].startswith("attachment")
    assert "sandbox" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"

    refused = {
        "/ws1/outputs/output/secret.csv": (403, "never served"),
        "/ws1/outputs/output/rows.csv": (403, "patient_id"),
        "/ws1/outputs/output/nope.csv": (404, "no output"),
        "/ws1/outputs/output/..%2F..%2F..%2Fsecret.txt": (404, "no output"),
        "/ws1/outputs/metadata/manifest.json": (404, "no output"),
    }
    for url, (status, message) in refused.items():
        response = await alice.get(url)
        assert response.status_code == status, url
        assert message in text(response), url
        assert "not yours" not in response.text


async def test_a_replaced_output_is_not_followed_out_of_the_workspace(app, browser, study, outputs):
    (outputs / "output/ok.csv").unlink()
    (outputs / "output/ok.csv").symlink_to(app.state.settings.data_dir / "secret.txt")
    for url in ("/ws1/outputs/output/ok.csv", "/ws1/outputs/output/ok.csv?download=1"):
        response = await study["alice"].get(url)
        assert response.status_code == 404 and "not yours" not in response.text


async def test_outputs_need_the_output_viewer_role(app, browser, study, outputs):
    await add_member(app, "study", "carol", "collaborator")
    carol = await browser("carol")
    assert (await carol.get("/ws1/outputs/")).status_code == 403
    assert (await carol.get("/ws1/outputs/output/ok.csv")).status_code == 403
    visitor = await browser()
    response = await visitor.get("/ws1/outputs/output/ok.csv")
    assert response.status_code == 303 and response.headers["location"].startswith("/login")
    await add_member(app, "study", "carol", "output_viewer")
    assert (await carol.get("/ws1/outputs/output/ok.csv")).status_code == 200


# -- admin ------------------------------------------------------------------------------


async def test_admin_page_is_for_admins(app, browser, study):
    response = await study["alice"].get("/admin/")
    assert response.status_code == 403
    assert (await study["alice"].post("/admin/pause", {"paused": "0"})).status_code == 403
    assert app.state.scheduler.paused


async def test_admin_sees_the_queue_and_pauses_and_prioritises_it(app, browser, study):
    alice = study["alice"]
    await alice.post(
        "/projects/study/new-workspace",
        {"name": "ws2", "repo": study["repo"].url, "branch": "main", "database": "sample"},
    )
    await alice.post("/ws1/", [("actions", "prepare")])
    await alice.post("/ws2/", [("actions", "prepare")])
    root = await browser("root", admin=True)
    page = await root.get("/admin/")
    assert page.status_code == 200
    assert "The queue is paused" in text(page)
    assert re.search(r"<button[^>]*>Resume the queue</button>", page.text)
    assert "Docker reachable" in text(page) or "Docker not reachable" in text(page)
    assert "free of" in text(page)
    assert "alice" in text(page) and "root" in text(page)
    assert page.text.count('data-job="') == 2
    assert "0 running · 2 waiting to start · 0 waiting on dependencies" in text(page)

    response = await root.post("/admin/priority", {"job_request_id": "2", "priority": "5"})
    assert response.status_code == 303
    assert await app.state.db.fetchval("SELECT priority FROM job_requests WHERE id = 2") == 5
    page = await root.get("/admin/")
    assert "Job request #2 now has priority 5" in text(page)
    # the higher priority request's job is first in line
    order = re.findall(r'data-job="([^"]+)"', page.text)
    first = await app.state.db.fetchval("SELECT job_request_id FROM jobs WHERE id = ?", (order[0],))
    assert first == 2
    bad = await root.post("/admin/priority", {"job_request_id": "2", "priority": "99"})
    assert bad.status_code == 400 and "from -10 to 10" in text(bad)

    fragment = await root.get("/admin/", headers=HX)
    assert fragment.status_code == 200 and fragment.text.lstrip().startswith('<div id="queue"')

    await app.state.db.execute("UPDATE jobs SET state = 'failed', status_code = 'internal_error'")
    assert (await root.get("/admin/", headers=HX)).status_code == 286
    await root.post("/admin/pause", {"paused": "0"})
    assert not app.state.scheduler.paused
    assert "The queue is running again" in text(await root.get("/admin/"))
    await root.post("/admin/pause", {"paused": "1"})
    assert app.state.scheduler.paused


async def test_a_long_queue_is_listed_in_part_and_counted(app, browser, study):
    db = app.state.db
    await study["alice"].post("/ws1/", [("actions", "prepare")])
    first = await db.fetchval("SELECT id FROM jobs")
    for i in range(120):
        await db.execute(
            "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
            "run_command, image, args, outputs, state, status_code, created_at, updated_at) "
            "SELECT ?, job_request_id, workspace_id, user_id, action, sha, run_command, image, "
            "args, outputs, 'pending', 'created', created_at + ?, updated_at FROM jobs "
            "WHERE id = ?",
            (f"copy{i}", i + 1, first),
        )
    page = await (await browser("root", admin=True)).get("/admin/")
    assert page.text.count('data-job="') == 50
    assert "121 waiting to start" in text(page) and "… and 71 more waiting to start" in text(page)


# -- a real run -------------------------------------------------------------------------


@pytest.mark.usefixtures("docker_cleanup")
async def test_a_run_watched_through_the_pages(app, browser, make_repo):
    repo = make_repo(
        {
            "project.yaml": """\
version: "4"
actions:
  prepare:
    run: python:v2 -c "mkdir -p output && printf 'n\\n1\\n' > output/a.csv && echo '<b>made</b>'"
    outputs:
      moderately_sensitive:
        a: output/a.csv
"""
        }
    )
    alice = await browser("alice")
    await alice.post("/projects/", {"name": "Study"})
    await alice.post(
        "/projects/study/new-workspace",
        {"name": "ws1", "repo": repo.url, "branch": "main", "database": "sample"},
    )
    response = await alice.post("/ws1/", [("actions", "prepare")])
    location = response.headers["location"]

    async def polling_stopped():  # htmx stops polling on HTTP 286, once all is finished
        poll = await alice.get(location, headers=HX)
        return poll if poll.status_code == 286 else None

    poll = await until(polling_stopped, 60, f"{location} to stop the polling")
    assert 'data-status="succeeded"' in poll.text
    job_id = await app.state.db.fetchval("SELECT id FROM jobs")
    page = await alice.get(f"/jobs/{job_id}")
    assert "&lt;b&gt;made&lt;/b&gt;" in page.text
    assert 'href="/ws1/outputs/output/a.csv"' in page.text
    assert (await alice.get("/ws1/outputs/output/a.csv?download=1")).text == "n\n1\n"
    workspace = await alice.get("/ws1/")
    assert 'class="node node-succeeded"' in workspace.text
    assert 'data-status="succeeded"' in workspace.text


# -- accessibility basics ---------------------------------------------------------------


async def test_pages_have_landmarks_unique_ids_and_labelled_controls(app, browser, study, outputs):
    alice = study["alice"]
    await alice.post("/ws1/", [("actions", "analyse")])
    job_id = await app.state.db.fetchval("SELECT id FROM jobs LIMIT 1")
    root = await browser("root", admin=True)
    pages = {
        "/": alice,
        "/projects/study/": alice,
        "/projects/study/new-workspace": alice,
        "/ws1/": alice,
        "/ws1/logs": alice,
        "/ws1/logs/1": alice,
        f"/jobs/{job_id}": alice,
        "/ws1/outputs/": alice,
        "/admin/": root,
    }
    for url, session in pages.items():
        page = (await session.get(url)).text
        assert '<main id="main"' in page and "<header" in page and "<nav" in page, url
        assert len(re.findall(r"<h1[ >]", page)) == 1, url
        ids = re.findall(r'\sid="([^"]+)"', page)
        assert len(ids) == len(set(ids)), (url, sorted(i for i in ids if ids.count(i) > 1))
        labelled = set(re.findall(r'<label[^>]*\sfor="([^"]+)"', page))
        assert labelled <= set(ids), (url, labelled - set(ids))
        for control in re.findall(r"<(?:input|select|textarea)\b[^>]*>", page):
            if 'type="hidden"' in control:
                continue
            control_id = re.search(r'\sid="([^"]+)"', control)
            wrapped = re.search(r"<label[^>]*>\s*" + re.escape(control), page)
            assert (
                "aria-label=" in control or wrapped or (control_id and control_id[1] in labelled)
            ), (url, control)

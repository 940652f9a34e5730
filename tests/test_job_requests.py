"""Job requests as researchers use them: the job request page (project.yaml at its commit,
counts, what changed since the last success, running it again), choosing a commit, and
changing a workspace's branch — through the pages and the JSON API, on real git repos."""

from __future__ import annotations

import re
import time

import pytest
from helpers import text

from jobsite import auth
from jobsite.views import jobs

PROJECT_YAML = """\
version: "4"
# <script>alert("project.yaml")</script> is only a comment
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


@pytest.fixture(autouse=True)
def no_job_starts(settings):
    """Jobs stay pending (no user may run one), so nothing here needs Docker, while the
    queue itself is not paused."""
    settings.max_jobs_per_user = 0


@pytest.fixture
async def study(app, browser, make_repo, make_user):
    """alice develops project "Study" with workspace ws1; carol only collaborates on it."""
    repo = make_repo({"project.yaml": PROJECT_YAML, "analysis/a.py": "print(1)\n"})
    alice = await browser("alice")
    assert (await alice.post("/projects/", {"name": "Study"})).status_code == 303
    response = await alice.post(
        "/projects/study/new-workspace",
        {"name": "ws1", "repo": repo.url, "branch": "main", "database": "sample"},
    )
    assert response.status_code == 303, response.text
    await alice.get("/ws1/")  # shows (and so clears) the messages so far
    db = app.state.db
    token_headers = await make_user("carol")
    carol_id = await db.fetchval("SELECT id FROM users WHERE username = 'carol'")
    project_id = await db.fetchval("SELECT id FROM projects WHERE slug = 'study'")
    await db.execute(
        "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, 'collaborator')",
        (project_id, carol_id),
    )
    alice_id = await db.fetchval("SELECT id FROM users WHERE username = 'alice'")
    alice_token = await auth.create_token(db, alice_id, "api")
    return {
        "alice": alice,
        "repo": repo,
        "api": {"Authorization": f"Bearer {alice_token}"},
        "carol": token_headers,
    }


async def request_actions(client, headers, actions, **fields):
    return await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": actions, **fields}, headers=headers
    )


async def finish(app, request_id: int, state: str = "succeeded", seconds: float = 65.0) -> None:
    """The request's jobs ended as if they ran for ``seconds`` each."""
    now = time.time()
    await app.state.db.execute(
        "UPDATE jobs SET state = ?, status_code = ?, started_at = ?, completed_at = ? "
        "WHERE job_request_id = ?",
        (state, "succeeded" if state == "succeeded" else "nonzero_exit", now - seconds, now,
         request_id),
    )  # fmt: skip


# -- the job request page -----------------------------------------------------------------


async def test_the_page_shows_project_yaml_at_its_commit_escaped(app, client, study):
    response = await request_actions(client, study["api"], ["prepare"])
    request_id = response.json()["id"]
    sha = response.json()["sha"]
    # the branch moves on; the page still shows the file as it was at the request's commit
    study["repo"].commit({"project.yaml": PROJECT_YAML.replace("analysing", "changed later")})
    page = await study["alice"].get(f"/ws1/logs/{request_id}")
    assert page.status_code == 200
    assert f"project.yaml at {sha[:7]}" in text(page)
    assert "&lt;script&gt;alert(&#34;project.yaml&#34;)&lt;/script&gt;" in page.text
    assert "<script>alert" not in page.text
    assert "echo analysing" in page.text and "changed later" not in page.text


async def test_a_long_project_yaml_is_shown_in_part(app, client, study, monkeypatch):
    monkeypatch.setattr(jobs, "PROJECT_YAML_SHOWN", 100)
    request_id = (await request_actions(client, study["api"], ["prepare"])).json()["id"]
    page = await study["alice"].get(f"/ws1/logs/{request_id}")
    assert f"Only the first 100 of its {len(PROJECT_YAML)} characters are shown" in text(page)


async def test_counts_by_status_and_total_runtime(app, client, study):
    request_id = (await request_actions(client, study["api"], ["analyse"])).json()["id"]
    page = await study["alice"].get(f"/ws1/logs/{request_id}")
    assert "2 pending" in text(page)
    assert "total runtime" not in text(page)
    db = app.state.db
    now = time.time()
    await db.execute(
        "UPDATE jobs SET state = 'succeeded', status_code = 'succeeded', started_at = ?, "
        "completed_at = ? WHERE action = 'prepare'",
        (now - 65, now),
    )
    await db.execute(
        "UPDATE jobs SET state = 'failed', status_code = 'nonzero_exit', started_at = ?, "
        "completed_at = ? WHERE action = 'analyse'",
        (now - 30, now),
    )
    page = await study["alice"].get(f"/ws1/logs/{request_id}")
    assert "1 succeeded · 1 failed · total runtime 1m 35s" in text(page)
    # the polled fragment carries the counts too
    fragment = await study["alice"].get(f"/ws1/logs/{request_id}", headers={"HX-Request": "true"})
    assert "1 succeeded · 1 failed" in text(fragment)


async def test_what_changed_since_the_previous_successful_request(app, client, study):
    repo = study["repo"]
    first = (await request_actions(client, study["api"], ["prepare"])).json()["id"]
    page = await study["alice"].get(f"/ws1/logs/{first}")
    assert "No earlier job request of this workspace succeeded in full" in text(page)
    await finish(app, first)

    # a failed request in between is not what researchers compare with
    failed = (await request_actions(client, study["api"], ["prepare"])).json()["id"]
    await finish(app, failed, "failed")

    repo.git("mv", "analysis/a.py", "analysis/b.py")
    repo.commit({"analysis/<new>.py": "print(2)\n", "README.md": "notes\n"})
    latest = await request_actions(client, study["api"], ["prepare"])
    page = await study["alice"].get(f"/ws1/logs/{latest.json()['id']}")
    shown = text(page)
    assert f"Compared with job request #{first} at" in shown
    assert "3 files changed" in shown
    assert "added analysis/<new>.py" in shown and "added README.md" in shown
    assert "renamed analysis/a.py → analysis/b.py" in shown
    assert "analysis/&lt;new&gt;.py" in page.text

    # the same commit again: nothing changed
    await finish(app, latest.json()["id"])
    again = (await request_actions(client, study["api"], ["prepare"])).json()["id"]
    page = await study["alice"].get(f"/ws1/logs/{again}")
    assert "the same commit, so no file changed" in text(page)


async def test_a_long_list_of_changed_files_is_cut_and_counted(app, client, study, monkeypatch):
    monkeypatch.setattr(jobs, "CHANGED_FILES_SHOWN", 2)
    first = (await request_actions(client, study["api"], ["prepare"])).json()["id"]
    await finish(app, first)
    study["repo"].commit({f"data/{n}.txt": str(n) for n in range(5)})
    latest = (await request_actions(client, study["api"], ["prepare"])).json()["id"]
    page = await study["alice"].get(f"/ws1/logs/{latest}")
    assert "5 files changed (the first 2 are listed)" in text(page)
    assert len(re.findall(r"<li data-change=", page.text)) == 2


async def test_run_these_actions_again(app, client, study):
    response = await request_actions(client, study["api"], ["analyse"], force_run_dependencies=True)
    first = response.json()["id"]
    await finish(app, first)
    study["repo"].commit({"analysis/a.py": "print('fixed')\n"})
    alice = study["alice"]
    page = await alice.get(f"/ws1/logs/{first}")
    assert "Run these actions again" in text(page)

    response = await alice.post(f"/ws1/logs/{first}/rerun")
    assert response.status_code == 303
    new_id = int(response.headers["location"].rsplit("/", 1)[1])
    assert new_id != first
    again = (await client.get(f"/api/v1/job-requests/{new_id}", headers=study["api"])).json()
    assert again["requested_actions"] == ["analyse"]
    assert again["force_run_dependencies"] is True
    assert again["sha"] == study["repo"].git("rev-parse", "HEAD")  # the branch's head
    page = await alice.get(response.headers["location"])
    assert "Scheduled 2 jobs: prepare, analyse" in text(page)


async def test_running_again_is_for_developers_with_the_forms_token(app, client, study, browser):
    first = (await request_actions(client, study["api"], ["prepare"])).json()["id"]
    before = await app.state.db.fetchval("SELECT count(*) FROM job_requests")
    # a form from another site carries no token
    forged = await study["alice"].client.post(f"/ws1/logs/{first}/rerun", data={})
    assert forged.status_code == 403
    carol = await browser("carol")
    page = await carol.get(f"/ws1/logs/{first}")
    assert "Run these actions again" not in text(page)
    assert (await carol.post(f"/ws1/logs/{first}/rerun")).status_code == 403
    # another workspace's address for the request is not found
    assert (await study["alice"].post(f"/nope/logs/{first}/rerun")).status_code == 404
    assert await app.state.db.fetchval("SELECT count(*) FROM job_requests") == before


async def test_running_again_when_project_yaml_broke_says_why(app, client, study):
    first = (await request_actions(client, study["api"], ["analyse"])).json()["id"]
    await finish(app, first)
    study["repo"].commit({"project.yaml": PROJECT_YAML.replace("needs: [prepare]", "needs: [x]")})
    response = await study["alice"].post(f"/ws1/logs/{first}/rerun")
    assert response.status_code == 303
    assert response.headers["location"] == f"/ws1/logs/{first}"
    page = await study["alice"].get(response.headers["location"])
    assert "Nothing was scheduled:" in text(page) and "x" in text(page)
    assert await app.state.db.fetchval("SELECT count(*) FROM job_requests") == 1


# -- choosing a commit --------------------------------------------------------------------


async def test_a_request_may_name_a_commit_of_the_branch(app, client, study):
    repo = study["repo"]
    first = repo.git("rev-parse", "HEAD")
    repo.commit({"project.yaml": PROJECT_YAML.replace("echo analysing", "echo second")})
    response = await request_actions(client, study["api"], ["analyse"], commit=first[:8])
    assert response.status_code == 201, response.text
    assert response.json()["sha"] == first
    job = await app.state.db.fetchone("SELECT * FROM jobs WHERE action = 'analyse'")
    assert job["sha"] == first and "echo analysing" in job["run_command"]

    response = await request_actions(client, study["api"], ["prepare"])
    assert response.json()["sha"] == repo.git("rev-parse", "HEAD")


async def test_a_commit_not_on_the_branch_is_a_clear_400(app, client, study, intact):
    repo = study["repo"]
    repo.branch("experiment")
    elsewhere = repo.commit({"other.txt": "x"})
    repo.git("checkout", "--quiet", "main")
    before = await app.state.db.fetchval("SELECT count(*) FROM job_requests")
    for commit, message in (
        (elsewhere, f"commit {elsewhere[:7]} is not on branch main"),
        ("0" * 40, "is not in"),
        ("HEAD~1", "is not a commit id"),
        ("--upload-pack=touch /tmp/pwned", "is not a commit id"),
    ):
        response = await request_actions(client, study["api"], ["prepare"], commit=commit)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
    response = await request_actions(client, study["api"], ["prepare"], commit=4)
    assert response.status_code == 400
    assert response.json()["error"] == "commit must be a str"
    assert await app.state.db.fetchval("SELECT count(*) FROM job_requests") == before
    await intact.check(client, allowed=lambda path: path.startswith("repos/study/"))


async def test_the_workspace_form_takes_a_commit_and_keeps_it_when_refused(app, study):
    alice = study["alice"]
    first = study["repo"].git("rev-parse", "HEAD")
    study["repo"].commit({"analysis/a.py": "print(3)\n"})
    response = await alice.post("/ws1/", [("actions", "prepare"), ("commit", "0123abcd")])
    assert response.status_code == 400
    assert "commit 0123abcd is not in" in text(response)
    assert 'value="0123abcd"' in response.text
    assert re.search(
        r'<input type="checkbox" name="actions" value="prepare"[^>]*checked', response.text
    )

    response = await alice.post("/ws1/", [("actions", "prepare"), ("commit", first[:7])])
    assert response.status_code == 303
    assert await app.state.db.fetchval("SELECT sha FROM job_requests") == first


# -- changing a workspace's branch ----------------------------------------------------------


async def test_a_developer_changes_the_branch_through_the_api(app, client, study):
    repo = study["repo"]
    repo.branch("dev")
    dev_head = repo.commit({"project.yaml": PROJECT_YAML.replace("analysing", "on dev")})
    response = await client.patch(
        "/api/v1/workspaces/ws1", json={"branch": "dev"}, headers=study["api"]
    )
    assert response.status_code == 200, response.text
    assert response.json()["branch"] == "dev" and response.json()["changed"] is True
    assert response.json()["message"] == "The workspace now runs branch dev (it was main)"

    data = (await client.get("/api/v1/workspaces/ws1", headers=study["api"])).json()
    assert data["branch"] == "dev" and data["sha"] == dev_head
    (change,) = data["changes"]
    assert (change["kind"], change["from"], change["to"], change["by"]) == (
        "branch", "main", "dev", "alice",
    )  # fmt: skip
    # new job requests run the new branch
    assert (await request_actions(client, study["api"], ["analyse"])).json()["sha"] == dev_head

    response = await client.patch(
        "/api/v1/workspaces/ws1", json={"branch": "dev"}, headers=study["api"]
    )
    assert response.json()["changed"] is False
    assert len((await client.get("/api/v1/workspaces/ws1")).json()["changes"]) == 1


async def test_a_branch_that_is_not_there_is_a_clear_400(app, client, study, intact):
    repo = study["repo"]
    repo.git("tag", "v1")
    repo.branch("no-project")
    repo.git("rm", "--quiet", "project.yaml")
    repo.commit({"other.txt": "x"})
    for branch, message in (
        ("nope", "branch 'nope' not found in"),
        ("main~1", "branch 'main~1' not found"),
        ("v1", "branch 'v1' not found"),
        ("--all", "branch '--all' not found"),
        ("no-project", "project.yaml not found"),
        ("", "branch is required"),
    ):
        response = await client.patch(
            "/api/v1/workspaces/ws1", json={"branch": branch}, headers=study["api"]
        )
        assert response.status_code == 400, (branch, response.text)
        assert message in response.json()["error"], branch
    response = await client.patch(
        "/api/v1/workspaces/ws1", json={"branch": ["main"]}, headers=study["api"]
    )
    assert response.status_code == 400
    # collaborators may not change it
    response = await client.patch(
        "/api/v1/workspaces/ws1", json={"branch": "no-project"}, headers=study["carol"]
    )
    assert response.status_code == 403
    workspace = await app.state.db.fetchone("SELECT * FROM workspaces WHERE name = 'ws1'")
    assert workspace["branch"] == "main"
    assert await app.state.db.fetchval("SELECT count(*) FROM workspace_events") == 0
    await intact.check(client, allowed=lambda path: path.startswith("repos/study/"))


async def test_the_branch_form_on_the_workspace_page(app, study, browser):
    alice = study["alice"]
    study["repo"].branch("dev")
    study["repo"].commit({"dev.txt": "x"})
    response = await alice.post("/ws1/branch", {"branch": "<b>nope</b>"})
    assert response.status_code == 400
    assert "branch '<b>nope</b>' not found" in text(response)
    assert 'value="&lt;b&gt;nope&lt;/b&gt;"' in response.text
    assert "<b>nope" not in response.text

    response = await alice.post("/ws1/branch", {"branch": "dev"})
    assert response.status_code == 303
    page = await alice.get("/ws1/")
    assert "Workspace ws1 now runs branch dev." in text(page)
    assert "Branch changed from main to dev" in text(page)
    assert re.search(r"Branch.*?<code>dev</code>", page.text, re.S)

    carol = await browser("carol")
    page = await carol.get("/ws1/")
    assert "Change branch" not in page.text and "Branch changed from main to dev" in text(page)
    assert (await carol.post("/ws1/branch", {"branch": "main"})).status_code == 403

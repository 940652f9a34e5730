"""The JSON API, driven as a client would: project -> workspace -> job request -> outputs."""

from __future__ import annotations

import pytest
from helpers import PROJECT_YAML, setup_workspace, wait_for_request


async def test_health_needs_no_token(client):
    response = await client.get("/api/v1/health")
    assert response.json() == {"status": "ok"}


@pytest.mark.usefixtures("docker_cleanup")
async def test_one_action_runs_end_to_end(client, make_user, make_repo, settings):
    headers = await make_user("alice")
    repo = make_repo({"project.yaml": PROJECT_YAML})
    await setup_workspace(client, headers, repo)

    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": ["generate"]}, headers=headers
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert [job["action"] for job in created["jobs"]] == ["generate"]

    done = await wait_for_request(client, headers, created["id"])
    assert done["status"] == "succeeded", done
    (job,) = done["jobs"]
    assert job["status_code"] == "succeeded"
    assert job["exit_code"] == 0

    workspace = settings.data_dir / "workspaces" / "ws1"
    assert (workspace / "output/counts.csv").read_text() == "n,total\n"
    log = (workspace / "metadata/generate.log").read_text()
    assert "made it" in log
    assert (settings.data_dir / "logs" / f"{job['id']}.log").read_text() == log
    assert not (settings.data_dir / "jobs" / job["id"]).exists()

    outputs = (await client.get("/api/v1/workspaces/ws1/outputs", headers=headers)).json()
    assert outputs["files"]["output/counts.csv"]["level"] == "moderately_sensitive"
    assert outputs["files"]["output/counts.csv"]["visible"] is True

    status = (await client.get("/api/v1/workspaces/ws1", headers=headers)).json()
    assert status["actions"] == [{"name": "generate", "needs": [], "status": "succeeded"}]


async def test_errors_are_json_a_user_can_act_on(client, make_user, make_repo, repos_dir):
    headers = await make_user("alice")
    repo = make_repo({"project.yaml": PROJECT_YAML})
    slug = await setup_workspace(client, headers, repo)

    async def create(**body):
        body = {"name": "ws2", "repo": repo.url, "branch": "main", "database": "full", **body}
        return await client.post(f"/api/v1/projects/{slug}/workspaces", json=body, headers=headers)

    cases = [
        (await client.post("/api/v1/projects/nope/workspaces", json={}, headers=headers),
         404, "there is no project 'nope'"),
        (await create(name="ws1"), 400, "a workspace named 'ws1' already exists"),
        (await create(repo="/elsewhere/repo"), 400, "is not allowed on this site"),
        (await create(branch="nope"), 400, "branch 'nope' not found"),
        (await create(database="big"), 400, "database must be one of: full, sample"),
        (await create(name="admin"), 400, "is used by the site itself"),
        (await create(name="Bad Name"), 400, "lowercase letters"),
        (await client.post("/api/v1/workspaces/ws1/job-requests",
                           json={"actions": ["nope"]}, headers=headers), 400, "nope"),
        (await client.post("/api/v1/projects", content=b"{", headers=headers),
         400, "must be JSON"),
        (await client.post("/api/v1/projects", json={"name": "x"}), 401, "sign in"),
        (await client.get("/api/v1/job-requests/999", headers=headers),
         404, "no job request '999'"),
    ]  # fmt: skip
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]

    bare = make_repo({"README.md": "no pipeline here"}, name="bare")
    response = await create(repo=bare.url, name="ws3")
    assert response.status_code == 400
    assert "project.yaml not found" in response.json()["error"]


async def test_a_bad_token_is_refused(client):
    response = await client.get(
        "/api/v1/workspaces/x", headers={"Authorization": "Bearer jst_wrong"}
    )
    assert response.status_code == 401
    assert "not valid" in response.json()["error"]


CHAIN_YAML = """\
version: "4"
actions:
  extract:
    run: python:v2 -c "mkdir -p output && echo 'id,value' > output/data.csv"
    outputs:
      highly_sensitive:
        data: output/data.csv
  summarise:
    run: python:v2 -c "sleep 1; wc -l < output/data.csv > output/summary.txt"
    needs: [extract]
    outputs:
      moderately_sensitive:
        summary: output/summary.txt
"""


@pytest.mark.usefixtures("docker_cleanup")
async def test_dependencies_run_first_then_are_reused_and_queued_work_is_joined(
    client, make_user, make_repo, settings
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": CHAIN_YAML}))

    async def submit(*actions, **options):
        response = await client.post(
            "/api/v1/workspaces/ws1/job-requests",
            json={"actions": list(actions), **options},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        return response.json()

    first = await submit("summarise")
    assert [job["action"] for job in first["jobs"]] == ["extract", "summarise"]
    again = await submit("summarise")
    assert again["status"] == "nothing_to_do"
    assert again["status_message"] == "All requested actions were already scheduled to run"

    done = await wait_for_request(client, headers, first["id"])
    assert [job["status_code"] for job in done["jobs"]] == ["succeeded", "succeeded"]
    workspace = settings.data_dir / "workspaces" / "ws1"
    assert (workspace / "output/summary.txt").read_text().strip() == "1"

    second = await submit("summarise")
    assert [job["action"] for job in second["jobs"]] == ["summarise"]
    await wait_for_request(client, headers, second["id"])

    forced = await submit("summarise", force_run_dependencies=True)
    assert [job["action"] for job in forced["jobs"]] == ["extract", "summarise"]
    await wait_for_request(client, headers, forced["id"])

    everything = await submit("run_all")
    assert everything["status"] == "nothing_to_do"
    assert everything["status_message"] == "All actions have already completed successfully"


@pytest.mark.usefixtures("docker_cleanup")
async def test_a_failed_dependency_fails_its_dependents(client, make_user, make_repo):
    headers = await make_user("alice")
    broken = CHAIN_YAML.replace("echo 'id,value' > output/data.csv", "exit 3")
    await setup_workspace(client, headers, make_repo({"project.yaml": broken}))
    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": ["summarise"]}, headers=headers
    )
    done = await wait_for_request(client, headers, response.json()["id"])
    assert done["status"] == "failed"
    extract, summarise = done["jobs"]
    assert extract["status_code"] == "nonzero_exit"
    assert "exit code 3" in extract["status_message"]
    assert summarise["status_code"] == "dependency_failed"


async def test_an_image_the_site_does_not_know_is_refused_at_submit(client, make_user, make_repo):
    headers = await make_user("alice")
    unknown = PROJECT_YAML.replace("python:v2", "fortran:v1")
    await setup_workspace(client, headers, make_repo({"project.yaml": unknown}))
    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": ["generate"]}, headers=headers
    )
    assert response.status_code == 400
    assert "image 'fortran', which this site does not provide" in response.json()["error"]
    requests = await client.get("/api/v1/workspaces/ws1", headers=headers)
    assert requests.json()["actions"][0]["status"] is None


async def test_a_broken_project_yaml_is_explained(client, make_user, make_repo):
    headers = await make_user("alice")
    repo = make_repo({"project.yaml": PROJECT_YAML})
    await setup_workspace(client, headers, repo)
    repo.commit({"project.yaml": "version: '4'\nactions:\n  a:\n    run: python:v2\n    nee"})
    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": ["generate"]}, headers=headers
    )
    assert response.status_code == 400
    assert "project.yaml" in response.json()["error"]
    status = (await client.get("/api/v1/workspaces/ws1", headers=headers)).json()
    assert "project.yaml" in status["project_yaml_error"]

"""The scheduler with real Docker, a real SQLite file and real git repos, driven through
the API: fair order between users, dependencies, cancellation, the disk guard, and the
admin's queue controls."""

from __future__ import annotations

import gc
import re
import time
import warnings

import pytest
from helpers import (
    add_request,
    job,
    running_site,
    setup_workspace,
    submit,
    until,
    user_headers,
    wait_for_request,
)

from jobsite.units import iso_ms

FAIR_YAML = """\
version: "4"
actions:
""" + "".join(
    f"""
  {name}:
    run: python:v2 -c "sleep {seconds} && mkdir -p output && echo {name} > output/{name}.csv"
    outputs:
      moderately_sensitive:
        out: output/{name}.csv
"""
    for name, seconds in [("h1", 3), ("h2", 0.2), ("h3", 0.2), ("h4", 0.2), ("quick", 0.2)]
)

pytestmark = pytest.mark.usefixtures("docker_cleanup")


def writes(action, text=None, sleep=0):
    text = text or action
    return f"sleep {sleep} && mkdir -p output && echo {text} > output/{action}.csv"


async def test_a_light_users_job_overtakes_a_heavy_users_backlog(
    app, client, make_user, make_repo, settings
):
    settings.max_workers = 1
    heavy = await make_user("heavy")
    light = await make_user("light")
    repo = make_repo({"project.yaml": FAIR_YAML})
    slug = await setup_workspace(client, heavy, repo)
    response = await client.post(
        f"/api/v1/projects/{slug}/members",
        json={"username": "light", "roles": ["developer"]},
        headers=heavy,
    )
    assert response.status_code == 200, response.text

    heavy_requests = [await submit(client, heavy, [a]) for a in ("h1", "h2", "h3", "h4")]
    await until(
        lambda: _status_is(client, heavy, heavy_requests[0], "h1", "executing"),
        message="h1 to run",
    )
    light_request = await submit(client, light, ["quick"])

    async def h4_sees_its_place():
        found = await job(client, heavy, heavy_requests[3], "h4")
        return found["status_message"] == "Waiting for a free worker: 3 jobs ahead of this one"

    await until(h4_sees_its_place, message="h4's place in the queue")
    quick = await job(client, light, light_request, "quick")
    assert quick["status_message"] == "Waiting for a free worker: 0 jobs ahead of this one"

    done = [await wait_for_request(client, heavy, r) for r in [*heavy_requests, light_request]]
    assert all(d["status"] == "succeeded" for d in done), done
    starts = {d["jobs"][0]["action"]: d["jobs"][0]["started_at"] for d in done}
    assert sorted(starts, key=starts.get) == ["h1", "quick", "h2", "h3", "h4"]


async def _status_is(client, headers, request_id, action, code):
    return (await job(client, headers, request_id, action))["status_code"] == code


async def test_a_dependent_job_starts_when_its_dependency_succeeds_and_reads_its_outputs(
    app, client, make_user, make_repo, settings
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    copy = "mkdir -p output && cat output/generate.csv > output/analyse.csv"
    request_id, _ = await add_request(
        app,
        "ws1",
        "alice",
        [("generate", writes("generate", "made", sleep=1), ()), ("analyse", copy, ["generate"])],
    )

    async def analyse_waits():
        found = await job(client, headers, request_id, "analyse")
        return found["status_message"] == "Waiting on dependencies: generate"

    await until(analyse_waits, message="analyse to say what it waits on")
    done = await wait_for_request(client, headers, request_id)
    assert done["status"] == "succeeded", done
    generate, analyse = done["jobs"]
    assert analyse["started_at"] >= generate["completed_at"]
    workspace = settings.data_dir / "workspaces" / "ws1"
    assert (workspace / "output/analyse.csv").read_text() == "made\n"


async def test_a_failed_dependency_fails_its_dependents_and_says_which(
    app, client, make_user, make_repo
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    request_id, ids = await add_request(
        app,
        "ws1",
        "alice",
        [
            ("generate", "echo broken && exit 3", ()),
            ("analyse", writes("analyse"), ["generate"]),
            ("report", writes("report"), ["analyse"]),
        ],
    )
    done = await wait_for_request(client, headers, request_id)
    codes = {j["action"]: (j["status_code"], j["status_message"]) for j in done["jobs"]}
    assert codes["generate"][0] == "nonzero_exit"
    assert codes["analyse"] == (
        "dependency_failed",
        f"Not run: the job for action generate (job {ids['generate']}), which this job "
        "needs, did not succeed",
    )
    assert codes["report"][0] == "dependency_failed"
    assert f"action analyse (job {ids['analyse']})" in codes["report"][1]
    assert all(j["started_at"] is None for j in done["jobs"][1:])


async def test_cancelling_a_running_action_stops_its_container_and_fails_its_dependents(
    app, client, make_user, make_repo, settings, docker_client
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    request_id, ids = await add_request(
        app,
        "ws1",
        "alice",
        [
            ("generate", writes("generate", sleep=60), ()),
            ("analyse", writes("analyse"), ["generate"]),
        ],
    )
    await until(
        lambda: _status_is(client, headers, request_id, "generate", "executing"),
        message="generate to run",
    )
    started = time.monotonic()
    response = await client.post(
        f"/api/v1/job-requests/{request_id}/cancel", json={"actions": ["generate"]}, headers=headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["cancelled"] == [ids["generate"]]

    done = await wait_for_request(client, headers, request_id)
    assert time.monotonic() - started < 15
    codes = {j["action"]: (j["status_code"], j["status_message"]) for j in done["jobs"]}
    assert codes["generate"] == ("cancelled_by_user", "Cancelled by user")
    assert codes["analyse"][0] == "dependency_failed"
    assert "action generate" in codes["analyse"][1]
    assert not docker_client.containers.list(
        all=True, filters={"label": f"jobsite={settings.site_id}"}
    )
    workspace = settings.data_dir / "workspaces" / "ws1"
    assert not (workspace / "output").exists()
    assert not (settings.data_dir / "jobs" / ids["generate"]).exists()
    log = (workspace / "metadata/generate.log").read_text()  # a cancelled job ran: its log stays
    assert f"job id:          {ids['generate']}" in log
    assert "status:          cancelled_by_user: Cancelled by user" in log


async def test_cancelling_a_whole_request_ends_its_pending_jobs_at_once(
    app, client, make_user, make_repo
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    request_id, ids = await add_request(
        app,
        "ws1",
        "alice",
        [
            ("generate", writes("generate", sleep=60), ()),
            ("analyse", writes("analyse"), ["generate"]),
        ],
    )
    await until(
        lambda: _status_is(client, headers, request_id, "generate", "executing"),
        message="generate to run",
    )
    response = await client.post(f"/api/v1/job-requests/{request_id}/cancel", headers=headers)
    assert sorted(response.json()["cancelled"]) == sorted(ids.values())
    analyse = await job(client, headers, request_id, "analyse")
    assert (analyse["state"], analyse["status_code"]) == ("failed", "cancelled_by_user")
    done = await wait_for_request(client, headers, request_id)
    assert [j["status_code"] for j in done["jobs"]] == ["cancelled_by_user"] * 2


async def test_cancelling_a_finished_job_changes_nothing_and_says_so(
    app, client, make_user, make_repo
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    request_id = await submit(client, headers, ["quick"])
    before = await wait_for_request(client, headers, request_id)
    response = await client.post(f"/api/v1/job-requests/{request_id}/cancel", headers=headers)
    assert response.status_code == 200
    data = response.json()
    assert data["cancelled"] == []
    assert data["message"] == "Nothing to cancel: those jobs have already finished"
    assert data["jobs"] == before["jobs"]


async def test_jobs_wait_for_disk_space_and_start_when_it_returns(
    app, client, make_user, make_repo, settings
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    settings.min_free_disk = 2**60
    request_id = await submit(client, headers, ["quick"])

    async def waiting_on_disk():
        found = await job(client, headers, request_id, "quick")
        return found if found["status_code"] == "waiting_on_disk" else None

    found = await until(waiting_on_disk, message="the job to wait for disk space")
    assert re.fullmatch(
        r"Waiting for free disk space: [\d.]+ [KMGT]?B free in the site's data directory, "
        r"1048576\.0 TB needed to start a job",
        found["status_message"],
    ), found["status_message"]

    space_came_back = iso_ms(time.time())
    settings.min_free_disk = 1024  # space came back; the safety tick notices
    done = await wait_for_request(client, headers, request_id, timeout=30)
    assert done["status"] == "succeeded"
    (quick,) = done["jobs"]
    assert quick["started_at"] >= space_came_back, "the job started while disk space was short"


async def test_an_admin_pauses_the_queue_sees_it_in_order_and_raises_a_priority(
    app, client, make_user, make_repo, settings
):
    settings.max_workers = 1
    admin = await make_user("root", admin=True)
    alice = await make_user("alice")
    await setup_workspace(client, alice, make_repo({"project.yaml": FAIR_YAML}))

    for path in ("/api/v1/admin/queue/pause", "/api/v1/admin/queue/resume"):
        response = await client.post(path, headers=alice)
        assert response.status_code == 403
        assert response.json()["error"] == "only site admins can control the queue"

    response = await client.post("/api/v1/admin/queue/pause", headers=admin)
    assert response.json()["paused"] is True
    first = await submit(client, alice, ["h2"])
    second = await submit(client, alice, ["h3"])

    response = await client.post(
        f"/api/v1/job-requests/{second}/priority", json={"priority": 5}, headers=alice
    )
    assert response.status_code == 403
    response = await client.post(
        f"/api/v1/job-requests/{second}/priority", json={"priority": "high"}, headers=admin
    )
    assert response.status_code == 400
    assert (
        response.json()["error"] == "priority must be a whole number from -1000 to 1000 (default 0)"
    )
    response = await client.post(
        f"/api/v1/job-requests/{second}/priority", json={"priority": 5}, headers=admin
    )
    assert response.json() == {"id": second, "priority": 5}

    async def queue_lists_both():
        data = (await client.get("/api/v1/admin/queue", headers=admin)).json()
        return data if [q["action"] for q in data["queued"]] == ["h3", "h2"] else None

    queue = await until(queue_lists_both, message="the queue to list both jobs")
    assert queue["paused"] is True
    assert queue["running"] == []
    assert queue["queued"][1]["status_message"] == (
        "The queue is paused by a site admin; 1 job ahead of this one"
    )
    assert (await client.get("/api/v1/admin/queue", headers=alice)).status_code == 403

    response = await client.post("/api/v1/admin/queue/resume", headers=admin)
    assert response.json()["paused"] is False
    done = [await wait_for_request(client, alice, r) for r in (first, second)]
    assert done[1]["jobs"][0]["started_at"] < done[0]["jobs"][0]["started_at"]


async def test_the_scheduler_stops_promptly_while_a_job_runs(app, client, make_user, make_repo):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    request_id = await submit(client, headers, ["h1"])
    await until(
        lambda: _status_is(client, headers, request_id, "h1", "executing"), message="h1 to run"
    )
    started = time.monotonic()
    await app.state.scheduler.stop()
    assert time.monotonic() - started < 1.0


async def test_a_user_at_the_per_user_cap_is_told_why_their_job_waits(
    app, client, make_user, make_repo, settings
):
    settings.max_jobs_per_user = 1
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    first = await submit(client, headers, ["h1"])
    second = await submit(client, headers, ["h2"])

    async def told_why():
        found = await job(client, headers, second, "h2")
        return found["status_message"] == (
            "Waiting: alice has 1 job running, the most one user may run at once; "
            "0 jobs ahead of this one"
        )

    await until(told_why, message="h2 to say why it waits")
    assert (await job(client, headers, first, "h1"))["status_code"] in ("preparing", "executing")
    done = await wait_for_request(client, headers, second)
    assert done["status"] == "succeeded"


@pytest.fixture
def collect_unclosed_docker_clients():
    """executor.py drops a Docker client whose ping failed without closing it; until it
    closes it, collect the unclosed sockets after this test rather than in a later one."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_jobs_wait_while_docker_is_away_and_start_when_it_returns(
    collect_unclosed_docker_clients, settings, make_repo, monkeypatch, tmp_path
):
    # Docker is away from before the site starts, so the site has never reached it
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker-here.sock")
    async with running_site(settings) as (app, client):
        headers = await user_headers(app, "alice")
        await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
        request_id = await submit(client, headers, ["quick"])

        async def waiting_on_docker():
            found = await job(client, headers, request_id, "quick")
            return found if found["status_code"] == "waiting_on_docker" else None

        found = await until(waiting_on_docker, message="the job to wait for Docker")
        assert found["state"] == "pending"
        assert found["status_message"].startswith("Waiting for Docker to be available")

        monkeypatch.undo()  # Docker is back; the safety tick notices
        done = await wait_for_request(client, headers, request_id, timeout=30)
    assert done["status"] == "succeeded", done


CHAIN_YAML = """\
version: "4"
actions:
  generate:
    run: python:v2 -c "sleep 1 && mkdir -p output && echo made > output/generate.csv"
    outputs:
      moderately_sensitive:
        out: output/generate.csv
  analyse:
    run: python:v2 -c "mkdir -p output && cat output/generate.csv > output/analyse.csv"
    needs: [generate]
    outputs:
      moderately_sensitive:
        out: output/analyse.csv
"""


async def test_a_planned_dependency_runs_first_and_a_cancelled_one_fails_its_dependent(
    app, client, make_user, make_repo, settings
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": CHAIN_YAML}))
    request_id = await submit(client, headers, ["analyse"])
    done = await wait_for_request(client, headers, request_id)
    assert [(j["action"], j["status_code"]) for j in done["jobs"]] == [
        ("generate", "succeeded"),
        ("analyse", "succeeded"),
    ]
    assert (settings.data_dir / "workspaces/ws1/output/analyse.csv").read_text() == "made\n"

    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests",
        json={"actions": ["analyse"], "force_run_dependencies": True},
        headers=headers,
    )
    request_id = response.json()["id"]
    await until(
        lambda: _status_is(client, headers, request_id, "generate", "executing"),
        message="generate to run",
    )
    response = await client.post(
        f"/api/v1/job-requests/{request_id}/cancel", json={"actions": ["generate"]}, headers=headers
    )
    done = await wait_for_request(client, headers, request_id)
    codes = {j["action"]: j["status_code"] for j in done["jobs"]}
    assert codes == {"generate": "cancelled_by_user", "analyse": "dependency_failed"}
    assert (settings.data_dir / "workspaces/ws1/output/analyse.csv").read_text() == "made\n"


async def test_a_job_needing_an_already_failed_job_fails_when_it_is_queued(
    app, client, make_user, make_repo
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    first, ids = await add_request(app, "ws1", "alice", [("generate", "exit 1", ())])
    assert (await wait_for_request(client, headers, first))["status"] == "failed"

    second, _ = await add_request(
        app, "ws1", "alice", [("analyse", writes("analyse"), ["generate"])], existing=ids
    )
    done = await wait_for_request(client, headers, second, timeout=5)
    (analyse,) = done["jobs"]
    assert (analyse["status_code"], analyse["started_at"]) == ("dependency_failed", None)
    assert f"action generate (job {ids['generate']})" in analyse["status_message"]


async def test_cancelling_a_waiting_request_marks_every_job_cancelled(
    app, client, make_user, make_repo
):
    admin = await make_user("root", admin=True)
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    await client.post("/api/v1/admin/queue/pause", headers=admin)
    request_id, ids = await add_request(
        app,
        "ws1",
        "alice",
        [
            ("generate", writes("generate"), ()),
            ("analyse", writes("analyse"), ["generate"]),
            ("report", writes("report"), ["analyse"]),
        ],
    )
    response = await client.post(
        f"/api/v1/job-requests/{request_id}/cancel",
        json={"actions": ["generate", "analyse"]},
        headers=headers,
    )
    assert sorted(response.json()["cancelled"]) == sorted([ids["generate"], ids["analyse"]])
    codes = {j["action"]: j["status_code"] for j in response.json()["jobs"]}
    assert codes == {
        "generate": "cancelled_by_user",
        "analyse": "cancelled_by_user",
        "report": "dependency_failed",
    }


async def test_a_job_request_cancelled_before_the_scheduler_looked_at_it_is_cancelled(
    app, client, make_user, make_repo, monkeypatch
):
    """Submitted, then cancelled at once: the scheduler has not yet taken the request into
    its queue (it was not woken), and the cancel still ends its jobs."""
    admin = await make_user("root", admin=True)
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": FAIR_YAML}))
    await client.post("/api/v1/admin/queue/pause", headers=admin)
    monkeypatch.setattr(app.state.scheduler, "wake", lambda: None)
    request_id, ids = await add_request(app, "ws1", "alice", [("generate", writes("g"), ())])
    assert ids["generate"] not in app.state.scheduler.queue.pending
    response = await client.post(f"/api/v1/job-requests/{request_id}/cancel", headers=headers)
    assert response.json()["cancelled"] == [ids["generate"]]
    (job,) = response.json()["jobs"]
    assert job["status_code"] == "cancelled_by_user"

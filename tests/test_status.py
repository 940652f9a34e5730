"""The queue in the open: /status and GET /api/v1/status (who may see what), and when each
waiting job is expected to start, on the pages and in the job's JSON."""

from __future__ import annotations

import gc
import re
import time
from datetime import datetime

import pytest
from helpers import add_request, text, until

from jobsite.queries import ExpectedStarts
from jobsite.scheduling import DEFAULT_RUNTIME
from jobsite.units import Size

PROJECT_YAML = """\
version: "4"
actions:
  slow:
    run: python:v2 -c "sleep 30; mkdir -p output && echo n > output/slow.csv"
    outputs:
      moderately_sensitive:
        slow: output/slow.csv
  quick:
    run: python:v2 -c "mkdir -p output && echo n > output/quick.csv"
    outputs:
      moderately_sensitive:
        quick: output/quick.csv
"""


@pytest.fixture
def held(settings):
    """Jobs stay pending (no user may run one) while the queue itself runs: no Docker."""
    settings.max_jobs_per_user = 0


@pytest.fixture
async def two_studies(app, client, make_user, make_repo):
    """alice's workspace ws1 in "Study" and bob's ws2 in "Other", on the same pipeline."""
    repo = make_repo({"project.yaml": PROJECT_YAML})
    heads = {}
    for username, project, workspace in (("alice", "Study", "ws1"), ("bob", "Other", "ws2")):
        headers = await make_user(username)
        slug = await client.post("/api/v1/projects", json={"name": project}, headers=headers)
        response = await client.post(
            f"/api/v1/projects/{slug.json()['slug']}/workspaces",
            json={"name": workspace, "repo": repo.url, "branch": "main", "database": "sample"},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        heads[username] = headers
    return heads


async def run(client, headers, workspace, *actions):
    response = await client.post(
        f"/api/v1/workspaces/{workspace}/job-requests",
        json={"actions": list(actions), "force_run_dependencies": True},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    return response.json()


async def ran(app, job_id: str, seconds: float, ago: float = 0.0) -> None:
    """The job is recorded as having run for ``seconds``, ``ago`` seconds ago."""
    end = time.time() - ago
    await app.state.db.execute(
        "UPDATE jobs SET state = 'succeeded', status_code = 'succeeded', started_at = ?, "
        "completed_at = ? WHERE id = ?",
        (end - seconds, end, job_id),
    )


async def running(app, job_id: str, since: float) -> None:
    await app.state.db.execute(
        "UPDATE jobs SET state = 'running', status_code = 'executing', started_at = ? WHERE id = ?",
        (since, job_id),
    )


def seconds_from_now(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp() - time.time()


async def test_status_counts_jobs_overall_and_per_workspace(held, app, client, two_studies):
    alice, bob = two_studies["alice"], two_studies["bob"]
    first = await run(client, alice, "ws1", "slow", "quick")
    await running(app, first["jobs"][0]["id"], time.time() - 5)
    await run(client, bob, "ws2", "quick")

    response = await client.get("/api/v1/status")  # no token: the site is public
    assert response.status_code == 200
    status = response.json()
    assert (status["running"], status["pending"]) == (1, 2)
    assert status["workers"] == {"in_use": 1, "total": 2}
    assert status["paused"] is False
    assert status["workspaces"] == [
        {"workspace": "ws1", "running": 1, "pending": 1},
        {"workspace": "ws2", "running": 0, "pending": 1},
    ]
    assert status["other_workspaces"] == {"running": 0, "pending": 0}
    assert 0 <= status["oldest_waiting_seconds"] < 30
    assert status["disk"]["ok"] is True and status["disk"]["free_bytes"] > 0
    # in the fair order: bob runs nothing yet, so his job goes ahead of alice's second one
    assert [j["workspace"] for j in status["waiting"]] == ["ws2", "ws1"]

    home = await client.get("/")
    assert '<a href="/status">Status</a>' in home.text  # every page links to it
    page = await client.get("/status")
    assert page.status_code == 200
    shown = text(page)
    assert "Running 1 Waiting 2 Workers in use 1 of 2" in shown
    assert re.search(r'data-workspace="ws1">.*?<td>1</td><td>1</td>', page.text, re.S)
    assert "The queue is paused" not in shown
    fragment = await client.get("/status", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert 'hx-trigger="every 5s"' in fragment.text


async def test_a_paused_queue_shows_a_banner_and_no_expected_starts(app, client, two_studies):
    await app.state.scheduler.set_paused(True)
    request = await run(client, two_studies["alice"], "ws1", "quick")
    status = (await client.get("/api/v1/status")).json()
    assert status["paused"] is True
    assert status["waiting"][0]["expected_start_at"] is None
    page = await client.get("/status")
    assert "The queue is paused by a site admin." in text(page)
    assert "when the queue is resumed" in text(page)
    job = (await client.get(f"/api/v1/jobs/{request['jobs'][0]['id']}")).json()
    assert job["expected_start_at"] is None


async def test_on_a_private_site_status_is_for_signed_in_users(
    settings, held, app, client, two_studies, browser
):
    settings.public_status = False
    await run(client, two_studies["alice"], "ws1", "slow")
    await run(client, two_studies["bob"], "ws2", "quick")
    response = await client.get("/api/v1/status")
    assert response.status_code == 401
    assert "sign in" in response.json()["error"]
    page = await client.get("/status")
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    assert '<a href="/status">' not in (await client.get("/login")).text

    # bob sees his own workspace by name and alice's only as a count
    status = (await client.get("/api/v1/status", headers=two_studies["bob"])).json()
    assert status["pending"] == 2
    assert status["workspaces"] == [{"workspace": "ws2", "running": 0, "pending": 1}]
    assert status["other_workspaces"] == {"running": 0, "pending": 1}
    assert [j["workspace"] for j in status["waiting"]] == ["ws2"]
    session = await browser("bob")
    page = await session.get("/status")
    assert "Other projects' workspaces" in text(page) and "ws1" not in text(page)


async def test_low_disk_is_shown(settings, held, app, client):
    settings.min_free_disk = Size(2**62)
    status = (await client.get("/api/v1/status")).json()
    assert status["disk"]["ok"] is False
    assert "jobs wait until" in status["disk"]["message"]
    assert "Disk low" in text(await client.get("/status"))


@pytest.fixture
def no_docker(monkeypatch, tmp_path):
    """Docker cannot be reached: its socket is a path where nothing listens."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    yield
    gc.collect()


# docker-py leaves the socket of a failed connection unclosed
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_docker_out_of_reach_is_shown(no_docker, app, client):
    status = (await client.get("/api/v1/status")).json()
    assert status["docker"] == {
        "ok": False,
        "message": "Docker cannot be reached: no job can start until it is back",
    }
    assert "Docker cannot be reached" in text(await client.get("/status"))


# -- expected start ------------------------------------------------------------------------


async def test_a_waiting_job_is_expected_when_a_slot_frees(held, app, client, two_studies):
    # slow ran three times before, for 10 minutes give or take
    for seconds in (580, 600, 650):
        _, ids = await add_request(app, "ws1", "alice", [("slow", "sleep 1", ())])
        await ran(app, ids["slow"], seconds, ago=1000)
    # now two slow jobs hold both workers, one of them since 2 minutes ago
    busy = []
    for since in (time.time() - 120, time.time()):
        _, ids = await add_request(app, "ws1", "alice", [("slow", "sleep 1", ())])
        await running(app, ids["slow"], since)
        busy.append(ids["slow"])
    waiting = await run(client, two_studies["bob"], "ws2", "quick")
    job_id = waiting["jobs"][0]["id"]

    job = (await client.get(f"/api/v1/jobs/{job_id}")).json()
    # the first slot frees when the older slow job has run its median 600 s
    assert 470 < seconds_from_now(job["expected_start_at"]) < 490
    page = await client.get(f"/jobs/{job_id}")
    assert "Expected to start in about 8 min" in text(page)
    status = (await client.get("/api/v1/status")).json()
    (listed,) = status["waiting"]
    assert listed["job_id"] == job_id and 470 < listed["expected_start_in_seconds"] < 490
    assert "in about 8 min" in text(await client.get("/status"))
    (listed,) = (await client.get(f"/api/v1/job-requests/{waiting['id']}")).json()["jobs"]
    # the job request's JSON gives each of its jobs the same
    assert (
        abs(
            seconds_from_now(listed["expected_start_at"])
            - seconds_from_now(job["expected_start_at"])
        )
        < 2
    )
    request_page = await client.get(f"/ws2/logs/{waiting['id']}")
    assert "expected in about 8 min" in text(request_page)

    # a started job has no expected start
    busy_job = (await client.get(f"/api/v1/jobs/{busy[0]}")).json()
    assert busy_job["expected_start_at"] is None


async def test_an_action_never_run_is_expected_to_take_the_default(held, app, client, two_studies):
    for _ in range(2):
        _, ids = await add_request(app, "ws1", "alice", [("quick", "true", ())])
        await running(app, ids["quick"], time.time())
    waiting = await run(client, two_studies["alice"], "ws1", "slow")
    job = (await client.get(f"/api/v1/jobs/{waiting['jobs'][0]['id']}")).json()
    assert abs(seconds_from_now(job["expected_start_at"]) - DEFAULT_RUNTIME) < 10


@pytest.mark.usefixtures("docker_cleanup")
async def test_a_real_running_job_is_counted_until_it_ends(app, client, two_studies):
    request = await run(client, two_studies["alice"], "ws1", "quick")

    async def finished():
        data = (await client.get(f"/api/v1/job-requests/{request['id']}")).json()
        return data["status"] == "succeeded"

    await until(finished, 60, "the quick job to succeed")
    status = (await client.get("/api/v1/status")).json()
    assert (status["running"], status["pending"], status["workers"]["in_use"]) == (0, 0, 0)
    assert status["docker"]["ok"] is True

    slow = await run(client, two_studies["alice"], "ws1", "slow")

    async def counted():
        return (await client.get("/api/v1/status")).json()["running"] == 1

    await until(counted, 60, "the slow job to be counted as running")
    status = (await client.get("/api/v1/status")).json()
    assert status["workspaces"] == [{"workspace": "ws1", "running": 1, "pending": 0}]
    cancel = await client.post(
        f"/api/v1/job-requests/{slow['id']}/cancel", json={}, headers=two_studies["alice"]
    )
    assert cancel.status_code == 200


def test_expected_starts_read_as_people_say_them():
    from jobsite.units import expected_in

    assert expected_in(None) == ""
    assert expected_in(20) == "in under a minute"
    assert expected_in(4 * 60 + 10) == "in about 4 min"
    assert expected_in(89 * 60) == "in about 89 min"
    assert expected_in(2 * 3600) == "in about 2 h"
    assert expected_in(3 * 86400) == "in about 3 days"


async def test_expected_starts_are_kept_a_while_unless_a_new_job_is_asked_about(
    held, app, client, two_studies
):
    db = app.state.db
    cache = ExpectedStarts(ttl=3600)
    first = (await run(client, two_studies["alice"], "ws1", "quick"))["jobs"][0]["id"]
    (before,) = (await cache.of(db, 1, [first])).values()
    assert abs(before - time.time()) < 5  # the one worker is free

    _, ids = await add_request(app, "ws2", "bob", [("slow", "sleep 1", ())])
    await running(app, ids["slow"], time.time())
    assert await cache.of(db, 1, [first]) == {first: before}  # kept: asked again too soon
    second = (await run(client, two_studies["bob"], "ws2", "quick"))["jobs"][0]["id"]
    starts = await cache.of(db, 1, [first, second])  # a job it has not seen: computed again
    assert starts[first] > before + DEFAULT_RUNTIME - 5  # now after bob's slow job
    assert await cache.of(db, 1, ["no-such-job"]) == {}

"""Restart recovery (DESIGN section 7), with real Docker: the site stops mid-job (its
lifespan ends) and a new site starts over the same data dir."""

from __future__ import annotations

import asyncio

import pytest
from helpers import (
    job,
    running_site,
    setup_workspace,
    submit,
    until,
    user_headers,
    wait_for_request,
)

PROJECT_YAML = """\
version: "4"
actions:
  slow:
    run: python:v2 -c "sleep 2 && mkdir -p output && echo done > output/slow.csv"
    outputs:
      moderately_sensitive:
        out: output/slow.csv
"""

pytestmark = pytest.mark.usefixtures("docker_cleanup")


async def start_slow_job(app, client, make_repo) -> tuple[dict, int, str]:
    headers = await user_headers(app, "alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": PROJECT_YAML}))
    request_id = await submit(client, headers, ["slow"])
    return headers, request_id, (await job(client, headers, request_id, "slow"))["id"]


async def is_executing(client, headers, request_id):
    return (await job(client, headers, request_id, "slow"))["status_code"] == "executing"


def stick_in_preparing(app) -> asyncio.Event:
    """The site's next job stops while preparing its files, as if the server died there."""
    entered = asyncio.Event()

    async def stuck(spec):
        entered.set()
        await asyncio.Event().wait()

    app.state.executor.prepare = stuck
    return entered


async def job_row(app, job_id):
    return await app.state.db.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))


async def events(app, job_id):
    rows = await app.state.db.fetchall(
        "SELECT status_code, status_message FROM job_events WHERE job_id = ? ORDER BY id",
        (job_id,),
    )
    return [(r["status_code"], r["status_message"]) for r in rows]


async def test_a_running_job_is_re_adopted_and_its_outputs_land(settings, make_repo, docker_client):
    async with running_site(settings) as (app, client):
        headers, request_id, job_id = await start_slow_job(app, client, make_repo)
        await until(lambda: is_executing(client, headers, request_id), message="the job to run")
    container = docker_client.containers.get(f"jobsite-{job_id}")
    assert container.status == "running"  # the site stopped; the job did not

    async with running_site(settings) as (app, client):
        done = await wait_for_request(client, headers, request_id)
        assert done["status"] == "succeeded", done
        row = await job_row(app, job_id)
        assert row["attempts"] == 1
        assert [code for code, _ in await events(app, job_id)].count("executing") == 1
    workspace = settings.data_dir / "workspaces" / "ws1"
    assert (workspace / "output/slow.csv").read_text() == "done\n"
    assert not (settings.data_dir / "jobs" / job_id).exists()


async def test_a_job_that_exited_while_the_site_was_down_is_finalized(
    settings, make_repo, docker_client
):
    async with running_site(settings) as (app, client):
        headers, request_id, job_id = await start_slow_job(app, client, make_repo)
        await until(lambda: is_executing(client, headers, request_id), message="the job to run")
    container = docker_client.containers.get(f"jobsite-{job_id}")
    assert (await asyncio.to_thread(container.wait))["StatusCode"] == 0

    async with running_site(settings) as (app, client):
        done = await wait_for_request(client, headers, request_id)
        assert done["status"] == "succeeded", done
    assert (settings.data_dir / "workspaces/ws1/output/slow.csv").read_text() == "done\n"
    assert not docker_client.containers.list(
        all=True, filters={"label": f"jobsite={settings.site_id}"}
    )


async def test_a_job_caught_preparing_is_tried_again_once(settings, make_repo):
    async with running_site(settings) as (app, client):
        entered = stick_in_preparing(app)
        headers, request_id, job_id = await start_slow_job(app, client, make_repo)
        await asyncio.wait_for(entered.wait(), 10)

    async with running_site(settings) as (app, client):
        done = await wait_for_request(client, headers, request_id)
        assert done["status"] == "succeeded", done
        assert (await job_row(app, job_id))["attempts"] == 2
        assert (
            "created",
            "The server restarted before this job started; it will be tried again",
        ) in await events(app, job_id)
    assert (settings.data_dir / "workspaces/ws1/output/slow.csv").read_text() == "done\n"


async def test_a_job_caught_preparing_a_second_time_fails_and_says_why(settings, make_repo):
    async with running_site(settings) as (app, client):
        entered = stick_in_preparing(app)
        headers, request_id, job_id = await start_slow_job(app, client, make_repo)
        await asyncio.wait_for(entered.wait(), 10)
    async with running_site(settings) as (app, client):
        entered = stick_in_preparing(app)
        await asyncio.wait_for(entered.wait(), 10)

    async with running_site(settings) as (app, client):
        done = await wait_for_request(client, headers, request_id, timeout=5)
        (found,) = done["jobs"]
        assert (found["state"], found["status_code"]) == ("failed", "internal_error")
        assert found["status_message"] == (
            "The server restarted while this job was starting, for the second time; it was "
            "not tried again. Submit it again to retry."
        )
    assert not (settings.data_dir / "jobs" / job_id).exists()


async def test_a_running_job_whose_container_vanished_is_not_left_running(
    settings, make_repo, docker_client
):
    async with running_site(settings) as (app, client):
        headers, request_id, job_id = await start_slow_job(app, client, make_repo)
        await until(lambda: is_executing(client, headers, request_id), message="the job to run")
    docker_client.containers.get(f"jobsite-{job_id}").remove(force=True)

    async with running_site(settings) as (app, client):
        running = await app.state.db.fetchall("SELECT id FROM jobs WHERE state = 'running'")
        assert [r["id"] for r in running] in ([], [job_id])  # pending again, or restarted
        done = await wait_for_request(client, headers, request_id)
        assert done["status"] == "succeeded", done
        assert (await job_row(app, job_id))["attempts"] == 2

"""What a researcher learns about a job that ran: its log with a summary, and the CPU and
memory it used, in the API, on the job page and in ``jobsite run``'s files."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from helpers import setup_workspace, submit, until, wait_for_request

pytestmark = pytest.mark.usefixtures("docker_cleanup")

BUSY_YAML = """\
version: "4"
actions:
  busy:
    run: >-
      python:v2 -c "x=$(head -c 6000000 /dev/zero | tr '\\\\0' a);
      end=$(($(date +%s) + 3)); while [ $(date +%s) -lt $end ]; do :; done;
      mkdir -p output; echo n > output/n.csv; echo 1 > output/ids.rds; echo done"
    outputs:
      moderately_sensitive:
        n: output/n.csv
      highly_sensitive:
        ids: output/ids.rds
  broken:
    run: python:v2 -c "echo about to fail; exit 5"
    outputs:
      moderately_sensitive:
        n: output/broken.csv
"""


async def test_a_job_reports_its_cpu_and_memory_and_its_log_sums_it_up(
    client, make_user, make_repo, settings
):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": BUSY_YAML}))
    done = await wait_for_request(client, headers, await submit(client, headers, ["busy"]))
    (job,) = done["jobs"]
    assert job["status_code"] == "succeeded", job

    data = (await client.get(f"/api/v1/jobs/{job['id']}", headers=headers)).json()
    metrics = data["metrics"]
    assert sorted(metrics) == ["cpu_mean", "cpu_peak", "memory_mean_mb", "memory_peak_mb"]
    assert 20 <= metrics["cpu_peak"] <= 110, metrics  # one busy shell, capped at job_cpus
    assert 0 < metrics["cpu_mean"] <= metrics["cpu_peak"]
    assert 6 <= metrics["memory_peak_mb"] < 64, metrics
    assert 0 < metrics["memory_mean_mb"] <= metrics["memory_peak_mb"]

    page = (await client.get(f"/jobs/{job['id']}", headers=headers)).text
    assert f"peak {metrics['cpu_peak']:.0f}%" in page
    assert f"peak {metrics['memory_peak_mb']:.1f} MB" in page

    log = (settings.data_dir / "workspaces/ws1/metadata/busy.log").read_text()
    body, _, summary = log.partition("\n---- jobsite summary ----\n")
    for line in body.splitlines():
        stamp, _, _ = line.partition(" ")
        assert datetime.fromisoformat(stamp).tzinfo is not None, line  # RFC 3339, UTC
    assert body.splitlines()[-1].endswith(" done")
    request_id = done["id"]
    for expected in (
        f"job id:          {job['id']}",
        f"job request id:  {request_id}",
        f"commit:          {done['sha']}",
        "image:           ghcr.io/opensafely-core/python:v2 (sha256:",
        "image digest:    ",
        "exit code:       0",
        "status:          succeeded: Completed successfully",
        "  output/n.csv  (moderately_sensitive)",
        "  output/ids.rds: highly_sensitive outputs are never shown",
        f"memory:          mean {metrics['memory_mean_mb']:.1f} MB, peak "
        f"{metrics['memory_peak_mb']:.1f} MB",
    ):
        assert expected in summary, (expected, summary)
    assert re.search(r"started:         \d{4}-\d\d-\d\dT", summary)
    api_log = (await client.get(f"/api/v1/jobs/{job['id']}/log", headers=headers)).text
    assert api_log == log


async def test_a_failed_job_leaves_its_log_and_no_outputs(client, make_user, make_repo, settings):
    headers = await make_user("alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": BUSY_YAML}))
    done = await wait_for_request(client, headers, await submit(client, headers, ["broken"]))
    (job,) = done["jobs"]
    assert job["status_code"] == "nonzero_exit"
    workspace = settings.data_dir / "workspaces/ws1"
    assert sorted(p.relative_to(workspace).as_posix() for p in workspace.rglob("*")) == [
        "metadata",
        "metadata/broken.log",
    ]
    log = (workspace / "metadata/broken.log").read_text()
    assert log.splitlines()[0].endswith("Z about to fail")
    assert "exit code:       5" in log
    assert "status:          nonzero_exit: Job exited with an error (exit code 5)\n" in log
    data = (await client.get(f"/api/v1/jobs/{job['id']}", headers=headers)).json()
    assert set(data["metrics"]) == {"cpu_mean", "cpu_peak", "memory_mean_mb", "memory_peak_mb"}


async def test_a_running_job_shows_its_use_so_far(client, make_user, make_repo):
    headers = await make_user("alice")
    project = BUSY_YAML.replace("+ 3))", "+ 30))")  # long enough to watch
    await setup_workspace(client, headers, make_repo({"project.yaml": project}))
    request_id = await submit(client, headers, ["busy"])
    job_id = (await client.get(f"/api/v1/job-requests/{request_id}", headers=headers)).json()[
        "jobs"
    ][0]["id"]

    async def sampled_while_running():
        data = (await client.get(f"/api/v1/jobs/{job_id}", headers=headers)).json()
        running = data["state"] == "running" and data["metrics"]["cpu_mean"] is not None
        return data if running else None

    data = await until(sampled_while_running, 30, "the running job's first samples")
    assert data["metrics"]["memory_peak_mb"] > 0
    poll = await client.get(f"/jobs/{job_id}", headers={**headers, "HX-Request": "true"})
    assert "<dt>Memory</dt>" in poll.text and "<dt>CPU</dt>" in poll.text
    response = await client.post(f"/api/v1/job-requests/{request_id}/cancel", headers=headers)
    assert response.json()["cancelled"] == [job_id]
    done = await wait_for_request(client, headers, request_id)
    assert done["jobs"][0]["metrics"]["memory_peak_mb"] >= data["metrics"]["memory_peak_mb"]

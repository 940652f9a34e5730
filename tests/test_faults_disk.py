"""A full disk: the data dir on a small tmpfs, filled by a job and then by a file beside
it. Failures say what went wrong, nothing is corrupted, and the site goes on when space
returns (the tmpfs is made larger, as an admin would free space)."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import httpx
import pytest
from helpers import ServeProcess, until

from jobsite import auth
from jobsite.db import Database

PROJECT_YAML = """\
version: "4"
actions:
  huge:
    run: python:v2 -c "mkdir -p output && dd if=/dev/zero of=output/huge.bin bs=1M count=64"
    outputs:
      highly_sensitive:
        huge: output/huge.bin
  small:
    run: python:v2 -c "mkdir -p output && echo 'n' > output/small.csv"
    outputs:
      moderately_sensitive:
        small: output/small.csv
"""

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_cleanup")]


def mount(path, size: str, remount: bool = False) -> None:
    options = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def small_disk(data_dir):
    """The data dir on a 40 MB tmpfs (skipped where this user may not mount one)."""
    data_dir.mkdir()
    try:
        mount(data_dir, "40m")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs for the data dir: {getattr(e, 'stderr', e)}")
    yield data_dir
    subprocess.run(["umount", "-l", str(data_dir)], check=False)


@pytest.fixture
async def site(tmp_path, small_disk, repos_dir, settings, make_repo):
    repo = make_repo({"project.yaml": PROJECT_YAML})
    config = tmp_path / "jobsite.yaml"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(small_disk),
                "repos": {"allow": [f"{repos_dir}/*"]},
                "max_workers": 1,
                "job_memory": "256M",
                "job_cpus": 1,
                "allow_pull": False,
                "min_free_disk": "1M",
            }
        )
    )
    db = await Database.open(settings.data.db, readers=1)
    try:
        user_id = await auth.create_user(db, "alice", "pw-1234567")
        token = await auth.create_token(db, user_id, "faults")
    finally:
        await db.close()
    server = ServeProcess(config, tmp_path / "server.log")
    server.start()
    client = httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    response = await client.post("/api/v1/projects", json={"name": "Study"})
    assert response.status_code == 201, response.text
    body = {"name": "ws1", "repo": repo.url, "branch": "main", "database": "sample"}
    response = await client.post("/api/v1/projects/study/workspaces", json=body)
    assert response.status_code == 201, response.text
    yield {"client": client, "server": server, "data_dir": small_disk}
    await client.aclose()
    server.stop()


async def run(client, actions) -> dict:
    response = await client.post("/api/v1/workspaces/ws1/job-requests", json={"actions": actions})
    assert response.status_code == 201, response.text
    request_id = response.json()["id"]

    async def done():
        data = (await client.get(f"/api/v1/job-requests/{request_id}")).json()
        return data if data["status"] in ("succeeded", "failed") else None

    return await until(done, 90, f"job request {request_id} to finish")


def integrity(data_dir) -> str:
    conn = sqlite3.connect(f"file:{data_dir / 'db.sqlite'}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


async def test_a_job_that_fills_the_disk_fails_clearly_and_the_site_goes_on(site):
    client, data_dir = site["client"], site["data_dir"]
    result = await run(client, ["huge"])
    (job,) = result["jobs"]
    assert job["state"] == "failed"
    assert "disk" in job["status_message"] and "free some space" in job["status_message"], job
    assert integrity(data_dir) == "ok"
    assert not any((data_dir / "jobs").iterdir())  # its files are gone, and the space back
    assert not (data_dir / "workspaces" / "ws1" / "output" / "huge.bin").exists()
    assert (await client.get("/api/v1/health")).status_code == 200

    result = await run(client, ["small"])  # the next job runs as usual
    assert result["status"] == "succeeded", result


async def test_a_full_disk_refuses_clearly_and_the_site_recovers_when_space_returns(site):
    client, data_dir = site["client"], site["data_dir"]
    filler = data_dir / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], check=False,
                   capture_output=True)  # fmt: skip
    response = await client.post("/api/v1/workspaces/ws1/job-requests", json={"actions": ["small"]})
    assert response.status_code == 503, response.text
    assert "disk" in response.json()["error"] and "nothing was changed" in response.json()["error"]
    page = await client.get("/ws1/")
    assert page.status_code == 200
    assert integrity(data_dir) == "ok"

    mount(data_dir, "256m", remount=True)  # an admin makes room
    filler.unlink()
    result = await run(client, ["small"])
    assert result["status"] == "succeeded", result
    assert integrity(data_dir) == "ok"

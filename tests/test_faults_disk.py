"""A full disk: the data dir on a small tmpfs, filled by a job and then by a file beside
it. Failures say what went wrong, nothing is corrupted, and the site goes on when space
returns (the tmpfs is made larger, as an admin would free space). Real Docker, a real
SQLite file on the small disk, the site in this process."""

from __future__ import annotations

import gc
import sqlite3
import subprocess

import pytest
from helpers import running_site, setup_workspace, until, user_headers

from jobsite.config import load_settings

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

pytestmark = [
    pytest.mark.docker,
    pytest.mark.usefixtures("docker_cleanup"),
    # a log stream cut by the full disk leaves the Docker SDK's socket to the garbage
    # collector; the site fixture collects it before the test ends
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


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
async def site(small_disk, repos_dir, make_repo):
    """The site (in this process, with real Docker) over the small data dir, with ws1."""
    repo = make_repo({"project.yaml": PROJECT_YAML})
    settings = load_settings(
        environ={},
        data_dir=str(small_disk),
        repos={"allow": [f"{repos_dir}/*"]},
        max_workers=1,
        job_memory="256M",
        job_cpus=1,
        allow_pull=False,
        min_free_disk="1M",
    )
    async with running_site(settings) as (app, client):
        client.headers.update(await user_headers(app, "alice"))
        await setup_workspace(client, client.headers, repo)
        yield {"client": client, "data_dir": small_disk}
    gc.collect()


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

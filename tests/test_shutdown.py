"""Stopping: `jobsite serve` under full load stops within 10 s of SIGTERM (or Ctrl-C), leaves
the running job's container for the next start to adopt, folds the WAL into db.sqlite, and
logs a client that went away as one line, never a traceback."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ServeProcess, raw_request, wait_until

pytestmark = pytest.mark.docker

# the job waits for a file the test writes, so it runs across the restart and ends after it
WAITING_YAML = """\
version: "4"
actions:
  wait:
    run: python:v2 -c "until [ -f go ]; do sleep 0.1; done; mkdir -p output; echo n > output/w.csv"
    outputs:
      moderately_sensitive:
        w: output/w.csv
"""
SLOW_CLIENTS = 40  # submissions whose upload never ends, holding their places until the end
ABANDONED = 6  # of those, the ones whose client gives up before the site stops
HAMMERS = 6  # threads asking for the admin page as fast as they can


def settings_file(path: Path, data_dir: Path, repos_dir: Path) -> Path:
    """The test site's settings, with room for every slow client so that the admin page's
    askers fill the rest."""
    limit = SLOW_CLIENTS + HAMMERS // 2
    path.write_text(
        json.dumps(
            {
                "data_dir": str(data_dir),
                "repos": {"allow": [f"{repos_dir}/*"]},
                "max_workers": 2,
                "job_memory": "256M",
                "job_cpus": 1,
                "max_requests": limit,
                "max_requests_per_page": limit,
            }
        )
    )
    return path


def slow_submission(url: str, headers: dict[str, str]) -> socket.socket:
    """A job request whose client sends its headers and the start of its body, then nothing
    more. Submissions are never refused before other requests, so every one of them holds
    a place however busy the site is meanwhile (a burst of an ordinary page may be shed)."""
    more = {**headers, "Content-Type": "application/json", "Content-Length": "100"}
    return raw_request(url, "POST", "/api/v1/workspaces/ws1/job-requests", more, b'{"actions": ')


def post_honouring_retry_after(api: httpx.Client, path: str, body: object) -> httpx.Response:
    """POSTs ``body``, and again after the wait a 503 asks for, as a polite client does
    (a new project is not among the requests a busy site keeps for last)."""
    for _ in range(5):
        answer = api.post(path, json=body)
        if answer.status_code != 503:
            return answer
        time.sleep(float(answer.headers["Retry-After"]))
    return answer


def token(config: Path) -> str:
    made = subprocess.run(
        [sys.executable, "-m", "jobsite.cli", "--config", str(config), "token", "create", "admin"],
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.strip()


def stop(server: ServeProcess, sig: int) -> float:
    """Sends ``sig``; the seconds until the server exited."""
    assert server.proc is not None
    start = time.monotonic()
    server.proc.send_signal(sig)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError(f"jobsite serve did not stop in 30 s:\n{text(server)}") from None
    return time.monotonic() - start


def text(server: ServeProcess) -> str:
    return server.log.read_text(errors="replace")


@contextlib.contextmanager
def hammering(url: str, headers: dict[str, str]) -> Iterator[list[int]]:
    """Threads asking for /admin/ back to back until the block ends; the statuses they got."""
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(headers=headers, timeout=5) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.get(url + "/admin/").status_code)
                except httpx.HTTPError:
                    statuses.append(0)

    threads = [threading.Thread(target=hammer) for _ in range(HAMMERS)]
    for thread in threads:
        thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_the_site_stops_within_10_s_under_load_and_the_next_start_adopts_its_job(
    settings, data_dir, repos_dir, make_repo, tmp_path, docker_client, docker_cleanup, sig, request
):
    repo = make_repo({"project.yaml": WAITING_YAML})
    config = settings_file(tmp_path / "jobsite.yaml", data_dir, repos_dir)
    first = ServeProcess(config, tmp_path / "first.log")
    request.addfinalizer(first.kill)  # when the test fails before stopping it
    first.start()
    headers = {"Authorization": f"Bearer {token(config)}"}
    api = httpx.Client(base_url=first.url, headers=headers, timeout=10)
    slug = api.post("/api/v1/projects", json={"name": "Study"}).json()["slug"]
    made = api.post(
        f"/api/v1/projects/{slug}/workspaces",
        json={"name": "ws1", "repo": repo.url, "branch": "main", "database": "sample"},
    )
    assert made.status_code == 201, made.text
    submitted = api.post("/api/v1/workspaces/ws1/job-requests", json={"actions": ["wait"]})
    (job,) = submitted.json()["jobs"]
    wait_until(
        lambda: api.get(f"/api/v1/jobs/{job['id']}").json()["status_code"] == "executing",
        60,
        "the job's container to run",
    )

    slow = [slow_submission(first.url, headers) for _ in range(SLOW_CLIENTS)]
    try:
        with hammering(first.url, headers) as statuses:
            wait_until(lambda: 503 in statuses, 30, "the site to be full and refuse requests")
            for sock in slow[:ABANDONED]:
                sock.close()
            wait_until(
                lambda: text(first).count("client went away") == ABANDONED,
                30,
                f"the {ABANDONED} abandoned uploads to be logged (log: {first.log})",
            )
            last = post_honouring_retry_after(api, "/api/v1/projects", {"name": "The last write"})
            assert last.status_code == 201, last.text
            # someone looking at the database (a sqlite3 shell): SQLite's own checkpoint when
            # the last connection closes does not happen then; the site's must
            onlooker = sqlite3.connect(data_dir / "db.sqlite")
            onlooker.execute("SELECT count(*) FROM users").fetchone()
            took = stop(first, sig)
    finally:
        for sock in slow:
            sock.close()
        api.close()

    assert took < 10, f"jobsite serve took {took:.1f} s to stop"
    log = text(first)
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    assert log.count("client went away") == ABANDONED, log
    # the admin page's refusals counted in a line or a few, not one access log line each
    assert '"GET /admin/ HTTP/1.1" 200' in log, "the access log is written"
    # (a request stopped by the site's stopping has its 503 logged, and a line saying so)
    stopped = log.count("stopped answering GET /admin/")
    assert log.count('"GET /admin/ HTTP/1.1" 503') <= stopped, log
    refused = re.findall(r"refused (\d+) requests in [\d.]+ s, the site being busy.*: (.*)", log)
    assert any(re.search(r"\badmin \d+", pages) for _, pages in refused), log
    assert sum(int(count) for count, _ in refused) >= statuses.count(503) - stopped, log
    container = docker_client.containers.get(f"jobsite-{job['id']}")
    assert container.status == "running"

    # db.sqlite alone, copied without its -wal, holds the last write
    copy = tmp_path / "copy.sqlite"
    shutil.copy(data_dir / "db.sqlite", copy)
    onlooker.close()
    conn = sqlite3.connect(copy)
    try:
        names = [name for (name,) in conn.execute("SELECT name FROM projects")]
    finally:
        conn.close()
    assert "The last write" in names

    second = ServeProcess(config, tmp_path / "second.log")
    second.start()
    try:
        wait_until(lambda: "re-adopted" in text(second), 30, "the next start to adopt the job")
        (data_dir / "jobs" / job["id"] / "go").touch()
        with httpx.Client(base_url=second.url, headers=headers, timeout=10) as again:
            wait_until(
                lambda: again.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "succeeded",
                60,
                "the adopted job to finish under the new process",
            )
    finally:
        second.stop()

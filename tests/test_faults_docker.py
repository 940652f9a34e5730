"""The Docker daemon goes away mid-run and comes back: jobs wait, then go on, each
finishing once. The real daemon is shared with other tests, so it is never stopped: the
site talks to it through a socket proxy (DOCKER_HOST) that this test stops and starts."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from helpers import ServeProcess, until, wait_until

from jobsite import auth
from jobsite.db import Database

PROJECT_YAML = """\
version: "4"
actions:
  first:
    run: python:v2 -c "sleep 3 && mkdir -p output && echo 1 > output/first.csv"
    outputs:
      moderately_sensitive:
        first: output/first.csv
  second:
    run: python:v2 -c "mkdir -p output && cat output/first.csv > output/second.csv"
    needs: [first]
    outputs:
      moderately_sensitive:
        second: output/second.csv
"""
TERMINAL = {"succeeded", "nonzero_exit", "unmatched_patterns", "dependency_failed",
            "cancelled_by_user", "timed_out", "out_of_memory", "internal_error"}  # fmt: skip
DOCKER_SOCKET = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_cleanup")]


class SocketProxy:
    """A Unix socket that forwards every connection to the Docker daemon's, until stopped:
    stopping closes the socket and every connection through it, as a daemon going away."""

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self.listener: socket.socket | None = None
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(self.path))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.path.unlink(missing_ok=True)
        with self.lock:
            for conn in self.open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            with self.lock:
                self.open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, dest):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def proxy(tmp_path):
    found = SocketProxy(tmp_path / "docker.sock", DOCKER_SOCKET)
    found.start()
    yield found
    found.stop()


def read(data_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{data_dir / 'db.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def test_jobs_wait_while_docker_is_away_then_go_on(
    tmp_path, data_dir, repos_dir, settings, make_repo, proxy, docker_client
):
    repo = make_repo({"project.yaml": PROJECT_YAML})
    config = tmp_path / "jobsite.yaml"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(data_dir),
                "repos": {"allow": [f"{repos_dir}/*"]},
                "max_workers": 2,
                "job_memory": "256M",
                "job_cpus": 1,
                "allow_pull": False,
            }
        )
    )
    data_dir.mkdir()
    db = await Database.open(settings.data.db, readers=1)
    try:
        user_id = await auth.create_user(db, "alice", "pw-1234567")
        token = await auth.create_token(db, user_id, "faults")
    finally:
        await db.close()
    server = ServeProcess(config, tmp_path / "server.log", DOCKER_HOST=f"unix://{proxy.path}")
    server.start()
    try:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as client:
            await client.post("/api/v1/projects", json={"name": "Study"})
            body = {"name": "ws1", "repo": repo.url, "branch": "main", "database": "sample"}
            response = await client.post("/api/v1/projects/study/workspaces", json=body)
            assert response.status_code == 201, response.text
            response = await client.post(
                "/api/v1/workspaces/ws1/job-requests", json={"actions": ["second"]}
            )
            request_id = response.json()["id"]

            def status(action: str) -> str | None:
                rows = read(data_dir, "SELECT status_code FROM jobs WHERE action = ?", (action,))
                return rows[0][0] if rows else None

            wait_until(lambda: status("first") == "executing", 60, "the first job to run")
            proxy.stop()  # Docker goes away while the job runs
            wait_until(
                lambda: status("first") == "waiting_on_docker", 60, "the job to wait on Docker"
            )
            page = await client.get("/api/v1/job-requests/" + str(request_id))
            assert page.status_code == 200  # the site answers meanwhile
            proxy.start()  # and comes back

            async def done():
                data = (await client.get(f"/api/v1/job-requests/{request_id}")).json()
                return data if data["status"] in ("succeeded", "failed") else None

            result = await until(done, 120, "the job request to finish")
    finally:
        server.stop()
    assert result["status"] == "succeeded", result
    for job_id, action in read(data_dir, "SELECT id, action FROM jobs"):
        ends = read(data_dir, "SELECT status_code FROM job_events WHERE job_id = ?", (job_id,))
        assert [code for (code,) in ends if code in TERMINAL] == ["succeeded"], (action, ends)
    ws = data_dir / "workspaces" / "ws1" / "output"
    assert (ws / "second.csv").read_text() == "1\n"
    assert (
        docker_client.containers.list(all=True, filters={"label": f"jobsite={settings.site_id}"})
        == []
    )
    assert not any((data_dir / "jobs").iterdir())
    assert read(data_dir, "PRAGMA integrity_check") == [("ok",)]

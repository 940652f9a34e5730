"""The Docker daemon goes away mid-run and comes back: jobs wait, then go on, each
finishing once. The real daemon is shared with other tests, so it is never stopped: the
site (in this process) talks to it through a socket proxy (DOCKER_HOST) that this test
stops and starts."""

from __future__ import annotations

import gc
import os
import socket
import sqlite3
import threading
from pathlib import Path

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

from jobsite.config import load_settings

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
                conn.close()


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


# the Docker SDK leaves the socket of a connection cut under it for the garbage collector
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_jobs_wait_while_docker_is_away_then_go_on(
    data_dir, repos_dir, make_repo, proxy, docker_client, monkeypatch
):
    repo = make_repo({"project.yaml": PROJECT_YAML})
    monkeypatch.setenv("DOCKER_HOST", f"unix://{proxy.path}")
    settings = load_settings(
        environ={},
        data_dir=str(data_dir),
        repos={"allow": [f"{repos_dir}/*"]},
        max_workers=2,
        job_memory="256M",
        job_cpus=1,
        allow_pull=False,
    )
    async with running_site(settings) as (app, client):
        headers = await user_headers(app, "alice")
        await setup_workspace(client, headers, repo)
        request_id = await submit(client, headers, ["second"])

        async def status(action: str) -> str:
            return (await job(client, headers, request_id, action))["status_code"]

        async def first_is(code: str) -> bool:
            return await status("first") == code

        await until(lambda: first_is("executing"), 60, "the first job to run")
        proxy.stop()  # Docker goes away while the job runs
        await until(lambda: first_is("waiting_on_docker"), 60, "the job to wait on Docker")
        assert (await client.get(f"/api/v1/job-requests/{request_id}")).status_code == 200
        proxy.start()  # and comes back
        result = await wait_for_request(client, headers, request_id, 120)
    gc.collect()  # those sockets go now, while the warning is ignored, not at the session's end
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

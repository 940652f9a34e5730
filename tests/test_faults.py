"""Faults lose nothing: the server, a real `jobsite serve` process, is SIGKILLed in each
phase of a job, and a new process over the same data dir finishes every job exactly once,
with no half-written output, no duplicate email, no container or job dir left behind, and a
database that passes its integrity check."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller
from helpers import ServeProcess, free_port, until, wait_until

from jobsite import auth
from jobsite.db import Database

BIG_MB = 150
PROJECT_YAML = f"""\
version: "4"
actions:
  big:
    run: python:v2 -c "mkdir -p output && dd if=/dev/zero of=output/big.bin bs=1M count={BIG_MB} 2>/dev/null && sleep 2 && echo made"
    outputs:
      highly_sensitive:
        big: output/big.bin
  after:
    run: python:v2 -c "sleep 1 && mkdir -p output && wc -c < output/big.bin > output/size.txt"
    needs: [big]
    outputs:
      highly_sensitive:
        size: output/size.txt
"""  # noqa: E501
TERMINAL = {
    "succeeded", "nonzero_exit", "unmatched_patterns", "dependency_failed", "cancelled_by_user",
    "timed_out", "out_of_memory", "internal_error",
}  # fmt: skip

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_cleanup")]


class HeldMailbox:
    """An SMTP server's handler that holds the first message it is given until released,
    then refuses it for now (451), as a server does when its sender went away mid-send;
    every later message is accepted and kept."""

    def __init__(self) -> None:
        self.accepted: list[bytes] = []
        self.arrived = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server, session, envelope) -> str:
        if not self.arrived.is_set():
            self.arrived.set()
            await asyncio.to_thread(self.release.wait, 60)
            return "451 4.3.0 try again later"
        self.accepted.append(envelope.content)
        return "250 OK"


@pytest.fixture
def mailbox():
    box = HeldMailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield box, controller.port
    box.release.set()
    controller.stop()


@pytest.fixture
async def site(tmp_path, data_dir, repos_dir, settings, make_repo, mailbox):
    """A settings file for `jobsite serve` (the test's data dir and site id), alice with a
    token, and the server process, not yet started."""
    _, smtp_port = mailbox
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
                "smtp": {"host": "127.0.0.1", "port": smtp_port, "starttls": False},
            }
        )
    )
    data_dir.mkdir()
    db = await Database.open(settings.data.db, readers=1)
    try:
        user_id = await auth.create_user(db, "alice", "pw-1234567", email="alice@example.org")
        token = await auth.create_token(db, user_id, "faults")
    finally:
        await db.close()
    server = ServeProcess(config, tmp_path / "server.log")
    yield {"server": server, "repo": repo, "api": {"Authorization": f"Bearer {token}"}}
    server.stop()


async def start_pipeline(site) -> int:
    """ws1 on the two-action pipeline, and a job request for both, asking for emails."""
    api = site["api"]
    async with httpx.AsyncClient(base_url=site["server"].url, headers=api) as client:
        response = await client.post("/api/v1/projects", json={"name": "Study"})
        assert response.status_code == 201, response.text
        body = {"name": "ws1", "repo": site["repo"].url, "branch": "main", "database": "sample"}
        response = await client.post("/api/v1/projects/study/workspaces", json=body)
        assert response.status_code == 201, response.text
        response = await client.post(
            "/api/v1/workspaces/ws1/job-requests", json={"actions": ["after"], "notify": True}
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]


def read(data_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{data_dir / 'db.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def status_of(data_dir: Path, action: str) -> str | None:
    rows = read(data_dir, "SELECT status_code FROM jobs WHERE action = ?", (action,))
    return rows[0][0] if rows else None


def staged_outputs(data_dir: Path) -> list[Path]:
    """Outputs being copied into the workspace (staged next to their final place)."""
    return list((data_dir / "workspaces").rglob("*.tmp"))


def integrity(data_dir: Path) -> str:
    return read(data_dir, "PRAGMA integrity_check")[0][0]


async def finished(site, request_id: int) -> dict:
    async with httpx.AsyncClient(base_url=site["server"].url, headers=site["api"]) as client:

        async def done():
            data = (await client.get(f"/api/v1/job-requests/{request_id}")).json()
            return data if data["status"] in ("succeeded", "failed") else None

        return await until(done, 120, f"job request {request_id} to finish")


def assert_nothing_lost(data_dir: Path, docker_client, settings) -> None:
    # every job ended exactly once
    for job_id, action, state in read(data_dir, "SELECT id, action, state FROM jobs"):
        ends = read(data_dir, "SELECT status_code FROM job_events WHERE job_id = ?", (job_id,))
        assert [code for (code,) in ends if code in TERMINAL] == ["succeeded"], (action, ends)
        assert state == "succeeded", action
    # outputs whole, and what the manifest says they are
    ws = data_dir / "workspaces" / "ws1"
    assert staged_outputs(data_dir) == []
    big = ws / "output" / "big.bin"
    assert big.stat().st_size == BIG_MB * 2**20
    manifest = json.loads((ws / "metadata" / "manifest.json").read_text())
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert manifest["files"]["output/big.bin"]["sha256"] == digest
    assert (ws / "output" / "size.txt").read_text().strip() == str(BIG_MB * 2**20)
    # nothing left behind
    assert (
        docker_client.containers.list(all=True, filters={"label": f"jobsite={settings.site_id}"})
        == []
    )
    assert not any((data_dir / "jobs").iterdir())
    assert integrity(data_dir) == "ok"


PHASES = {
    "preparing": lambda data_dir: status_of(data_dir, "after") == "preparing",
    "executing": lambda data_dir: status_of(data_dir, "big") == "executing",
    "finalizing": lambda data_dir: status_of(data_dir, "big") == "finalizing",
    "outputs landing": lambda data_dir: bool(staged_outputs(data_dir)),
}


@pytest.mark.parametrize("phase", PHASES)
async def test_a_server_killed_in_a_job_phase_loses_nothing(
    site, phase, data_dir, docker_client, settings, mailbox
):
    box, _ = mailbox
    box.arrived.set()  # emails are not held here: each is accepted as it comes
    server = site["server"]
    server.start()
    request_id = await start_pipeline(site)
    await asyncio.to_thread(wait_until, lambda: PHASES[phase](data_dir), 90, phase)
    server.kill()
    assert integrity(data_dir) == "ok"

    server.start()
    result = await finished(site, request_id)
    assert result["status"] == "succeeded", result
    await until(lambda: len(box.accepted) == 2, 30, "an email per job")
    assert_nothing_lost(data_dir, docker_client, settings)
    sent = read(data_dir, "SELECT job_id, sent_at FROM outbox")
    assert len(sent) == 2 and all(at for _, at in sent)


async def test_a_server_killed_while_an_email_is_sent_sends_it_once(
    site, data_dir, docker_client, settings, mailbox
):
    box, _ = mailbox
    server = site["server"]
    server.start()
    request_id = await start_pipeline(site)
    await asyncio.to_thread(box.arrived.wait, 90)  # the first email is on the wire
    server.kill()
    box.release.set()

    server.start()
    await finished(site, request_id)
    await until(lambda: len(box.accepted) == 2, 60, "both emails")
    await until(
        lambda: all(at for _, at in read(data_dir, "SELECT job_id, sent_at FROM outbox")),
        30,
        "the outbox to say both were sent",
    )
    subjects = sorted(
        line for message in box.accepted for line in message.decode().splitlines()
        if line.startswith("Subject:")
    )  # fmt: skip
    assert len(subjects) == 2 and len(set(subjects)) == 2  # one per job, none twice
    assert_nothing_lost(data_dir, docker_client, settings)

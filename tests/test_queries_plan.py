"""Every page, fragment and API read uses indexes: no full scan of the tables that grow
with history (jobs, job_events, job_requests).

Each query the site sends while a visitor, a developer and an admin open every page (and
its htmx fragment) is recorded, then asked for its plan with ``EXPLAIN QUERY PLAN`` over the
same real database, holding enough history that a scan would show. The tables have no
statistics (a site never runs ANALYZE), so the plans are the ones a real site gets.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from typing import Any

import pytest
from helpers import TWO_ACTIONS as PROJECT_YAML
from helpers import setup_workspace, submit, user_headers

HX = {"HX-Request": "true"}
WATCHED = ("jobs", "job_events", "job_requests")
# a table named in FROM or JOIN, and the alias it goes by there
KEYWORDS = "WHERE|JOIN|ON|ORDER|GROUP|LIMIT|LEFT|CROSS|INNER|USING"
TABLE = re.compile(rf"\b(?:FROM|JOIN)\s+(\w+)(?:\s+(?:AS\s+)?(?!(?:{KEYWORDS})\b)(\w+))?", re.I)


def full_scans(conn: sqlite3.Connection, sql: str, params: Any) -> list[str]:
    """The plan's steps that read all of a history table (or an index of all of it)."""
    names = set(WATCHED)
    for table, alias in TABLE.findall(sql):
        if table in WATCHED and alias:
            names.add(alias)
    plan = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    found = []
    for *_, detail in plan:
        step = re.match(r"SCAN (\w+)", detail)
        if step and step.group(1) in names:
            found.append(detail)
    return found


class Recorder:
    """Every read sent through the site's database while it is on."""

    def __init__(self, db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.queries: dict[str, Any] = {}
        self.page = ""
        self.seen_on: dict[str, str] = {}
        for method in ("fetchall", "fetchone"):
            monkeypatch.setattr(db, method, self.wrap(getattr(db, method)))

    def wrap(self, read):
        async def recorded(sql: str, params: Any = ()) -> Any:
            self.queries.setdefault(sql, params)
            self.seen_on.setdefault(sql, self.page)
            return await read(sql, params)

        return recorded


async def add_history(db, workspace_id: int, user_id: int, requests: int = 300) -> None:
    """Finished job requests of two jobs each, six events per job, straight into the DB."""
    now = time.time() - 86400
    async with db.transaction() as conn:
        for r in range(requests):
            cur = await conn.execute(
                "INSERT INTO job_requests (workspace_id, created_by, branch, sha, "
                "requested_actions, created_at) VALUES (?, ?, 'main', 'abc', ?, ?)",
                (workspace_id, user_id, json.dumps(["analyse"]), now + r),
            )
            for action in ("prepare", "analyse"):
                job_id = secrets.token_hex(8)
                await conn.execute(
                    "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
                    "run_command, image, args, outputs, state, status_code, created_at, "
                    "started_at, completed_at, updated_at) VALUES (?, ?, ?, ?, ?, 'abc', "
                    "'python:v2', 'python:v2', '[]', '{}', 'succeeded', 'succeeded', ?, ?, ?, ?)",
                    (job_id, cur.lastrowid, workspace_id, user_id, action, now + r, now + r + 1,
                     now + r + 2, now + r + 2),
                )  # fmt: skip
                await conn.executemany(
                    "INSERT INTO job_events (job_id, status_code, at) VALUES (?, ?, ?)",
                    [(job_id, code, now + r) for code in ("created", "waiting_on_workers",
                     "preparing", "executing", "finalizing", "succeeded")],
                )  # fmt: skip


@pytest.fixture
async def site_with_history(app, client, make_repo, monkeypatch):
    await app.state.scheduler.set_paused(True)
    headers = await user_headers(app, "alice", email="alice@example.org", admin=True)
    repo = make_repo({"project.yaml": PROJECT_YAML})
    await setup_workspace(client, headers, repo)
    db = app.state.db
    ws_id = await db.fetchval("SELECT id FROM workspaces WHERE name = 'ws1'")
    user_id = await db.fetchval("SELECT id FROM users WHERE username = 'alice'")
    await add_history(db, ws_id, user_id)
    live = await submit(client, headers, ["analyse"])
    job_id = await db.fetchval(
        "SELECT id FROM jobs WHERE job_request_id = ? ORDER BY created_at", (live,)
    )
    return {
        "headers": headers,
        "request": live,
        "job": job_id,
        "recorder": Recorder(db, monkeypatch),
    }


async def sign_in(client, username: str) -> None:
    page = await client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    response = await client.post(
        "/login", data={"username": username, "password": "pw-1234567", "csrf_token": token}
    )
    assert response.status_code == 303


def pages(request_id: int, job_id: str) -> list[tuple[str, dict[str, str]]]:
    """Every page a person opens, each with its htmx fragment where it has one."""
    urls = [
        "/", "/projects/study-one/", "/ws1/", "/ws1/logs", "/ws1/logs?before=7",
        "/ws1/logs?q=analyse", f"/ws1/logs/{request_id}", "/ws1/logs/3", f"/jobs/{job_id}",
        f"/jobs/{job_id}/log", "/ws1/outputs/", "/admin/", "/admin/users", "/account",
    ]  # fmt: skip
    return [(url, {}) for url in urls] + [(url, HX) for url in urls]


API = [
    "/api/v1/workspaces/ws1", "/api/v1/workspaces/ws1/outputs", "/api/v1/job-requests/{request}",
    "/api/v1/job-requests/3", "/api/v1/jobs/{job}", "/api/v1/jobs/{job}/log",
    "/api/v1/admin/queue", "/api/v1/admin/outbox", "/api/v1/projects/study-one/members",
]  # fmt: skip


async def test_every_page_reads_jobs_and_events_through_indexes(
    app, client, site_with_history, settings
):
    recorder = site_with_history["recorder"]
    for url, headers in pages(site_with_history["request"], site_with_history["job"]):
        recorder.page = url
        assert (await client.get(url, headers=headers)).status_code < 500, url  # a visitor
    await sign_in(client, "alice")
    for url, headers in pages(site_with_history["request"], site_with_history["job"]):
        recorder.page = url
        response = await client.get(url, headers=headers)
        expected = (200, 286, 404) if url.endswith("/log") else (200, 286)  # it has not run
        assert response.status_code in expected, (url, response.status_code)
    for url in API:
        url = url.format(**site_with_history)
        recorder.page = url
        response = await client.get(url, headers=site_with_history["headers"])
        assert response.status_code in (200, 404), (url, response.text)

    assert len(recorder.queries) > 20  # the pages were really read
    conn = sqlite3.connect(f"file:{settings.data_dir / 'db.sqlite'}?mode=ro", uri=True)
    try:
        scans = {
            sql: (recorder.seen_on[sql], found)
            for sql, params in recorder.queries.items()
            if (found := full_scans(conn, sql, params))
        }
    finally:
        conn.close()
    assert scans == {}


def test_the_check_sees_a_full_scan(tmp_path):
    conn = sqlite3.connect(tmp_path / "t.sqlite")
    conn.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, action TEXT, workspace_id INT);"
        "CREATE INDEX jobs_ws ON jobs (workspace_id);"
    )
    assert full_scans(conn, "SELECT * FROM jobs j WHERE action = ?", ("x",)) == ["SCAN j"]
    assert full_scans(conn, "SELECT * FROM jobs ORDER BY workspace_id", ()) != []
    assert full_scans(conn, "SELECT * FROM jobs WHERE workspace_id = ?", (1,)) == []

"""Hostile input: HTTP and sessions. Odd ids and page numbers, a private site asked about
what exists, the session key, request bodies (too large, too slow, too deep), sign-in
timing and lock-out, sessions and tokens that must end. Each scenario ends with the
site intact (helpers.Intact)."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import sqlite3
import stat
import time

import httpx
import pytest
from helpers import Site, serve, setup_workspace, submit, user_headers, wait_for_request

from jobsite import auth
from jobsite.config import SettingsError
from jobsite.db import MIGRATIONS, SPLIT_LOG_LINES
from jobsite.server import create_app, secret_key
from jobsite.units import Duration

PROJECT_YAML = """\
version: "4"
actions:
  generate:
    run: python:v2 -c "print(1)"
    outputs:
      moderately_sensitive:
        counts: output/counts.csv
"""
FORM = "application/x-www-form-urlencoded"


def made_here(path: str) -> bool:
    """The files a test makes itself outside the data dir: its git repos."""
    return path.startswith("repos/")


# -- one strict rule for numbers in addresses -------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/job-requests/%C2%B2",  # "²": a digit to Python, not to int()
        "/api/v1/job-requests/%D9%A3",  # an Arabic-Indic three
        "/api/v1/job-requests/99999999999999999999",  # past SQLite's integers
        "/api/v1/job-requests/-1",
        "/api/v1/job-requests/1%00",
    ],
)
async def test_an_id_that_is_not_plain_ascii_digits_is_not_found(app, client, intact, path):
    headers = await user_headers(app, "alice")
    response = await client.get(path, headers=headers)
    assert response.status_code == 404, response.text
    assert "there is no job request" in response.json()["error"]
    await intact.check(client, made_here)


@pytest.mark.parametrize("path", ["/account/tokens/%C2%B2/revoke", "/admin/users/%C2%B2/activate"])
async def test_ids_in_page_addresses_follow_the_same_rule(app, client, intact, path):
    headers = await user_headers(app, "root", admin=True)
    response = await client.post(path, headers=headers)
    assert response.status_code == 404, response.text
    await intact.check(client, made_here)


@pytest.mark.parametrize("number", ["99999999999999999999", "%C2%B2", "%D9%A3", "-3", "1e3", "+1"])
@pytest.mark.parametrize("page", ["/ws1/logs?before={}", "/ws1/logs/1?from={}", "/admin/?from={}"])
async def test_a_place_in_a_paged_list_that_is_not_a_number_is_a_clear_400(
    app, client, intact, make_repo, page, number
):
    headers = await user_headers(app, "alice", admin=True)
    await setup_workspace(client, headers, make_repo({"project.yaml": PROJECT_YAML}))
    await app.state.scheduler.set_paused(True)
    await submit(client, headers, ["generate"])
    response = await client.get(page.format(number), headers=headers)
    assert response.status_code == 400, response.text
    name = page.split("?")[1].split("=")[0]
    assert f"{name} must be a whole number" in response.text
    for fine in ("", "0", "2", "999999999999999999"):
        assert (await client.get(page.format(fine), headers=headers)).status_code == 200, fine
    await intact.check(client, made_here)


async def test_a_queue_limit_that_is_not_plain_digits_is_a_400(app, client, intact):
    headers = await user_headers(app, "root", admin=True)
    response = await client.get("/api/v1/admin/queue?limit=%C2%B2", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"] == "limit must be a whole number of jobs"
    await intact.check(client, made_here)


# -- a private site reveals nothing -----------------------------------------------------


async def private_site_with_a_workspace(app, client, make_repo) -> dict[str, dict]:
    """A workspace with one job request on a private site; headers for a member and for a
    signed-in stranger."""
    member = await user_headers(app, "alice")
    stranger = await user_headers(app, "mallory")
    await setup_workspace(client, member, make_repo({"project.yaml": PROJECT_YAML}))
    await app.state.scheduler.set_paused(True)
    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": ["generate"]}, headers=member
    )
    assert response.status_code == 201, response.text
    app.state.settings.public_status = False
    return {"member": member, "stranger": stranger, "request": response.json()}


@pytest.mark.parametrize("who", ["stranger", "anonymous"])
async def test_a_private_site_answers_existing_and_missing_things_alike(
    app, client, intact, make_repo, who
):
    site = await private_site_with_a_workspace(app, client, make_repo)
    request_id, job_id = site["request"]["id"], site["request"]["jobs"][0]["id"]
    headers = site.get(who, {})
    pairs = [
        ("/api/v1/projects/study-one/members", "/api/v1/projects/study-two/members"),
        ("/api/v1/workspaces/ws1", "/api/v1/workspaces/ws2"),
        (f"/api/v1/job-requests/{request_id}", f"/api/v1/job-requests/{request_id + 1}"),
        (f"/api/v1/jobs/{job_id}", "/api/v1/jobs/0123456789abcdef"),
        ("/projects/study-one/", "/projects/study-two/"),
        ("/ws1/", "/ws2/"),
        ("/ws1/logs", "/ws2/logs"),
        (f"/ws1/logs/{request_id}", f"/ws2/logs/{request_id + 1}"),
        (f"/jobs/{job_id}", "/jobs/0123456789abcdef"),
    ]
    for existing, missing in pairs:
        seen = await client.get(existing, headers=headers)
        unseen = await client.get(missing, headers=headers)
        assert seen.status_code == unseen.status_code == 404, existing
        names = [(job_id, "0123456789abcdef"), ("study-one", "study-two"), ("ws1", "ws2")]
        text = seen.text.replace(existing, missing)  # the sign-in link's next=
        for shown, instead in names:
            text = text.replace(shown, instead)
        for quote in ("'", "&#39;"):
            text = text.replace(f"{quote}{request_id}{quote}", f"{quote}{request_id + 1}{quote}")
        assert text == unseen.text, existing
    # the member still sees everything
    response = await client.get("/api/v1/workspaces/ws1", headers=site["member"])
    assert response.status_code == 200
    await intact.check(client, made_here)


async def test_a_signed_out_visitor_is_offered_the_sign_in_page(app, client, intact, make_repo):
    await private_site_with_a_workspace(app, client, make_repo)
    response = await client.get("/ws1/")
    assert response.status_code == 404
    assert "there is no workspace &#39;ws1&#39; that you can see" in response.text
    assert 'href="/login?next=/ws1/"' in response.text
    await intact.check(client, made_here)


async def test_taken_names_are_not_said_to_exist_to_strangers(app, client, intact, make_repo):
    site = await private_site_with_a_workspace(app, client, make_repo)
    stranger = site["stranger"]
    response = await client.post("/api/v1/projects", json={"name": "Study One"}, headers=stranger)
    assert response.status_code == 400
    assert response.json()["error"] == "the name 'Study One' cannot be used; choose another name"
    response = await client.post("/api/v1/projects", json={"name": "Mine"}, headers=stranger)
    assert response.status_code == 201
    response = await client.post(
        "/api/v1/projects/mine/workspaces",
        json={"name": "ws1", "repo": "/nowhere", "branch": "main", "database": "sample"},
        headers=stranger,
    )
    assert response.status_code == 400
    assert "the name 'ws1' cannot be used" in response.text
    assert "exists" not in response.text
    # a member is told plainly
    response = await client.post(
        "/api/v1/projects", json={"name": "Study One"}, headers=site["member"]
    )
    assert (
        response.json()["error"]
        == "a project named 'Study One' already exists; choose another name"
    )
    await intact.check(client, made_here)


# -- the session key -----------------------------------------------------------------------


def test_the_session_key_is_made_whole_and_private(settings):
    key = secret_key(settings.data)
    path = settings.data.secret_key
    assert len(key) >= 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_key(settings.data) == key
    assert sorted(os.listdir(settings.data.root)) == ["secret.key"]  # no temporary left


@pytest.mark.parametrize("content", ["", "\n", "short-key"])
def test_a_session_key_too_short_stops_the_site(settings, content):
    settings.data.root.mkdir(parents=True)
    settings.data.secret_key.write_text(content)
    with pytest.raises(SettingsError, match=r"needs at least 32\. Delete the file and restart"):
        create_app(settings)


def test_a_session_key_made_meanwhile_by_another_process_is_used(settings, monkeypatch):
    settings.data.root.mkdir(parents=True)
    theirs = "k" * 64
    real_link = os.link

    def link_after_them(source, target):
        settings.data.secret_key.write_text(theirs)
        real_link(source, target)

    monkeypatch.setattr(os, "link", link_after_them)
    assert secret_key(settings.data) == theirs
    assert sorted(os.listdir(settings.data.root)) == ["secret.key"]


# -- request bodies, against a real server on loopback -----------------------------------


class Live:
    """The site served on loopback (helpers.serve), with a client for it and a way to run
    a coroutine on the server's own loop (to make users in its database)."""

    def __init__(self, app, url: str, loop) -> None:
        self.app, self.url, self.loop = app, url, loop
        self.client = httpx.AsyncClient(base_url=url, timeout=30)

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def raw(
        self, head: bytes, body: bytes = b"", wait: float = 10.0, piece: int = 65536
    ) -> tuple[int, bytes, int]:
        """Sends ``head``, then ``body`` a piece at a time until the server answers; the
        status, everything it answered (it must by ``wait`` seconds) and the bytes of
        ``body`` it was sent."""
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=wait) as sock:
            sock.sendall(head)
            sent = 0
            while sent < len(body) and not select.select([sock], [], [], 0.02)[0]:
                sock.sendall(body[sent : sent + piece])
                sent += piece
            answer = b""
            while not complete(answer) and (chunk := sock.recv(65536)):
                answer += chunk
        return int(answer.split(b" ", 2)[1]), answer, min(sent, len(body))


def complete(answer: bytes) -> bool:
    """Whether ``answer`` holds a whole HTTP response (its head and Content-Length bytes)."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    lengths = [
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    ]
    return bool(lengths) and len(body) >= lengths[0]


@pytest.fixture
async def live(settings):
    settings.request_body_timeout = Duration(2)
    app = create_app(settings)
    with serve(app) as (url, loop):
        site = Live(app, url, loop)
        yield site
        await site.client.aclose()


def post_head(path: str, length: int | None, kind: str = "application/json") -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n{size}\r\n\r\n"
    ).encode()


def chunked(data: bytes, size: int = 65536) -> bytes:
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_a_body_announced_too_large_is_refused_before_it_is_sent(live, intact):
    started = time.monotonic()
    status, answer, _ = live.raw(post_head("/login", 100 * 1024**2, FORM))  # no body follows
    assert status == 413
    assert b"larger than this site accepts (1 MiB)" in answer
    assert time.monotonic() - started < 5  # it did not wait for the 100 MB
    await intact.check(live.client)


@pytest.mark.parametrize("path", ["/login", "/api/v1/projects"])
async def test_a_body_that_turns_out_too_large_is_refused(live, intact, path):
    user_id = live.run(auth.create_user(live.app.state.db, "alice", "pw-1234567"))
    token = live.run(auth.create_token(live.app.state.db, user_id, "t"))
    head = post_head(path, None, FORM).replace(
        b"\r\n\r\n", f"\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    body = chunked(b"a=" + b"x" * 4 * 1024**2)
    status, answer, sent = live.raw(head, body)
    assert status == 413, answer
    assert sent < 2 * 1024**2  # refused once past the limit, not after reading all of it
    await intact.check(live.client)


async def test_a_signed_in_form_too_large_is_refused_by_the_csrf_check_too(live, intact):
    """The CSRF middleware reads the forms of signed-in sessions: a large one is still 413."""
    live.run(auth.create_user(live.app.state.db, "alice", "pw-1234567"))
    page = await live.client.get("/login")
    token = page.text.split('"X-CSRF-Token": "')[1].split('"')[0]
    signed_in = await live.client.post(
        "/login", data={"username": "alice", "password": "pw-1234567", "csrf_token": token}
    )
    assert signed_in.status_code == 303
    cookie = f"Cookie: jobsite_session={live.client.cookies['jobsite_session']}"
    head = post_head("/account/tokens", None, FORM)
    head = head.replace(b"\r\n\r\n", f"\r\n{cookie}\r\n\r\n".encode())
    status, answer, sent = live.raw(head, chunked(b"name=" + b"x" * 4 * 1024**2))
    assert status == 413, answer
    assert b"larger than this site accepts" in answer
    assert sent < 2 * 1024**2
    await intact.check(live.client)


async def test_a_body_that_trickles_in_is_cut_off_and_others_are_served(live, intact):
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as slow:
        slow.sendall(post_head("/login", 1000, FORM) + b"user")
        # meanwhile the site serves everyone else
        assert (await live.client.get("/api/v1/health")).status_code == 200
        answer = b""
        while not complete(answer) and (chunk := slow.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"did not arrive within 2 seconds" in answer
    await intact.check(live.client)


@pytest.mark.parametrize("length", ["12abc", "%C2%B2", "-1"])
async def test_a_content_length_that_is_not_a_number_is_a_400(live, intact, length):
    head = (
        f"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    status, _, _ = live.raw(head)
    assert status == 400
    await intact.check(live.client)


@pytest.mark.parametrize("body", ["[" * 100_000, '{"name": ' * 50_000, '{"name": 1e99999999}x'])
async def test_deeply_nested_or_broken_json_is_a_400(live, intact, body):
    user_id = live.run(auth.create_user(live.app.state.db, "alice", "pw-1234567"))
    token = live.run(auth.create_token(live.app.state.db, user_id, "t"))
    response = await live.client.post(
        "/api/v1/projects", content=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("the request body must be JSON")
    await intact.check(live.client)


async def test_cancel_checks_the_role_before_reading_the_body(live, intact, make_repo):
    db = live.app.state.db
    owner = live.run(auth.create_user(db, "alice", "pw-1234567"))
    stranger = live.run(auth.create_user(db, "mallory", "pw-1234567"))
    headers = {"Authorization": f"Bearer {live.run(auth.create_token(db, owner, 't'))}"}
    live.run(live.app.state.scheduler.set_paused(True))
    await setup_workspace(live.client, headers, make_repo({"project.yaml": PROJECT_YAML}))
    request_id = await submit(live.client, headers, ["generate"])
    token = live.run(auth.create_token(db, stranger, "t"))
    head = post_head(f"/api/v1/job-requests/{request_id}/cancel", 1000)
    head = head.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    started = time.monotonic()
    status, answer, _ = live.raw(head, wait=1.5)  # the body never comes: refused without it
    assert status == 403, answer
    assert b"developer role" in answer
    assert time.monotonic() - started < 1.5
    await intact.check(live.client, made_here)


# -- a failed job's log lines are for those who may read its log ------------------------

SECRET_LINE = "patient 4711 has condition X"  # as the job prints it, not as its command reads
FAILING_YAML = """\
version: "4"
actions:
  generate:
    run: python:v2 -c "echo patient $((4700 + 11)) has condition X; exit 3"
    outputs:
      moderately_sensitive:
        counts: output/counts.csv
"""


@pytest.mark.usefixtures("docker_cleanup")
async def test_a_failed_jobs_log_lines_are_shown_only_to_output_viewers(
    app, client, intact, make_repo
):
    alice = await user_headers(app, "alice", email="alice@example.org")  # every role
    bob = await user_headers(app, "bob", email="bob@example.org")  # developer only
    carol = await user_headers(app, "carol")  # collaborator
    mallory = await user_headers(app, "mallory")  # no role
    slug = await setup_workspace(client, alice, make_repo({"project.yaml": FAILING_YAML}))
    for name, role in (("bob", "developer"), ("carol", "collaborator")):
        response = await client.post(
            f"/api/v1/projects/{slug}/members",
            json={"username": name, "roles": [role]},
            headers=alice,
        )
        assert response.status_code == 200, response.text
    ids = {}
    for who, headers in (("alice", alice), ("bob", bob)):
        response = await client.post(
            "/api/v1/workspaces/ws1/job-requests",
            json={"actions": ["generate"], "notify": True},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        ids[who] = response.json()["id"]
        done = await wait_for_request(client, headers, ids[who])
        assert done["jobs"][0]["status_code"] == "nonzero_exit"
    request_id = ids["alice"]
    job = (await client.get(f"/api/v1/job-requests/{request_id}", headers=alice)).json()["jobs"][0]
    assert job["status_message"] == "Job exited with an error (exit code 3)"
    assert job["log_excerpt"] == SECRET_LINE
    pages = [
        f"/api/v1/job-requests/{request_id}",
        f"/api/v1/jobs/{job['id']}",
        f"/ws1/logs/{request_id}",
        f"/jobs/{job['id']}",
        "/ws1/logs",
        "/ws1/",
    ]
    for who, headers in (("anonymous", {}), ("mallory", mallory), ("carol", carol), ("bob", bob)):
        for page in pages:
            response = await client.get(page, headers=headers)
            assert response.status_code == 200, (who, page)
            assert SECRET_LINE not in response.text, (who, page)
            assert "log_excerpt" not in response.text, (who, page)
    for page in pages[:4]:
        assert SECRET_LINE in (await client.get(page, headers=alice)).text, page
    emails = {
        row["to_addr"]: row["body"]
        for row in await app.state.db.fetchall("SELECT to_addr, body FROM outbox")
    }
    assert f"The last lines of its log:\n{SECRET_LINE}\n" in emails["alice@example.org"]
    assert SECRET_LINE not in emails["bob@example.org"]
    assert "Job exited with an error (exit code 3)" in emails["bob@example.org"]
    await intact.check(client, made_here)


async def test_a_content_length_that_is_not_a_number_is_refused_by_the_site_itself(
    app, client, intact
):
    """uvicorn refuses such a header before the site sees it; another server may not."""
    headers = await user_headers(app, "alice")
    response = await client.post(
        "/api/v1/projects", content=b"{}", headers={**headers, "Content-Length": "2 bytes"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "the Content-Length header is not a number"
    await intact.check(client)


async def test_log_lines_in_old_status_messages_move_to_their_own_field(app, client, intact):
    """A job that failed before the upgrade had its log lines in its status message; the
    migration moves them out (db.SPLIT_LOG_LINES is part of MIGRATIONS[1])."""
    site = await Site.make(app.state.db)
    old = "Job exited with an error (exit code 3): patient 4711 | has condition X"
    job_id = await site.add_job(state="failed", status_code="nonzero_exit", status_message=old)
    await app.state.db.execute(
        "INSERT INTO job_events (job_id, status_code, status_message, at) "
        "VALUES (?, 'nonzero_exit', ?, 0)",
        (job_id, old),
    )
    ok = await site.add_job(state="failed", status_code="timed_out", status_message="Ran: a | b")
    conn = sqlite3.connect(app.state.db.path)  # as the migration runs it: a script
    conn.executescript(SPLIT_LOG_LINES)
    conn.close()
    job = await app.state.db.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
    assert job["status_message"] == "Job exited with an error (exit code 3)"
    assert job["log_excerpt"] == "patient 4711\nhas condition X"
    event = await app.state.db.fetchval(
        "SELECT status_message FROM job_events WHERE job_id = ?", (job_id,)
    )
    assert event == "Job exited with an error (exit code 3)"
    assert (
        await app.state.db.fetchval("SELECT status_message FROM jobs WHERE id = ?", (ok,))
        == "Ran: a | b"
    )
    assert SPLIT_LOG_LINES in MIGRATIONS[1]
    await intact.check(client)


@pytest.mark.parametrize(
    "cookie",
    [
        "jobsite_session=garbage",
        "jobsite_session=" + "A" * 3000,
        'jobsite_session="; user_id=1',
        "jobsite_session=eyJ1c2VyX2lkIjogMX0=.forged.signature",  # {"user_id": 1}, unsigned
    ],
)
async def test_a_bad_session_cookie_is_nobody_signed_in(live, intact, cookie):
    live.run(auth.create_user(live.app.state.db, "root", "pw-1234567", is_admin=True))
    response = await live.client.get("/admin/", headers={"Cookie": cookie})
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login")
    await intact.check(live.client)


async def test_headers_too_large_are_refused_and_the_site_goes_on(live, intact):
    huge = b"X-Padding: " + b"x" * 200_000 + b"\r\n"
    head = b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + huge + b"\r\n"
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(head)
            answer = sock.recv(65536)
        except ConnectionError:  # refused by closing, before all of it was sent
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:100]
    many = b"".join(b"X-%d: y\r\n" % n for n in range(5000))
    status, _, _ = live.raw(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n")
    assert status == 200, "many small headers are simply answered"
    await intact.check(live.client)


@pytest.mark.parametrize(
    "body",
    [
        {"actions": [["generate"]]},
        {"actions": [{"generate": 1}]},
        {"actions": [None]},
        {"actions": [1, 2]},
        {"actions": ["generate"], "commit": ["main"]},
    ],
)
async def test_a_job_request_whose_actions_are_not_names_is_a_400(
    app, client, intact, make_repo, body
):
    headers = await user_headers(app, "alice")
    await app.state.scheduler.set_paused(True)
    await setup_workspace(client, headers, make_repo({"project.yaml": PROJECT_YAML}))
    response = await client.post("/api/v1/workspaces/ws1/job-requests", json=body, headers=headers)
    assert response.status_code == 400, response.text
    assert "must be a" in response.json()["error"]
    assert await app.state.db.fetchval("SELECT count(*) FROM job_requests") == 0
    await intact.check(client, made_here)

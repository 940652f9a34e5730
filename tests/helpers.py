"""What many test modules share: the one way to wait for something, real git repos, a site
over ASGI, the API calls a researcher makes, and jobs written straight into a database.

Test modules (and the benchmarks, which put ``tests/`` on ``sys.path``) import these from
here, never from each other or from a conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import inspect
import json
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from jobsite import auth
from jobsite.config import Settings
from jobsite.db import Database
from jobsite.server import create_app

T = TypeVar("T")

POLL_INTERVAL = 0.05


# -- waiting -------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, message: str = "") -> T:
    """Calls ``predicate`` until it returns something true, and returns that; fails saying
    what it waited for (``message``) when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {message or 'the condition'}")
        time.sleep(POLL_INTERVAL)


async def until(
    predicate: Callable[[], T | Awaitable[T]], timeout: float = 30.0, message: str = ""
) -> T:
    """``wait_until`` for the event loop: ``predicate`` may be sync or async, and the loop
    keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {message or 'the condition'}")
        await asyncio.sleep(POLL_INTERVAL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- git -----------------------------------------------------------------------------------


class GitRepo:
    """A real git repository made by a test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = str(path)

    def git(self, *args: str) -> str:
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }
        return subprocess.run(
            ["git", "-C", str(self.path), *args],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip()

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        for name, content in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self.git("add", "-A")
        self.git("commit", "--quiet", "-m", message)
        return self.git("rev-parse", "HEAD")

    def branch(self, name: str) -> None:
        self.git("checkout", "--quiet", "-B", name)


# -- a site and its API ------------------------------------------------------------------------

PROJECT_YAML = """\
version: "4"
actions:
  generate:
    run: python:v2 -c "mkdir -p output && echo 'n,total' > output/counts.csv && echo made it"
    outputs:
      moderately_sensitive:
        counts: output/counts.csv
"""

# two actions, the second needing the first, that write nothing (for tests of pages and
# their reads, where the jobs never run)
TWO_ACTIONS = """\
version: "4"
actions:
  prepare:
    run: python:v2 -c "echo preparing"
    outputs:
      moderately_sensitive:
        a: output/a.csv
  analyse:
    run: python:v2 -c "echo analysing"
    needs: [prepare]
    outputs:
      moderately_sensitive:
        b: output/b.csv
"""

FINISHED = ("succeeded", "failed", "nothing_to_do")


@contextlib.asynccontextmanager
async def running_site(settings: Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The site started over ``settings`` (its lifespan: database, scheduler), and a client
    talking to it over ASGI; the site stops when the block ends."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield app, client


async def user_headers(
    app: Any, username: str, email: str | None = None, admin: bool = False
) -> dict[str, str]:
    """Makes a user; returns the headers that authenticate as them on the API."""
    user_id = await auth.create_user(
        app.state.db, username, "pw-1234567", email=email, is_admin=admin
    )
    return {"Authorization": f"Bearer {await auth.create_token(app.state.db, user_id, 't')}"}


async def setup_workspace(client, headers, repo, name="ws1"):
    response = await client.post("/api/v1/projects", json={"name": "Study One"}, headers=headers)
    assert response.status_code == 201, response.text
    slug = response.json()["slug"]
    response = await client.post(
        f"/api/v1/projects/{slug}/workspaces",
        json={"name": name, "repo": repo.url, "branch": "main", "database": "sample"},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    return slug


async def submit(client, headers, actions, workspace="ws1"):
    response = await client.post(
        f"/api/v1/workspaces/{workspace}/job-requests", json={"actions": actions}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def job(client, headers, request_id, action):
    data = (await client.get(f"/api/v1/job-requests/{request_id}", headers=headers)).json()
    (found,) = [j for j in data["jobs"] if j["action"] == action]
    return found


async def wait_for_request(client, headers, request_id, timeout=60.0):
    """The job request once it has finished (as the API shows it)."""
    last: dict[str, Any] = {}

    async def finished():
        response = await client.get(f"/api/v1/job-requests/{request_id}", headers=headers)
        last.update(response.json())
        return last if last["status"] in FINISHED else None

    try:
        return await until(finished, timeout, f"job request {request_id} to finish")
    except AssertionError as e:
        raise AssertionError(f"{e}; it is still {last.get('status')}: {last}") from None


async def add_request(app, workspace, username, jobs, existing=None):
    """A job request whose jobs wait on each other, written as submit.py writes one.

    ``jobs`` is a list of (action, shell command, actions it needs); a needed action found
    in ``existing`` (action -> job id) waits on that earlier job. The planner decides these
    links in real use; writing them here keeps these tests about the scheduler.
    """
    db = app.state.db
    ws = await db.fetchone("SELECT * FROM workspaces WHERE name = ?", (workspace,))
    user_id = await db.fetchval("SELECT id FROM users WHERE username = ?", (username,))
    now = time.time()
    ids = dict(existing or {})
    async with db.transaction() as conn:
        cur = await conn.execute(
            "INSERT INTO job_requests (workspace_id, created_by, branch, sha, requested_actions, "
            "created_at) VALUES (?, ?, 'main', 'HEAD', ?, ?)",
            (ws["id"], user_id, json.dumps([a for a, _, _ in jobs]), now),
        )
        request_id = cur.lastrowid
        sha = await app.state.repos.resolve_branch(ws["repo"], "main")
        for offset, (action, command, needs) in enumerate(jobs):
            ids[action] = secrets.token_hex(8)
            await conn.execute(
                "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
                "run_command, image, args, outputs, needs, wait_for, state, status_code, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', "
                "'created', ?, ?)",
                (
                    ids[action],
                    request_id,
                    ws["id"],
                    user_id,
                    action,
                    sha,
                    f"python:v2 -c {command!r}",
                    "ghcr.io/opensafely-core/python:v2",
                    json.dumps(["-c", command]),
                    json.dumps({"moderately_sensitive": {"out": f"output/{action}.csv"}}),
                    json.dumps(list(needs)),
                    json.dumps([ids[n] for n in needs]),
                    now + offset * 1e-6,
                    now,
                ),
            )
    app.state.scheduler.wake()
    return request_id, {action: ids[action] for action, _, _ in jobs}


class Browser:
    """One person's session: cookies kept, the CSRF token read from each page."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.csrf = ""

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        response = await self.client.get(url, **kwargs)
        found = re.search(r'name="csrf_token" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    async def post(self, url: str, data: dict | list | None = None) -> httpx.Response:
        if not self.csrf:
            await self.get("/")
        items = list(data.items()) if isinstance(data, dict) else list(data or [])
        form: dict[str, list[str]] = {"csrf_token": [self.csrf]}
        for key, value in items:
            form.setdefault(key, []).append(value)
        return await self.client.post(url, data=form)


def text(response: httpx.Response) -> str:
    """The page's visible text, roughly: tags dropped, entities decoded, spaces squeezed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", response.text, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


# -- jobs written straight into a database -------------------------------------------------


class Site:
    """One user, project and workspace in ``db``; ``add_job`` records jobs in them, for
    tests of what is read back (emails, metrics, pruning) without running anything."""

    def __init__(self, db: Database, user_id: int, workspace_id: int) -> None:
        self.db = db
        self.user_id = user_id
        self.workspace_id = workspace_id

    @classmethod
    async def make(
        cls,
        db: Database,
        username: str = "alice",
        email: str | None = "alice@example.org",
        workspace: str = "ws1",
    ) -> Site:
        user_id = await auth.create_user(db, username, "pw-1234567", email=email)
        now = time.time()
        project_id = await db.execute(
            "INSERT INTO projects (slug, name, created_by, created_at) VALUES (?, ?, ?, ?)",
            (f"{workspace}-study", f"{workspace} study", user_id, now),
        )
        workspace_id = await db.execute(
            "INSERT INTO workspaces (name, project_id, repo, branch, database, created_by, "
            "created_at) VALUES (?, ?, '/repo', 'main', 'sample', ?, ?)",
            (workspace, project_id, user_id, now),
        )
        return cls(db, user_id, workspace_id)

    async def add_job(
        self,
        action: str = "generate",
        *,
        state: str = "succeeded",
        status_code: str = "succeeded",
        status_message: str = "Completed successfully",
        notify: bool = True,
        created_at: float | None = None,
        wait: float | None = 2.0,
        duration: float | None = 65.0,
    ) -> str:
        """A job created at ``created_at`` that started ``wait`` seconds later (None: never)
        and, when finished, ended ``duration`` seconds after starting."""
        created = time.time() - 3600 if created_at is None else created_at
        started = None if wait is None else created + wait
        completed = None
        if state in ("succeeded", "failed"):
            completed = (started + duration) if started is not None else created + 1
        request_id = await self.db.execute(
            "INSERT INTO job_requests (workspace_id, created_by, branch, sha, requested_actions, "
            "notify, created_at) VALUES (?, ?, 'main', 'abc123', ?, ?, ?)",
            (self.workspace_id, self.user_id, f'["{action}"]', int(notify), created),
        )
        job_id = secrets.token_hex(8)
        await self.db.execute(
            "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
            "run_command, image, args, outputs, state, status_code, status_message, created_at, "
            "started_at, completed_at, updated_at) VALUES (?, ?, ?, ?, ?, 'abc123', "
            "'python:v2 analysis.py', 'python:v2', '[]', '{}', ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                request_id,
                self.workspace_id,
                self.user_id,
                action,
                state,
                status_code,
                status_message,
                created,
                started,
                completed,
                completed or created,
            ),
        )
        return job_id


# -- a real server on loopback, and what must hold after an attack --------------------------


@contextlib.contextmanager
def serve(app: Any, grace: float | None = None) -> Iterator[tuple[str, asyncio.AbstractEventLoop]]:
    """uvicorn serving ``app`` (its lifespan too) in a thread on a free loopback port; yields
    the base URL and the server's event loop, and stops the server when the block ends
    (stopping requests still running after ``grace`` seconds, as `jobsite serve` does)."""
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            ws="none",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=grace,
        )
    )
    loops: list[asyncio.AbstractEventLoop] = []

    async def run() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[sock])

    thread = threading.Thread(target=asyncio.run, args=(run(),), name="live-server")
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 15, "the live server to start")
        if not server.started:
            raise RuntimeError("the live server did not start; see the log above")
        yield f"http://127.0.0.1:{port}", loops[0]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
    assert not thread.is_alive(), "the live server did not stop within 60 s"


def raw_request(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes
) -> socket.socket:
    """A request sent by hand on its own connection, so the test decides when (or whether)
    the body ends: a Content-Length longer than ``body`` is a client still uploading."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def slow_upload(url: str, headers: dict[str, str]) -> socket.socket:
    """A new-project API request whose client sends its headers and the start of its body,
    then nothing more: it holds one of the site's places until the socket is closed."""
    more = {**headers, "Content-Type": "application/json", "Content-Length": "100"}
    return raw_request(url, "POST", "/api/v1/projects", more, b'{"name": ')


def files_under(root: Path, skip: Path | None = None) -> set[str]:
    """Every path under ``root`` (links not followed), relative to it, leaving out ``skip``."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            found.add(str((here / name).relative_to(root)))
    return found


class Intact:
    """What must hold after every hostile scenario: the site answers its health check, the
    database passes ``PRAGMA integrity_check``, and nothing appeared outside the data dir.

    Made by the ``intact`` fixture before the attack (it notes every file under the test's
    temporary dir, the data dir left out); ``await intact.check(client)`` after it."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root = root
        self.data_dir = data_dir
        self.before = files_under(root, skip=data_dir)

    def new_files(self, allowed: Callable[[str], bool] = lambda path: False) -> set[str]:
        """Paths under the temporary dir, outside the data dir, that were not there before
        (less those ``allowed`` accepts: files the test itself made)."""
        now = files_under(self.root, skip=self.data_dir)
        return {path for path in now - self.before if not allowed(path)}

    def database_ok(self) -> str:
        import sqlite3

        db = self.data_dir / "db.sqlite"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as error:
            return f"damaged: {error}"
        finally:
            conn.close()

    async def check(
        self, client: httpx.AsyncClient, allowed: Callable[[str], bool] = lambda path: False
    ) -> None:
        response = await client.get("/api/v1/health")
        assert response.status_code == 200, f"health check answered {response.status_code}"
        assert self.database_ok() == "ok"
        assert self.new_files(allowed) == set(), "files appeared outside the data dir"


# -- a fake GitHub on loopback ---------------------------------------------------------------


class FakeGitHub:
    """Just enough of a GitHub Enterprise server for the OAuth web flow and the API calls
    the site makes, served by uvicorn on loopback."""

    CLIENT_ID = "client-123"
    CLIENT_SECRET = "secret-456"

    def __init__(self) -> None:
        self.accounts = {
            "octocat": {"id": 583231, "login": "octocat", "name": "Mona Lisa", "email": None},
            "hubot": {"id": 1000, "login": "hubot", "name": "", "email": "hubot@example.org"},
        }
        self.emails = [
            {"email": "old@example.org", "primary": False, "verified": True},
            {"email": "mona@example.org", "primary": True, "verified": True},
        ]
        self.repos = [
            {
                "full_name": f"octocat/study-{n}",
                "html_url": f"https://github.example/octocat/study-{n}",
                "private": n % 2 == 0,
                "default_branch": "main",
            }
            for n in range(150)
        ]
        self.signing_in = "octocat"
        self.orgs: dict[str, set[str]] = {"opensafely": {"octocat"}}  # org -> member logins
        self.invited: set[str] = set()  # logins invited to every org, not yet members
        self.memberships_fail = False  # GitHub answers 500 when asked about a membership
        self.scopes: list[str] = []  # the scope each sign-in asked for
        self.codes: dict[str, tuple[str, str]] = {}
        self.tokens: dict[str, str] = {}
        self.url = ""

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/login/oauth/authorize", self.authorize),
                Route("/login/oauth/access_token", self.access_token, methods=["POST"]),
                Route("/api/v3/user", self.user),
                Route("/api/v3/user/emails", self.user_emails),
                Route("/api/v3/user/repos", self.user_repos),
                Route("/api/v3/user/memberships/orgs/{org}", self.membership),
            ]
        )

    async def authorize(self, request: Request) -> Response:
        params = request.query_params
        assert params["client_id"] == self.CLIENT_ID
        self.scopes.append(params["scope"])
        code = secrets.token_hex(8)
        self.codes[code] = (self.signing_in, params["redirect_uri"])
        query = httpx.QueryParams(code=code, state=params["state"])
        return RedirectResponse(f"{params['redirect_uri']}?{query}", status_code=302)

    async def access_token(self, request: Request) -> Response:
        form = await request.form()
        assert request.headers["accept"] == "application/json"
        assert form["client_id"] == self.CLIENT_ID
        assert form["client_secret"] == self.CLIENT_SECRET
        login, redirect_uri = self.codes.pop(str(form["code"]), (None, None))
        if login is None or form["redirect_uri"] != redirect_uri:
            return JSONResponse(
                {
                    "error": "bad_verification_code",
                    "error_description": "The code passed is incorrect or expired.",
                }
            )
        token = "gho_" + secrets.token_hex(16)
        self.tokens[token] = login
        return JSONResponse({"access_token": token, "token_type": "bearer", "scope": "user:email"})

    def account(self, request: Request) -> dict[str, Any] | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        login = self.tokens.get(token)
        return self.accounts[login] if login else None

    async def user(self, request: Request) -> Response:
        account = self.account(request)
        if account is None:
            return JSONResponse({"message": "Bad credentials"}, status_code=401)
        return JSONResponse(account)

    async def user_emails(self, request: Request) -> Response:
        if self.account(request) is None:
            return JSONResponse({"message": "Bad credentials"}, status_code=401)
        if self.emails is None:
            return JSONResponse({"message": "Resource not accessible"}, status_code=403)
        return JSONResponse(self.emails)

    async def membership(self, request: Request) -> Response:
        """GitHub's answer for one's own membership of an org: 404 when not a member."""
        account = self.account(request)
        if account is None:
            return JSONResponse({"message": "Bad credentials"}, status_code=401)
        if self.memberships_fail:
            return JSONResponse({"message": "Server Error"}, status_code=500)
        org = request.path_params["org"]
        login = account["login"]
        if login in self.invited:
            return JSONResponse({"state": "pending", "organization": {"login": org}})
        if login not in self.orgs.get(org, set()):
            return JSONResponse({"message": "Not Found"}, status_code=404)
        return JSONResponse({"state": "active", "role": "member", "organization": {"login": org}})

    async def user_repos(self, request: Request) -> Response:
        if self.account(request) is None:
            return JSONResponse({"message": "Bad credentials"}, status_code=401)
        page = int(request.query_params.get("page", 1))
        per_page = int(request.query_params["per_page"])
        chunk = self.repos[(page - 1) * per_page : page * per_page]
        headers = {}
        if page * per_page < len(self.repos):
            next_url = f"{self.url}/api/v3/user/repos?per_page={per_page}&page={page + 1}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        return JSONResponse(chunk, headers=headers)


async def through_github(client: httpx.AsyncClient, fake: FakeGitHub, next: str = "/"):
    """Follows the OAuth web flow as a browser does: to GitHub and back to the site."""
    response = await client.get("/auth/github", params={"next": next})
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith(f"{fake.url}/login/oauth/authorize?")
    async with httpx.AsyncClient() as browser:
        at_github = await browser.get(location)
    assert at_github.status_code == 302
    back = httpx.URL(at_github.headers["location"])
    assert back.path == "/auth/github/callback"
    return await client.get(back.path, params=back.params)


# -- the site as its own process -------------------------------------------------------------


class ServeProcess:
    """`jobsite serve` in a subprocess over a settings file, on a free loopback port, its
    output in ``log``: a server that can really be killed (SIGKILL) and started again."""

    def __init__(self, config: Path, log: Path, **env: str) -> None:
        import sys

        self.command = [str(Path(sys.executable).with_name("jobsite")), "serve"]
        self.config = config
        self.log = log
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> str:
        """Starts the server; returns its base URL once it answers its health check."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "JOBSITE_CONFIG": str(self.config), "JOBSITE_PORT": str(port)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command, env={**env, **self.env}, stdout=log, stderr=log
            )

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, timeout, "jobsite serve to answer")
        return self.url

    def _proc_file(self, name: str) -> str:
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/{name}").read_text()

    def rss_mb(self) -> float:
        """The server's resident memory now, in MiB."""
        for line in self._proc_file("status").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc status")

    def cpu_seconds(self) -> float:
        """CPU time the server (and the processes it waited for, such as git) used so far."""
        fields = self._proc_file("stat").rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def log_says(self, text: str) -> int:
        """How many times ``text`` is in the server's output so far."""
        return self.log.read_text(errors="replace").count(text)

    def __enter__(self) -> ServeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no clean-up, as when a machine loses power."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

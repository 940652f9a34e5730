"""Who may do what (DESIGN section 10): every route of the app, asked by every kind of
user, on a public site and on a private one.

One site is built for the whole module: a project "Study" with a workspace, a finished
job with a log, and one user per role. Each case below is one route with a request that
succeeds when allowed (and can be repeated), and the rule that says who is allowed.
test_every_route_is_in_the_matrix fails when a route is added without a case here.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from helpers import GitRepo
from starlette.routing import Mount, Route

from jobsite import auth
from jobsite.config import GitHub, load_settings
from jobsite.outputs import Manifest
from jobsite.server import create_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

PASSWORD = "a long password"
ROLES = ("anonymous", "outsider", "collaborator", "output_viewer", "developer", "admin")
SECRET_LOG = "the log line only output viewers read"
PROJECT_YAML = """\
version: "4"
actions:
  generate:
    run: python:v2 -c "echo hi > output/a.csv"
    outputs:
      moderately_sensitive:
        a: output/a.csv
"""
OK, SIGN_IN, REFUSED, NOT_FOUND = "ok", "sign in", "refused", "not found"
FIGURE = '<svg xmlns="http://www.w3.org/2000/svg"><text>the figure only viewers see</text></svg>'


def rule_anyone(role: str, public: bool) -> str:
    return OK


def rule_signed_in(role: str, public: bool) -> str:
    return SIGN_IN if role == "anonymous" else OK


def hidden(rule: Callable[[str, bool], str]) -> Callable[[str, bool], str]:
    """A route about a project's things: on a private site, whoever is not a member
    (signed in or not) is told it does not exist, as for a missing one."""

    def hiding(role: str, public: bool) -> str:
        if not public and role in ("anonymous", "outsider"):
            return NOT_FOUND
        return rule(role, public)

    hiding.__name__ = f"hidden {rule.__name__}"
    return hiding


@hidden
def rule_viewer(role: str, public: bool) -> str:
    """Browsing a project: anyone on a public site; on a private one, its members."""
    return OK


def rule_status(role: str, public: bool) -> str:
    """The queue in the open: anyone on a public site; on a private one, signed-in users."""
    return SIGN_IN if role == "anonymous" and not public else OK


def needs(*roles: str) -> Callable[[str, bool], str]:
    def rule(role: str, public: bool) -> str:
        if role == "anonymous":
            return SIGN_IN
        return OK if role in (*roles, "admin") else REFUSED

    rule.__name__ = f"needs {' or '.join(roles) or 'admin'}"
    return rule


rule_developer = hidden(needs("developer"))
rule_output_viewer = hidden(needs("output_viewer"))
rule_admin = needs()

_unique = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}{next(_unique)}"


@dataclass
class Case:
    route: str  # the path as the routes table writes it
    method: str
    rule: Callable[[str, bool], str]
    url: str  # formatted with the world's ids
    ok: int = 200  # the status when allowed
    json: Callable[[], Any] | None = None
    form: Callable[[], dict[str, Any]] | None = None
    setup: Callable[[World, str], Awaitable[dict[str, Any]]] | None = None
    shows: tuple[str, Callable[[str, bool], str]] | None = None  # text shown only when allowed
    own_session: bool = False  # sent from a session of its own (signing out ends it)

    @property
    def api(self) -> bool:
        return self.route.startswith("/api/")

    def __str__(self) -> str:
        return f"{self.method} {self.route}"


async def with_bystander(world: World, role: str) -> dict[str, Any]:
    """Makes 'bystander' a developer of Study, so there is someone to remove."""
    await world.db.execute(
        "INSERT OR IGNORE INTO project_members (project_id, user_id, role) "
        "VALUES (?, ?, 'developer')",
        (world.project_id, world.user_ids["bystander"]),
    )
    return {}


async def with_a_figure(world: World, role: str) -> dict[str, Any]:
    """An SVG output of ws1 that output viewers may see, recorded as a job records one."""
    ws = world.app.state.settings.data.workspace("ws1")
    (ws / "output").mkdir(parents=True, exist_ok=True)
    (ws / "output/plot.svg").write_text(FIGURE)
    manifest = Manifest.load(ws)
    entry = {"action": "generate", "job": world.ids["job_id"], "level": "moderately_sensitive",
             "size": len(FIGURE), "visible": True, "not_visible_because": None}  # fmt: skip
    manifest.record_action("generate", world.ids["job_id"], "sha", {"output/plot.svg": entry})
    (ws / "metadata").mkdir(exist_ok=True)
    (ws / "metadata/manifest.json").write_text(manifest.dumps())
    return {}


async def with_own_token(world: World, role: str) -> dict[str, Any]:
    user_id = world.user_ids.get(role)
    if user_id is None:  # anonymous: someone's token, which they must not reach
        user_id = world.user_ids["bystander"]
    await auth.create_token(world.db, user_id, "to revoke")
    return {"token_id": await world.db.fetchval("SELECT max(id) FROM api_tokens")}


def new_workspace() -> dict[str, Any]:
    return {"name": unique("ws-"), "repo": "{repo}", "branch": "main", "database": "sample"}


CASES = [
    # the JSON API (Authorization: Bearer <token>)
    Case("/api/v1/health", "GET", rule_anyone, "/api/v1/health"),
    Case("/api/v1/openapi.json", "GET", rule_anyone, "/api/v1/openapi.json"),
    Case("/api/v1/github/repos", "GET", rule_signed_in, "/api/v1/github/repos", ok=400),
    Case("/api/v1/projects", "POST", rule_signed_in, "/api/v1/projects", 201,
         json=lambda: {"name": unique("Project ")}),
    Case("/api/v1/projects/{slug}/members", "GET", rule_viewer, "/api/v1/projects/study/members"),
    Case("/api/v1/projects/{slug}/members", "POST", rule_developer,
         "/api/v1/projects/study/members",
         json=lambda: {"username": "bystander", "roles": ["developer"]}),
    Case("/api/v1/projects/{slug}/members/{username}", "DELETE", rule_developer,
         "/api/v1/projects/study/members/bystander", 204, setup=with_bystander),
    Case("/api/v1/projects/{slug}/workspaces", "POST", rule_developer,
         "/api/v1/projects/study/workspaces", 201, json=new_workspace),
    Case("/api/v1/workspaces/{name}", "GET", rule_viewer, "/api/v1/workspaces/ws1"),
    Case("/api/v1/workspaces/{name}", "PATCH", rule_developer, "/api/v1/workspaces/ws1",
         json=lambda: {"branch": "main"}),  # stays on main: other cases run jobs in it
    Case("/api/v1/status", "GET", rule_status, "/api/v1/status"),
    Case("/api/v1/workspaces/{name}/job-requests", "POST", rule_developer,
         "/api/v1/workspaces/ws1/job-requests", 201, json=lambda: {"actions": ["generate"]}),
    Case("/api/v1/workspaces/{name}/outputs", "GET", rule_output_viewer,
         "/api/v1/workspaces/ws1/outputs"),
    Case("/api/v1/job-requests/{id}", "GET", rule_viewer, "/api/v1/job-requests/{request_id}"),
    Case("/api/v1/job-requests/{id}/cancel", "POST", rule_developer,
         "/api/v1/job-requests/{request_id}/cancel", json=lambda: {}),
    Case("/api/v1/jobs/{id}", "GET", rule_viewer, "/api/v1/jobs/{job_id}"),
    Case("/api/v1/jobs/{id}/log", "GET", rule_output_viewer, "/api/v1/jobs/{job_id}/log",
         shows=(SECRET_LOG, rule_output_viewer)),
    Case("/api/v1/admin/outbox", "GET", rule_admin, "/api/v1/admin/outbox"),
    Case("/api/v1/admin/queue", "GET", rule_admin, "/api/v1/admin/queue"),
    Case("/api/v1/admin/queue/pause", "POST", rule_admin, "/api/v1/admin/queue/pause"),
    Case("/api/v1/admin/queue/resume", "POST", rule_admin, "/api/v1/admin/queue/resume"),
    Case("/api/v1/job-requests/{id}/priority", "POST", hidden(rule_admin),
         "/api/v1/job-requests/{request_id}/priority", json=lambda: {"priority": 0}),
    # pages (a browser session; forms carry the CSRF token)
    # metrics: anyone on this machine (these requests come from 127.0.0.1)
    Case("/metrics", "GET", rule_anyone, "/metrics"),
    Case("/static", "GET", rule_anyone, "/static/jobsite.css"),
    Case("/", "GET", rule_anyone, "/"),
    Case("/login", "GET", rule_anyone, "/login"),
    Case("/login", "POST", rule_anyone, "/login", 400,
         form=lambda: {"username": "nobody", "password": "wrong"}),
    Case("/logout", "POST", rule_anyone, "/logout", 303, form=dict, own_session=True),
    Case("/auth/github", "GET", rule_anyone, "/auth/github", 303),
    Case("/auth/github/callback", "GET", rule_anyone, "/auth/github/callback?code=c&state=s",
         400),
    Case("/account", "GET", rule_signed_in, "/account"),
    # a wrong current password: a real change would sign out this role's session
    Case("/account/password", "POST", rule_signed_in, "/account/password", 400,
         form=lambda: {"current_password": "not it", "new_password": PASSWORD,
                       "confirm_password": PASSWORD}),
    Case("/account/tokens", "POST", rule_signed_in, "/account/tokens",
         form=lambda: {"name": "matrix"}),
    Case("/account/tokens/{id}/revoke", "POST", rule_signed_in,
         "/account/tokens/{token_id}/revoke", 303, form=dict, setup=with_own_token),
    Case("/status", "GET", rule_status, "/status"),
    Case("/admin/", "GET", rule_admin, "/admin/"),
    Case("/admin/pause", "POST", rule_admin, "/admin/pause", 303,
         form=lambda: {"paused": "1"}),  # stays paused: no job of this module may start
    Case("/admin/priority", "POST", rule_admin, "/admin/priority", 303,
         form=lambda: {"job_request_id": "{request_id}", "priority": "0"}),
    Case("/admin/users", "GET", rule_admin, "/admin/users"),
    Case("/admin/users", "POST", rule_admin, "/admin/users",
         form=lambda: {"username": unique("user")}),
    Case("/admin/users/{id}/{action}", "POST", rule_admin,
         "/admin/users/{bystander_id}/activate", form=dict),
    Case("/projects/{slug}/", "GET", rule_viewer, "/projects/study/"),
    Case("/projects/", "POST", rule_signed_in, "/projects/", 303,
         form=lambda: {"name": unique("Project ")}),
    Case("/projects/{slug}/new-workspace", "GET", rule_developer,
         "/projects/study/new-workspace"),
    Case("/projects/{slug}/new-workspace", "POST", rule_developer,
         "/projects/study/new-workspace", 303, form=new_workspace),
    Case("/projects/{slug}/new-workspace/branches", "GET", rule_developer,
         "/projects/study/new-workspace/branches?repo={repo}",
         shows=('<option value="main"', rule_developer)),
    Case("/projects/{slug}/members", "POST", rule_developer, "/projects/study/members", 303,
         form=lambda: {"username": "bystander", "roles": "developer"}),
    Case("/projects/{slug}/members/{username}/remove", "POST", rule_developer,
         "/projects/study/members/bystander/remove", 303, form=dict, setup=with_bystander),
    Case("/jobs/{id}", "GET", rule_viewer, "/jobs/{job_id}",
         shows=(SECRET_LOG, rule_output_viewer)),
    Case("/jobs/{id}/log", "GET", rule_output_viewer, "/jobs/{job_id}/log",
         shows=(SECRET_LOG, rule_output_viewer)),
    Case("/{workspace}/", "GET", rule_viewer, "/ws1/"),
    Case("/{workspace}/", "POST", rule_developer, "/ws1/", 303,
         form=lambda: {"actions": "generate"}),
    Case("/{workspace}/archive", "POST", rule_developer, "/ws1/archive", 303,
         form=lambda: {"archived": "0"}),  # stays open: other cases run jobs in it
    Case("/{workspace}/branch", "POST", rule_developer, "/ws1/branch", 303,
         form=lambda: {"branch": "main"}),
    Case("/{workspace}/outputs/{path:path}", "GET", rule_output_viewer, "/ws1/outputs/"),
    Case("/{workspace}/output-files/{path:path}", "GET", rule_output_viewer,
         "/ws1/output-files/output/plot.svg", setup=with_a_figure,
         shows=(FIGURE, rule_output_viewer)),
    Case("/{workspace}/logs", "GET", rule_viewer, "/ws1/logs"),
    Case("/{workspace}/logs/{id}", "GET", rule_viewer, "/ws1/logs/{request_id}"),
    Case("/{workspace}/logs/{id}/cancel", "POST", rule_developer,
         "/ws1/logs/{request_id}/cancel", 303, form=dict),
    Case("/{workspace}/logs/{id}/rerun", "POST", rule_developer,
         "/ws1/logs/{request_id}/rerun", 303, form=dict),
]  # fmt: skip


class World:
    """The site every case runs against, with a signed-in client per role."""

    app: Any
    db: Any
    project_id: int
    user_ids: dict[str, int]
    tokens: dict[str, str]
    transport: httpx.ASGITransport
    sessions: dict[str, httpx.AsyncClient]
    csrf: dict[str, str]
    ids: dict[str, Any]


@pytest.fixture(scope="module")
def cheap_scrypt():
    """Passwords hashed at a lower cost, for speed: test_auth checks the real cost."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(auth._SCRYPT, "n", 2**10)
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory, cheap_scrypt):
    root = tmp_path_factory.mktemp("access")
    (root / "repos" / "study").mkdir(parents=True)
    repo = GitRepo(root / "repos" / "study")
    repo.git("init", "--quiet", "-b", "main")
    repo.commit({"project.yaml": PROJECT_YAML})
    settings = load_settings(
        environ={},
        data_dir=str(root / "data"),
        repos={"allow": [f"{root / 'repos'}/*"]},
        max_workers=1,
        max_jobs_per_user=0,  # jobs wait, however the queue is switched: no container starts
    )
    # configured so the sign-in pages answer; no request ever reaches this address
    settings.github = GitHub(client_id="id", client_secret="secret", base_url="http://127.0.0.1:9")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        w = World()
        w.app, w.db = app, app.state.db
        app.state.sign_in_throttle = auth.SignInThrottle(10_000, 10_000, window=1)
        await app.state.scheduler.set_paused(True)
        db = app.state.db
        w.user_ids = {}
        for name in (*ROLES[1:], "bystander"):
            w.user_ids[name] = await auth.create_user(db, name, PASSWORD, is_admin=name == "admin")
        w.project_id = await db.execute(
            "INSERT INTO projects (slug, name, created_at) VALUES ('study', 'Study', 0)"
        )
        other = await db.execute(
            "INSERT INTO projects (slug, name, created_at) VALUES ('other', 'Other', 0)"
        )
        for role in auth.ROLES:
            await db.execute(
                "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, ?)",
                (other, w.user_ids["outsider"], role),
            )
            if role in w.user_ids:
                await db.execute(
                    "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, ?)",
                    (w.project_id, w.user_ids[role], role),
                )
        await db.execute(
            "INSERT INTO workspaces (name, project_id, repo, branch, database, created_at) "
            "VALUES ('ws1', ?, ?, 'main', 'sample', 0)",
            (w.project_id, repo.url),
        )
        w.tokens = {
            name: await auth.create_token(db, user_id, "matrix")
            for name, user_id in w.user_ids.items()
        }

        transport = httpx.ASGITransport(app=app)
        w.transport = transport
        w.sessions, w.csrf = {}, {}
        for role in ROLES:
            w.sessions[role], w.csrf[role] = await signed_in(transport, role)

        # a finished job with a log, made the way the site makes jobs
        response = await w.sessions["anonymous"].post(
            "/api/v1/workspaces/ws1/job-requests",
            json={"actions": ["generate"]},
            headers={"Authorization": f"Bearer {w.tokens['developer']}"},
        )
        assert response.status_code == 201, response.text
        created = response.json()
        job_id = created["jobs"][0]["id"]
        await db.execute(
            "UPDATE jobs SET state = 'succeeded', status_code = 'succeeded' WHERE id = ?",
            (job_id,),
        )
        (settings.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        (settings.data_dir / "logs" / f"{job_id}.log").write_text(SECRET_LOG)
        w.ids = {
            "request_id": created["id"],
            "job_id": job_id,
            "bystander_id": w.user_ids["bystander"],
            "repo": repo.url,
        }
        yield w
        for client in w.sessions.values():
            await client.aclose()


async def signed_in(transport: httpx.ASGITransport, role: str) -> tuple[httpx.AsyncClient, str]:
    """A browser session signed in as ``role`` (or not, for anonymous), and its CSRF token."""
    client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
    page = await client.get("/login")
    csrf = page.text.split('"X-CSRF-Token": "')[1].split('"')[0]
    if role != "anonymous":
        await client.post(
            "/login", data={"username": role, "password": PASSWORD, "csrf_token": csrf}
        )
        page = await client.get("/account")
        csrf = page.text.split('"X-CSRF-Token": "')[1].split('"')[0]
    return client, csrf


def fill(value: Any, ids: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: fill(v, ids) for k, v in value.items()}
    return value


async def ask(world: World, case: Case, role: str) -> httpx.Response:
    ids = {**world.ids, **(await case.setup(world, role) if case.setup else {})}
    url = fill(case.url, ids)
    client = world.sessions[role]
    if case.api:
        headers = {"Authorization": f"Bearer {world.tokens[role]}"} if role in world.tokens else {}
        body = fill(case.json(), ids) if case.json else None
        return await client.request(case.method, url, json=body, headers=headers)
    if case.form is None:
        return await client.request(case.method, url)
    if case.own_session:
        own, csrf = await signed_in(world.transport, role)
        try:
            return await own.request(
                case.method, url, data={**fill(case.form(), ids), "csrf_token": csrf}
            )
        finally:
            await own.aclose()
    saved = list(client.cookies.jar)  # a sign-out must not end the session other cases use
    form = {**fill(case.form(), ids), "csrf_token": world.csrf[role]}
    response = await client.request(case.method, url, data=form)
    client.cookies.jar.clear()
    for cookie in saved:
        client.cookies.jar.set_cookie(cookie)
    return response


@pytest.mark.parametrize("public", [True, False], ids=["public", "private"])
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", CASES, ids=str)
async def test_who_may_do_what(world, case, role, public):
    world.app.state.settings.public_status = public
    response = await ask(world, case, role)
    expected = case.rule(role, public)
    where = f"{case} as {role} on a {'public' if public else 'private'} site"
    location = response.headers.get("location", "")
    if expected == OK:
        assert response.status_code == case.ok, f"{where}: {response.text[:500]}"
        assert not location.startswith("/login"), where
    elif expected == SIGN_IN:
        if case.api:
            assert response.status_code == 401, f"{where}: {response.text[:500]}"
            assert "sign in" in response.json()["error"]
        else:
            assert response.status_code == 303, f"{where}: {response.text[:500]}"
            assert location.startswith("/login?next="), where
    elif expected == NOT_FOUND:
        assert response.status_code == 404, f"{where}: {response.text[:500]}"
        assert "that you can see" in response.text, where
    else:
        assert response.status_code == 403, f"{where}: {response.text[:500]}"
        if case.api:
            assert response.json()["error"]
        else:
            assert "Not allowed" in response.text
    if case.shows:
        text, rule = case.shows
        assert (text in response.text) == (rule(role, public) == OK), where


async def test_every_route_is_in_the_matrix(world):
    routes = set()
    for route in world.app.routes:
        if isinstance(route, Mount):
            routes.add((route.path, "GET"))
        elif isinstance(route, Route):
            routes.update((route.path, method) for method in route.methods - {"HEAD"})
    in_matrix = {(case.route, case.method) for case in CASES}
    assert routes - in_matrix == set(), "routes with no case in test_access.CASES"
    assert in_matrix - routes == set(), "cases for routes the app does not have"

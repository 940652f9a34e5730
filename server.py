"""The web app: routes, page and API handlers, and the lifespan that runs the scheduler."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from . import auth, metrics, notify, pipeline
from .auth import User
from .config import Settings
from .datadir import DataDir
from .db import Database, Row
from .local_docker import LocalDockerExecutor
from .outputs import Manifest
from .repos import BranchNotFound, FileNotFound, RepoError, Repos, check_allowed
from .runner import Scheduler
from .submit import SubmitError, iso, job_json, job_request_json, submit

log = logging.getLogger("jobsite.server")

ROOT = Path(__file__).parent
WORKSPACE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# first path segments the site itself uses; a workspace may not take one as its name
RESERVED_NAMES = {
    "login", "logout", "admin", "api", "static", "projects", "jobs", "account", "auth",
    "settings", "metrics", "health", "new", "users", "favicon.ico", "robots.txt",
}  # fmt: skip


class ApiError(Exception):
    """An error for the person asking: answered as JSON on the API, as a page elsewhere."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


HANDLED_ERRORS = (ApiError, RepoError, SubmitError, HTTPException, pipeline.ProjectValidationError)


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def secret_key(data_dir: Path) -> str:
    """The session signing key, made on first start and kept private to the site."""
    path = DataDir(data_dir).secret_key
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


# -- request helpers --------------------------------------------------------------------


def app_state(request: Request) -> Any:
    return request.app.state


async def current_user(request: Request) -> User | None:
    if "user" in request.state._state:
        return request.state.user
    state = app_state(request)
    user = None
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        user = await auth.authenticate_token(state.db, header[7:].strip())
        if user is None:
            raise ApiError(401, "the API token is not valid; create a new one on your account page")
        request.state.via_token = True
    elif "user_id" in request.session:
        user = await auth.load_session_user(state.db, request.session)
        if user is None:
            request.session.clear()
    request.state.user = user
    return user


async def require_user(request: Request) -> User:
    user = await current_user(request)
    if user is None:
        raise ApiError(401, "sign in first")
    await check_csrf(request)
    return user


def api(handler: Callable[[Request], Awaitable[Response]]) -> Callable:
    """An API endpoint: whoever the token names is known (or refused) before anything else."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        await current_user(request)
        return await handler(request)

    return endpoint


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def check_csrf(request: Request) -> None:
    """Unsafe requests authenticated by the session cookie must carry the CSRF token."""
    if request.method in ("GET", "HEAD", "OPTIONS") or getattr(request.state, "via_token", False):
        return
    submitted = request.headers.get(auth.CSRF_HEADER)
    if submitted is None and "form" in request.headers.get("content-type", ""):
        form = await request.form()
        submitted = form.get(auth.CSRF_FIELD)
    if not auth.csrf_ok(request, submitted):
        raise ApiError(403, "the form has expired or came from another site; reload the page")


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type = str, required: bool = True) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"{name} is required")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{name} must be a {kind.__name__}")
    return value


async def _visible(request: Request, row: Row | None, kind: str, key: str) -> Row:
    """A row the asker looked up by ``key``: 404 when missing, then the project's visibility."""
    if row is None:
        raise ApiError(404, f"there is no {kind} {key!r}")
    await check_can_view(request, row["project_id"])
    return row


async def get_project(request: Request, slug: str) -> Row:
    project = await app_state(request).db.fetchone(
        "SELECT *, id AS project_id FROM projects WHERE slug = ?", (slug,)
    )
    return await _visible(request, project, "project", slug)


async def get_workspace(request: Request, name: str) -> Row:
    workspace = await app_state(request).db.fetchone(
        "SELECT w.*, p.slug AS project_slug, p.name AS project_name FROM workspaces w "
        "JOIN projects p ON p.id = w.project_id WHERE w.name = ?",
        (name,),
    )
    return await _visible(request, workspace, "workspace", name)


async def check_can_view(request: Request, project_id: int) -> None:
    user = await current_user(request)  # a bad token is refused even where none is needed
    if app_state(request).settings.public_status:
        return
    if user is None:
        raise ApiError(401, "sign in to see this project")
    if not user.is_member(project_id):
        raise ApiError(403, "only members of this project can see it")


async def check_role(request: Request, project_id: int, *roles: str) -> User:
    user = await require_user(request)
    if not user.has_role(project_id, *roles):
        raise ApiError(403, f"you need the {' or '.join(roles)} role on this project to do that")
    return user


async def get_job(request: Request, job_id: str) -> Row:
    job = await app_state(request).db.fetchone(
        "SELECT j.*, w.name AS workspace, w.project_id FROM jobs j "
        "JOIN workspaces w ON w.id = j.workspace_id WHERE j.id = ?",
        (job_id,),
    )
    return await _visible(request, job, "job", job_id)


async def get_job_request(request: Request, request_id: str) -> Row:
    row = None
    if request_id.isdigit() and int(request_id) < 2**63:  # SQLite's largest integer
        row = await app_state(request).db.fetchone(
            "SELECT r.*, w.name AS workspace, w.project_id FROM job_requests r "
            "JOIN workspaces w ON w.id = r.workspace_id WHERE r.id = ?",
            (int(request_id),),
        )
    return await _visible(request, row, "job request", request_id)


# -- actions shared by the API and the pages ---------------------------------------------


async def create_project(request: Request, name: str) -> Row:
    user = await require_user(request)
    name = name.strip()
    slug = slugify(name)
    if not slug:
        raise ApiError(400, "a project name needs at least one letter or digit")
    db: Database = app_state(request).db
    if await db.fetchone("SELECT 1 FROM projects WHERE slug = ? OR name = ?", (slug, name)):
        raise ApiError(400, f"a project named {name!r} already exists; choose another name")
    async with db.transaction() as conn:
        cur = await conn.execute(
            "INSERT INTO projects (slug, name, created_by, created_at) VALUES (?, ?, ?, ?)",
            (slug, name, user.id, time.time()),
        )
        for role in auth.ROLES:
            await conn.execute(
                "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, ?)",
                (cur.lastrowid, user.id, role),
            )
    return await db.fetchone("SELECT * FROM projects WHERE slug = ?", (slug,))


class FormError(ApiError):
    """Bad form fields: ``errors`` maps each field to what is wrong with it."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__(400, "; ".join(errors.values()))
        self.errors = errors


async def create_workspace(request: Request, project: Row, form: dict[str, Any]) -> Row:
    user = await check_role(request, project["id"], "developer")
    state = app_state(request)
    settings: Settings = state.settings
    name = str(form.get("name") or "").strip()
    repo = str(form.get("repo") or "").strip()
    branch = str(form.get("branch") or "").strip()
    database = str(form.get("database") or "").strip()
    errors: dict[str, str] = {}
    if not WORKSPACE_NAME.fullmatch(name):
        errors["name"] = (
            "a workspace name uses lowercase letters, digits, '-' and '_', starts with a "
            "letter or digit and is at most 63 characters"
        )
    elif name in RESERVED_NAMES:
        errors["name"] = f"{name!r} is used by the site itself; choose another name"
    elif await state.db.fetchone("SELECT 1 FROM workspaces WHERE name = ?", (name,)):
        errors["name"] = f"a workspace named {name!r} already exists; choose another name"
    if database not in settings.databases:
        errors["database"] = f"database must be one of: {', '.join(settings.databases)}"
    if not repo:
        errors["repo"] = "repo is required"
    elif not branch:
        errors["branch"] = "branch is required"
    else:
        try:
            check_allowed(repo, settings.repos.allow)
            sha = await state.repos.resolve_branch(repo, branch)
            await state.repos.read_file(repo, sha, "project.yaml")
        except (BranchNotFound, FileNotFound) as e:
            errors["branch"] = str(e)
        except RepoError as e:
            errors["repo"] = str(e)
    if errors:
        raise FormError(errors)
    try:
        await state.db.execute(
            "INSERT INTO workspaces (name, project_id, repo, branch, database, purpose, "
            "notify_default, created_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                project["id"],
                repo,
                branch,
                database,
                str(form.get("purpose") or "").strip(),
                int(bool(form.get("notify_default"))),
                user.id,
                time.time(),
            ),
        )
    except sqlite3.IntegrityError:  # someone took the name a moment ago
        raise FormError(
            {"name": f"a workspace named {name!r} already exists; choose another name"}
        ) from None
    return await get_workspace(request, name)


async def create_job_request(
    request: Request, workspace: Row, actions: list[str], force: bool, notify: bool
) -> int:
    user = await check_role(request, workspace["project_id"], "developer")
    state = app_state(request)
    request_id = await submit(
        state.db,
        state.settings,
        state.repos,
        workspace,
        user.id,
        actions,
        force_run_dependencies=force,
        notify=notify,
    )
    state.scheduler.wake()
    return request_id


async def cancel_jobs(request: Request, job_request: Row, actions: list[str] | None) -> list[str]:
    await check_role(request, job_request["project_id"], "developer")
    db: Database = app_state(request).db
    jobs = await db.fetchall(
        "SELECT id, action, state FROM jobs WHERE job_request_id = ?", (job_request["id"],)
    )
    if actions is not None:
        unknown = set(actions) - {job["action"] for job in jobs}
        if unknown:
            raise ApiError(400, f"this job request has no job for: {', '.join(sorted(unknown))}")
        jobs = [job for job in jobs if job["action"] in actions]
    active = [job["id"] for job in jobs if job["state"] in ("pending", "running")]
    return await app_state(request).scheduler.cancel(active)


_PARSED: dict[tuple[str, str], pipeline.Pipeline] = {}
_PARSED_MAX = 64


async def project_at(repos: Repos, repo: str, sha: str) -> pipeline.Pipeline:
    """project.yaml of ``repo`` at commit ``sha``, parsed once: a commit never changes, and
    pages poll the same one every few seconds."""
    key = (repo, sha)
    if key not in _PARSED:
        parsed = pipeline.load_pipeline(await repos.read_file(repo, sha, "project.yaml"))
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = parsed
    return _PARSED[key]


async def workspace_actions(request: Request, workspace: Row, fetch: bool = True) -> dict[str, Any]:
    """The workspace's actions at the branch head with their latest jobs, or the errors.

    ``fetch=False`` reads the local mirror as it is, for status polling.
    """
    state = app_state(request)
    repos: Repos = state.repos
    result: dict[str, Any] = {"actions": [], "error": None, "warnings": [], "sha": None}
    try:
        sha = await repos.resolve_branch(workspace["repo"], workspace["branch"], fetch=fetch)
        project = await project_at(repos, workspace["repo"], sha)
    except (RepoError, pipeline.ProjectValidationError) as e:
        result["error"] = str(e)
        result["errors"] = getattr(e, "errors", None) or [str(e)]
        result["error_kind"] = type(e).__name__
        return result
    result["sha"] = sha
    result["warnings"] = list(project.warnings)
    latest = {
        row["action"]: row
        for row in await state.db.fetchall(
            "SELECT * FROM jobs j WHERE workspace_id = ? AND created_at = "
            "(SELECT max(created_at) FROM jobs WHERE workspace_id = j.workspace_id "
            "AND action = j.action)",
            (workspace["id"],),
        )
    }
    for name, action in project.actions.items():
        job = latest.get(name)
        result["actions"].append(
            {
                "name": name,
                "needs": list(action.needs),
                "run": action.run,
                "status": job["status_code"] if job else None,
                "state": job["state"] if job else None,
                "job_id": job["id"] if job else None,
                "changed_at": job["updated_at"] if job else None,
            }
        )
    return result


# -- API -------------------------------------------------------------------------------


async def api_health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def api_create_project(request: Request) -> Response:
    await require_user(request)
    body = await json_body(request)
    project = await create_project(request, field(body, "name"))
    return JSONResponse({"slug": project["slug"], "name": project["name"]}, status_code=201)


async def api_create_workspace(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    body = await json_body(request)
    for name in ("name", "repo", "branch", "database"):
        field(body, name)
    workspace = await create_workspace(request, project, body)
    return JSONResponse(workspace_json(workspace), status_code=201)


def workspace_json(workspace: Row) -> dict[str, Any]:
    return {
        "name": workspace["name"],
        "project": workspace["project_slug"],
        "repo": workspace["repo"],
        "branch": workspace["branch"],
        "database": workspace["database"],
        "purpose": workspace["purpose"],
        "archived": bool(workspace["archived"]),
        "created_at": iso(workspace["created_at"]),
    }


async def api_workspace(request: Request) -> Response:
    workspace = await get_workspace(request, request.path_params["name"])
    found = await workspace_actions(request, workspace)
    return JSONResponse(
        {
            **workspace_json(workspace),
            "sha": found["sha"],
            "project_yaml_error": found["error"],
            "actions": [
                {"name": a["name"], "needs": a["needs"], "status": a["status"]}
                for a in found["actions"]
            ],
        }
    )


async def api_submit(request: Request) -> Response:
    workspace = await get_workspace(request, request.path_params["name"])
    await check_role(request, workspace["project_id"], "developer")
    body = await json_body(request)
    actions = field(body, "actions", list)
    if not all(isinstance(a, str) for a in actions):
        raise ApiError(400, "actions must be a list of action names")
    force = bool(field(body, "force_run_dependencies", bool, required=False))
    notify = field(body, "notify", bool, required=False)
    if notify is None:
        notify = bool(workspace["notify_default"])
    request_id = await create_job_request(request, workspace, actions, force, notify)
    return JSONResponse(await job_request_json(app_state(request).db, request_id), status_code=201)


async def api_job_request(request: Request) -> Response:
    row = await get_job_request(request, request.path_params["id"])
    return JSONResponse(await job_request_json(app_state(request).db, row["id"]))


async def api_cancel(request: Request) -> Response:
    row = await get_job_request(request, request.path_params["id"])
    body = await json_body(request) if await request.body() else {}
    actions = field(body, "actions", list, required=False)
    cancelled = await cancel_jobs(request, row, actions)
    data = await job_request_json(app_state(request).db, row["id"])
    data["cancelled"] = cancelled
    if not cancelled:
        data["message"] = "Nothing to cancel: those jobs have already finished"
    return JSONResponse(data)


async def api_job(request: Request) -> Response:
    job = await get_job(request, request.path_params["id"])
    return JSONResponse({**job_json(job), "workspace": job["workspace"]})


async def api_job_log(request: Request) -> Response:
    job = await get_job(request, request.path_params["id"])
    await check_role(request, job["project_id"], "output_viewer")
    path = app_state(request).settings.data_dir / "logs" / f"{job['id']}.log"
    if not path.exists():
        raise ApiError(404, "this job has no log yet; it is written when the job finishes")
    return PlainTextResponse(path.read_text(errors="replace"))


async def api_outputs(request: Request) -> Response:
    workspace = await get_workspace(request, request.path_params["name"])
    await check_role(request, workspace["project_id"], "output_viewer")
    ws_dir = app_state(request).settings.data_dir / "workspaces" / workspace["name"]
    return JSONResponse(Manifest.load(ws_dir).data)


async def require_admin(request: Request) -> User:
    user = await require_user(request)
    if not user.is_admin:
        raise ApiError(403, "only site admins can control the queue")
    return user


async def api_queue(request: Request) -> Response:
    await require_admin(request)
    limit = request.query_params.get("limit", "1000")
    if not limit.isdigit():
        raise ApiError(400, "limit must be a whole number of jobs")
    return JSONResponse(app_state(request).scheduler.snapshot(int(limit)))


async def api_queue_pause(request: Request) -> Response:
    await require_admin(request)
    await app_state(request).scheduler.set_paused(True)
    return JSONResponse({"paused": True, "message": "Queue paused: running jobs go on"})


async def api_queue_resume(request: Request) -> Response:
    await require_admin(request)
    await app_state(request).scheduler.set_paused(False)
    return JSONResponse({"paused": False, "message": "Queue resumed"})


async def api_priority(request: Request) -> Response:
    row = await get_job_request(request, request.path_params["id"])
    await require_admin(request)
    priority = (await json_body(request)).get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > 1000:
        raise ApiError(400, "priority must be a whole number from -1000 to 1000 (default 0)")
    await app_state(request).scheduler.set_priority(row["id"], priority)
    return JSONResponse({"id": row["id"], "priority": priority})


async def api_admin_outbox(request: Request) -> Response:
    user = await require_user(request)
    if not user.is_admin:
        raise ApiError(403, "only site admins can see the outbox")
    state = app_state(request)
    return JSONResponse(await notify.outbox_json(state.db, state.settings))


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics, for an admin's API token or a scraper on this machine."""
    if not metrics.is_loopback(request.client.host if request.client else None):
        try:
            user = await current_user(request)
        except ApiError as e:
            return PlainTextResponse(f"{e.message}\n", status_code=e.status)
        if user is None or not user.is_admin or not getattr(request.state, "via_token", False):
            return PlainTextResponse(
                "metrics are served to this machine (loopback) or with a site admin's API token\n",
                status_code=403,
            )
    body = await app_state(request).metrics.render()
    return Response(body, media_type=metrics.CONTENT_TYPE)


# -- pages -----------------------------------------------------------------------------


async def render(
    request: Request, name: str, context: dict[str, Any], status: int = 200
) -> Response:
    user = await current_user(request)
    context = {
        "user": user,
        "csrf_token": auth.csrf_token(request),
        "settings": app_state(request).settings,
        # messages from the previous request are shown once, on the next full page
        "flashes": [] if name.startswith("_") else request.session.pop("flash", []),
        **context,
    }
    response = app_state(request).templates.TemplateResponse(
        request, name, context, status_code=status
    )
    response.headers["Vary"] = "HX-Request, Cookie"
    return response


# -- errors ----------------------------------------------------------------------------


async def handle_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        status, message = exc.status, exc.message
    elif isinstance(exc, RepoError | SubmitError | pipeline.ProjectValidationError):
        status, message = 400, str(exc)
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
    else:
        raise exc
    if is_api(request):
        return JSONResponse({"error": message}, status_code=status)
    if status == 401:
        login = f"/login?next={request.url.path}"
        if request.headers.get("hx-request"):  # a poll must not swap the sign-in page in
            return Response(message, status_code=401, headers={"HX-Redirect": login})
        return RedirectResponse(login, status_code=303)
    return await render(request, "error.html", {"status": status, "message": message}, status)


# -- the app ---------------------------------------------------------------------------


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = await Database.open(DataDir(settings.data_dir).db)
        repos = Repos(DataDir(settings.data_dir).repos, timeout=settings.repos.fetch_timeout)
        executor = LocalDockerExecutor(settings, repos)
        notifier = notify.Notifier(db, settings)
        scheduler = Scheduler(db, settings, executor, on_job_finished=notifier.job_finished)
        app.state.db = db
        app.state.repos = repos
        app.state.executor = executor
        app.state.scheduler = scheduler
        app.state.notifier = notifier
        app.state.metrics = metrics.SiteMetrics(db, settings, executor)
        try:
            await notifier.start()
            await scheduler.start()
            yield
        finally:
            await scheduler.stop()
            await notifier.stop()
            await db.close()

    # the account pages and the API description build on the helpers above
    # imported here, not at the top: the page modules use this module's helpers
    from . import accounts, openapi, views
    from .views import admin, jobs, projects, workspaces

    templates = Jinja2Templates(directory=str(ROOT / "templates"))
    views.setup(templates.env)
    routes = [
        Route("/api/v1/health", api(api_health)),
        Route("/api/v1/projects", api(api_create_project), methods=["POST"]),
        Route("/api/v1/openapi.json", openapi.openapi_json),
        Route("/api/v1/github/repos", api(accounts.api_github_repos)),
        Route("/api/v1/projects/{slug}/members", api(accounts.api_members)),
        Route("/api/v1/projects/{slug}/members", api(accounts.api_add_member), methods=["POST"]),
        Route(
            "/api/v1/projects/{slug}/members/{username}",
            api(accounts.api_remove_member),
            methods=["DELETE"],
        ),
        Route("/api/v1/projects/{slug}/workspaces", api(api_create_workspace), methods=["POST"]),
        Route("/api/v1/workspaces/{name}", api(api_workspace)),
        Route("/api/v1/workspaces/{name}/job-requests", api(api_submit), methods=["POST"]),
        Route("/api/v1/workspaces/{name}/outputs", api(api_outputs)),
        Route("/api/v1/job-requests/{id}", api(api_job_request)),
        Route("/api/v1/job-requests/{id}/cancel", api(api_cancel), methods=["POST"]),
        Route("/api/v1/jobs/{id}", api(api_job)),
        Route("/api/v1/jobs/{id}/log", api(api_job_log)),
        Route("/api/v1/admin/queue", api(api_queue)),
        Route("/api/v1/admin/queue/pause", api(api_queue_pause), methods=["POST"]),
        Route("/api/v1/admin/queue/resume", api(api_queue_resume), methods=["POST"]),
        Route("/api/v1/job-requests/{id}/priority", api(api_priority), methods=["POST"]),
        Route("/api/v1/admin/outbox", api(api_admin_outbox)),
        Route("/metrics", metrics_endpoint),
        Mount("/static", StaticFiles(directory=str(ROOT / "static")), name="static"),
        Route("/", projects.home),
        Route("/login", accounts.login_page, methods=["GET", "POST"]),
        Route("/logout", accounts.logout, methods=["POST"]),
        Route("/auth/github", accounts.github_start),
        Route("/auth/github/callback", accounts.github_callback),
        Route("/account", accounts.account_page),
        Route("/account/password", accounts.change_password, methods=["POST"]),
        Route("/account/tokens", accounts.create_token, methods=["POST"]),
        Route("/account/tokens/{id:int}/revoke", accounts.revoke_token, methods=["POST"]),
        Route("/admin/", admin.admin_page),
        Route("/admin/pause", admin.pause, methods=["POST"]),
        Route("/admin/priority", admin.priority, methods=["POST"]),
        Route("/admin/users", accounts.admin_users),
        Route("/admin/users", accounts.admin_create_user, methods=["POST"]),
        Route("/admin/users/{id:int}/{action}", accounts.admin_user_action, methods=["POST"]),
        Route("/projects/", projects.create_project, methods=["POST"]),
        Route("/projects/{slug}/", projects.project_page),
        Route("/projects/{slug}/members", accounts.add_member_form, methods=["POST"]),
        Route(
            "/projects/{slug}/members/{username}/remove",
            accounts.remove_member_form,
            methods=["POST"],
        ),
        Route(
            "/projects/{slug}/new-workspace",
            workspaces.new_workspace_page,
            methods=["GET", "POST"],
        ),
        Route("/projects/{slug}/new-workspace/branches", workspaces.branches),
        Route("/jobs/{id}", jobs.job_page),
        Route("/jobs/{id}/log", jobs.job_log),
        Route("/{workspace}/", workspaces.workspace_page, methods=["GET", "POST"]),
        Route("/{workspace}/archive", workspaces.archive, methods=["POST"]),
        Route("/{workspace}/outputs/{path:path}", workspaces.outputs),
        Route("/{workspace}/logs", jobs.logs_page),
        Route("/{workspace}/logs/{id}", jobs.job_request_page),
        Route("/{workspace}/logs/{id}/cancel", jobs.cancel, methods=["POST"]),
    ]
    key = secret_key(settings.data_dir)
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=key,
                session_cookie="jobsite_session",
                max_age=int(settings.session_max_age),
                same_site="lax",
                https_only=settings.base_url.startswith("https://"),
            ),
            Middleware(auth.CSRFMiddleware, base_url=settings.base_url, sign_in_paths=("/login",)),
        ],
        exception_handlers={error: handle_error for error in HANDLED_ERRORS},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.templates = templates
    app.state.login_limiter = auth.RateLimiter(limit=10, window=300)
    app.state.sealer = auth.Sealer(key)
    return app


def status_label(code: str | None) -> str:
    if code is None:
        return "Not run"
    return code.replace("_", " ").capitalize()

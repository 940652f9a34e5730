"""The web app assembled: the lifespan that runs the site, the middleware, and the one
named route table. Handlers live in views/; nothing here answers a request itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from . import auth, metrics, notify
from .config import Settings, SettingsError
from .datadir import DataDir
from .db import Database
from .local_docker import LocalDockerExecutor
from .repos import Repos
from .runner import Scheduler
from .views import accounts, admin, api, base, jobs, projects, status, workspaces
from .views.admission import Admission, AdmissionMiddleware
from .views.csrf import CSRFMiddleware
from .views.limits import BodyLimitMiddleware

ROOT = Path(__file__).parent


def get(path: str, endpoint: object, name: str) -> Route:
    return Route(path, endpoint, methods=["GET"], name=name)  # type: ignore[arg-type]


def post(path: str, endpoint: object, name: str) -> Route:
    return Route(path, endpoint, methods=["POST"], name=name)  # type: ignore[arg-type]


# Every URL of the site. Templates and handlers build links from these names
# (`url('workspace', workspace=...)`), never by hand. A workspace's pages come last: its
# name is the first path segment, so the site's own segments must match first
# (workspaces.RESERVED_NAMES keeps them apart).
ROUTES: list[BaseRoute] = [
    # the JSON API
    get("/api/v1/health", api.health, "api_health"),
    get("/api/v1/openapi.json", api.openapi_json, "api_openapi"),
    post("/api/v1/projects", api.create_project, "api_create_project"),
    get("/api/v1/github/repos", api.github_repos, "api_github_repos"),
    get("/api/v1/projects/{slug}/members", api.members, "api_members"),
    post("/api/v1/projects/{slug}/members", api.add_member, "api_add_member"),
    Route(
        "/api/v1/projects/{slug}/members/{username}",
        api.remove_member,
        methods=["DELETE"],
        name="api_remove_member",
    ),
    post("/api/v1/projects/{slug}/workspaces", api.create_workspace, "api_create_workspace"),
    get("/api/v1/workspaces/{name}", api.workspace, "api_workspace"),
    Route(
        "/api/v1/workspaces/{name}",
        api.change_workspace,
        methods=["PATCH"],
        name="api_change_workspace",
    ),
    post(
        "/api/v1/workspaces/{name}/job-requests", api.create_job_request, "api_create_job_request"
    ),
    get("/api/v1/workspaces/{name}/outputs", api.outputs, "api_outputs"),
    get("/api/v1/job-requests/{id}", api.job_request, "api_job_request"),
    post("/api/v1/job-requests/{id}/cancel", api.cancel, "api_cancel"),
    post("/api/v1/job-requests/{id}/priority", api.priority, "api_priority"),
    get("/api/v1/jobs/{id}", api.job, "api_job"),
    get("/api/v1/jobs/{id}/log", api.job_log, "api_job_log"),
    get("/api/v1/status", api.status, "api_status"),
    get("/api/v1/admin/queue", api.queue, "api_queue"),
    post("/api/v1/admin/queue/pause", api.pause_queue, "api_pause_queue"),
    post("/api/v1/admin/queue/resume", api.resume_queue, "api_resume_queue"),
    get("/api/v1/admin/outbox", api.outbox, "api_outbox"),
    get("/metrics", api.metrics_page, "metrics"),
    Mount("/static", StaticFiles(directory=str(ROOT / "static")), name="static"),
    # signing in, your account
    get("/", projects.home, "home"),
    get("/login", accounts.login_page, "login"),
    post("/login", accounts.login, "login_post"),
    post("/logout", accounts.logout, "logout"),
    get("/auth/github", accounts.github_start, "github_start"),
    get("/auth/github/callback", accounts.github_callback, "github_callback"),
    get("/account", accounts.account_page, "account"),
    post("/account/password", accounts.change_password, "change_password"),
    post("/account/tokens", accounts.create_token, "create_token"),
    post("/account/tokens/{id}/revoke", accounts.revoke_token, "revoke_token"),
    # the queue in the open
    get("/status", status.status_page, "status"),
    # site admins
    get("/admin/", admin.admin_page, "admin"),
    post("/admin/pause", admin.pause, "admin_pause"),
    post("/admin/priority", admin.priority, "admin_priority"),
    get("/admin/users", accounts.admin_users, "admin_users"),
    post("/admin/users", accounts.admin_create_user, "admin_create_user"),
    post("/admin/users/{id}/{action}", accounts.admin_user_action, "admin_user_action"),
    # projects
    post("/projects/", projects.create_project, "create_project"),
    get("/projects/{slug}/", projects.project_page, "project"),
    post("/projects/{slug}/members", accounts.add_member_form, "add_member"),
    post(
        "/projects/{slug}/members/{username}/remove", accounts.remove_member_form, "remove_member"
    ),
    get("/projects/{slug}/new-workspace", workspaces.new_workspace_page, "new_workspace"),
    post("/projects/{slug}/new-workspace", workspaces.create_workspace, "create_workspace"),
    get("/projects/{slug}/new-workspace/branches", workspaces.branches, "branches"),
    # jobs
    get("/jobs/{id}", jobs.job_page, "job"),
    get("/jobs/{id}/log", jobs.job_log, "job_log"),
    # a workspace's pages
    get("/{workspace}/", workspaces.workspace_page, "workspace"),
    post("/{workspace}/", workspaces.create_job_request, "create_job_request"),
    post("/{workspace}/archive", workspaces.archive, "archive"),
    post("/{workspace}/branch", workspaces.change_branch, "change_branch"),
    get("/{workspace}/outputs/{path:path}", workspaces.outputs, "outputs"),
    get("/{workspace}/output-files/{path:path}", workspaces.output_file, "output_file"),
    get("/{workspace}/logs", jobs.logs_page, "logs"),
    get("/{workspace}/logs/{id}", jobs.job_request_page, "job_request"),
    post("/{workspace}/logs/{id}/cancel", jobs.cancel, "cancel"),
    post("/{workspace}/logs/{id}/rerun", jobs.rerun, "rerun"),
]

# the requests a busy site still answers (views/admission.py): its health check, signing in,
# submitting a job request, and the CSS and JS of the pages it did answer
RESERVED = (
    "api_health",
    "login",
    "login_post",
    "create_job_request",
    "api_create_job_request",
    "static",
)


MIN_SECRET_KEY = 32  # characters of the session signing key; a new one has 64


def secret_key(data: DataDir) -> str:
    """The session signing key, made on first start and kept private to the site.

    It is written whole under a temporary name, readable by the site alone, then linked
    into place, which fails if another process made one first: then that one is used, and
    no reader ever sees a half-written key. A key too short to keep sessions safe (an
    empty file, a placeholder) stops the site."""
    path = data.secret_key
    if not path.exists():
        data.root.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            temporary.unlink()
    key = path.read_text().strip()
    if len(key) < MIN_SECRET_KEY:
        raise SettingsError(
            f"the session key in {path} is {len(key)} characters long; it needs at least "
            f"{MIN_SECRET_KEY}. Delete the file and restart to have a new one made "
            "(everyone will have to sign in again)."
        )
    return key


def create_app(settings: Settings) -> Starlette:
    def job_url(job_id: str) -> str:
        """A job page's address, for links in emails."""
        return settings.base_url + app.url_path_for("job", id=job_id)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.data.root.mkdir(parents=True, exist_ok=True)
        site.repos = Repos(
            settings.data.repos,
            timeout=settings.repos.fetch_timeout,
            fetch_interval=settings.repos.fetch_interval,
        )
        site.executor = LocalDockerExecutor(settings, site.repos)
        await site.executor.check_settings()
        site.db = db = await Database.open(settings.data.db)
        site.notifier = notify.Notifier(db, settings, job_url=job_url)
        site.scheduler = Scheduler(
            db, settings, site.executor, on_job_finished=site.notifier.job_finished
        )
        site.metrics = metrics.SiteMetrics(db, settings, site.executor)
        await asyncio.to_thread(auth.dummy_hash)  # made now, not on a first sign-in
        try:
            await site.notifier.start()
            await site.scheduler.start()
            yield
        finally:
            site.admission.summarise(stopping=True)
            await site.scheduler.stop()
            await site.notifier.stop()
            await db.close()

    key = secret_key(settings.data)
    site = base.Site(
        settings,
        templates=base.templates(str(ROOT / "templates")),
        sign_in_throttle=auth.SignInThrottle(),
        sealer=auth.Sealer(key),
        admission=Admission(
            ROUTES,
            max_requests=settings.max_requests,
            max_requests_per_page=settings.max_requests_per_page,
            reserved=RESERVED,
        ),
    )
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(AdmissionMiddleware, admission=site.admission),
            Middleware(
                BodyLimitMiddleware,
                limit=int(settings.max_request_size),
                timeout=float(settings.request_body_timeout),
            ),
            Middleware(
                SessionMiddleware,
                secret_key=key,
                session_cookie="jobsite_session",
                max_age=int(settings.session_max_age),
                same_site="lax",
                https_only=settings.base_url.startswith("https://"),
            ),
            Middleware(CSRFMiddleware, base_url=settings.base_url, sign_in_paths=("/login",)),
        ],
        exception_handlers={
            **{error: base.handle_error for error in base.HANDLED_ERRORS},
            **{error: base.handle_storage_error for error in base.STORAGE_ERRORS},
        },
        lifespan=lifespan,
    )
    app.state = site  # type: ignore[assignment]  # typed: handlers read it as base.Site
    return app

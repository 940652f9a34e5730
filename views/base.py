"""What every page and API handler shares: the site's typed state, the HTTP error, who is
asking and what they may do, lookups by name, and rendering (pages, htmx fragments,
redirects, flashes, named URLs).

Handlers receive a Starlette ``Request``; everything below this module is plain Python
that knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import threading
import time
import urllib.parse
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jinja2 import Template, pass_context
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, NoMatchFound
from starlette.templating import Jinja2Templates

from .. import auth, pipeline
from ..auth import Sealer, SignInThrottle, User
from ..config import Settings
from ..db import Database, Row, out_of_space
from ..executor import Executor
from ..graph import ICONS
from ..metrics import SiteMetrics
from ..notify import Notifier
from ..problems import Conflict, NotAllowed, NotFound, Problem
from ..queries import ExpectedStarts, QueueOrder
from ..repos import RepoError, Repos
from ..runner import Scheduler
from ..states import State, status_label
from ..submit import SubmitError
from ..units import ago, expected_in, human_duration, iso, runtime, when
from ..workspaces import ParsedProjects
from . import csrf
from .admission import GIVE_WAY_MAX, Admission, answering_quick


class Site:
    """Everything a handler may use, one per app (it is ``app.state``).

    The settings and what follows from them are made with the app; the rest by the
    lifespan, while the site runs.
    """

    db: Database
    repos: Repos
    executor: Executor
    scheduler: Scheduler
    notifier: Notifier
    metrics: SiteMetrics

    def __init__(
        self,
        settings: Settings,
        templates: Jinja2Templates,
        sign_in_throttle: SignInThrottle,
        sealer: Sealer,
        admission: Admission,
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.templates = templates
        self.sign_in_throttle = sign_in_throttle
        self.sealer = sealer
        self.projects = ParsedProjects()
        self.expected_starts = ExpectedStarts()
        self.queue_order = QueueOrder()
        self.fragments = Fragments()
        self.named_routes: dict[str, BaseRoute] = {}  # filled by url() as names are asked for


class Fragments:
    """Polled fragments as rendered, by version (ETag), the most recent few kept: every
    open tab of a workspace polls for the same version, and the first to ask renders it."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.rendered: OrderedDict[str, tuple[int, bytes]] = OrderedDict()

    def get(self, etag: str) -> Response | None:
        found = self.rendered.get(etag)
        if found is None:
            return None
        self.rendered.move_to_end(etag)
        status, body = found
        return Response(body, status, headers=versioned(etag), media_type="text/html")

    def keep(self, etag: str, response: Response) -> None:
        self.rendered[etag] = (response.status_code, bytes(response.body))
        if len(self.rendered) > self.size:
            self.rendered.popitem(last=False)


def site(request: Request) -> Site:
    return request.app.state


class HTTPError(Exception):
    """An error for the person asking: answered as JSON on the API, as a page elsewhere."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# what each kind of refusal from the core is, in HTTP
PROBLEM_STATUS: dict[type[Problem], int] = {NotFound: 404, NotAllowed: 403, Conflict: 409}
HANDLED_ERRORS = (
    HTTPError,
    Problem,
    RepoError,
    SubmitError,
    HTTPException,
    pipeline.ProjectValidationError,
)


def as_http(exc: Exception) -> HTTPError:
    """The status and message an error from below is answered with."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, Problem):
        return HTTPError(PROBLEM_STATUS.get(type(exc), 400), exc.message)
    if isinstance(exc, HTTPException):
        return HTTPError(exc.status_code, exc.detail)
    return HTTPError(400, str(exc))


# -- who is asking ------------------------------------------------------------------------


async def current_user(request: Request) -> User | None:
    """The signed-in user (session cookie or API token), looked up once per request."""
    if hasattr(request.state, "user"):
        return request.state.user
    state = site(request)
    user = None
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        user = await auth.authenticate_token(state.db, header[7:].strip())
        if user is None:
            raise HTTPError(
                401,
                "the API token is not valid (it may have been revoked, or have expired); "
                "create a new one on your account page",
            )
        request.state.via_token = True
    elif "user_id" in request.session:
        user = await auth.load_session_user(
            state.db, request.session, float(state.settings.session_max_age)
        )
        if user is None:
            request.session.clear()
    request.state.user = user
    return user


def via_token(request: Request) -> bool:
    """Whether the asker authenticated with an API token (not a browser session)."""
    return getattr(request.state, "via_token", False)


async def require_user(request: Request) -> User:
    user = await current_user(request)
    if user is None:
        raise HTTPError(401, "sign in first")
    await check_csrf(request)
    return user


async def require_admin(request: Request, to: str) -> User:
    """A site admin, or 403 saying only admins can do ``to`` ("control the queue")."""
    user = await require_user(request)
    if not user.is_admin:
        raise HTTPError(403, f"only site admins can {to}")
    return user


async def check_csrf(request: Request) -> None:
    """Unsafe requests authenticated by the session cookie must carry the CSRF token."""
    if request.method in ("GET", "HEAD", "OPTIONS") or via_token(request):
        return
    submitted = request.headers.get(csrf.CSRF_HEADER)
    if submitted is None and "form" in request.headers.get("content-type", ""):
        form = await request.form()
        submitted = form.get(csrf.CSRF_FIELD)
    if not csrf.csrf_ok(request, submitted):
        raise HTTPError(403, "the form has expired or came from another site; reload the page")


async def may_read_logs(request: Request, project_id: int) -> bool:
    """Whether the asker may read the project's job logs (output viewers, DESIGN 10)."""
    user = await current_user(request)
    return bool(user and user.can_view_outputs(project_id))


async def check_role(request: Request, project_id: int, *roles: str) -> User:
    user = await require_user(request)
    if not user.has_role(project_id, *roles):
        raise HTTPError(403, f"you need the {' or '.join(roles)} role on this project to do that")
    return user


def check_may_register(request: Request, user: User) -> None:
    """Who may register projects: any user, or site admins only (``project_registration``)."""
    if site(request).settings.project_registration == "admins" and not user.is_admin:
        raise HTTPError(
            403,
            "only site admins register projects on this site; ask one to register yours "
            "and make you a member",
        )


GITHUB_TOKEN = "github_token"  # the session key of the asker's sealed GitHub token


def github(request: Request) -> auth.GitHub:
    settings = site(request).settings.github
    if not settings.enabled:
        raise HTTPError(404, "signing in with GitHub is not set up on this site")
    return auth.GitHub(settings)


async def asker_github_repos(request: Request) -> list[dict[str, Any]] | None:
    """The asker's GitHub repositories, or None when they did not sign in with GitHub.
    Raises auth.GitHubError when GitHub refuses or cannot be reached."""
    sealed = request.session.get(GITHUB_TOKEN)
    token = site(request).sealer.unseal(sealed) if sealed else None
    if token is None:
        return None
    return await github(request).repos(token)


# the one rule for a number in an address (an id, a page): ASCII digits only (to Python,
# "²" is a digit that int() refuses, and int() reads the Arabic-Indic "٣" as 3), at most 18
# of them, so that every such number is an SQLite integer
NUMBER = re.compile(r"[0-9]{1,18}")


def parse_number(text: str | None) -> int | None:
    """The number ``text`` spells by that rule, or None when it does not."""
    return int(text) if text is not None and NUMBER.fullmatch(text) else None


def query_number(request: Request, name: str) -> int | None:
    """The number in the query string's ``name`` by that rule (a place in a paged list, an
    id to page from): None when not given, a clear 400 when it is not such a number."""
    text = request.query_params.get(name, "")
    if text == "":
        return None
    number = parse_number(text)
    if number is None:
        raise HTTPError(400, f"{name} must be a whole number (ASCII digits, at most 18)")
    return number


# -- lookups by name ----------------------------------------------------------------------


async def _visible(request: Request, row: Row | None, kind: str, key: str) -> Row:
    """A row the asker looked up by ``key``, when it exists and they may see its project.

    A private site (``public_status: false``) shows a project to its members only; to
    anyone else, signed in or not, a thing that exists there is as missing as one that
    does not: the same 404, the same words, so that no one learns what exists."""
    user = await current_user(request)  # a bad token is refused even where none is needed
    hidden = not site(request).settings.public_status and (
        row is not None and (user is None or not user.is_member(row["project_id"]))
    )
    if row is None or hidden:
        raise HTTPError(404, f"there is no {kind} {key!r} that you can see")
    return row


async def get_project(request: Request, slug: str) -> Row:
    project = await site(request).db.lookup(
        "SELECT *, id AS project_id FROM projects WHERE slug = ?", (slug,)
    )
    return await _visible(request, project, "project", slug)


async def get_workspace(request: Request, name: str) -> Row:
    workspace = await site(request).db.lookup(
        "SELECT w.*, p.slug AS project_slug, p.name AS project_name FROM workspaces w "
        "JOIN projects p ON p.id = w.project_id WHERE w.name = ?",
        (name,),
    )
    return await _visible(request, workspace, "workspace", name)


async def get_job(request: Request, job_id: str) -> Row:
    job = await site(request).db.lookup(
        "SELECT j.*, w.name AS workspace, w.project_id FROM jobs j "
        "JOIN workspaces w ON w.id = j.workspace_id WHERE j.id = ?",
        (job_id,),
    )
    return await _visible(request, job, "job", job_id)


async def expected_starts(request: Request, jobs: list[dict[str, Any]]) -> dict[str, float]:
    """When the waiting jobs among ``jobs`` should start (none while the queue is paused)."""
    state = site(request)
    waiting = [job["id"] for job in jobs if job["state"] == State.PENDING]
    if state.scheduler.paused or not waiting:
        return {}
    return await state.expected_starts.of(state.db, state.settings.max_workers, waiting)


def with_usage_so_far(request: Request, job: Row) -> Row:
    """A running job with the CPU and memory sampled so far: its columns are written only
    when it ends."""
    if job["state"] != "running":
        return job
    use = site(request).scheduler.executor.usage(job["id"])
    return {**job, **use.as_json()} if use is not None else job


async def get_job_request(request: Request, request_id: str) -> Row:
    row = None
    number = parse_number(request_id)
    if number is not None:
        row = await site(request).db.lookup(
            "SELECT r.*, w.name AS workspace, w.project_id FROM job_requests r "
            "JOIN workspaces w ON w.id = r.workspace_id WHERE r.id = ?",
            (number,),
        )
    return await _visible(request, row, "job request", request_id)


# -- reading requests ---------------------------------------------------------------------


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def is_htmx(request: Request) -> bool:
    """An htmx request wanting a fragment (restoring history wants the whole page)."""
    headers = request.headers
    return headers.get("hx-request") == "true" and not headers.get("hx-history-restore-request")


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past Python's stack
        raise HTTPError(
            400, "the request body must be JSON (UTF-8, nested at most a few hundred deep)"
        ) from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type = str, required: bool = True) -> Any:
    """``body[name]``, which must be a ``kind``; a list must be a list of strings."""
    value = body.get(name)
    if value is None:
        if required:
            raise HTTPError(400, f"{name} is required")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HTTPError(400, f"{name} must be a {kind.__name__}")
    if kind is list and not all(isinstance(item, str) for item in value):
        raise HTTPError(400, f"{name} must be a list of strings")
    return value


def local_path(target: str | None, default: str) -> str:
    """``target`` when it is a path on this site, else ``default`` (no open redirects)."""
    # browsers read "/\host" as "//host", another site
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


# -- answering ----------------------------------------------------------------------------


def url(request: Request, name: str, **params: Any) -> str:
    """The path of the named route (server.ROUTES), its parameters escaped."""
    # Starlette tries every route in turn for each URL asked for; a page with a hundred
    # links would spend most of its time there, so each name's route is found once
    routes = site(request).named_routes
    if name not in routes:
        found = [r for r in request.app.router.routes if getattr(r, "name", None) == name]
        if not found:
            raise NoMatchFound(name, params)
        routes[name] = found[0]
    return routes[name].url_path_for(name, **_path_params(params))


def _path_params(params: dict[str, Any]) -> dict[str, Any]:
    # an output's path keeps its slashes; every other value is one path segment
    return {
        key: urllib.parse.quote(value, safe="/" if key == "path" else "")
        if isinstance(value, str)
        else value
        for key, value in params.items()
    }


async def render(
    request: Request, name: str, context: dict[str, Any], status: int = 200
) -> Response:
    user = await current_user(request)
    context = {
        "user": user,
        "csrf_token": csrf.csrf_token(request),
        "settings": site(request).settings,
        # messages from the previous request are shown once, on the next full page
        "flashes": [] if name.startswith("_") else request.session.pop("flash", []),
        **context,
    }
    html = await render_page(site(request).templates.get_template(name), request, context)
    response = HTMLResponse(html, status_code=status)
    response.headers["Vary"] = "HX-Request, Cookie"
    return response


# The pages that take long to render are rendered by a thread of their own, not on the
# event loop: such a page then holds the loop for no more than a switch interval at a time
# (cli.SWITCH_INTERVAL), and the requests arriving meanwhile — cheap pages, quick 503s —
# are answered without waiting for it. The quick ones stay on the loop, so they never wait
# behind a long one in the thread, and while one is at work the thread's render pauses
# between pieces of its output (views/admission.py: the quick pages go first). Every
# HAND_OVER of rendering it also hands the GIL over (a sleep of 0 s): the loop gives the
# GIL up at each of its socket calls, and without the hand-over it waited after each one
# for the render's switch interval to end (under bench_overload's flood the cheap pages' p95
# went from 1.1-1.6x their idle p95 to 0.8-1.0x). Not much more often: every hand-over
# waits for the loop to give the GIL back, and at every 0.1 ms a flooded page's admitted
# renders took 300-400 ms at p95 (11-15 ms at every 1 ms). One thread: renders share one
# GIL, more would only share it more finely.
RENDERER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
LONG_RENDER = 0.001  # seconds: a template whose renders usually take longer is rendered there
GIVE_WAY_EVERY = 16  # pieces of output a long render makes between two looks for quick requests
HAND_OVER = 0.001  # seconds of a long render between two hand-overs of the GIL to the loop
_render_time: dict[str, float] = {}  # template name -> its usual render time (moving average)


async def render_page(template: Template, request: Request, context: dict[str, Any]) -> str:
    context = {"request": request, **context}
    name = template.name or ""
    usual = _render_time.get(name, 0.0)
    if usual < LONG_RENDER or answering_quick.get():
        start = time.perf_counter()
        html = template.render(context)
        took = time.perf_counter() - start
    else:
        quiet = site(request).admission.no_quick_at_work
        html, took = await asyncio.get_running_loop().run_in_executor(
            RENDERER, render_giving_way, template, context, quiet
        )
    _render_time[name] = usual * 0.8 + took * 0.2 if usual else took
    return html


def render_giving_way(
    template: Template, context: dict[str, Any], quiet: threading.Event
) -> tuple[str, float]:
    """The page, and the seconds its render took (not counting its pauses): while ``quiet``
    is clear it waits between pieces of output, for at most GIVE_WAY_MAX in all."""
    start = time.perf_counter()
    allowance = GIVE_WAY_MAX
    parts = []
    handed = start
    for i, piece in enumerate(template.generate(context)):
        parts.append(piece)
        if i % GIVE_WAY_EVERY:
            continue
        now = time.perf_counter()
        if now - handed >= HAND_OVER:
            time.sleep(0)  # the GIL handed over (see RENDERER)
            handed = now
        if allowance > 0 and not quiet.is_set():
            before = time.perf_counter()
            quiet.wait(allowance)
            allowance -= time.perf_counter() - before
    return "".join(parts), time.perf_counter() - start - (GIVE_WAY_MAX - allowance)


async def fragment(
    request: Request, name: str, context: dict[str, Any], done: bool, etag: str | None = None
) -> Response:
    """A partial for htmx; HTTP 286 tells htmx to stop polling once nothing shown can change.
    With ``etag`` (from ``version_tag``) the partial says which version it shows."""
    response = await render(request, name, {**context, "etag": etag})
    if done:
        response.status_code = 286
    if etag:
        response.headers.update(versioned(etag))
    return response


def versioned(etag: str) -> dict[str, str]:
    """The headers of an answer with a version."""
    # no-cache: a browser may keep the answer but must ask again before using it
    return {"ETag": etag, "Cache-Control": "no-cache", "Vary": "HX-Request, Cookie"}


def version_tag(*parts: Any) -> str:
    """An ETag for what a fragment shows, made from everything its content depends on (and
    the minute, so that "5 min ago" stays true)."""
    text = json.dumps([*parts, int(time.time() // 60)], default=str)
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:24] + '"'


def not_modified(request: Request, etag: str) -> Response | None:
    """304 Not Modified when the asker already has the version ``etag``: a poll that finds
    nothing changed costs a lookup, not a render."""
    sent = request.headers.get("if-none-match", "")
    if etag not in (tag.strip().removeprefix("W/") for tag in sent.split(",")):
        return None
    return Response(status_code=304, headers=versioned(etag))


def flash(request: Request, message: str, kind: str = "info") -> None:
    """A message shown once, on the next full page."""
    # assigned, not appended in place: the session notices assignments only
    request.session["flash"] = [
        *request.session.get("flash", []),
        {"message": message, "kind": kind},
    ]


async def flash_scheduled(request: Request, request_id: int) -> None:
    """Tell the asker what a job request just made scheduled, in its own words (or that it
    had nothing to do)."""
    row = await site(request).db.fetchone(
        "SELECT status, status_message FROM job_requests WHERE id = ?", (request_id,)
    )
    assert row is not None
    flash(
        request,
        row["status_message"] or "Job request submitted",
        "info" if row["status"] == "created" else "warning",
    )


def redirect(request: Request, name: str, fragment_id: str = "", **params: Any) -> Response:
    """See Other: to the named route (and an anchor on it)."""
    target = url(request, name, **params) + (f"#{fragment_id}" if fragment_id else "")
    return RedirectResponse(target, status_code=303)


def redirect_to(path: str) -> Response:
    """See Other: to a URL the handler built, or a path checked to be on this site
    (see local_path)."""
    return RedirectResponse(path, status_code=303)


DISK_FULL = (
    "the disk holding the site's data is full, so nothing could be saved and nothing was "
    "changed; try again once a site admin has freed some space"
)
# errors from storage: a full disk is answered (503, saying so); anything else is a bug
STORAGE_ERRORS = (sqlite3.OperationalError, OSError)


async def handle_storage_error(request: Request, exc: Exception) -> Response:
    if not out_of_space(exc):
        raise exc
    return await handle_error(request, HTTPError(503, DISK_FULL))


async def handle_error(request: Request, exc: Exception) -> Response:
    error = as_http(exc)
    status, message = error.status, error.message
    if is_api(request):
        return JSONResponse({"error": message}, status_code=status)
    # a poll whose session ended meets a 404 on a private site (see _visible): it too
    # sends the browser to sign in, as it would for anything missing
    polled = bool(request.headers.get("hx-request"))
    if status == 404 and polled and getattr(request.state, "user", None) is None:  # nobody
        status = 401
    if status == 401:
        login = url(request, "login") + "?next=" + urllib.parse.quote(request.url.path)
        if polled:  # a poll must not swap the sign-in page in
            return Response(message, status_code=401, headers={"HX-Redirect": login})
        return RedirectResponse(login, status_code=303)
    return await render(request, "error.html", {"status": status, "message": message}, status)


# -- templates ----------------------------------------------------------------------------


def dom_id(prefix: str, name: str) -> str:
    """A valid, stable HTML id for any name (action names may hold any character)."""
    return f"{prefix}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def commit_url(repo: str, sha: str) -> str | None:
    """A link to the commit on its forge, for the forges whose URL scheme is known."""
    if repo.startswith("https://github.com/"):
        return f"{repo.removesuffix('.git').rstrip('/')}/commit/{sha}"
    return None


@pass_context
def _url(context: Any, name: str, **params: Any) -> str:
    return url(context["request"], name, **params)


def templates(directory: str) -> Jinja2Templates:
    """The page templates, with the helpers they use."""
    result = Jinja2Templates(directory=directory)
    # the templates ship with the package and never change while the site runs; reloading
    # would stat each one (every included pill) on every render
    result.env.auto_reload = False
    result.env.globals.update(
        url=_url,
        status_label=status_label,
        status_icon=lambda state: ICONS.get(state, ICONS[None]),
        runtime=runtime,
        when=when,
        ago=ago,
        iso=lambda ts: iso(ts) or "",
        dom_id=dom_id,
        commit_url=commit_url,
        human_duration=human_duration,
        expected_in=expected_in,
    )
    return result

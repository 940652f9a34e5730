"""The HTML pages, one module per kind of page. Routes are listed in server.create_app."""

from __future__ import annotations

import hashlib
from typing import Any

from jinja2 import Environment
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from .. import server
from ..graph import ICONS
from ..units import ago, human_duration, runtime, when
from ..units import iso as rfc3339

STATES_ACTIVE = ("pending", "running")


def is_htmx(request: Request) -> bool:
    """An htmx request wanting a fragment (restoring history wants the whole page)."""
    headers = request.headers
    return headers.get("hx-request") == "true" and not headers.get("hx-history-restore-request")


async def fragment(request: Request, name: str, context: dict[str, Any], done: bool) -> Response:
    """A partial for htmx; HTTP 286 tells htmx to stop polling once nothing shown can change."""
    response = await server.render(request, name, context)
    if done:
        response.status_code = 286
    return response


def flash(request: Request, message: str, kind: str = "info") -> None:
    """A message shown once, on the next full page."""
    # assigned, not appended in place: the session notices assignments only
    request.session["flash"] = [
        *request.session.get("flash", []),
        {"message": message, "kind": kind},
    ]


def redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303)


def local_path(target: str | None, default: str) -> str:
    """``target`` when it is a path on this site, else ``default`` (no open redirects)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


def iso(ts: float | None) -> str:
    return rfc3339(ts) if ts else ""


def dom_id(prefix: str, name: str) -> str:
    """A valid, stable HTML id for any name (action names may hold any character)."""
    return f"{prefix}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def commit_url(repo: str, sha: str) -> str | None:
    """A link to the commit on its forge, for the forges whose URL scheme is known."""
    if repo.startswith("https://github.com/"):
        return f"{repo.removesuffix('.git').rstrip('/')}/commit/{sha}"
    return None


def setup(env: Environment) -> None:
    env.globals.update(
        status_label=server.status_label,
        status_icon=lambda state: ICONS.get(state, ICONS[None]),
        runtime=runtime,
        when=when,
        ago=ago,
        iso=iso,
        dom_id=dom_id,
        commit_url=commit_url,
        human_duration=human_duration,
    )

"""Home (your projects and recent job requests) and project pages."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .. import workspaces
from ..problems import Problem
from ..queries import job_request_rows
from ..states import ACTIVE_STATES
from .base import (
    check_may_register,
    current_user,
    flash,
    fragment,
    get_project,
    is_htmx,
    redirect,
    render,
    require_user,
    site,
)

RECENT = 10


async def home_context(request: Request) -> dict[str, Any]:
    user = await current_user(request)
    state = site(request)
    db = state.db
    mine: list[dict] = []
    others: list[dict] = []
    recent: list[dict] = []
    if user:
        mine = await db.fetchall(
            "SELECT DISTINCT p.* FROM projects p JOIN project_members m ON m.project_id = p.id "
            "WHERE m.user_id = ? ORDER BY p.name",
            (user.id,),
        )
        recent = await job_request_rows(db, "r.created_by = ?", (user.id,), RECENT)
    if (user and user.is_admin) or state.settings.public_status:
        member_of = {p["id"] for p in mine}
        others = [
            p
            for p in await db.fetchall("SELECT * FROM projects ORDER BY name")
            if p["id"] not in member_of
        ]
    return {
        "mine": mine,
        "others": others,
        "recent": recent,
        "error": None,
        "name": "",
        "live": any(r["status"] in ACTIVE_STATES for r in recent),
    }


async def home(request: Request) -> Response:
    context = await home_context(request)
    if is_htmx(request):
        return await fragment(request, "_recent.html", context, done=not context["live"])
    return await render(request, "home.html", context)


async def create_project(request: Request) -> Response:
    """Register a project (from the home page)."""
    user = await require_user(request)
    check_may_register(request, user)
    form = await request.form()
    name = str(form.get("name") or "")
    try:
        project = await workspaces.create_project(
            site(request).db, user, name, site(request).settings.public_status
        )
    except Problem as e:
        context = {**await home_context(request), "error": e.message, "name": name}
        return await render(request, "home.html", context, status=400)
    flash(request, f"Project {project['name']} registered. Create its first workspace.")
    return redirect(request, "project", slug=project["slug"])


async def project_page(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    user = await current_user(request)
    db = site(request).db
    rows = await db.fetchall(
        "SELECT w.*, (SELECT max(r.created_at) FROM job_requests r WHERE r.workspace_id = w.id) "
        "AS last_run FROM workspaces w WHERE w.project_id = ? ORDER BY w.archived, w.name",
        (project["id"],),
    )
    members = await db.fetchall(
        "SELECT u.id, u.username, u.full_name, group_concat(m.role, ', ') AS roles "
        "FROM project_members m JOIN users u ON u.id = m.user_id WHERE m.project_id = ? "
        "GROUP BY u.id ORDER BY u.username",
        (project["id"],),
    )
    context = {
        "project": project,
        "workspaces": rows,
        "members": members,
        "can_create": bool(user and user.can_run(project["id"])),
    }
    return await render(request, "project.html", context)

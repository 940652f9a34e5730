"""The JSON API (``/api/v1``): bearer tokens, JSON bodies, errors as ``{"error": ...}``.

Each handler checks who is asking, reads its input, calls the core and answers JSON; the
routes are named in server.ROUTES and described in openapi.py.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .. import auth, metrics, notify, openapi, site_status, submit, workspaces
from ..db import Row
from ..outputs import Manifest
from ..units import iso_ms
from .base import (
    HTTPError,
    asker_github_repos,
    check_may_register,
    check_role,
    current_user,
    expected_starts,
    field,
    get_job,
    get_job_request,
    get_project,
    get_workspace,
    json_body,
    may_read_logs,
    parse_number,
    require_admin,
    require_user,
    site,
    via_token,
    with_usage_so_far,
)

Handler = Callable[[Request], Awaitable[Response]]


def api(handler: Handler) -> Handler:
    """An API endpoint: whoever the token names is known (or refused) before anything else."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        await current_user(request)
        return await handler(request)

    return endpoint


@api
async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document())


# -- projects and members -----------------------------------------------------------------


@api
async def create_project(request: Request) -> Response:
    user = await require_user(request)
    check_may_register(request, user)
    body = await json_body(request)
    state = site(request)
    project = await workspaces.create_project(
        state.db, user, field(body, "name"), state.settings.public_status
    )
    return JSONResponse({"slug": project["slug"], "name": project["name"]}, status_code=201)


@api
async def members(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    rows = await workspaces.members_of(site(request).db, project["id"])
    return JSONResponse(
        {"members": [{"username": m["username"], "roles": workspaces.roles_list(m)} for m in rows]}
    )


@api
async def add_member(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    user = await check_role(request, project["id"], "developer")
    body = await json_body(request)
    username = field(body, "username")
    roles = field(body, "roles", list)
    if not roles:
        raise HTTPError(400, "roles must name at least one role; to remove a member use DELETE")
    await workspaces.set_member(site(request).db, user, project["id"], username, roles)
    return JSONResponse({"username": username, "roles": sorted(set(roles))})


@api
async def remove_member(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    username = request.path_params["username"]
    user = await check_role(request, project["id"], "developer")
    rows = await workspaces.members_of(site(request).db, project["id"])
    if username.lower() not in {m["username"].lower() for m in rows}:
        raise HTTPError(404, f"{username!r} is not a member of this project")
    await workspaces.set_member(site(request).db, user, project["id"], username, [])
    return Response(status_code=204)


@api
async def github_repos(request: Request) -> Response:
    """The signed-in user's GitHub repositories, for the new-workspace form."""
    await require_user(request)
    try:
        repos = await asker_github_repos(request)
    except auth.GitHubError as e:
        raise HTTPError(502, str(e)) from None
    if repos is None:
        raise HTTPError(400, "sign in with GitHub (in the browser) to list your repositories")
    return JSONResponse({"repos": repos})


# -- workspaces ---------------------------------------------------------------------------


def workspace_json(workspace: Row) -> dict[str, Any]:
    return {
        "name": workspace["name"],
        "project": workspace["project_slug"],
        "repo": workspace["repo"],
        "branch": workspace["branch"],
        "database": workspace["database"],
        "purpose": workspace["purpose"],
        "archived": bool(workspace["archived"]),
        "created_at": iso_ms(workspace["created_at"]),
    }


@api
async def create_workspace(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    user = await check_role(request, project["id"], "developer")
    body = await json_body(request)
    for name in ("name", "repo", "branch", "database"):
        field(body, name)
    state = site(request)
    name = await workspaces.create_workspace(
        state.db, state.settings, state.repos, user, project["id"], body
    )
    return JSONResponse(workspace_json(await get_workspace(request, name)), status_code=201)


@api
async def workspace(request: Request) -> Response:
    row = await get_workspace(request, request.path_params["name"])
    state = site(request)
    found = await workspaces.workspace_actions(state.db, state.repos, state.projects, row)
    return JSONResponse(
        {
            **workspace_json(row),
            "sha": found["sha"],
            "project_yaml_error": found["error"],
            "changes": [
                change_json(c) for c in await workspaces.workspace_changes(state.db, row["id"])
            ],
            "actions": [
                {"name": a["name"], "needs": a["needs"], "status": a["status"]}
                for a in found["actions"]
            ],
        }
    )


@api
async def change_workspace(request: Request) -> Response:
    """Change a workspace: its branch, for now (developers)."""
    row = await get_workspace(request, request.path_params["name"])
    user = await check_role(request, row["project_id"], "developer")
    body = await json_body(request)
    branch = field(body, "branch")
    state = site(request)
    changed = await workspaces.set_branch(state.db, state.repos, user, row, branch)
    updated = await get_workspace(request, row["name"])
    message = (
        f"The workspace now runs branch {updated['branch']} (it was {row['branch']})"
        if changed
        else f"The workspace already runs branch {row['branch']}"
    )
    return JSONResponse({**workspace_json(updated), "changed": changed, "message": message})


def change_json(change: Row) -> dict[str, Any]:
    return {
        "kind": change["kind"],
        "from": change["old_value"],
        "to": change["new_value"],
        "by": change["username"],
        "at": iso_ms(change["at"]),
    }


@api
async def outputs(request: Request) -> Response:
    row = await get_workspace(request, request.path_params["name"])
    await check_role(request, row["project_id"], "output_viewer")
    state = site(request)
    manifest = await asyncio.to_thread(Manifest.load, state.settings.data.workspace(row["name"]))
    return JSONResponse(
        await workspaces.workspace_outputs(state.repos, state.projects, row, manifest)
    )


# -- job requests and jobs ----------------------------------------------------------------


@api
async def create_job_request(request: Request) -> Response:
    row = await get_workspace(request, request.path_params["name"])
    user = await check_role(request, row["project_id"], "developer")
    body = await json_body(request)
    actions = field(body, "actions", list)
    if not all(isinstance(a, str) for a in actions):
        raise HTTPError(400, "actions must be a list of action names")
    force = bool(field(body, "force_run_dependencies", bool, required=False))
    commit = field(body, "commit", str, required=False)
    notify_me = field(body, "notify", bool, required=False)
    if notify_me is None:
        notify_me = bool(row["notify_default"])
    state = site(request)
    request_id = await submit.submit(
        state.db,
        state.settings,
        state.repos,
        row,
        user.id,
        actions,
        force_run_dependencies=force,
        notify=notify_me,
        commit=commit,
    )
    state.scheduler.wake()
    data = await submit.job_request_json(
        state.db, request_id, user.can_view_outputs(row["project_id"])
    )
    assert data is not None
    data["jobs"] = await with_expected_starts(request, data["jobs"])
    return JSONResponse(data, status_code=201)


@api
async def job_request(request: Request) -> Response:
    row = await get_job_request(request, request.path_params["id"])
    show_log = await may_read_logs(request, row["project_id"])
    data = await submit.request_json(site(request).db, row, show_log)
    data["jobs"] = await with_expected_starts(request, data["jobs"])
    return JSONResponse(data)


@api
async def cancel(request: Request) -> Response:
    row = await get_job_request(request, request.path_params["id"])
    user = await check_role(request, row["project_id"], "developer")
    body = await json_body(request) if await request.body() else {}
    actions = field(body, "actions", list, required=False)
    state = site(request)
    cancelled = await submit.cancel(state.db, state.scheduler, row["id"], actions)
    data = await submit.job_request_json(
        state.db, row["id"], user.can_view_outputs(row["project_id"])
    )
    assert data is not None
    data["jobs"] = await with_expected_starts(request, data["jobs"])
    data["cancelled"] = cancelled
    if not cancelled:
        data["message"] = "Nothing to cancel: those jobs have already finished"
    return JSONResponse(data)


@api
async def job(request: Request) -> Response:
    row = with_usage_so_far(request, await get_job(request, request.path_params["id"]))
    show_log = await may_read_logs(request, row["project_id"])
    (data,) = await with_expected_starts(
        request, [{**submit.job_json(row, show_log), "workspace": row["workspace"]}]
    )
    return JSONResponse(data)


async def with_expected_starts(request: Request, jobs: list[dict[str, Any]]) -> list[dict]:
    """Each job's JSON with its "expected_start_at": when it should start if it is waiting
    (null once started, and while the queue is paused)."""
    starts = await expected_starts(request, jobs)
    return [{**job, "expected_start_at": iso_ms(starts.get(job["id"]))} for job in jobs]


@api
async def job_log(request: Request) -> Response:
    row = await get_job(request, request.path_params["id"])
    await check_role(request, row["project_id"], "output_viewer")
    path = site(request).settings.data.log(row["id"])
    if not path.exists():
        raise HTTPError(404, "this job has no log yet; it is written when the job finishes")
    return PlainTextResponse(await asyncio.to_thread(path.read_text, errors="replace"))


# -- the queue ----------------------------------------------------------------------------


@api
async def status(request: Request) -> Response:
    """The queue in the open: public when public_status is on, else for signed-in users."""
    user = await current_user(request)
    state = site(request)
    if not state.settings.public_status and user is None:
        raise HTTPError(401, "sign in (an API token) to see the status of the queue")
    return JSONResponse(
        await site_status.site_status(state.db, state.settings, state.scheduler, user)
    )


# -- the queue (site admins) --------------------------------------------------------------


@api
async def queue(request: Request) -> Response:
    await require_admin(request, "control the queue")
    limit = parse_number(request.query_params.get("limit", "1000"))
    if limit is None:
        raise HTTPError(400, "limit must be a whole number of jobs")
    return JSONResponse(site(request).scheduler.snapshot(limit))


@api
async def pause_queue(request: Request) -> Response:
    await require_admin(request, "control the queue")
    await site(request).scheduler.set_paused(True)
    return JSONResponse({"paused": True, "message": "Queue paused: running jobs go on"})


@api
async def resume_queue(request: Request) -> Response:
    await require_admin(request, "control the queue")
    await site(request).scheduler.set_paused(False)
    return JSONResponse({"paused": False, "message": "Queue resumed"})


@api
async def priority(request: Request) -> Response:
    row = await get_job_request(request, request.path_params["id"])
    await require_admin(request, "control the queue")
    value = (await json_body(request)).get("priority")
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 1000:
        raise HTTPError(400, "priority must be a whole number from -1000 to 1000 (default 0)")
    await site(request).scheduler.set_priority(row["id"], value)
    return JSONResponse({"id": row["id"], "priority": value})


@api
async def outbox(request: Request) -> Response:
    await require_admin(request, "see the outbox")
    state = site(request)
    return JSONResponse(await notify.outbox_json(state.db, state.settings))


async def metrics_page(request: Request) -> Response:
    """Prometheus metrics, for an admin's API token or a scraper on this machine."""
    if not metrics.is_loopback(request.client.host if request.client else None):
        try:
            user = await current_user(request)
        except HTTPError as e:
            return PlainTextResponse(f"{e.message}\n", status_code=e.status)
        if user is None or not user.is_admin or not via_token(request):
            return PlainTextResponse(
                "metrics are served to this machine (loopback) or with a site admin's API token\n",
                status_code=403,
            )
    body = await site(request).metrics.render()
    return Response(body, media_type=metrics.CONTENT_TYPE)

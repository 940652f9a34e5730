"""New workspace, the workspace page (run actions, watch them), archiving, outputs."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import PurePosixPath
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .. import auth, pipeline, submit, workspaces
from ..db import Row
from ..graph import Node, render_svg
from ..outputs import (
    MAX_VIEWABLE_SIZE,
    PREVIEWS,
    Manifest,
    UnreadableOutput,
    csv_preview,
    read_output,
)
from ..problems import FieldProblems
from ..queries import latest_statuses
from ..repos import RepoError, check_allowed, is_allowed
from ..states import ACTIVE_STATES, status_label
from ..submit import SubmitError
from .base import (
    HTTPError,
    asker_github_repos,
    check_role,
    current_user,
    flash,
    flash_scheduled,
    fragment,
    get_project,
    get_workspace,
    is_htmx,
    not_modified,
    redirect,
    render,
    site,
    url,
    version_tag,
)

PREFERRED_BRANCHES = ("main", "master")


# -- a new workspace ----------------------------------------------------------------------


async def load_branches(request: Request, repo: str, wanted: str = "") -> dict[str, Any]:
    """The repo's branches with one preselected, or why they cannot be listed."""
    state = site(request)
    try:
        names = await state.repos.branches(check_allowed(repo, state.settings.repos.allow))
    except RepoError as e:
        return {"branches": [], "selected": None, "branch_error": str(e)}
    if not names:
        return {
            "branches": [],
            "selected": None,
            "branch_error": f"{repo} has no branches yet: push a branch, then try again",
        }
    preferred = [wanted, *PREFERRED_BRANCHES, names[0]]
    return {
        "branches": names,
        "selected": next(b for b in preferred if b in names),
        "branch_error": None,
    }


async def new_workspace_page(
    request: Request,
    project: Any = None,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
) -> Response:
    if project is None:
        project = await get_project(request, request.path_params["slug"])
        await check_role(request, project["id"], "developer")
    form = form or {}
    errors = errors or {}
    branch_field: dict[str, Any] = {"branches": [], "selected": None, "branch_error": None}
    if form.get("repo", "").strip():
        branch_field = await load_branches(request, form["repo"].strip(), form.get("branch", ""))
    context = {
        "project": project,
        "form": form,
        "errors": errors,
        "databases": site(request).settings.databases,
        "github_repos": await offered_github_repos(request),
        **branch_field,
    }
    return await render(request, "new_workspace.html", context, status=400 if errors else 200)


async def create_workspace(request: Request) -> Response:
    """The new-workspace form sent: create it, or show the form again with what is wrong
    (or with the branches of the repo entered, when the browser could not fetch them)."""
    project = await get_project(request, request.path_params["slug"])
    user = await check_role(request, project["id"], "developer")
    form = {key: str(value) for key, value in (await request.form()).items()}
    if form.get("load_branches"):
        return await new_workspace_page(request, project, form)
    state = site(request)
    try:
        name = await workspaces.create_workspace(
            state.db, state.settings, state.repos, user, project["id"], form
        )
    except FieldProblems as e:
        return await new_workspace_page(request, project, form, e.errors)
    flash(request, f"Workspace {name} created. Choose actions to run.")
    return redirect(request, "workspace", workspace=name)


async def offered_github_repos(request: Request) -> list[dict[str, Any]]:
    """Your GitHub repositories that this site allows, to pick from when signed in with
    GitHub; none (the field still takes any URL) when GitHub cannot be asked."""
    try:
        repos = await asker_github_repos(request) or []
    except auth.GitHubError:
        return []
    allow = site(request).settings.repos.allow
    return [repo for repo in repos if is_allowed(repo["url"], allow)]


async def branches(request: Request) -> Response:
    """The branch field of the new workspace form, for the repo just entered (htmx)."""
    project = await get_project(request, request.path_params["slug"])
    await check_role(request, project["id"], "developer")
    repo = request.query_params.get("repo", "").strip()
    if repo:
        context = await load_branches(request, repo, request.query_params.get("branch", ""))
    else:
        context = {"branches": [], "selected": None, "branch_error": None}
    return await render(request, "_branch_field.html", {**context, "errors": {}})


# -- the workspace page -------------------------------------------------------------------


def action_views(found: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**a, "label": status_label(a["status"])} for a in found["actions"]]


def graph_svg(request: Request, actions: list[dict[str, Any]]) -> Any:
    nodes = [
        Node(
            name=a["name"],
            needs=tuple(a["needs"]),
            state=a["state"],
            label=a["label"],
            href=url(request, "job", id=a["job_id"]) if a["job_id"] else None,
        )
        for a in actions
    ]
    return render_svg(nodes, title="Pipeline")


async def workspace_page(
    request: Request,
    workspace: Any = None,
    error: str | None = None,
    selected: list[str] | None = None,
    force: bool = False,
    notify: bool | None = None,
    commit: str = "",
    branch_form: dict[str, str] | None = None,
) -> Response:
    """The workspace's actions with their latest jobs; for htmx, only their status.
    ``branch_form`` is a branch change to show again, with what is wrong with it."""
    if workspace is None:
        workspace = await get_workspace(request, request.path_params["workspace"])
    if is_htmx(request) and request.method == "GET":
        return await workspace_status(request, workspace)
    user = await current_user(request)
    state = site(request)
    manifest = await asyncio.to_thread(
        Manifest.load, state.settings.data.workspace(workspace["name"])
    )
    found = await workspaces.workspace_actions(
        state.db, state.repos, state.projects, workspace, manifest=manifest
    )
    actions = action_views(found)
    context = {
        "workspace": workspace,
        "found": found,
        "actions": actions,
        "graph": graph_svg(request, actions) if actions else None,
        "live": any(a["state"] in ACTIVE_STATES for a in actions),
        "etag": await status_tag(request, workspace, found["sha"]),
        "error": error,
        "selected": selected or [],
        "force": force,
        "commit": commit,
        "branch_form": branch_form or {},
        "notify": bool(workspace["notify_default"]) if notify is None else notify,
        "can_run": bool(user and user.can_run(workspace["project_id"])),
        "can_view_outputs": bool(user and user.can_view_outputs(workspace["project_id"])),
    }
    context["changes"] = await workspaces.workspace_changes(state.db, workspace["id"])
    failed = error or (branch_form or {}).get("error")
    return await render(request, "workspace.html", context, status=400 if failed else 200)


async def status_tag(request: Request, workspace: Any, sha: str | None) -> str:
    """The version of the workspace's live part: the commit shown and its pills."""
    pills = await latest_statuses(site(request).db, workspace["id"])
    return version_tag(workspace["id"], sha, pills)


async def workspace_status(request: Request, workspace: Any) -> Response:
    """The poll of an open workspace page: the pills and the graph, out of band, or 304 when
    nothing changed since the version the page has. No git: the branch head is the one last
    seen and project.yaml at it is parsed once."""
    state = site(request)
    try:
        sha = await state.projects.head(
            state.repos, workspace["repo"], workspace["branch"], fetch=False
        )
    except RepoError:
        sha = None
    etag = await status_tag(request, workspace, sha)
    answer = not_modified(request, etag) or state.fragments.get(etag)
    if answer:
        return answer
    manifest = await asyncio.to_thread(
        Manifest.load, state.settings.data.workspace(workspace["name"])
    )
    found = await workspaces.workspace_actions(
        state.db, state.repos, state.projects, workspace, fetch=False, manifest=manifest
    )
    actions = action_views(found)
    live = any(a["state"] in ACTIVE_STATES for a in actions)
    context = {
        "workspace": workspace,
        "actions": actions,
        "graph": graph_svg(request, actions) if actions else None,
        "live": live,
        "oob": True,
    }
    response = await fragment(request, "_workspace_status.html", context, done=not live, etag=etag)
    state.fragments.keep(etag, response)
    return response


async def create_job_request(request: Request) -> Response:
    """The workspace form sent: submit the ticked actions, or show why not."""
    workspace = await get_workspace(request, request.path_params["workspace"])
    user = await check_role(request, workspace["project_id"], "developer")
    form = await request.form()
    selected = [str(a) for a in form.getlist("actions")]
    force = bool(form.get("force_run_dependencies"))
    notify = bool(form.get("notify"))
    commit = str(form.get("commit") or "").strip() or None
    state = site(request)
    try:
        request_id = await submit.submit(
            state.db,
            state.settings,
            state.repos,
            workspace,
            user.id,
            selected,
            force_run_dependencies=force,
            notify=notify,
            commit=commit,
        )
    except (SubmitError, RepoError, pipeline.ProjectValidationError) as e:
        return await workspace_page(
            request, workspace, str(e), selected, force, notify, commit or ""
        )
    state.scheduler.wake()
    await flash_scheduled(request, request_id)
    return redirect(request, "job_request", workspace=workspace["name"], id=str(request_id))


async def change_branch(request: Request) -> Response:
    """The branch form sent: point the workspace at that branch, or say why not."""
    workspace = await get_workspace(request, request.path_params["workspace"])
    user = await check_role(request, workspace["project_id"], "developer")
    branch = str((await request.form()).get("branch") or "")
    state = site(request)
    try:
        changed = await workspaces.set_branch(state.db, state.repos, user, workspace, branch)
    except FieldProblems as e:
        form = {"branch": branch, "error": e.errors["branch"]}
        return await workspace_page(request, workspace, branch_form=form)
    if changed:
        flash(request, f"Workspace {workspace['name']} now runs branch {branch.strip()}.")
    else:
        flash(request, f"Workspace {workspace['name']} already runs branch {branch.strip()}.")
    return redirect(request, "workspace", workspace=workspace["name"])


async def archive(request: Request) -> Response:
    workspace = await get_workspace(request, request.path_params["workspace"])
    await check_role(request, workspace["project_id"], "developer")
    archived = (await request.form()).get("archived") == "1"
    await workspaces.set_archived(site(request).db, workspace["id"], archived)
    if archived:
        flash(request, f"Workspace {workspace['name']} archived: its logs stay, no new jobs run.")
    else:
        flash(request, f"Workspace {workspace['name']} unarchived: jobs can run again.")
    return redirect(request, "workspace", workspace=workspace["name"])


# -- outputs ------------------------------------------------------------------------------

# a file served from a workspace is never a page of this site: no script runs in it, nothing
# sniffs it into another type, and only this site may frame it
FILE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "font-src data:; frame-ancestors 'self'"
    ),
    "Cross-Origin-Resource-Policy": "same-origin",
    "Referrer-Policy": "no-referrer",
}
# the types shown inline (an image, a report in a sandboxed frame); all else is a download
INLINE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}
PREVIEW_TEXT = 1024**2  # bytes of a text output shown on its preview page


async def outputs(request: Request) -> Response:
    """The workspace's outputs by action (no path); one output's preview page; or, with
    ``?download=1``, the file itself."""
    workspace = await get_workspace(request, request.path_params["workspace"])
    await check_role(request, workspace["project_id"], "output_viewer")
    state = site(request)
    manifest = await asyncio.to_thread(
        Manifest.load, state.settings.data.workspace(workspace["name"])
    )
    path = request.path_params["path"]
    if not path:
        found = await workspaces.workspace_outputs(state.repos, state.projects, workspace, manifest)
        context = {"workspace": workspace, "groups": output_groups(found), "found": found}
        return await render(request, "outputs.html", context)
    entry, data = await shown_output(request, workspace, manifest, path)
    name = PurePosixPath(path).name
    if request.query_params.get("download"):
        disposition = f"attachment; filename*=utf-8''{urllib.parse.quote(name)}"
        return Response(
            data,
            media_type="application/octet-stream",
            headers={**FILE_HEADERS, "Content-Disposition": disposition},
        )
    suffix = PurePosixPath(path).suffix.lower()
    context = {
        "workspace": workspace,
        "path": path,
        "name": name,
        "entry": entry,
        "kind": PREVIEWS.get(suffix),
    }
    if context["kind"] == "table":
        context["table"] = csv_preview(data, "\t" if suffix == ".tsv" else ",")
        if context["table"] is None:
            context["kind"] = "text"
    if context["kind"] == "text":
        context["text"] = data[:PREVIEW_TEXT].decode(errors="replace")
        context["cut"] = len(data) > PREVIEW_TEXT
    return await render(request, "output.html", context)


async def output_file(request: Request) -> Response:
    """An image or HTML report, for the preview page's <img> or sandboxed <iframe>."""
    workspace = await get_workspace(request, request.path_params["workspace"])
    await check_role(request, workspace["project_id"], "output_viewer")
    manifest = await asyncio.to_thread(
        Manifest.load, site(request).settings.data.workspace(workspace["name"])
    )
    path = request.path_params["path"]
    media_type = INLINE_TYPES.get(PurePosixPath(path).suffix.lower())
    if media_type is None:
        raise HTTPError(404, f"{path} is not shown inline: download it from its preview page")
    _, data = await shown_output(request, workspace, manifest, path)
    return Response(data, headers={**FILE_HEADERS, "Content-Type": media_type})


async def shown_output(
    request: Request, workspace: Row, manifest: Manifest, path: str
) -> tuple[dict[str, Any], bytes]:
    """An output an output viewer may see (DESIGN section 10) and its bytes, or why not."""
    entry = manifest.data["files"].get(path)
    if entry is None:
        raise HTTPError(404, f"{workspace['name']} has no output {path!r}")
    if entry["level"] != "moderately_sensitive":
        raise HTTPError(403, f"{path} is {entry['level']}: such outputs are never served")
    if not entry.get("visible"):
        reason = entry.get("not_visible_because") or "it did not pass the checks"
        raise HTTPError(403, f"{path} is not shown: {reason}")
    ws_dir = site(request).settings.data.workspace(workspace["name"])
    try:
        data = await asyncio.to_thread(read_output, ws_dir, path, MAX_VIEWABLE_SIZE)
    except UnreadableOutput:
        message = f"{path} is no longer in the workspace; run its action again"
        raise HTTPError(404, message) from None
    return entry, data


def output_groups(found: dict[str, Any]) -> list[dict[str, Any]]:
    """The outputs list: each action's files, actions in name order."""
    files: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path, entry in sorted(found["files"].items()):
        files.setdefault(entry.get("action", ""), []).append((path, entry))
    return [
        {"action": action, **entry, "files": files.get(action, [])}
        for action, entry in sorted(found["actions"].items())
    ]

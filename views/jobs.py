"""Logs (a workspace's job requests), a job request, a job and its log."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .. import pipeline, submit
from ..outputs import Manifest
from ..queries import job_request_rows, previous_success
from ..repos import RepoError
from ..states import ACTIVE_STATES, State
from .base import (
    HTTPError,
    check_role,
    current_user,
    expected_starts,
    flash,
    flash_scheduled,
    fragment,
    get_job,
    get_job_request,
    get_workspace,
    is_htmx,
    local_path,
    not_modified,
    query_number,
    redirect_to,
    render,
    site,
    url,
    version_tag,
    versioned,
    with_usage_so_far,
)

PAGE_SIZE = 20
JOBS_SHOWN = 100  # jobs of one job request listed at once; the page pages through the rest
LOG_TAIL = 256 * 1024  # bytes of a log shown on the page; the whole log is a link away
PROJECT_YAML_SHOWN = 200_000  # characters of a job request's project.yaml shown on its page
CHANGED_FILES_SHOWN = 500  # files listed as changed since the last success; the rest counted
COUNTED_STATES = (State.RUNNING, State.PENDING, State.SUCCEEDED, State.FAILED)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def logs_page(request: Request) -> Response:
    workspace = await get_workspace(request, request.path_params["workspace"])
    db = site(request).db
    query = request.query_params.get("q", "").strip()
    before = query_number(request, "before")  # keyset: as fast deep in history as at its top
    where = "r.workspace_id = ?"
    params: tuple = (workspace["id"],)
    if query:
        where += (
            " AND (EXISTS (SELECT 1 FROM json_each(r.requested_actions) "
            "WHERE value LIKE ? ESCAPE '\\') OR EXISTS (SELECT 1 FROM jobs j "
            "WHERE j.job_request_id = r.id AND j.action LIKE ? ESCAPE '\\'))"
        )
        params += (_like(query), _like(query))
    if before is not None:
        where += " AND r.id < ?"
        params += (before,)
    rows = await job_request_rows(db, where, params, PAGE_SIZE + 1)
    user = await current_user(request)
    context = {
        "workspace": workspace,
        "can_view_outputs": bool(user and user.can_view_outputs(workspace["project_id"])),
        "job_requests": rows[:PAGE_SIZE],
        "query": query,
        "before": before,
        "older": rows[PAGE_SIZE - 1]["id"] if len(rows) > PAGE_SIZE else None,
        "live": any(r["status"] in ACTIVE_STATES for r in rows[:PAGE_SIZE]),
    }
    if is_htmx(request):
        return await fragment(request, "_logs_list.html", context, done=not context["live"])
    return await render(request, "logs.html", context)


async def job_request_page(request: Request) -> Response:
    row = await get_job_request(request, request.path_params["id"])
    if row["workspace"] != request.path_params["workspace"]:
        raise HTTPError(404, f"job request {row['id']} belongs to another workspace")
    db = site(request).db
    user = await current_user(request)
    can_view_log = bool(user and user.can_view_outputs(row["project_id"]))
    etag = await finished_request_tag(db, row, can_view_log) if is_htmx(request) else None
    cached = etag and (not_modified(request, etag) or site(request).fragments.get(etag))
    if cached:
        return cached
    (job_request,) = await job_request_rows(db, "r.id = ?", (row["id"],), 1)
    now = time.time()
    jobs = job_request["jobs"]
    start = query_number(request, "from") or 0
    if start >= len(jobs):  # past the end: the first jobs
        start = 0
    shown = jobs[start : start + JOBS_SHOWN]
    events: dict[str, list[dict[str, Any]]] = {job["id"]: [] for job in shown}
    if shown:
        marks = ",".join("?" * len(shown))
        for event in await db.fetchall(
            f"SELECT * FROM job_events WHERE job_id IN ({marks}) ORDER BY id", list(events)
        ):
            events[event["job_id"]].append(event)
    workspace = await get_workspace(request, row["workspace"])
    context = {
        "job_request": job_request,
        "shown_jobs": shown,
        "jobs_from": start,
        "jobs_shown": JOBS_SHOWN,
        "timelines": {job["id"]: timeline(events[job["id"]], job, now) for job in shown},
        "workspace": workspace,
        "can_cancel": bool(user and user.can_run(row["project_id"])),
        "can_view_log": can_view_log,
        "live": job_request["status"] in ACTIVE_STATES,
        "now": now,
        "counts": job_counts(job_request["jobs"], now),
        "expected_starts": await expected_starts(request, job_request["jobs"]),
    }
    if is_htmx(request):
        response = await fragment(request, "_job_request.html", context, done=not context["live"])
        if etag and not context["live"]:
            response.headers.update(versioned(etag))
            site(request).fragments.keep(etag, response)
        return response
    context["project_yaml"] = await project_yaml_at(request, workspace["repo"], row["sha"])
    context["changes"] = await changes_since_success(request, workspace, row)
    return await render(request, "job_request.html", context)


def job_counts(jobs: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """How many of a job request's jobs are in each state, and how long they ran in all."""
    by_state = {state: sum(job["state"] == state for job in jobs) for state in COUNTED_STATES}
    runtime = sum(
        (job["completed_at"] or now) - job["started_at"] for job in jobs if job["started_at"]
    )
    return {"by_state": {k: v for k, v in by_state.items() if v}, "runtime": runtime}


async def project_yaml_at(request: Request, repo: str, sha: str) -> dict[str, Any]:
    """The text of project.yaml at a commit (its start, when long), or why it cannot be read."""
    try:
        text = await site(request).repos.read_file(repo, sha, "project.yaml")
    except RepoError as e:
        return {"text": None, "error": str(e), "cut": False}
    return {
        "text": text[:PROJECT_YAML_SHOWN],
        "error": None,
        "cut": len(text) > PROJECT_YAML_SHOWN,
        "size": len(text),
    }


async def changes_since_success(
    request: Request, workspace: dict[str, Any], row: dict[str, Any]
) -> dict[str, Any] | None:
    """The files changed since the workspace's previous successful job request, or None
    when there was none."""
    previous = await previous_success(site(request).db, workspace["id"], row["id"])
    if previous is None:
        return None
    result: dict[str, Any] = {"previous": previous, "files": [], "total": 0, "error": None}
    if previous["sha"] == row["sha"]:
        return result
    try:
        changes = await site(request).repos.changed_files(
            workspace["repo"], previous["sha"], row["sha"], CHANGED_FILES_SHOWN
        )
    except RepoError as e:
        result["error"] = str(e)
        return result
    result.update(files=changes.files, total=changes.total)
    return result


async def rerun(request: Request) -> Response:
    """Run a job request's actions again, at the head of the workspace's branch."""
    row = await get_job_request(request, request.path_params["id"])
    if row["workspace"] != request.path_params["workspace"]:
        raise HTTPError(404, f"job request {row['id']} belongs to another workspace")
    user = await check_role(request, row["project_id"], "developer")
    workspace = await get_workspace(request, row["workspace"])
    state = site(request)
    try:
        request_id = await submit.submit(
            state.db,
            state.settings,
            state.repos,
            workspace,
            user.id,
            json.loads(row["requested_actions"]),
            force_run_dependencies=bool(row["force_run_dependencies"]),
            notify=bool(row["notify"]),
        )
    except (submit.SubmitError, RepoError, pipeline.ProjectValidationError) as e:
        flash(request, f"Nothing was scheduled: {e}", "warning")
        return redirect_to(
            url(request, "job_request", workspace=row["workspace"], id=str(row["id"]))
        )
    state.scheduler.wake()
    await flash_scheduled(request, request_id)
    return redirect_to(url(request, "job_request", workspace=row["workspace"], id=str(request_id)))


async def finished_request_tag(db: Any, row: Any, can_view_log: bool) -> str | None:
    """The version of a finished job request's fragment: the same for everyone who may (or
    everyone who may not) read its logs, as it offers nothing to cancel; None while any of
    its jobs is unfinished."""
    jobs = await db.fetchall(
        "SELECT id, state, status_code, updated_at FROM jobs WHERE job_request_id = ? ORDER BY id",
        (row["id"],),
    )
    if any(job["state"] in ACTIVE_STATES for job in jobs):
        return None
    return version_tag(
        "job request", row["id"], can_view_log, [tuple(job.values()) for job in jobs]
    )


async def cancel(request: Request) -> Response:
    """Cancel a job request's unfinished jobs: all of them, or the named actions' jobs."""
    row = await get_job_request(request, request.path_params["id"])
    await check_role(request, row["project_id"], "developer")
    form = await request.form()
    actions = [str(a) for a in form.getlist("actions")] or None
    state = site(request)
    cancelled = await submit.cancel(state.db, state.scheduler, row["id"], actions)
    if cancelled:
        flash(request, f"Cancelled {len(cancelled)} job{'s' if len(cancelled) != 1 else ''}.")
    else:
        flash(request, "Nothing to cancel: those jobs have already finished.", "warning")
    default = url(request, "job_request", workspace=row["workspace"], id=str(row["id"]))
    return redirect_to(local_path(str(form.get("next") or ""), default))


def timeline(events: list[dict[str, Any]], job: dict[str, Any], now: float) -> list[dict]:
    """Each status the job passed through, with how long it stayed there."""
    result = []
    for i, event in enumerate(events):
        if i + 1 < len(events):
            until = events[i + 1]["at"]
        elif job["state"] in ACTIVE_STATES:
            until = now
        else:
            until = None
        result.append({**event, "lasted": None if until is None else until - event["at"]})
    return result


async def job_page(request: Request) -> Response:
    job = with_usage_so_far(request, await get_job(request, request.path_params["id"]))
    user = await current_user(request)
    state = site(request)
    db = state.db
    events = await db.fetchall(
        "SELECT * FROM job_events WHERE job_id = ? ORDER BY id", (job["id"],)
    )
    can_view_log = bool(user and user.can_view_outputs(job["project_id"]))
    files = []
    if can_view_log:
        manifest = Manifest.load(state.settings.data.workspace(job["workspace"]))
        files = sorted(
            (path, entry)
            for path, entry in manifest.data["files"].items()
            if entry.get("job") == job["id"]
        )
    now = time.time()
    context = {
        "job": job,
        "events": timeline(events, job, now),
        "can_view_log": can_view_log,
        "can_cancel": bool(user and user.can_run(job["project_id"])),
        "files": files,
        "live": job["state"] in ACTIVE_STATES,
        "now": now,
        "expected_starts": await expected_starts(request, [job]),
    }
    if is_htmx(request):
        return await fragment(request, "_job_status.html", context, done=not context["live"])
    if can_view_log:
        context["log"] = await read_log(log_path(request, job["id"]))
    return await render(request, "job.html", context)


def log_path(request: Request, job_id: str) -> Path:
    return site(request).settings.data.log(job_id)


async def read_log(path: Path) -> dict[str, Any] | None:
    """The end of a log (the whole log when it is short), or None before it exists."""

    def read() -> dict[str, Any] | None:
        try:
            with path.open("rb") as f:
                size = f.seek(0, 2)
                f.seek(max(0, size - LOG_TAIL))
                data = f.read()
        except FileNotFoundError:
            return None
        return {"text": data.decode(errors="replace"), "size": size, "cut": size > LOG_TAIL}

    return await asyncio.to_thread(read)


async def job_log(request: Request) -> Response:
    """A job's log: its end as a fragment for htmx to follow, or the whole file as text."""
    job = await get_job(request, request.path_params["id"])
    await check_role(request, job["project_id"], "output_viewer")
    path = log_path(request, job["id"])
    if is_htmx(request):
        context = {"job": job, "log": await read_log(path), "live": job["state"] in ACTIVE_STATES}
        return await fragment(request, "_log.html", context, done=not context["live"])
    if not path.exists():
        raise HTTPError(404, "this job has no log yet: it starts when the job runs")
    text = await asyncio.to_thread(path.read_text, errors="replace")
    return PlainTextResponse(text, headers={"X-Content-Type-Options": "nosniff"})

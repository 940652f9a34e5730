"""Turning a submission into a job request and its jobs, in one transaction."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from . import pipeline
from .config import Settings
from .db import Database, Row
from .outputs import Manifest, action_definition
from .queries import LATEST_JOB_PER_ACTION, request_status
from .repos import FileTooLarge, Repos
from .states import ACTIVE_STATES, StatusCode
from .units import iso_ms

if TYPE_CHECKING:
    from .runner import Scheduler


class SubmitError(Exception):
    """The submission cannot be accepted; the message tells the user why and what to do."""


def new_job_id() -> str:
    return secrets.token_hex(8)


def image_for(settings: Settings, action: pipeline.Action) -> str:
    template = settings.images.get(action.image)
    if template is None:
        known = ", ".join(sorted(settings.images))
        raise SubmitError(
            f"action {action.name} uses image {action.image[:200]!r}, which this site does not "
            f"provide (images here: {known})"
        )
    return template.replace("{name}", action.image).replace("{tag}", action.tag)


async def load_project(
    repos: Repos, repo: str, branch: str, commit: str | None = None
) -> tuple[str, pipeline.Pipeline]:
    """The commit to run (``commit``, which must be on ``branch``, else the branch's head),
    the repo just fetched, and its parsed project.yaml.

    Raises RepoError or ProjectValidationError, each with a message for the user.
    """
    if commit:
        sha = await repos.resolve_commit(repo, branch, commit, fresh=True)
    else:
        sha = await repos.resolve_branch(repo, branch, fresh=True)
    return sha, await parse_project(repos, repo, sha)


async def parse_project(repos: Repos, repo: str, sha: str) -> pipeline.Pipeline:
    """project.yaml of ``repo`` at commit ``sha``, validated. A file over the size limit is
    not read, and the rest is parsed in a thread: however hostile the file, the site goes
    on answering meanwhile."""
    try:
        text = await repos.read_file(repo, sha, "project.yaml", max_size=pipeline.MAX_PROJECT_SIZE)
    except FileTooLarge as e:
        raise pipeline.ProjectValidationError([pipeline.too_large_message(e.size)]) from None
    return await asyncio.to_thread(pipeline.load_pipeline, text)


def action_definitions(project: pipeline.Pipeline) -> dict[str, dict[str, Any]]:
    """What each action of ``project`` runs, to compare with what made its outputs."""
    return {
        name: action_definition(action.run, action.args, action.needs)
        for name, action in project.actions.items()
    }


def out_of_date(manifest: Manifest, project: pipeline.Pipeline) -> dict[str, str | None]:
    """Why each action's recorded outputs are out of date against ``project``, or None."""
    return manifest.out_of_date(action_definitions(project))


async def _workspace_state(
    conn: aiosqlite.Connection,
    workspace_dir: Path,
    workspace_id: int,
    project: pipeline.Pipeline,
) -> dict[str, pipeline.ActionState]:
    cur = await conn.execute(LATEST_JOB_PER_ACTION, (workspace_id,))
    manifest = Manifest.load(workspace_dir)
    stale = out_of_date(manifest, project)
    return {
        row["action"]: pipeline.ActionState(
            state=row["state"],
            job_id=row["id"],
            outputs_exist=manifest.outputs_exist(workspace_dir, row["action"]),
            out_of_date=stale.get(row["action"]),
        )
        for row in await cur.fetchall()
    }


async def submit(
    db: Database,
    settings: Settings,
    repos: Repos,
    workspace: Row,
    user_id: int,
    actions: list[str],
    *,
    force_run_dependencies: bool = False,
    notify: bool = False,
    commit: str | None = None,
) -> int:
    """Create a job request for ``actions`` in ``workspace`` at ``commit`` (a commit of the
    workspace's branch; its head when None); returns its id."""
    if workspace["archived"]:
        raise SubmitError(f"workspace {workspace['name']} is archived; unarchive it to run jobs")
    if not actions:
        raise SubmitError("choose at least one action to run")
    sha, project = await load_project(repos, workspace["repo"], workspace["branch"], commit)
    workspace_dir = settings.data.workspace(workspace["name"])
    now = time.time()
    async with db.transaction() as conn:
        state = await _workspace_state(conn, workspace_dir, workspace["id"], project)
        try:
            the_plan = pipeline.plan(project, actions, state, force_run_dependencies)
        except pipeline.UnknownActionError as e:
            raise SubmitError(str(e)) from None
        images = {
            job.action: image_for(settings, project.actions[job.action]) for job in the_plan.jobs
        }
        cur = await conn.execute(
            "INSERT INTO job_requests (workspace_id, created_by, branch, sha, requested_actions, "
            "force_run_dependencies, notify, status, status_message, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                workspace["id"],
                user_id,
                workspace["branch"],
                sha,
                json.dumps(actions),
                int(force_run_dependencies),
                int(notify),
                the_plan.status,
                the_plan.message,
                now,
            ),
        )
        request_id = cur.lastrowid
        new_ids: dict[str, str] = {}
        for offset, job in enumerate(the_plan.jobs):
            action = project.actions[job.action]
            job_id = new_job_id()
            new_ids[job.action] = job_id
            wait_for = [new_ids[a] for a in job.needs_new] + list(job.needs_existing)
            created = now + offset * 1e-6  # keeps dependency order among equal timestamps
            await conn.execute(
                "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
                "run_command, image, args, outputs, needs, wait_for, requires_db, state, "
                "status_code, status_message, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 'created', ?, ?, ?)",
                (
                    job_id,
                    request_id,
                    workspace["id"],
                    user_id,
                    job.action,
                    sha,
                    action.run,
                    images[job.action],
                    json.dumps(list(action.args)),
                    json.dumps(action.outputs),
                    json.dumps(list(action.needs)),
                    json.dumps(wait_for),
                    int(action.is_database_action),
                    StatusCode.CREATED.message,
                    created,
                    created,
                ),
            )
            await conn.execute(
                "INSERT INTO job_events (job_id, status_code, status_message, at) "
                "VALUES (?, ?, ?, ?)",
                (job_id, StatusCode.CREATED, StatusCode.CREATED.message, created),
            )
    return request_id


async def job_request_json(
    db: Database, request_id: int, show_log: bool = False
) -> dict[str, Any] | None:
    """A job request and its jobs as the API shows them; with ``show_log`` (the asker may
    read the jobs' logs), failed jobs' last log lines too."""
    row = await db.lookup(
        "SELECT r.*, w.name AS workspace FROM job_requests r "
        "JOIN workspaces w ON w.id = r.workspace_id WHERE r.id = ?",
        (request_id,),
    )
    return None if row is None else await request_json(db, row, show_log)


async def request_json(db: Database, row: Row, show_log: bool = False) -> dict[str, Any]:
    """job_request_json of a job request's row already read (its columns and "workspace")."""
    jobs = await db.fetchall(
        "SELECT * FROM jobs WHERE job_request_id = ? ORDER BY created_at", (row["id"],)
    )
    status, message = request_status(row, jobs)
    return {
        "id": row["id"],
        "workspace": row["workspace"],
        "branch": row["branch"],
        "sha": row["sha"],
        "requested_actions": json.loads(row["requested_actions"]),
        "force_run_dependencies": bool(row["force_run_dependencies"]),
        "created_at": iso_ms(row["created_at"]),
        "status": status,
        "status_message": message,
        "jobs": [job_json(job, show_log) for job in jobs],
    }


# a job's sampled resource use, as columns of the jobs table and keys of its JSON
METRICS = ("cpu_mean", "cpu_peak", "memory_mean_mb", "memory_peak_mb")


def job_json(job: Row, show_log: bool = False) -> dict[str, Any]:
    """A job as the API shows it; ``log_excerpt`` only with ``show_log``."""
    shown = {
        "id": job["id"],
        "job_request_id": job["job_request_id"],
        "action": job["action"],
        "run_command": job["run_command"],
        "state": job["state"],
        "status_code": job["status_code"],
        "status_message": job["status_message"],
        "created_at": iso_ms(job["created_at"]),
        "started_at": iso_ms(job["started_at"]),
        "completed_at": iso_ms(job["completed_at"]),
        "exit_code": job["exit_code"],
        "metrics": {name: job.get(name) for name in METRICS},
    }
    if show_log:
        shown["log_excerpt"] = job["log_excerpt"]
    return shown


async def cancel(
    db: Database, scheduler: Scheduler, job_request_id: int, actions: list[str] | None
) -> list[str]:
    """Cancel the job request's unfinished jobs: all, or those of the named actions.
    Returns the ids of the jobs cancelled; the caller checks the asker may cancel."""
    jobs = await db.fetchall(
        "SELECT id, action, state FROM jobs WHERE job_request_id = ?", (job_request_id,)
    )
    if actions is not None:
        unknown = set(actions) - {job["action"] for job in jobs}
        if unknown:
            raise SubmitError(f"this job request has no job for: {', '.join(sorted(unknown))}")
        jobs = [job for job in jobs if job["action"] in actions]
    active = [job["id"] for job in jobs if job["state"] in ACTIVE_STATES]
    return await scheduler.cancel(active)

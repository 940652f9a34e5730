"""The reads that several parts of the site share: each written once, here."""

from __future__ import annotations

import json
import time
from typing import Any

from .db import Database, Row
from .scheduling import QueuedJob, decayed, queue_order
from .states import State

# the latest job of each action in a workspace (one row per action that ever ran): the
# newest time per action from the index alone, then one index lookup per action (CROSS JOIN
# keeps SQLite to that order, which it cannot know is best without table statistics)
LATEST_JOBS = (
    "SELECT {columns} FROM (SELECT action, max(created_at) AS newest FROM jobs "
    "WHERE workspace_id = ?1 GROUP BY action) latest CROSS JOIN jobs j "
    "ON j.workspace_id = ?1 AND j.action = latest.action AND j.created_at = latest.newest"
)
LATEST_JOB_PER_ACTION = LATEST_JOBS.format(columns="j.*")


async def latest_statuses(db: Database, workspace_id: int) -> list[tuple[str, str, str, str]]:
    """(action, job id, state, status code) of each action's latest job: what a workspace's
    pills show. A waiting job's message changes as the queue moves; this does not."""
    rows = await db.fetchall(
        LATEST_JOBS.format(columns="j.action, j.id, j.state, j.status_code"), (workspace_id,)
    )
    return sorted((r["action"], r["id"], r["state"], r["status_code"]) for r in rows)


def request_status(request: Row, jobs: list[Row]) -> tuple[str, str]:
    """A job request's overall status, from its jobs' states."""
    if request["status"] == "nothing_to_do" or not jobs:
        return "nothing_to_do", request["status_message"]
    states = [job["state"] for job in jobs]
    succeeded = states.count(State.SUCCEEDED)
    if State.RUNNING in states:
        return State.RUNNING, f"{succeeded} of {len(jobs)} jobs succeeded so far"
    if State.PENDING in states:
        return State.PENDING, f"{succeeded} of {len(jobs)} jobs succeeded so far"
    if succeeded == len(jobs):
        return State.SUCCEEDED, "The job succeeded" if len(
            jobs
        ) == 1 else f"All {len(jobs)} jobs succeeded"
    return State.FAILED, f"{len(jobs) - succeeded} of {len(jobs)} jobs did not succeed"


async def job_request_rows(
    db: Database, where: str, params: tuple, limit: int, offset: int = 0
) -> list[dict[str, Any]]:
    """Job requests matching ``where`` (SQL written in this package; values go in
    ``params``), with who made them, their jobs and overall status, newest first."""
    rows = await db.fetchall(
        "SELECT r.*, w.name AS workspace, u.username FROM job_requests r "
        "JOIN workspaces w ON w.id = r.workspace_id JOIN users u ON u.id = r.created_by "
        f"WHERE {where} ORDER BY r.id DESC LIMIT ? OFFSET ?",
        (*params, limit, offset),
    )
    jobs: dict[int, list[dict[str, Any]]] = {row["id"]: [] for row in rows}
    if rows:
        marks = ",".join("?" * len(rows))
        for job in await db.fetchall(
            f"SELECT * FROM jobs WHERE job_request_id IN ({marks}) ORDER BY created_at",
            list(jobs),
        ):
            jobs[job["job_request_id"]].append(job)
    result = []
    for row in rows:
        status, message = request_status(row, jobs[row["id"]])
        result.append(
            {
                **row,
                "requested": json.loads(row["requested_actions"]),
                "jobs": jobs[row["id"]],
                "status": status,
                "status_message": message,
                "succeeded": sum(job["state"] == "succeeded" for job in jobs[row["id"]]),
            }
        )
    return result


async def queue(
    db: Database, shown: int | None = None, start: int = 0
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Running jobs, then runnable jobs in the order the scheduler would start them,
    then jobs still waiting on their dependencies: ``shown`` of them from the ``start``-th
    on (all when None), per part, each with its ``position`` in its part; and how many each
    part holds. Only what ordering needs is read for every unfinished job; the rest only
    for the jobs shown."""
    rows = await db.fetchall(
        "SELECT j.id, j.state, j.status_code, j.user_id, j.requires_db, j.created_at, "
        "r.priority FROM jobs j JOIN job_requests r ON r.id = j.job_request_id "
        "WHERE j.state IN ('pending', 'running') ORDER BY j.created_at"
    )
    running = [row for row in rows if row["state"] == "running"]
    blocked = [row for row in rows if row["status_code"] == "waiting_on_dependencies"]
    runnable = {
        row["id"]: row
        for row in rows
        if row["state"] == "pending" and row["status_code"] != "waiting_on_dependencies"
    }
    now = time.time()
    usage = {
        row["user_id"]: decayed(row["usage"], row["updated_at"], now)
        for row in await db.fetchall("SELECT user_id, usage, updated_at FROM user_usage")
    }
    per_user: dict[int, int] = {}
    for row in running:
        per_user[row["user_id"]] = per_user.get(row["user_id"], 0) + 1
    ordered = queue_order(
        [
            QueuedJob(
                r["id"],
                r["user_id"],
                priority=r["priority"],
                created_at=r["created_at"],
                requires_db=bool(r["requires_db"]),
            )
            for r in runnable.values()
        ],
        per_user,
        usage,
    )
    parts = {
        "running": running,
        "queued": [runnable[job.id] for job in ordered],
        "blocked": blocked,
    }
    counts = {part: len(jobs) for part, jobs in parts.items()}
    skip, room = start, len(rows) if shown is None else shown
    for part, jobs in parts.items():
        first = min(skip, len(jobs))
        skip -= first
        parts[part] = [
            {**job, "position": first + i + 1} for i, job in enumerate(jobs[first : first + room])
        ]
        room -= len(parts[part])
    ids = [job["id"] for jobs in parts.values() for job in jobs]
    details: dict[str, Row] = {}
    for start in range(0, len(ids), 500):  # SQLite takes a bounded number of parameters
        batch = ids[start : start + 500]
        for row in await db.fetchall(
            "SELECT j.id, j.action, j.status_message, j.started_at, j.job_request_id, "
            "w.name AS workspace, u.username FROM jobs j "
            "JOIN workspaces w ON w.id = j.workspace_id JOIN users u ON u.id = j.user_id "
            f"WHERE j.id IN ({','.join('?' * len(batch))})",
            batch,
        ):
            details[row["id"]] = row
    return (
        {part: [{**job, **details[job["id"]]} for job in jobs] for part, jobs in parts.items()},
        counts,
    )

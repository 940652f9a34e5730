"""The reads that several parts of the site share: each written once, here."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

from .db import Database, Row
from .scheduling import (
    RECENT_RUNS,
    QueuedJob,
    Running,
    Waiting,
    decayed,
    expected_runtime,
    expected_starts,
    queue_order,
)
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


async def previous_success(db: Database, workspace_id: int, before: int) -> Row | None:
    """The workspace's latest job request before ``before`` whose jobs all succeeded."""
    return await db.fetchone(
        "SELECT r.id, r.sha FROM job_requests r WHERE r.workspace_id = ? AND r.id < ? "
        "AND EXISTS (SELECT 1 FROM jobs j WHERE j.job_request_id = r.id) "
        "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_request_id = r.id "
        "AND j.state != 'succeeded') ORDER BY r.id DESC LIMIT 1",
        (workspace_id, before),
    )


async def queue_parts(db: Database) -> dict[str, list[Row]]:
    """Running jobs, then runnable jobs in the order the scheduler would start them,
    then jobs still waiting on their dependencies; of each, only what ordering and the
    expected start times need."""
    rows = await db.fetchall(
        "SELECT j.id, j.action, j.state, j.status_code, j.user_id, j.requires_db, "
        "j.created_at, j.started_at, j.workspace_id, j.wait_for, r.priority FROM jobs j "
        "JOIN job_requests r ON r.id = j.job_request_id "
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
    return {
        "running": running,
        "queued": [runnable[job.id] for job in ordered],
        "blocked": blocked,
    }


class QueueOrder:
    """``queue_parts`` as last read, kept while nothing it depends on changed: ordering
    every unfinished job is most of what the admin page costs, and its open tabs poll it.
    What it depends on is told by a cheap read (how many unfinished jobs, their latest
    change, the latest use recorded) and by the scheduler's own count of changes to its
    queue (``version``: a new priority changes no job row); kept ``ttl`` seconds at most."""

    def __init__(self, ttl: float = 2.0) -> None:
        self.ttl = ttl
        self._key: tuple[Any, ...] | None = None
        self._at = float("-inf")
        self._parts: dict[str, list[Row]] = {}
        self._lock = asyncio.Lock()

    async def parts(self, db: Database, version: int) -> dict[str, list[Row]]:
        async with self._lock:  # tabs asking together share one read
            seen = await db.fetchone(
                "SELECT count(*) AS jobs, max(updated_at) AS changed, "
                "(SELECT max(updated_at) FROM user_usage) AS used "
                "FROM jobs WHERE state IN ('pending', 'running')"
            )
            key = (version, *(seen or {}).values())
            if key != self._key or time.monotonic() - self._at > self.ttl:
                self._parts = await queue_parts(db)
                self._key, self._at = key, time.monotonic()
            return self._parts


async def queue(
    db: Database,
    shown: int | None = None,
    start: int = 0,
    ordered: dict[str, list[Row]] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """The queue as ``queue_parts`` orders it (or as ``ordered`` holds it, read so before):
    ``shown`` of its jobs from the ``start``-th on (all when None), per part, each with its
    ``position`` in its part and what a page shows of it; and how many each part holds. Only
    what ordering needs is read for every unfinished job; the rest only for the jobs shown."""
    parts = dict(ordered if ordered is not None else await queue_parts(db))
    counts = {part: len(jobs) for part, jobs in parts.items()}
    skip, room = start, sum(counts.values()) if shown is None else shown
    for part, jobs in parts.items():
        first = min(skip, len(jobs))
        skip -= first
        parts[part] = [
            {**job, "position": first + i + 1} for i, job in enumerate(jobs[first : first + room])
        ]
        room -= len(parts[part])
    ids = [job["id"] for jobs in parts.values() for job in jobs]
    details: dict[str, Row] = {}
    for first in range(0, len(ids), 500):  # SQLite takes a bounded number of parameters
        batch = ids[first : first + 500]
        for row in await db.fetchall(
            "SELECT j.id, j.status_message, j.job_request_id, "
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


async def recent_runtimes(
    db: Database, actions: set[str]
) -> tuple[dict[tuple[int, str], list[float]], dict[str, list[float]]]:
    """How long the latest successful jobs of these actions ran: per (workspace id, action),
    and per action across the site (the latest RECENT_RUNS of each)."""
    if not actions:
        return {}, {}
    marks = ",".join("?" * len(actions))
    rows = await db.fetchall(
        "SELECT workspace_id, action, seconds, in_workspace, anywhere FROM ("
        "SELECT workspace_id, action, completed_at - started_at AS seconds, "
        "row_number() OVER (PARTITION BY workspace_id, action ORDER BY completed_at DESC) "
        "AS in_workspace, "
        "row_number() OVER (PARTITION BY action ORDER BY completed_at DESC) AS anywhere "
        f"FROM jobs WHERE state = 'succeeded' AND started_at IS NOT NULL AND action IN ({marks})"
        ") WHERE in_workspace <= ? OR anywhere <= ?",
        (*sorted(actions), RECENT_RUNS, RECENT_RUNS),
    )
    per_workspace: dict[tuple[int, str], list[float]] = {}
    per_action: dict[str, list[float]] = {}
    for row in rows:
        if row["in_workspace"] <= RECENT_RUNS:
            per_workspace.setdefault((row["workspace_id"], row["action"]), []).append(
                row["seconds"]
            )
        if row["anywhere"] <= RECENT_RUNS:
            per_action.setdefault(row["action"], []).append(row["seconds"])
    return per_workspace, per_action


async def expected_start_times(
    db: Database, workers: int, jobs: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, float]:
    """When each pending job is expected to start (Unix time), from its place in the fair
    queue and the median runtimes of recent jobs of the same actions. ``jobs`` is what
    ``queue_parts`` returned, when the caller has it already."""
    jobs = jobs or await queue_parts(db)
    active = [*jobs["running"], *jobs["queued"], *jobs["blocked"]]
    per_workspace, per_action = await recent_runtimes(db, {row["action"] for row in active})

    def runtime(row: dict[str, Any]) -> float:
        return expected_runtime(
            per_workspace.get((row["workspace_id"], row["action"]), []),
            per_action.get(row["action"], []),
        )

    unfinished = {row["id"] for row in active}
    return expected_starts(
        time.time(),
        workers,
        [
            Running(row["id"], row["started_at"] or time.time(), runtime(row))
            for row in jobs["running"]
        ],
        [
            Waiting(
                row["id"],
                runtime(row),
                tuple(dep for dep in json.loads(row["wait_for"]) if dep in unfinished),
            )
            for row in [*jobs["queued"], *jobs["blocked"]]
        ],
    )


class ExpectedStarts:
    """``expected_start_times`` for pages and the API, computed again only when ``ttl``
    seconds have passed or a job asked about is not in the last answer: with a long queue
    it reads every pending job, and many pages poll it every few seconds."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._starts: dict[str, float] = {}
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def of(self, db: Database, workers: int, job_ids: Iterable[str]) -> dict[str, float]:
        """When each of the pending jobs ``job_ids`` should start."""
        wanted = set(job_ids)
        async with self._lock:
            if time.monotonic() - self._at > self.ttl or not wanted <= self._starts.keys():
                self._starts = await expected_start_times(db, workers)
                self._at = time.monotonic()
            return {job_id: self._starts[job_id] for job_id in wanted & self._starts.keys()}

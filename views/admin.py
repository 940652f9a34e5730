"""The site admin's page: users, the queue (pause, priorities), Docker and disk."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .. import server
from ..auth import User
from ..db import Database
from ..scheduling import QueuedJob, decayed, queue_order
from . import flash, fragment, is_htmx, redirect

PRIORITY_RANGE = range(-10, 11)
SHOWN = 100  # jobs listed per part of the queue; the rest are counted


async def require_admin(request: Request) -> User:
    user = await server.require_user(request)
    if not user.is_admin:
        raise server.ApiError(403, "only site admins can use the admin page")
    return user


async def queue(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Running jobs, then runnable jobs in the order the scheduler would start them,
    then jobs still waiting on their dependencies."""
    rows = await db.fetchall(
        "SELECT j.id, j.action, j.state, j.status_code, j.status_message, j.user_id, "
        "j.requires_db, j.created_at, j.started_at, j.job_request_id, r.priority, "
        "w.name AS workspace, u.username FROM jobs j "
        "JOIN job_requests r ON r.id = j.job_request_id "
        "JOIN workspaces w ON w.id = j.workspace_id JOIN users u ON u.id = j.user_id "
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


async def admin_page(request: Request) -> Response:
    await require_admin(request)
    state = server.app_state(request)
    db: Database = state.db
    jobs = await queue(db)
    disk = await asyncio.to_thread(shutil.disk_usage, state.settings.data_dir)
    context = {
        **{part: rows[:SHOWN] for part, rows in jobs.items()},
        "counts": {part: len(rows) for part, rows in jobs.items()},
        "paused": state.scheduler.paused,
        "docker_ok": await state.executor.docker_available(),
        "disk": {
            "free": disk.free,
            "total": disk.total,
            "ok": disk.free >= state.settings.min_free_disk,
        },
        "users": await db.fetchall(
            "SELECT u.*, (SELECT count(DISTINCT project_id) FROM project_members m "
            "WHERE m.user_id = u.id) AS projects FROM users u ORDER BY u.username"
        ),
        "users_url": next(
            (
                route.path
                for route in request.app.routes
                if getattr(route, "path", "").startswith("/admin/users")
            ),
            None,
        ),
        "priorities": PRIORITY_RANGE,
    }
    if is_htmx(request):
        live = bool(jobs["running"] or jobs["queued"] or jobs["blocked"])
        return await fragment(request, "_queue.html", context, done=not live)
    return await server.render(request, "admin.html", context)


async def pause(request: Request) -> Response:
    await require_admin(request)
    paused = (await request.form()).get("paused") == "1"
    await server.app_state(request).scheduler.set_paused(paused)
    if paused:
        flash(request, "The queue is paused: running jobs finish, no new job starts.")
    else:
        flash(request, "The queue is running again.")
    return redirect("/admin/")


async def priority(request: Request) -> Response:
    """Set a job request's priority: higher starts sooner among one user's peers."""
    await require_admin(request)
    form = await request.form()
    request_id = str(form.get("job_request_id") or "")
    value = str(form.get("priority") or "").strip()
    try:
        new = int(value)
    except ValueError:
        new = None
    if new not in PRIORITY_RANGE:
        raise server.ApiError(
            400,
            f"priority must be a whole number from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[-1]}",
        )
    row = await server.get_job_request(request, request_id)
    state = server.app_state(request)
    await state.scheduler.set_priority(row["id"], new)
    flash(request, f"Job request #{row['id']} now has priority {new}.")
    return redirect("/admin/")

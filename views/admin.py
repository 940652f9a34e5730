"""The site admin's page: users, the queue (pause, priorities), Docker and disk."""

from __future__ import annotations

import asyncio
import shutil

from starlette.requests import Request
from starlette.responses import Response

from ..db import Row
from ..queries import queue
from .base import (
    HTTPError,
    flash,
    fragment,
    get_job_request,
    is_htmx,
    redirect,
    render,
    require_admin,
    site,
)

PRIORITY_RANGE = range(-10, 11)
SHOWN = 100  # jobs of the queue listed at once; the page pages through the rest
SHOWN_USERS = 50  # users listed here; /admin/users pages through them all
QUEUE_PARTS = ("running", "queued", "blocked")


def queue_window(
    jobs: dict[str, list[Row]], start: int
) -> tuple[dict[str, list[Row]], dict[str, int]]:
    """SHOWN jobs of the queue (running, then waiting in order, then blocked) from
    ``start``, per part, each with its position in its part; and how many of each part
    come after them."""
    window: dict[str, list[Row]] = {}
    after: dict[str, int] = {}
    skip, room = start, SHOWN
    for part in QUEUE_PARTS:
        rows = jobs[part]
        first = min(skip, len(rows))
        skip -= first
        taken = rows[first : first + room]
        room -= len(taken)
        window[part] = [{**row, "position": first + i + 1} for i, row in enumerate(taken)]
        after[part] = len(rows) - first - len(taken)
    return window, after


async def admin_page(request: Request) -> Response:
    await require_admin(request, "use the admin page")
    state = site(request)
    db = state.db
    jobs = await queue(db)
    total = sum(len(rows) for rows in jobs.values())
    start_param = request.query_params.get("from", "")
    start = int(start_param) if start_param.isdigit() and int(start_param) < total else 0
    window, after = queue_window(jobs, start)
    disk = await asyncio.to_thread(shutil.disk_usage, state.settings.data_dir)
    context = {
        **window,
        "counts": {part: len(rows) for part, rows in jobs.items()},
        "after": after,
        "start": start,
        "shown": SHOWN,
        "total": total,
        "paused": state.scheduler.paused,
        "docker_ok": await state.executor.available(),
        "disk": {
            "free": disk.free,
            "total": disk.total,
            "ok": disk.free >= state.settings.min_free_disk,
        },
        "users": await db.fetchall(
            "SELECT u.*, (SELECT count(DISTINCT project_id) FROM project_members m "
            "WHERE m.user_id = u.id) AS projects FROM users u ORDER BY u.username LIMIT ?",
            (SHOWN_USERS,),
        ),
        "user_count": await db.fetchval("SELECT count(*) FROM users"),
        "priorities": PRIORITY_RANGE,
    }
    if is_htmx(request):
        live = bool(jobs["running"] or jobs["queued"] or jobs["blocked"])
        return await fragment(request, "_queue.html", context, done=not live)
    return await render(request, "admin.html", context)


async def pause(request: Request) -> Response:
    await require_admin(request, "use the admin page")
    paused = (await request.form()).get("paused") == "1"
    await site(request).scheduler.set_paused(paused)
    if paused:
        flash(request, "The queue is paused: running jobs finish, no new job starts.")
    else:
        flash(request, "The queue is running again.")
    return redirect(request, "admin")


async def priority(request: Request) -> Response:
    """Set a job request's priority: higher starts sooner among one user's peers."""
    await require_admin(request, "use the admin page")
    form = await request.form()
    request_id = str(form.get("job_request_id") or "")
    value = str(form.get("priority") or "").strip()
    try:
        new = int(value)
    except ValueError:
        new = None
    if new not in PRIORITY_RANGE:
        raise HTTPError(
            400,
            f"priority must be a whole number from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[-1]}",
        )
    row = await get_job_request(request, request_id)
    await site(request).scheduler.set_priority(row["id"], new)
    flash(request, f"Job request #{row['id']} now has priority {new}.")
    return redirect(request, "admin")

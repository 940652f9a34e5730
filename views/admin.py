"""The site admin's page: users, the queue (pause, priorities), Docker and disk."""

from __future__ import annotations

import asyncio
import shutil

from starlette.requests import Request
from starlette.responses import Response

from ..queries import queue
from .base import (
    HTTPError,
    flash,
    fragment,
    get_job_request,
    is_htmx,
    query_number,
    redirect,
    render,
    require_admin,
    site,
)

PRIORITY_RANGE = range(-10, 11)
SHOWN = 50  # jobs of the queue listed at once; the page pages through the rest
SHOWN_USERS = 50  # users listed here; /admin/users pages through them all
QUEUE_PARTS = ("running", "queued", "blocked")


def jobs_after(counts: dict[str, int], start: int) -> dict[str, int]:
    """How many jobs of each part of the queue come after the SHOWN listed from ``start``."""
    after, before = {}, 0
    for part in QUEUE_PARTS:
        listed_to = min(max(start + SHOWN - before, 0), counts[part])
        after[part] = counts[part] - listed_to
        before += counts[part]
    return after


async def admin_page(request: Request) -> Response:
    await require_admin(request, "use the admin page")
    state = site(request)
    db = state.db
    start = query_number(request, "from") or 0
    ordered = await state.queue_order.parts(db, state.scheduler.queue.version)
    jobs, counts = await queue(db, SHOWN, start, ordered)
    total = sum(counts.values())
    if start >= total > 0:  # past the end (the queue got shorter): the first jobs
        start = 0
        jobs, counts = await queue(db, SHOWN, start, ordered)
    disk = await asyncio.to_thread(shutil.disk_usage, state.settings.data_dir)
    context = {
        **jobs,
        "counts": counts,
        "after": jobs_after(counts, start),
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
        live = total > 0
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

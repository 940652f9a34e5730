"""The queue in the open (``/status`` and ``GET /api/v1/status``): how busy the site is, who
is waiting and for how long, whether Docker and the disk are fine, and when each waiting job
is expected to start."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

from .auth import User
from .config import Settings
from .db import Database
from .queries import expected_start_times, queue_parts
from .runner import Scheduler
from .units import disk_space, iso_ms

WAITING_LISTED = 100  # waiting jobs listed by name; the rest are counted


def can_see(settings: Settings, user: User | None) -> Callable[[int], bool]:
    """Whose workspaces the asker may see by name: all on a public site, else their own."""
    if settings.public_status:
        return lambda project_id: True
    return lambda project_id: bool(user and user.is_member(project_id))


async def site_status(
    db: Database, settings: Settings, scheduler: Scheduler, user: User | None
) -> dict[str, Any]:
    """The queue as anyone allowed to see it may: counts overall and per workspace (the
    workspaces of projects the asker may not see are counted together, unnamed)."""
    now = time.time()
    jobs = await queue_parts(db)
    running, queued, blocked = jobs["running"], jobs["queued"], jobs["blocked"]
    waiting = sorted([*queued, *blocked], key=lambda row: row["created_at"])
    starts = {} if scheduler.paused else await expected_start_times(db, settings.max_workers, jobs)
    visible = can_see(settings, user)
    workspaces = {
        row["id"]: row
        for row in await db.fetchall(
            "SELECT w.id, w.name, w.project_id FROM workspaces w WHERE w.id IN "
            "(SELECT workspace_id FROM jobs WHERE state IN ('pending', 'running'))"
        )
    }
    per_workspace: dict[str, dict[str, Any]] = {}
    hidden = {"running": 0, "pending": 0}
    for row in [*running, *waiting]:
        counts = hidden
        workspace = workspaces[row["workspace_id"]]
        if visible(workspace["project_id"]):
            counts = per_workspace.setdefault(
                workspace["name"], {"workspace": workspace["name"], "running": 0, "pending": 0}
            )
        counts["running" if row["state"] == "running" else "pending"] += 1
    in_order = [*queued, *blocked]
    docker_ok = await scheduler.executor.available()
    disk = shutil.disk_usage(settings.data_dir)
    disk_ok = disk.free >= settings.min_free_disk
    oldest = waiting[0]["created_at"] if waiting else None
    return {
        "running": len(running),
        "pending": len(waiting),
        "workers": {"in_use": len(running), "total": settings.max_workers},
        "paused": scheduler.paused,
        "oldest_waiting_since": iso_ms(oldest),
        "oldest_waiting_seconds": None if oldest is None else round(now - oldest, 3),
        "docker": {
            "ok": docker_ok,
            "message": "Docker is running"
            if docker_ok
            else "Docker cannot be reached: no job can start until it is back",
        },
        "disk": {
            "ok": disk_ok,
            "free_bytes": disk.free,
            "needed_bytes": int(settings.min_free_disk),
            "message": f"{disk_space(disk.free)} free"
            + ("" if disk_ok else f"; jobs wait until {disk_space(settings.min_free_disk)} are"),
        },
        "workspaces": sorted(per_workspace.values(), key=lambda w: w["workspace"]),
        "other_workspaces": hidden,
        "waiting": [
            {
                "job_id": row["id"],
                "workspace": workspaces[row["workspace_id"]]["name"],
                "action": row["action"],
                "status_code": row["status_code"],
                "created_at": iso_ms(row["created_at"]),
                "expected_start_at": iso_ms(starts.get(row["id"])),
                "expected_start_in_seconds": None
                if row["id"] not in starts
                else round(max(0.0, starts[row["id"]] - now), 1),
            }
            for row in in_order[:WAITING_LISTED]
            if visible(workspaces[row["workspace_id"]]["project_id"])
        ],
    }

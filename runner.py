"""The scheduler: which job runs next, on which free slot, and what happens after a restart.

One asyncio task watches for work. It wakes on an event — a job request arrived, a job
finished, a job was cancelled — rather than on a polling interval, so a dependent job starts
as soon as its dependency ends. A slow safety tick remains for things no event announces,
such as Docker coming back.

The order among runnable jobs is a pure function (``queue_order``) of plain data, so it is
tested without Docker or a database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from config import Settings
from db import Database, Row
from executor import DockerUnavailable, Executor, JobError, JobSpec

log = logging.getLogger("jobsite.runner")

HALF_LIFE = 3600.0  # seconds; usage from an hour ago counts half
SAFETY_TICK = 5.0
MAX_ATTEMPTS = 2  # a job caught preparing by a restart is retried once

STATUS_MESSAGES = {
    "created": "Created",
    "waiting_on_dependencies": "Waiting on dependencies",
    "waiting_on_workers": "Waiting for a free worker",
    "waiting_on_docker": "Waiting for Docker to be available",
    "preparing": "Preparing the job's files",
    "executing": "Running",
    "finalizing": "Collecting outputs",
    "succeeded": "Completed successfully",
    "cancelled_by_user": "Cancelled by user",
    "dependency_failed": "A job this one needs did not succeed",
    "internal_error": "Internal error",
}


def decayed(usage: float, since: float, now: float) -> float:
    """Usage recorded at ``since``, as it counts at ``now``."""
    return usage * math.pow(0.5, max(0.0, now - since) / HALF_LIFE)


@dataclass(frozen=True)
class QueuedJob:
    id: str
    user_id: int
    priority: int
    created_at: float
    requires_db: bool = False


def queue_order(
    runnable: Iterable[QueuedJob],
    running_per_user: dict[int, int],
    usage_per_user: dict[int, float],
) -> list[QueuedJob]:
    """Runnable jobs, the one to start first first.

    Fewest running jobs of the user, then least recent usage, then the request's priority
    (higher first), then age: a light user's job goes ahead of a heavy user's backlog.
    """
    return sorted(
        runnable,
        key=lambda j: (
            running_per_user.get(j.user_id, 0),
            usage_per_user.get(j.user_id, 0.0),
            -j.priority,
            j.created_at,
        ),
    )


class Scheduler:
    """Starts pending jobs on free slots and sees each one through to its end."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        executor: Executor,
        on_job_finished: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.executor = executor
        self.on_job_finished = on_job_finished
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}
        self._stopping = False
        self.docker_ok = True

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await self.recover()
        self._loop_task = asyncio.create_task(self._loop(), name="jobsite-scheduler")

    async def stop(self) -> None:
        """Stop scheduling. Running containers are left alone: a restart re-adopts them."""
        self._stopping = True
        tasks = list(self._running.values())
        if self._loop_task:
            tasks.append(self._loop_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()

    def wake(self) -> None:
        """Something changed (new work, a finished or cancelled job): look at the queue."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), SAFETY_TICK)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.dispatch()
            except Exception:
                log.exception("scheduler pass failed")

    # -- choosing jobs -------------------------------------------------------------

    async def paused(self) -> bool:
        value = await self.db.fetchval("SELECT value FROM site_state WHERE key = 'paused'")
        return value == "1"

    async def set_paused(self, paused: bool) -> None:
        await self.db.execute(
            "INSERT INTO site_state (key, value) VALUES ('paused', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            ("1" if paused else "0",),
        )
        self.wake()

    async def dispatch(self) -> None:
        """One scheduling pass: settle dependencies, then start jobs on free slots."""
        pending = await self.db.fetchall(
            "SELECT j.id, j.user_id, j.wait_for, j.status_code, j.requires_db, j.created_at, "
            "r.priority FROM jobs j JOIN job_requests r ON r.id = j.job_request_id "
            "WHERE j.state = 'pending' ORDER BY j.created_at"
        )
        if not pending:
            return
        runnable = await self._settle_dependencies(pending)
        if not runnable or await self.paused():
            return
        if not self.docker_ok:
            self.docker_ok = await self.executor.docker_available()
            if not self.docker_ok:
                await self._mark_waiting(runnable, "waiting_on_docker")
                return
        running = await self.db.fetchall(
            "SELECT user_id, requires_db FROM jobs WHERE state = 'running'"
        )
        running_per_user: dict[int, int] = {}
        db_running = 0
        for row in running:
            running_per_user[row["user_id"]] = running_per_user.get(row["user_id"], 0) + 1
            db_running += row["requires_db"]
        usage = await self._usage()
        queue = queue_order(
            [
                QueuedJob(r["id"], r["user_id"], r["priority"], r["created_at"], r["requires_db"])
                for r in runnable
            ],
            running_per_user,
            usage,
        )
        free = self.settings.max_workers - len(self._running)
        waiting: list[QueuedJob] = []
        for job in queue:
            per_user_cap = self.settings.max_jobs_per_user
            db_cap = self.settings.max_db_workers
            if (
                free <= 0
                or (per_user_cap and running_per_user.get(job.user_id, 0) >= per_user_cap)
                or (job.requires_db and db_cap is not None and db_running >= db_cap)
            ):
                waiting.append(job)
                continue
            free -= 1
            running_per_user[job.user_id] = running_per_user.get(job.user_id, 0) + 1
            db_running += job.requires_db
            await self._launch(job.id)
        await self._mark_waiting(
            [{"id": j.id} for j in waiting],
            "waiting_on_workers",
            positions=True,
        )

    async def _settle_dependencies(self, pending: list[Row]) -> list[Row]:
        """Fail jobs whose dependencies failed; return jobs whose dependencies all succeeded."""
        waited = {dep for row in pending for dep in json.loads(row["wait_for"])}
        states: dict[str, str] = {}
        if waited:
            marks = ",".join("?" * len(waited))
            for row in await self.db.fetchall(
                f"SELECT id, state, action FROM jobs WHERE id IN ({marks})", list(waited)
            ):
                states[row["id"]] = row["state"]
        runnable = []
        failed_now = False
        for row in pending:
            deps = json.loads(row["wait_for"])
            if any(states.get(dep) == "failed" for dep in deps):
                await self.finish(
                    row["id"], "failed", "dependency_failed", STATUS_MESSAGES["dependency_failed"]
                )
                states[row["id"]] = "failed"
                failed_now = True
            elif all(states.get(dep) == "succeeded" for dep in deps):
                runnable.append(row)
            elif row["status_code"] != "waiting_on_dependencies":
                await self.set_status(row["id"], "waiting_on_dependencies")
        if failed_now:
            self.wake()  # dependents of the jobs just failed are settled on the next pass
        return runnable

    async def _mark_waiting(self, jobs: list[Any], code: str, positions: bool = False) -> None:
        for position, job in enumerate(jobs):
            job_id = job["id"] if isinstance(job, dict) else job.id
            message = STATUS_MESSAGES[code]
            if positions:
                message = (
                    f"Waiting for a free worker: {position} job{'s' if position != 1 else ''} "
                    "ahead of this one"
                )
            await self.set_status(job_id, code, message, only_if_changed=True)

    async def _usage(self) -> dict[int, float]:
        now = time.time()
        return {
            row["user_id"]: decayed(row["usage"], row["updated_at"], now)
            for row in await self.db.fetchall("SELECT user_id, usage, updated_at FROM user_usage")
        }

    async def _add_usage(self, user_id: int, seconds: float) -> None:
        now = time.time()
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "SELECT usage, updated_at FROM user_usage WHERE user_id = ?", (user_id,)
            )
            row = await cur.fetchone()
            total = seconds + (decayed(row["usage"], row["updated_at"], now) if row else 0.0)
            await conn.execute(
                "INSERT INTO user_usage (user_id, usage, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET usage = excluded.usage, "
                "updated_at = excluded.updated_at",
                (user_id, total, now),
            )

    # -- status --------------------------------------------------------------------

    async def set_status(
        self,
        job_id: str,
        code: str,
        message: str | None = None,
        *,
        state: str | None = None,
        only_if_changed: bool = False,
        **fields: Any,
    ) -> None:
        message = STATUS_MESSAGES.get(code, code) if message is None else message
        now = time.time()
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "SELECT status_code, status_message FROM jobs WHERE id = ?", (job_id,)
            )
            current = await cur.fetchone()
            if current is None:
                return
            changed = (current["status_code"], current["status_message"]) != (code, message)
            if only_if_changed and not changed:
                return
            sets = {"status_code": code, "status_message": message, "updated_at": now, **fields}
            if state:
                sets["state"] = state
            assignments = ", ".join(f"{key} = ?" for key in sets)
            await conn.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", [*sets.values(), job_id]
            )
            if current["status_code"] != code:
                await conn.execute(
                    "INSERT INTO job_events (job_id, status_code, status_message, at) "
                    "VALUES (?, ?, ?, ?)",
                    (job_id, code, message, now),
                )
        log.info("job %s: %s: %s", job_id, code, message)

    async def finish(self, job_id: str, state: str, code: str, message: str, **fields: Any) -> None:
        await self.set_status(
            job_id, code, message, state=state, completed_at=time.time(), **fields
        )
        self.wake()
        if self.on_job_finished is not None:
            try:
                await self.on_job_finished(job_id)
            except Exception:
                log.exception("after-job hook failed for job %s", job_id)

    # -- running one job -------------------------------------------------------------

    async def _launch(self, job_id: str) -> None:
        await self.set_status(
            job_id,
            "preparing",
            state="running",
            started_at=time.time(),
            attempts=(await self.db.fetchval("SELECT attempts FROM jobs WHERE id = ?", (job_id,)))
            + 1,
        )
        self._start_task(job_id, self._run(job_id))

    def _start_task(self, job_id: str, coro: Awaitable[None]) -> None:
        task = asyncio.create_task(coro, name=f"job-{job_id}")
        self._running[job_id] = task

        def done(_: asyncio.Task) -> None:
            self._running.pop(job_id, None)
            self.wake()

        task.add_done_callback(done)

    async def job_spec(self, job_id: str) -> JobSpec:
        row = await self.db.fetchone(
            "SELECT j.*, w.name AS workspace, w.repo, w.database FROM jobs j "
            "JOIN workspaces w ON w.id = j.workspace_id WHERE j.id = ?",
            (job_id,),
        )
        assert row is not None, job_id
        database = self.settings.databases.get(row["database"])
        return JobSpec(
            id=row["id"],
            job_request_id=row["job_request_id"],
            workspace=row["workspace"],
            repo=row["repo"],
            sha=row["sha"],
            action=row["action"],
            run_command=row["run_command"],
            image=row["image"],
            args=json.loads(row["args"]),
            outputs=json.loads(row["outputs"]),
            needs=json.loads(row["needs"]),
            requires_db=bool(row["requires_db"]),
            database_url=database.url if database else None,
            database_network=database.network if database else None,
            timeout=row["timeout"],
        )

    async def _run(self, job_id: str, adopt: str | None = None) -> None:
        """See a job through. ``adopt`` is the state of a container found after a restart.

        The temporary dir and container are removed before the job is marked finished, so
        whoever sees the final status also sees a clean machine.
        """
        try:
            ending = await self._execute(job_id, adopt)
        except asyncio.CancelledError:
            if not self._stopping:  # left for the next process to re-adopt otherwise
                await self.executor.cleanup(job_id)
            raise
        except DockerUnavailable as e:
            self.docker_ok = False
            await self.executor.cleanup(job_id)
            await self.set_status(
                job_id,
                "waiting_on_docker",
                f"{STATUS_MESSAGES['waiting_on_docker']}: {e}",
                state="pending",
            )
            return
        except JobError as e:
            ending = ("failed", e.status_code, e.message, {})
        except Exception as e:
            log.error("job %s failed inside jobsite:\n%s", job_id, traceback.format_exc())
            message = (
                f"Internal error: {type(e).__name__}: {e}. The site admin can find the "
                "details in the server log."
            )
            ending = ("failed", "internal_error", message, {})
        await self.executor.cleanup(job_id)
        state, code, message, fields = ending
        await self.finish(job_id, state, code, message, **fields)

    async def _execute(
        self, job_id: str, adopt: str | None
    ) -> tuple[str, str, str, dict[str, Any]]:
        """Steps 1 to 5 of a job; returns (state, status code, message, fields to record)."""
        cancelled = ("failed", "cancelled_by_user", STATUS_MESSAGES["cancelled_by_user"])
        spec = await self.job_spec(job_id)
        started = time.time()
        if adopt is None:
            await self.executor.prepare(spec)
            if await self._cancelled(job_id):
                return (*cancelled, {})
            await self.executor.start(spec)
            await self.set_status(job_id, "executing")
        else:
            started = (
                await self.db.fetchval("SELECT started_at FROM jobs WHERE id = ?", (job_id,))
                or started
            )
        exit = await self.executor.wait(spec, started)
        await self._add_usage(
            await self.db.fetchval("SELECT user_id FROM jobs WHERE id = ?", (job_id,)),
            max(0.0, exit.finished_at - exit.started_at),
        )
        if await self._cancelled(job_id):
            return (*cancelled, {"exit_code": exit.exit_code})
        await self.set_status(job_id, "finalizing")
        outcome = await self.executor.finalize(spec, exit, {"started_at": started})
        fields = {"exit_code": outcome.exit_code, "image_id": outcome.image_id}
        return outcome.state, outcome.status_code, outcome.status_message, fields

    async def _cancelled(self, job_id: str) -> bool:
        return bool(await self.db.fetchval("SELECT cancelled FROM jobs WHERE id = ?", (job_id,)))

    async def cancel(self, job_ids: list[str]) -> None:
        """Cancel jobs: pending ones end now, running ones have their container stopped."""
        for job_id in job_ids:
            row = await self.db.fetchone("SELECT state FROM jobs WHERE id = ?", (job_id,))
            if row is None or row["state"] in ("succeeded", "failed"):
                continue
            await self.db.execute("UPDATE jobs SET cancelled = 1 WHERE id = ?", (job_id,))
            if row["state"] == "pending":
                await self.finish(
                    job_id, "failed", "cancelled_by_user", STATUS_MESSAGES["cancelled_by_user"]
                )
            elif job_id in self._running:
                try:
                    await self.executor.stop(job_id)
                except DockerUnavailable:
                    pass
        self.wake()

    # -- restart recovery ---------------------------------------------------------------

    async def recover(self) -> None:
        """Pick up jobs a previous process left running (DESIGN section 7)."""
        running = await self.db.fetchall(
            "SELECT id, status_code, attempts FROM jobs WHERE state = 'running'"
        )
        if not running:
            return
        try:
            containers = await self.executor.site_containers()
        except DockerUnavailable:
            containers = {}
            self.docker_ok = False
        for row in running:
            job_id = row["id"]
            status = containers.get(job_id)
            if status is not None and row["status_code"] in ("executing", "finalizing"):
                log.info("re-adopting job %s (container %s)", job_id, status)
                self._start_task(job_id, self._run(job_id, adopt=status))
                continue
            if status is not None:
                await self.executor.cleanup(job_id)
            if row["attempts"] < MAX_ATTEMPTS:
                await self.set_status(
                    job_id,
                    "created",
                    "The server restarted before this job started; it will be tried again",
                    state="pending",
                    started_at=None,
                )
            else:
                await self.finish(
                    job_id,
                    "failed",
                    "internal_error",
                    "The server restarted while this job was starting, for the second time; "
                    "it was not tried again. Submit it again to retry.",
                )
        self.wake()

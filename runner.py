"""The scheduler: starts queued jobs on free slots, sees each through, and recovers after a
restart (DESIGN sections 5 and 7).

The queue lives in memory (``scheduling.JobQueue``), rebuilt from SQLite on start; SQLite
stays the record of every job's state. One asyncio task dispatches: it wakes on an event —
a job request arrived, a job finished, a job was cancelled, an admin changed something —
rather than on a polling interval, so a dependent job starts as soon as its dependency
ends. A slow safety tick remains for what no event announces: Docker or disk space coming
back. A second task writes the waiting jobs' statuses ("3 jobs ahead of this one"), at most
once per interval and only the rows whose status changed, so a long queue does not turn
every event into thousands of writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from .config import Settings
from .db import Database, Row, out_of_space
from .executor import ContainerExit, DockerUnavailable, Executor, JobError, JobSpec
from .scheduling import DependencyFailure, JobQueue, Limits, QueuedJob
from .states import MESSAGES, State, StatusCode
from .units import disk_space

log = logging.getLogger("jobsite.runner")

SAFETY_TICK = 5.0
STATUS_INTERVAL = 0.5  # seconds between two rewrites of waiting jobs' statuses
STOP_TIMEOUT = 5.0  # the longest stop() waits for job tasks to wind down
MAX_ATTEMPTS = 2  # a job caught preparing by a restart is retried once
DISK_FULL = (
    "The disk holding the site's data filled up while this job ran, so it was stopped and "
    "its files removed; the workspace was left as it was. An admin must free some space; "
    "then run the job again."
)

PENDING_COLUMNS = (
    "j.id, j.user_id, j.job_request_id, j.action, j.wait_for, j.requires_db, "
    "j.created_at, j.started_at, j.status_code, j.status_message, r.priority, "
    "w.name AS workspace, u.username"
)
PENDING_FROM = (
    "jobs j JOIN job_requests r ON r.id = j.job_request_id "
    "JOIN workspaces w ON w.id = j.workspace_id JOIN users u ON u.id = j.user_id"
)


def jobs_ahead(count: int) -> str:
    """'3 jobs ahead of this one'; past 100, rounded down to two significant figures, so a
    job deep in the queue does not get a new message every time the queue moves by one."""
    if count >= 100:
        step = 10 ** (len(str(count)) - 2)
        return f"more than {count // step * step:,} jobs ahead of this one"
    return f"{count} job{'' if count == 1 else 's'} ahead of this one"


def log_line(**fields: Any) -> str:
    """key=value pairs; values with spaces or quotes are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        text = "" if value is None else str(value)
        if not text or any(c in text for c in ' "=\n'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


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
        self.queue = JobQueue()
        self.docker_ok = True
        self.paused = False
        # why runnable jobs cannot start now: (status code, message), or None
        self.blocked: tuple[str, str] | None = None
        self._wake = asyncio.Event()
        self._loading = asyncio.Lock()  # one look for new job requests at a time
        self._statuses_stale = asyncio.Event()
        self._statuses_seen: tuple = ()  # what the last status rewrite was asked for
        self._tasks: list[asyncio.Task] = []
        self._running: dict[str, asyncio.Task] = {}
        self._phase: dict[str, str] = {}  # running job -> preparing, executing or finalizing
        self._cancel_requested: set[str] = set()
        self._last_request = 0  # id of the newest job request whose jobs are in the queue
        self._stopping = False

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(s.max_workers, s.max_jobs_per_user, s.max_db_workers)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous process left, rebuild the queue, start dispatching."""
        self.paused = (
            await self.db.fetchval("SELECT value FROM site_state WHERE key = 'paused'")
        ) == "1"
        adopt = await self.recover()
        for row in await self.db.fetchall("SELECT user_id, usage, updated_at FROM user_usage"):
            self.queue.set_usage(row["user_id"], row["usage"], row["updated_at"])
        for row in await self.db.fetchall(
            f"SELECT {PENDING_COLUMNS} FROM {PENDING_FROM} WHERE j.state = 'running'"
        ):
            job = self._queued_job(row)
            self.queue.add_running(job, row["started_at"] or time.time())
        await self._load_new_jobs()
        for job_id, container in adopt.items():
            log.info(log_line(job=job_id, event="re-adopted", container=container))
            self._phase[job_id] = StatusCode.EXECUTING
            self._start_task(job_id, self._run(job_id, adopt=container))
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="jobsite-scheduler"),
            asyncio.create_task(self._status_loop(), name="jobsite-statuses"),
        ]
        self.wake()

    async def stop(self) -> None:
        """Stop scheduling, within STOP_TIMEOUT. Containers are left running: the next
        start re-adopts them."""
        self._stopping = True
        self.wake()
        tasks = [*self._running.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in still:
                log.warning(log_line(event="stop", task=task.get_name(), note="did not stop"))
        self._running.clear()
        self._tasks.clear()

    def wake(self) -> None:
        """Something changed (new work, a finished or cancelled job): look at the queue."""
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        # The loop also checks _stopping: on Python 3.11 a cancel that arrives just as the
        # wait ends can be lost, and a lost cancel must not keep the scheduler running.
        while not self._stopping:
            try:
                async with asyncio.timeout(SAFETY_TICK):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.dispatch()
            except Exception:
                log.exception("scheduler pass failed")

    async def _status_loop(self) -> None:
        while not self._stopping:
            await self._statuses_stale.wait()
            self._statuses_stale.clear()
            try:
                await self.write_waiting_statuses()
            except Exception:
                log.exception("writing waiting statuses failed")
            await asyncio.sleep(STATUS_INTERVAL)

    # -- choosing jobs -------------------------------------------------------------------

    async def dispatch(self) -> None:
        """One scheduling pass: take in new jobs, then start jobs while slots are free."""
        await self._load_new_jobs()
        await self._start_jobs()
        seen = (self.queue.version, self.paused, self.blocked)
        if seen != self._statuses_seen:  # an idle safety tick rewrites nothing
            self._statuses_seen = seen
            self._statuses_stale.set()

    async def _start_jobs(self) -> None:
        if self.paused or not self.queue.pending:
            return
        if len(self.queue.running) >= self.settings.max_workers:
            self.blocked = None  # the jobs wait for workers, whatever else is wrong
            return
        self.blocked = await self._blocked()
        if self.blocked is not None:
            return
        now = time.time()
        while (job := self.queue.pick(now, self.limits)) is not None:
            self.queue.start(job.id, now)
            self._phase[job.id] = StatusCode.PREPARING
            self._start_task(job.id, self._run(job.id))

    async def _blocked(self) -> tuple[str, str] | None:
        """Why no job may start now (Docker away, disk nearly full), or None."""
        if not self.docker_ok:
            self.docker_ok = await self.executor.available()
            if not self.docker_ok:
                return (StatusCode.WAITING_ON_DOCKER, StatusCode.WAITING_ON_DOCKER.message)
        needed = self.settings.min_free_disk
        if needed:
            free = shutil.disk_usage(self.settings.data_dir).free
            if free < needed:
                return (
                    StatusCode.WAITING_ON_DISK,
                    f"Waiting for free disk space: {disk_space(free)} free in the site's data "
                    f"directory, {disk_space(needed)} needed to start a job",
                )
        return None

    def _queued_job(self, row: Row) -> QueuedJob:
        return QueuedJob(
            id=row["id"],
            user_id=row["user_id"],
            request_id=row["job_request_id"],
            action=row["action"],
            priority=row["priority"],
            created_at=row["created_at"],
            requires_db=bool(row["requires_db"]),
            workspace=row["workspace"],
            username=row["username"],
            status=(row["status_code"], row["status_message"]),
        )

    async def _load_new_jobs(self) -> None:
        """Add the pending jobs of job requests made since the last look. A request and its
        jobs are written in one transaction, and request ids grow in the order those
        transactions commit (the one writer serialises them), so none is missed."""
        async with self._loading:
            await self._load_new_jobs_now()

    async def _load_new_jobs_now(self) -> None:
        rows = await self.db.fetchall(
            f"SELECT {PENDING_COLUMNS} FROM {PENDING_FROM} "
            "WHERE j.job_request_id > ? AND j.state = 'pending' "
            "ORDER BY j.job_request_id, j.created_at",
            (self._last_request,),
        )
        if not rows:
            return
        first_load = self._last_request == 0
        self._last_request = rows[-1]["job_request_id"]
        needs = {row["id"]: json.loads(row["wait_for"]) for row in rows}
        ended = await self._ended_jobs({d for deps in needs.values() for d in deps})
        # no await from here until every job is placed: the queue must not change meanwhile
        failures: list[tuple[QueuedJob, Row]] = []
        for row in rows:
            job = self._queued_job(row)
            failed = None
            for dep in needs[job.id]:
                if self.queue.get(dep) is not None:
                    job.waiting_on.add(dep)
                elif ended.get(dep, {}).get("state") != State.SUCCEEDED:
                    failed = ended.get(dep) or {"id": dep, "action": "(unknown)"}
                    break
            if failed is None:
                self.queue.add(job)
                if not first_load:
                    self._log_status(job, State.PENDING, *job.status)
            else:
                failures.append((job, failed))
                ended[job.id] = {"id": job.id, "action": job.action, "state": State.FAILED}
        for job, dependency in failures:
            message = dependency_message(dependency["action"], dependency["id"])
            await self._end_pending(job, StatusCode.DEPENDENCY_FAILED, message)

    async def _ended_jobs(self, job_ids: set[str]) -> dict[str, Row]:
        """The jobs among ``job_ids`` that are no longer in the queue, with their states.
        A job leaves the queue only after its final state is written, so asking again for
        any that left while the database answered finds them all."""
        ended: dict[str, Row] = {}
        while True:
            asked = [j for j in job_ids if self.queue.get(j) is None and j not in ended]
            if not asked:
                return ended
            marks = ",".join("?" * len(asked))
            rows = await self.db.fetchall(
                f"SELECT id, action, state FROM jobs WHERE id IN ({marks})", asked
            )
            ended.update((row["id"], row) for row in rows)
            if len(rows) < len(asked):  # some named jobs do not exist at all
                return ended

    # -- status ------------------------------------------------------------------------

    async def write_waiting_statuses(self) -> int:
        """Tell each waiting job why it waits and where it stands; write only changes.
        Returns the number of jobs whose status changed."""
        now = time.time()
        changes = [
            (job, code, message)
            for job, code, message in self.waiting_statuses(now)
            if job.status != (code, message)
        ]
        if not changes:
            return 0
        still_pending = "EXISTS (SELECT 1 FROM jobs WHERE id = ? AND state = 'pending')"
        async with self.db.transaction() as conn:
            await conn.executemany(
                "INSERT INTO job_events (job_id, status_code, status_message, at) "
                f"SELECT ?, ?, ?, ? WHERE {still_pending}",
                [
                    (job.id, code, message, now, job.id)
                    for job, code, message in changes
                    if job.status is None or job.status[0] != code
                ],
            )
            await conn.executemany(
                "UPDATE jobs SET status_code = ?, status_message = ?, updated_at = ? "
                "WHERE id = ? AND state = 'pending'",
                [(code, message, now, job.id) for job, code, message in changes],
            )
        for job, code, message in changes:
            if job.status is None or job.status[0] != code:
                self._log_status(job, State.PENDING, code, message)
            job.status = (code, message)
        return len(changes)

    def waiting_statuses(self, now: float) -> list[tuple[QueuedJob, str, str]]:
        """Every pending job with the status it should show: runnable ones in the order they
        would start, then the ones waiting on dependencies."""
        statuses = [
            (job, *self._waiting_status(job, position))
            for position, job in enumerate(self.queue.order(now))
        ]
        for job in self.queue.pending.values():
            if job.waiting_on:
                names = sorted({self.queue.get(dep).action for dep in job.waiting_on})
                message = f"Waiting on dependencies: {', '.join(names)}"
                statuses.append((job, StatusCode.WAITING_ON_DEPENDENCIES, message))
        return statuses

    def _waiting_status(self, job: QueuedJob, position: int) -> tuple[str, str]:
        ahead = jobs_ahead(position)
        if self.paused:
            return (StatusCode.WAITING_ON_WORKERS, f"The queue is paused by a site admin; {ahead}")
        if self.blocked is not None:
            return self.blocked
        cap = self.settings.max_jobs_per_user
        if cap is not None and self.queue.running_count(job.user_id) >= cap:
            return (
                StatusCode.WAITING_ON_WORKERS,
                f"Waiting: {job.username} has {cap} job{'' if cap == 1 else 's'} running, the "
                f"most one user may run at once; {ahead}",
            )
        db_cap = self.settings.max_db_workers
        if job.requires_db and db_cap is not None and self.queue.db_running >= db_cap:
            return (
                StatusCode.WAITING_ON_WORKERS,
                f"Waiting: {db_cap} database jobs are running, the most the site runs at "
                f"once; {ahead}",
            )
        return (StatusCode.WAITING_ON_WORKERS, f"Waiting for a free worker: {ahead}")

    def _log_status(self, job: QueuedJob | Row, state: str, code: str, message: str) -> None:
        get = job.get if isinstance(job, dict) else lambda key: getattr(job, key)
        log.info(
            log_line(
                job=get("id"),
                action=get("action"),
                workspace=get("workspace"),
                user=get("username"),
                state=state,
                status=code,
                message=message,
            )
        )

    async def set_status(
        self,
        job_id: str,
        code: str,
        message: str | None = None,
        *,
        state: str | None = None,
        **fields: Any,
    ) -> None:
        """Record a job's new status (and state), with a timeline event when the code
        changes, and log it."""
        message = MESSAGES.get(code, code) if message is None else message
        now = time.time()
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "SELECT j.id, j.action, j.state, j.status_code, w.name AS workspace, u.username "
                "FROM jobs j JOIN workspaces w ON w.id = j.workspace_id "
                "JOIN users u ON u.id = j.user_id WHERE j.id = ?",
                (job_id,),
            )
            current = await cur.fetchone()
            if current is None:
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
        self._log_status(current, state or current["state"], code, message)

    async def _end_pending(self, job: QueuedJob, code: str, message: str | None = None) -> None:
        """A pending job ends without running (cancelled, or a dependency failed); the
        message is the code's own unless a more specific one is given."""
        message = MESSAGES.get(code, code) if message is None else message
        now = time.time()
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE jobs SET state = 'failed', status_code = ?, status_message = ?, "
                "cancelled = cancelled OR ?, completed_at = ?, updated_at = ? WHERE id = ?",
                (code, message, code == StatusCode.CANCELLED_BY_USER, now, now, job.id),
            )
            await conn.execute(
                "INSERT INTO job_events (job_id, status_code, status_message, at) "
                "VALUES (?, ?, ?, ?)",
                (job.id, code, message, now),
            )
        self._log_status(job, State.FAILED, code, message)
        await self._after_job(job.id)

    async def _fail_dependents(self, failures: list[DependencyFailure]) -> None:
        for failure in failures:
            message = dependency_message(failure.dependency.action, failure.dependency.id)
            await self._end_pending(failure.job, StatusCode.DEPENDENCY_FAILED, message)

    async def _after_job(self, job_id: str) -> None:
        if self.on_job_finished is not None:
            try:
                await self.on_job_finished(job_id)
            except Exception:
                log.exception("after-job hook failed for job %s", job_id)

    async def finish(self, job_id: str, state: str, code: str, message: str, **fields: Any) -> None:
        """A running job ended: record it, free its slot, settle the jobs that need it."""
        fields.setdefault("completed_at", time.time())
        await self.set_status(job_id, code, message, state=state, **fields)
        job = self.queue.running.get(job_id)
        failures = self.queue.finish(job_id, time.time(), succeeded=state == State.SUCCEEDED)
        self._phase.pop(job_id, None)
        self._cancel_requested.discard(job_id)
        self.wake()
        if job is not None:
            await self._save_usage(job.user_id)
        await self._fail_dependents(failures)
        await self._after_job(job_id)

    async def _save_usage(self, user_id: int) -> None:
        usage, at = self.queue.recorded_usage(user_id)
        await self.db.execute(
            "INSERT INTO user_usage (user_id, usage, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id) DO UPDATE SET usage = excluded.usage, "
            "updated_at = excluded.updated_at",
            (user_id, usage, at),
        )

    # -- admin controls ----------------------------------------------------------------

    async def set_paused(self, paused: bool) -> None:
        """Pause or resume starting jobs; running jobs go on either way."""
        await self.db.execute(
            "INSERT INTO site_state (key, value) VALUES ('paused', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            ("1" if paused else "0",),
        )
        self.paused = paused
        log.info(log_line(event="queue", paused=paused))
        self.wake()

    async def set_priority(self, request_id: int, priority: int) -> None:
        """Raise or lower a job request's priority, for its jobs still waiting too."""
        await self.db.execute(
            "UPDATE job_requests SET priority = ? WHERE id = ?", (priority, request_id)
        )
        self.queue.set_priority(request_id, priority)
        log.info(log_line(event="priority", job_request=request_id, priority=priority))
        self.wake()

    def snapshot(self, limit: int = 1000) -> dict[str, Any]:
        """The queue as an admin sees it: running jobs, then waiting jobs in order."""
        now = time.time()

        def describe(job: QueuedJob) -> dict[str, Any]:
            return {
                "job_id": job.id,
                "job_request_id": job.request_id,
                "action": job.action,
                "workspace": job.workspace,
                "user": job.username,
                "priority": job.priority,
            }

        queued = [
            {
                "position": position,
                **describe(job),
                "status_code": code,
                "status_message": message,
                "waiting_on": sorted(job.waiting_on),
            }
            for position, (job, code, message) in enumerate(self.waiting_statuses(now)[:limit])
        ]
        running = [
            {**describe(job), "phase": self._phase.get(job.id, StatusCode.EXECUTING)}
            for job in sorted(self.queue.running.values(), key=lambda j: j.started_at or 0)
        ]
        return {
            "paused": self.paused,
            "blocked": self.blocked[1] if self.blocked else None,
            "max_workers": self.settings.max_workers,
            "running": running,
            "queued": queued,
            "queued_total": len(self.queue.pending),
        }

    # -- running one job -------------------------------------------------------------------

    def _start_task(self, job_id: str, coro: Awaitable[None]) -> None:
        task = asyncio.create_task(coro, name=f"job-{job_id}")
        self._running[job_id] = task

        def done(_: asyncio.Task) -> None:
            if self._running.get(job_id) is task:
                del self._running[job_id]
            self.wake()

        task.add_done_callback(done)

    async def _job_row(self, job_id: str) -> Row:
        row = await self.db.fetchone(
            "SELECT j.*, w.name AS workspace, w.repo, w.database FROM jobs j "
            "JOIN workspaces w ON w.id = j.workspace_id WHERE j.id = ?",
            (job_id,),
        )
        assert row is not None, job_id
        return row

    def job_spec(self, row: Row) -> JobSpec:
        """What the executor needs to run the job in ``row`` (from ``_job_row``)."""
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
                await self._cleanup(job_id)
            raise
        except DockerUnavailable as e:
            self.docker_ok = False
            await self._cleanup(job_id)
            await self._requeue(job_id, f"{StatusCode.WAITING_ON_DOCKER.message}: {e}")
            return
        except JobError as e:
            ending = (State.FAILED, e.status_code, e.message, {})
        except Exception as e:
            log.error("job %s failed inside jobsite:\n%s", job_id, traceback.format_exc())
            if out_of_space(e):
                message = DISK_FULL
            else:
                message = (
                    f"Internal error: {type(e).__name__}: {e}. The site admin can find the "
                    "details in the server log."
                )
            ending = (State.FAILED, StatusCode.INTERNAL_ERROR, message, {})
        state, code, message, fields = ending
        fields["completed_at"] = time.time()  # the outputs are in place: the job is done
        if state == State.SUCCEEDED:
            # its outputs are in the workspace: dependents start while the container goes
            self.queue.release_dependents(job_id)
            self.wake()
        await self._cleanup(job_id)
        await self.finish(job_id, state, code, message, **fields)

    async def _cleanup(self, job_id: str) -> None:
        """Step 6, which must not stop the job from being marked finished."""
        try:
            await self.executor.cleanup(job_id)
        except Exception:
            log.exception("cleaning up after job %s failed", job_id)

    async def _requeue(self, job_id: str, message: str) -> None:
        await self.set_status(job_id, StatusCode.WAITING_ON_DOCKER, message, state=State.PENDING)
        self._phase.pop(job_id, None)
        self.queue.requeue(job_id, time.time())
        job = self.queue.pending[job_id]
        job.status = (StatusCode.WAITING_ON_DOCKER, message)
        self.wake()

    async def _execute(
        self, job_id: str, adopt: str | None
    ) -> tuple[str, str, str, dict[str, Any]]:
        """Steps 1 to 5 of a job; returns (state, status code, message, fields to record)."""
        cancelled = (
            State.FAILED,
            StatusCode.CANCELLED_BY_USER,
            StatusCode.CANCELLED_BY_USER.message,
        )
        started = time.time()
        row = await self._job_row(job_id)
        spec = self.job_spec(row)
        if adopt is None:
            await self.set_status(
                job_id,
                StatusCode.PREPARING,
                state=State.RUNNING,
                started_at=started,
                attempts=row["attempts"] + 1,
            )
            await self.executor.prepare(spec)
            if job_id in self._cancel_requested:
                return (*cancelled, {})
            await self.executor.start(spec)
            self._phase[job_id] = StatusCode.EXECUTING
            if job_id in self._cancel_requested:  # cancelled while the container started
                await self.executor.cancel(job_id)
            await self.set_status(job_id, StatusCode.EXECUTING)
        else:
            started = row["started_at"] or started
            if job_id in self._cancel_requested:  # cancelled just before the restart
                await self.executor.cancel(job_id)
        exit = await self.executor.wait(spec, started)
        fields = usage_fields(exit)
        if job_id in self._cancel_requested:
            exit.cancelled = True  # the executor only keeps its log
            try:
                await self.executor.collect(spec, exit)
            except Exception:
                log.exception("keeping the log of cancelled job %s failed", job_id)
            return (*cancelled, {"exit_code": exit.exit_code, **fields})
        self._phase[job_id] = StatusCode.FINALIZING
        await self.set_status(job_id, StatusCode.FINALIZING)
        outcome = await self.executor.collect(spec, exit)
        fields.update(
            exit_code=outcome.exit_code,
            image_id=outcome.image_id,
            log_excerpt=outcome.log_excerpt,
        )
        return outcome.state, outcome.status_code, outcome.status_message, fields

    async def cancel(self, job_ids: list[str]) -> list[str]:
        """Cancel jobs: pending ones end now, running ones have their container stopped.
        Returns the jobs cancelled; finished jobs, and jobs already collecting their outputs,
        are left as they are."""
        # a job request submitted a moment ago may not be in the queue yet
        await self._load_new_jobs()
        cancelled = []
        asked = set(job_ids)
        for job_id in job_ids:
            if job_id in self.queue.pending:
                job, failures = self.queue.remove(job_id)
                await self._end_pending(job, StatusCode.CANCELLED_BY_USER)
                cancelled.append(job_id)
                for failure in failures:  # a dependent cancelled too says so, not that it failed
                    if failure.job.id in asked:
                        await self._end_pending(failure.job, StatusCode.CANCELLED_BY_USER)
                        cancelled.append(failure.job.id)
                    else:
                        await self._fail_dependents([failure])
            elif job_id in self.queue.running and self._phase.get(job_id) != StatusCode.FINALIZING:
                self._cancel_requested.add(job_id)
                await self.db.execute("UPDATE jobs SET cancelled = 1 WHERE id = ?", (job_id,))
                log.info(log_line(job=job_id, event="cancel", note="stopping its container"))
                if self._phase.get(job_id) == StatusCode.EXECUTING:
                    try:
                        await self.executor.cancel(job_id)
                    except DockerUnavailable:
                        pass
                cancelled.append(job_id)
        self.wake()
        return cancelled

    # -- restart recovery -------------------------------------------------------------------

    async def recover(self) -> dict[str, str]:
        """Settle jobs a previous process left running (DESIGN section 7). Returns the jobs
        whose containers are to be re-adopted: job id -> container state."""
        running = await self.db.fetchall(
            "SELECT id, status_code, attempts, cancelled FROM jobs WHERE state = 'running'"
        )
        if not running:
            return {}
        try:
            containers = await self.executor.adopt()
        except DockerUnavailable:
            containers = None
            self.docker_ok = False
        adopt = {}
        for row in running:
            job_id = row["id"]
            if row["cancelled"]:
                self._cancel_requested.add(job_id)
            if containers is None:
                await self.set_status(
                    job_id,
                    StatusCode.WAITING_ON_DOCKER,
                    "The server restarted and Docker is not reachable; the job will start "
                    "again when it is",
                    state=State.PENDING,
                )
                continue
            container = containers.get(job_id)
            if container is not None and row["status_code"] in (
                StatusCode.EXECUTING,
                StatusCode.FINALIZING,
            ):
                adopt[job_id] = container
                continue
            await self.executor.cleanup(job_id)
            if row["attempts"] < MAX_ATTEMPTS:
                await self.set_status(
                    job_id,
                    StatusCode.CREATED,
                    "The server restarted before this job started; it will be tried again",
                    state=State.PENDING,
                    started_at=None,
                )
            else:
                await self.set_status(
                    job_id,
                    StatusCode.INTERNAL_ERROR,
                    "The server restarted while this job was starting, for the second time; "
                    "it was not tried again. Submit it again to retry.",
                    state=State.FAILED,
                    completed_at=time.time(),
                )
        return adopt


def usage_fields(exit: ContainerExit) -> dict[str, float]:
    """The job's sampled CPU and memory use, as its columns of the jobs table."""
    return exit.usage.as_json() if exit.usage is not None else {}


def dependency_message(action: str, job_id: str) -> str:
    return (
        f"Not run: the job for action {action} (job {job_id}), which this job needs, did not "
        "succeed"
    )

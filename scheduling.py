"""Which job starts next: the fair order of the queue, as plain data and pure code.

The scheduler (runner.py) keeps one ``JobQueue`` in memory, rebuilt from SQLite on start,
and asks it for the next job whenever a slot frees, work arrives or a dependency finishes.
Nothing here does I/O or reads the clock: callers pass ``now``, so tests drive it with a
virtual clock.

The order (DESIGN section 7): among runnable jobs, the one whose user has the fewest running
jobs, then the least decayed usage (slot-seconds, one-hour half-life), then the highest
request priority, then the oldest. Each user's runnable jobs sit in a heap ordered by
(priority, age), so choosing the next job compares one candidate per user rather than
sorting the whole queue: with 10,000 jobs from 100 users a decision looks at 100 heads.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

HALF_LIFE = 3600.0  # seconds; usage from an hour ago counts half


def decayed(usage: float, since: float, now: float) -> float:
    """Usage recorded at ``since``, as it counts at ``now``."""
    return usage * math.pow(0.5, max(0.0, now - since) / HALF_LIFE)


@dataclass(eq=False)
class QueuedJob:
    """A pending or running job, as the queue sees it."""

    id: str
    user_id: int
    request_id: int = 0
    action: str = ""
    priority: int = 0
    created_at: float = 0.0
    requires_db: bool = False
    # ids of the jobs this one needs that have not finished yet
    waiting_on: set[str] = field(default_factory=set)
    started_at: float | None = None
    # for status messages and log lines
    workspace: str = ""
    username: str = ""
    # (status code, message) the database last showed, so unchanged rows are not rewritten
    status: tuple[str, str] | None = None

    def order_key(self) -> tuple[int, float, str]:
        """Its place among its own user's jobs: higher priority first, then older first."""
        return (-self.priority, self.created_at, self.id)


@dataclass(frozen=True)
class Limits:
    max_workers: int
    max_jobs_per_user: int | None = None
    max_db_workers: int | None = None


@dataclass(frozen=True)
class DependencyFailure:
    """A pending job that can no longer run because a job it needs did not succeed."""

    job: QueuedJob
    dependency: QueuedJob


def queue_order(
    runnable: Iterable[QueuedJob],
    running_per_user: dict[int, int],
    usage_per_user: dict[int, float],
) -> list[QueuedJob]:
    """Runnable jobs in the order they would start, if slots freed one at a time.

    Each start counts as one more running job for its user, so users take turns: a light
    user's job goes ahead of a heavy user's backlog, and two busy users alternate.
    """
    # A merge of each user's jobs, taking turns, is one sort by (the user's running jobs +
    # the job's place among the user's jobs, the user's usage, the job's own order).
    per_user: dict[int, list[tuple[int, float, str, QueuedJob]]] = {}
    for job in runnable:
        entry = (-job.priority, job.created_at, job.id, job)
        per_user.setdefault(job.user_id, []).append(entry)
    ranked = []
    for user_id, jobs in per_user.items():
        jobs.sort()  # job ids are unique, so jobs themselves are never compared
        running = running_per_user.get(user_id, 0)
        usage = usage_per_user.get(user_id, 0.0)
        ranked.extend((running + place, usage, *entry) for place, entry in enumerate(jobs))
    ranked.sort()
    return [entry[-1] for entry in ranked]


class JobQueue:
    """Pending and running jobs, and each user's usage, in memory."""

    def __init__(self) -> None:
        self.pending: dict[str, QueuedJob] = {}
        self.running: dict[str, QueuedJob] = {}
        # user -> heaps of runnable jobs: (jobs without the database, database jobs); entries
        # are (order key, job id) and go stale when the job starts, leaves or changes priority
        self._ready: dict[int, tuple[list, list]] = {}
        self._dependents: dict[str, set[str]] = {}
        self._running_per_user: dict[int, int] = {}
        self._started_sum: dict[int, float] = {}  # per user, sum of running jobs' start times
        self._db_running = 0
        self._usage: dict[int, tuple[float, float]] = {}  # user -> (usage, recorded at)
        self.version = 0  # grows with every change, so a caller can tell nothing changed

    # -- what is in the queue ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.pending)

    def runnable(self) -> list[QueuedJob]:
        return [job for job in self.pending.values() if not job.waiting_on]

    def get(self, job_id: str) -> QueuedJob | None:
        return self.pending.get(job_id) or self.running.get(job_id)

    def running_count(self, user_id: int) -> int:
        return self._running_per_user.get(user_id, 0)

    @property
    def db_running(self) -> int:
        return self._db_running

    # -- usage -----------------------------------------------------------------------

    def set_usage(self, user_id: int, usage: float, at: float) -> None:
        self._usage[user_id] = (usage, at)

    def recorded_usage(self, user_id: int) -> tuple[float, float]:
        """(usage, at) as last recorded for the user: what the database keeps."""
        return self._usage.get(user_id, (0.0, 0.0))

    def usage(self, user_id: int, now: float) -> float:
        """Decayed slot-seconds of finished jobs, plus the time running jobs have held slots."""
        recorded, at = self._usage.get(user_id, (0.0, now))
        total = decayed(recorded, at, now) if recorded else 0.0
        running = self._running_per_user.get(user_id, 0)
        if running:
            total += running * now - self._started_sum[user_id]
        return total

    # -- changes -------------------------------------------------------------------------

    def add(self, job: QueuedJob) -> None:
        """A new pending job. ``job.waiting_on`` must name only jobs still in the queue."""
        unknown = [dep for dep in job.waiting_on if self.get(dep) is None]
        if unknown:
            raise ValueError(f"job {job.id} waits on jobs the queue does not hold: {unknown}")
        self.version += 1
        self.pending[job.id] = job
        for dep in job.waiting_on:
            self._dependents.setdefault(dep, set()).add(job.id)
        if not job.waiting_on:
            self._push(job)

    def add_running(self, job: QueuedJob, started_at: float) -> None:
        """A job already running (re-adopted after a restart)."""
        job.started_at = started_at
        self._count_running(job, +1)

    def start(self, job_id: str, now: float) -> QueuedJob:
        job = self.pending.pop(job_id)
        job.started_at = now
        self._count_running(job, +1)
        return job

    def finish(self, job_id: str, now: float, succeeded: bool) -> list[DependencyFailure]:
        """A running job ended. Its slot time is added to its user's usage; its dependents
        become runnable, or, when it failed, fail in turn (returned, transitively)."""
        job = self.running.get(job_id)
        if job is None:
            return []
        self._free_slot(job, now)
        if succeeded:
            self.release_dependents(job_id)
            return []
        return self._fail_dependents(job)

    def release_dependents(self, job_id: str) -> None:
        """The job's outputs are in place: the jobs that need it may start (it may still
        hold its slot while its container is removed)."""
        self.version += 1
        for dependent_id in self._dependents.pop(job_id, ()):
            dependent = self.pending.get(dependent_id)
            if dependent is None:
                continue
            dependent.waiting_on.discard(job_id)
            if not dependent.waiting_on:
                self._push(dependent)

    def requeue(self, job_id: str, now: float) -> None:
        """A running job goes back to waiting (Docker went away before it could start)."""
        job = self.running[job_id]
        self._free_slot(job, now)
        job.started_at = None
        job.status = None
        self.add(job)

    def remove(self, job_id: str) -> tuple[QueuedJob, list[DependencyFailure]]:
        """Take a pending job out (cancelled); its dependents fail, transitively."""
        self.version += 1
        job = self.pending.pop(job_id)
        for dep in job.waiting_on:
            self._dependents.get(dep, set()).discard(job_id)
        return job, self._fail_dependents(job)

    def set_priority(self, request_id: int, priority: int) -> list[QueuedJob]:
        """Change the priority of a job request's pending jobs; returns them."""
        self.version += 1
        changed = [job for job in self.pending.values() if job.request_id == request_id]
        for job in changed:
            job.priority = priority
            if not job.waiting_on:
                self._push(job)  # the entry under the old priority goes stale
        return changed

    # -- choosing -----------------------------------------------------------------------

    def pick(self, now: float, limits: Limits) -> QueuedJob | None:
        """The job to start on a free slot now, or None (no free slot, or nothing runnable
        within the per-user and database caps)."""
        if len(self.running) >= limits.max_workers:
            return None
        per_user_cap = limits.max_jobs_per_user
        db_full = limits.max_db_workers is not None and self._db_running >= limits.max_db_workers
        best_key = None
        best = None
        for user_id, (plain, db) in list(self._ready.items()):
            candidate = self._head(plain)
            db_head = self._head(db)
            if candidate is None and db_head is None:
                del self._ready[user_id]
                continue
            running = self._running_per_user.get(user_id, 0)
            if per_user_cap is not None and running >= per_user_cap:
                continue
            if db_full:
                db_head = None
            if db_head is not None and (
                candidate is None or db_head.order_key() < candidate.order_key()
            ):
                candidate = db_head
            if candidate is None:
                continue
            key = (running, self.usage(user_id, now), candidate.order_key())
            if best_key is None or key < best_key:
                best_key, best = key, candidate
        return best

    def order(self, now: float) -> list[QueuedJob]:
        """Every runnable job, in the order they would start (see ``queue_order``)."""
        runnable = self.runnable()
        users = {job.user_id for job in runnable}
        return queue_order(
            runnable,
            self._running_per_user,
            {user_id: self.usage(user_id, now) for user_id in users},
        )

    # -- inside ------------------------------------------------------------------------

    def _push(self, job: QueuedJob) -> None:
        plain, db = self._ready.setdefault(job.user_id, ([], []))
        heapq.heappush(db if job.requires_db else plain, (job.order_key(), job.id))

    def _head(self, heap: list) -> QueuedJob | None:
        """The first live entry of a user's heap, dropping stale ones on the way."""
        while heap:
            key, job_id = heap[0]
            job = self.pending.get(job_id)
            if job is not None and not job.waiting_on and job.order_key() == key:
                return job
            heapq.heappop(heap)
        return None

    def _free_slot(self, job: QueuedJob, now: float) -> None:
        """The job leaves its slot; the time it held the slot counts as its user's usage."""
        assert job.started_at is not None
        recorded, at = self._usage.get(job.user_id, (0.0, now))
        slot_time = max(0.0, now - job.started_at)
        self._usage[job.user_id] = (decayed(recorded, at, now) + slot_time, now)
        self._count_running(job, -1)

    def _count_running(self, job: QueuedJob, step: int) -> None:
        self.version += 1
        user = job.user_id
        assert job.started_at is not None
        if step > 0:
            self.running[job.id] = job
        else:
            del self.running[job.id]
        self._running_per_user[user] = self._running_per_user.get(user, 0) + step
        self._started_sum[user] = self._started_sum.get(user, 0.0) + step * job.started_at
        if not self._running_per_user[user]:
            del self._running_per_user[user]
            del self._started_sum[user]
        self._db_running += step * job.requires_db

    def _fail_dependents(self, failed: QueuedJob) -> list[DependencyFailure]:
        failures = []
        stack = [failed]
        while stack:
            dependency = stack.pop()
            for dependent_id in sorted(self._dependents.pop(dependency.id, ())):
                dependent = self.pending.pop(dependent_id, None)
                if dependent is None:
                    continue
                for other in dependent.waiting_on - {dependency.id}:
                    self._dependents.get(other, set()).discard(dependent_id)
                failures.append(DependencyFailure(dependent, dependency))
                stack.append(dependent)
        return failures


# -- when a waiting job is expected to start ------------------------------------------------

DEFAULT_RUNTIME = 300.0  # seconds expected of an action that never ran anywhere on the site
RECENT_RUNS = 10  # successful runs of an action whose median predicts its next run


def median(values: Iterable[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def expected_runtime(
    in_workspace: list[float], anywhere: list[float], default: float = DEFAULT_RUNTIME
) -> float:
    """How long an action's next job should take: the median of its recent runs in the same
    workspace, else of its recent runs in any workspace, else ``default``."""
    found = median(in_workspace)
    if found is None:
        found = median(anywhere)
    return default if found is None else found


@dataclass(frozen=True)
class Running:
    id: str
    started_at: float
    runtime: float  # expected, in seconds


@dataclass(frozen=True)
class Waiting:
    id: str
    runtime: float  # expected, in seconds
    needs: tuple[str, ...] = ()  # ids of unfinished jobs it waits on


def expected_starts(
    now: float, workers: int, running: Iterable[Running], waiting: Iterable[Waiting]
) -> dict[str, float]:
    """When each waiting job should start, if jobs take their expected runtimes.

    ``waiting`` is in the order the jobs would start: the runnable ones as ``queue_order``
    gives them, then those waiting on dependencies, each after the jobs it needs. Each job
    takes the slot that frees first, once the jobs it needs have ended. A running job past
    its expected runtime is taken to end now. Per-user caps are not modelled.
    """
    ends: dict[str, float] = {}
    free: list[float] = []
    for job in running:
        ends[job.id] = max(now, job.started_at + job.runtime)
        free.append(ends[job.id])
    free.sort()
    # with more jobs running than workers (max_workers was lowered), a slot frees only when
    # the count falls below the number of workers
    free = [now] * max(0, workers - len(free)) + free[max(0, len(free) - workers) :]
    starts: dict[str, float] = {}
    if workers < 1:
        return starts
    for job in waiting:
        ready = max((ends.get(dep, now) for dep in job.needs), default=now)
        slot = heapq.heappop(free)
        start = max(slot, ready)
        starts[job.id] = start
        ends[job.id] = start + job.runtime
        heapq.heappush(free, ends[job.id])
    return starts

"""How close is a waiting job's expected start to when it really starts?

A simulated site: actions with recorded runtimes (each action has its own typical runtime,
and each run varies around it), several users queueing jobs of those actions, a few
workers. At time 0 every waiting job gets its expected start, as the site computes it
(scheduling.expected_starts over the fair queue's order, each job's runtime the median of
its action's recorded runs). Then the queue runs on a virtual clock through the same
JobQueue the scheduler uses, each job taking a runtime drawn for it, and each job's real
start is noted. The median error of the estimate is printed against a naive baseline that
gives every job the median of all recorded runtimes, and the ratio of the two.

Then what the site pays for the estimate: ``queries.expected_start_times`` over a real
SQLite database holding 10,000 pending jobs and 10,000 finished ones (the queue and the
recorded runtimes it reads), against reading the queue alone (``queries.queue_parts``).

    .venv/bin/python bench/bench_expected_start.py [--queues 20] [--jobs 200] [--workers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from jobsite import auth
from jobsite.db import Database
from jobsite.queries import expected_start_times, queue_parts
from jobsite.scheduling import (
    RECENT_RUNS,
    JobQueue,
    Limits,
    QueuedJob,
    Running,
    Waiting,
    expected_starts,
    median,
)

ACTIONS = 30
USERS = 6
SPREAD = 0.35  # how much one run of an action varies around its typical runtime (lognormal)


def simulate(rng: random.Random, jobs: int, workers: int) -> tuple[list[float], list[float]]:
    """One queue: the errors (seconds) of the estimate and of the baseline, per waiting job."""
    typical = {f"action{a}": rng.lognormvariate(6.0, 1.2) for a in range(ACTIONS)}  # ~7 min

    def draw(action: str) -> float:
        return typical[action] * rng.lognormvariate(0.0, SPREAD)

    history = {action: [draw(action) for _ in range(RECENT_RUNS)] for action in typical}
    expected = {action: median(runs) for action, runs in history.items()}
    everything = median([run for runs in history.values() for run in runs])
    assert everything is not None

    queue = JobQueue()
    runtime: dict[str, float] = {}
    actions: dict[str, str] = {}
    for n in range(jobs):
        job_id = f"job{n}"
        actions[job_id] = rng.choice(list(typical))
        runtime[job_id] = draw(actions[job_id])
        # some users queue far more than others
        user = min(int(rng.expovariate(0.5)), USERS - 1)
        queue.add(QueuedJob(job_id, user, created_at=rng.uniform(-600, 0)))
    # the workers are busy already: jobs that started up to their typical runtime ago
    running: list[tuple[str, float]] = []
    for n in range(workers):
        job_id = f"running{n}"
        actions[job_id] = rng.choice(list(typical))
        started = -rng.uniform(0, typical[actions[job_id]])
        runtime[job_id] = max(draw(actions[job_id]), -started + 1)
        queue.add(QueuedJob(job_id, n % USERS, created_at=started))
        queue.start(job_id, started)
        running.append((job_id, started))

    order = [job.id for job in queue.order(0.0)]
    estimate = expected_starts(
        0.0,
        workers,
        [Running(j, started, expected[actions[j]]) for j, started in running],
        [Waiting(j, expected[actions[j]]) for j in order],
    )
    baseline = expected_starts(
        0.0,
        workers,
        [Running(j, started, everything) for j, started in running],
        [Waiting(j, everything) for j in order],
    )

    # the queue runs: whenever a job ends, the fair queue picks the next
    actual: dict[str, float] = {}
    ends = [(started + runtime[j], j) for j, started in running]
    heapq.heapify(ends)
    limits = Limits(max_workers=workers)
    while ends:
        now, job_id = heapq.heappop(ends)
        queue.finish(job_id, now, succeeded=True)
        while (job := queue.pick(now, limits)) is not None:
            queue.start(job.id, now)
            actual[job.id] = now
            heapq.heappush(ends, (now + runtime[job.id], job.id))
    assert set(actual) == set(order)
    return (
        [abs(estimate[j] - actual[j]) for j in order],
        [abs(baseline[j] - actual[j]) for j in order],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", type=int, default=20, help="simulated queues")
    parser.add_argument("--jobs", type=int, default=200, help="waiting jobs per queue")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ours: list[float] = []
    naive: list[float] = []
    relative: list[float] = []
    for _ in range(args.queues):
        estimate, baseline = simulate(rng, args.jobs, args.workers)
        ours += estimate
        naive += baseline
        relative.append(statistics.median(estimate) / statistics.median(baseline))
    print(
        f"expected start of {args.jobs} waiting jobs x {args.queues} simulated queues, "
        f"{args.workers} workers, {ACTIONS} actions with {RECENT_RUNS} recorded runs each:"
    )
    print(f"  {'':44} {'median error':>12} {'p90 error':>10}")
    for label, errors in (
        ("median runtime of the job's action (jobsite)", ours),
        ("median runtime of all jobs (naive baseline)", naive),
    ):
        p90 = statistics.quantiles(errors, n=10)[-1]
        print(f"  {label:44} {statistics.median(errors) / 60:9.1f} min {p90 / 60:6.1f} min")
    print(
        f"  ratio of median errors, jobsite to baseline: "
        f"{statistics.median(ours) / statistics.median(naive):.2f} "
        f"(median over queues {statistics.median(relative):.2f})"
    )


async def cost(pending: int = 10_000, finished: int = 10_000, repeat: int = 5) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-expected-") as tmp:
        db = await Database.open(Path(tmp) / "db.sqlite")
        try:
            now = time.time()
            users = [await auth.create_user(db, f"user{n}", "pw-1234567") for n in range(50)]
            project = await db.execute(
                "INSERT INTO projects (slug, name, created_at) VALUES ('p', 'p', ?)", (now,)
            )
            workspaces = [
                await db.execute(
                    "INSERT INTO workspaces (name, project_id, repo, branch, database, "
                    "created_at) VALUES (?, ?, 'repo', 'main', 'sample', ?)",
                    (f"ws{n}", project, now),
                )
                for n in range(50)
            ]
            async with db.transaction() as conn:
                cur = await conn.execute(
                    "INSERT INTO job_requests (workspace_id, created_by, branch, sha, "
                    "requested_actions, created_at) VALUES (?, ?, 'main', 'x', '[]', ?)",
                    (workspaces[0], users[0], now),
                )
                rows = []
                for n in range(pending + finished):
                    state = "pending" if n < pending else "succeeded"
                    started = None if n < pending else now - 1000 - n
                    ended = None if started is None else started + 60 + n % 300
                    rows.append(
                        (secrets.token_hex(8), cur.lastrowid, workspaces[n % 50],
                         users[n % 50], f"action{n % 200}", state, state, now - n, started,
                         ended, now)
                    )  # fmt: skip
                await conn.executemany(
                    "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
                    "run_command, image, args, outputs, state, status_code, created_at, "
                    "started_at, completed_at, updated_at) VALUES "
                    "(?, ?, ?, ?, ?, 'x', 'r', 'i', '[]', '{}', ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            timings: dict[str, list[float]] = {"queue": [], "estimate": []}
            for _ in range(repeat):
                for name, work in (
                    ("queue", lambda: queue_parts(db)),
                    ("estimate", lambda: expected_start_times(db, 8)),
                ):
                    start = time.perf_counter()
                    await work()
                    timings[name].append(time.perf_counter() - start)
        finally:
            await db.close()
    read, estimate = (statistics.median(timings[k]) for k in ("queue", "estimate"))
    print(f"cost with {pending:,} pending and {finished:,} finished jobs ({repeat} runs):")
    print(f"  reading the queue alone (queries.queue_parts)    median {read * 1000:6.0f} ms")
    print(
        f"  expected start of every waiting job          median {estimate * 1000:6.0f} ms "
        f"({estimate / read:.2f}x the queue read; pages reuse it for 5 s)"
    )


if __name__ == "__main__":
    main()
    asyncio.run(cost())

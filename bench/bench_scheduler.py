"""How fast the scheduler decides, and how soon a dependent job's container starts.

Run from the repository root (Docker needed for the second part; test images built with
`make images`):

    .venv/bin/python bench/bench_scheduler.py [--decisions N] [--chains N]

1. One scheduling decision with 10,000 queued jobs from 100 users: the median time of
   ``JobQueue.pick`` over many decisions, against re-sorting the whole queue each time (what
   a scheduler without per-user heaps would do). Also the cost of a dispatch pass over a
   real SQLite file holding those 10,000 pending jobs, and of one rewrite of the waiting
   jobs' statuses after a job starts.
2. The delay between a dependency's container exiting and its dependent's container
   starting, from Docker's own events, against a bare `docker run` of the same image in the
   same run (from invoking it to its container starting).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import docker
import httpx

from jobsite import auth
from jobsite.config import load_settings
from jobsite.db import Database
from jobsite.local_docker import LocalDockerExecutor
from jobsite.repos import Repos
from jobsite.runner import Scheduler
from jobsite.scheduling import JobQueue, Limits, QueuedJob, queue_order
from jobsite.server import create_app

ROOT = Path(__file__).resolve().parent.parent

IMAGE = "ghcr.io/opensafely-core/python:v2"
JOBS = 10_000
USERS = 100
SLOTS = 16


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def queued_jobs(rng: random.Random) -> list[QueuedJob]:
    return [
        QueuedJob(
            f"job-{i:05d}",
            user_id=rng.randrange(USERS),
            request_id=i,
            priority=rng.choice([0, 0, 0, 0, 1, -1]),
            created_at=float(i),
        )
        for i in range(JOBS)
    ]


def bench_decisions(decisions: int) -> tuple[float, float]:
    """Prints the figures; returns the median decision and re-sort times (seconds)."""
    rng = random.Random(1)
    queue = JobQueue()
    for user in range(USERS):
        queue.set_usage(user, rng.uniform(0, 50_000), 0.0)
    for job in queued_jobs(rng):
        queue.add(job)
    limits = Limits(max_workers=SLOTS)
    now = 1000.0
    for _ in range(SLOTS):  # every slot busy, as in a long queue
        queue.start(queue.pick(now, limits).id, now)

    picks, sorts = [], []
    for _ in range(decisions):
        now += 1.0
        # a slot frees and a new job arrives, so the queue keeps 10,000 jobs
        queue.finish(rng.choice(list(queue.running)), now, succeeded=True)
        queue.add(QueuedJob(f"new-{now}", rng.randrange(USERS), created_at=now))
        started = time.perf_counter()
        job = queue.pick(now, limits)
        picks.append(time.perf_counter() - started)
        if len(sorts) < 50:
            users = {j.user_id for j in queue.pending.values()}
            started = time.perf_counter()
            full = queue_order(
                queue.runnable(),
                {u: queue.running_count(u) for u in users},
                {u: queue.usage(u, now) for u in users},
            )
            sorts.append(time.perf_counter() - started)
            assert full[0] is job
        queue.start(job.id, now)
    pick, resort = statistics.median(picks), statistics.median(sorts)
    print(f"queued jobs: {len(queue.pending):,} from {USERS} users, {SLOTS} slots busy")
    print(f"one decision (JobQueue.pick), median of {len(picks)}: {ms(pick)}")
    print(f"  p99: {ms(sorted(picks)[int(len(picks) * 0.99)])}")
    print(f"re-sorting the whole queue instead, median of {len(sorts)}: {ms(resort)}")
    print(f"  ratio: {resort / pick:.0f}x faster")
    return pick, resort


async def bench_dispatch_pass() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(environ={}, data_dir=tmp, max_workers=SLOTS)
        db = await Database.open(Path(tmp) / "db.sqlite")
        try:
            await fill_database(db)
            scheduler = Scheduler(
                db, settings, LocalDockerExecutor(settings, Repos(Path(tmp) / "repos"))
            )
            started = time.perf_counter()
            await scheduler._load_new_jobs()
            rebuild = time.perf_counter() - started
            now = time.time()
            for _ in range(SLOTS):  # slots busy without starting containers
                scheduler.queue.start(scheduler.queue.pick(now, scheduler.limits).id, now)
            started = time.perf_counter()
            await scheduler.write_waiting_statuses()
            first_write = time.perf_counter() - started

            passes = []
            for _ in range(200):
                started = time.perf_counter()
                await scheduler.dispatch()
                passes.append(time.perf_counter() - started)

            rewrites, written = [], []
            for _ in range(20):
                now = time.time()
                scheduler.queue.finish(next(iter(scheduler.queue.running)), now, succeeded=True)
                job = scheduler.queue.pick(now, scheduler.limits)
                scheduler.queue.start(job.id, now)
                started = time.perf_counter()
                written.append(await scheduler.write_waiting_statuses())
                rewrites.append(time.perf_counter() - started)
        finally:
            await db.close()
    print(f"loading {JOBS:,} pending jobs from SQLite into the queue: {ms(rebuild)}")
    print(f"first status write, for all {JOBS:,} of them: {ms(first_write)}")
    print(f"dispatch pass with every slot busy, median of 200: {ms(statistics.median(passes))}")
    print(
        f"status rewrite after one job starts, median of 20: {ms(statistics.median(rewrites))}; "
        f"rows written: median {statistics.median(written):.0f} of {JOBS:,}"
    )


async def fill_database(db: Database) -> None:
    rng = random.Random(2)
    now = time.time()
    async with db.transaction() as conn:
        for user in range(USERS):
            await conn.execute(
                "INSERT INTO users (id, username, created_at) VALUES (?, ?, ?)",
                (user + 1, f"user{user}", now),
            )
        await conn.execute(
            "INSERT INTO projects (id, slug, name, created_at) VALUES (1, 'p', 'P', ?)", (now,)
        )
        await conn.execute(
            "INSERT INTO workspaces (id, name, project_id, repo, branch, database, created_at) "
            "VALUES (1, 'ws', 1, '/nowhere', 'main', 'full', ?)",
            (now,),
        )
        jobs = queued_jobs(rng)
        await conn.executemany(
            "INSERT INTO job_requests (id, workspace_id, created_by, branch, sha, "
            "requested_actions, priority, created_at) VALUES (?, 1, ?, 'main', 'x', '[]', 0, ?)",
            [(j.request_id + 1, j.user_id + 1, now) for j in jobs],
        )
        await conn.executemany(
            "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
            "run_command, image, args, outputs, state, status_code, created_at, updated_at) "
            "VALUES (?, ?, 1, ?, 'a', 'x', 'python:v2', ?, '[]', '{}', 'pending', 'created', "
            "?, ?)",
            [(j.id, j.request_id + 1, j.user_id + 1, IMAGE, now + j.created_at, now) for j in jobs],
        )


# -- 2. from a dependency's exit to its dependent's start ----------------------------------


class DockerEvents:
    """Docker's container events for one label, as (action, job id, time) in a thread."""

    def __init__(self, client: docker.DockerClient, label: str) -> None:
        self.seen: list[tuple[str, str, float]] = []
        self._stream = client.events(decode=True, filters={"label": label, "type": "container"})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                labels = event.get("Actor", {}).get("Attributes", {})
                job = labels.get("jobsite.job") or labels.get("bench", "")
                self.seen.append((event["Action"], job, event["timeNano"] / 1e9))
        except Exception:
            pass  # the stream was closed

    def at(self, action: str, job: str) -> float | None:
        return next((t for a, j, t in self.seen if a == action and j == job), None)

    def close(self) -> None:
        self._stream.close()


def time_steps(executor: LocalDockerExecutor, stamps: dict[tuple[str, str], float]) -> None:
    """Note when the executor finishes collecting a job's outputs and is asked to start one."""
    collect, prepare, start = executor.collect, executor.prepare, executor.start

    async def timed_collect(spec, *args):
        outcome = await collect(spec, *args)
        stamps["collect", spec.id] = time.time()
        return outcome

    async def timed_prepare(spec):
        stamps["prepare", spec.id] = time.time()
        return await prepare(spec)

    async def timed_start(spec):
        stamps["start", spec.id] = time.time()
        return await start(spec)

    executor.collect, executor.prepare, executor.start = timed_collect, timed_prepare, timed_start


def bare_docker_run(events: DockerEvents, label: str, n: int) -> tuple[float, float]:
    """Medians of the time from invoking `docker run` to its container starting, and of
    the part of it from the container's creation to its start."""
    times, create_to_start = [], []
    for i in range(n):
        name = f"bench-{i}-{time.time_ns()}"
        invoked = time.time()
        subprocess.run(
            ["docker", "run", "--rm", "--init", "--network", "none", "--label", label,
             "--label", f"bench={name}", IMAGE, "-c", "true"],
            check=True, capture_output=True,
        )  # fmt: skip
        deadline = time.time() + 5
        while events.at("start", name) is None and time.time() < deadline:
            time.sleep(0.01)
        times.append(events.at("start", name) - invoked)
        create_to_start.append(events.at("start", name) - events.at("create", name))
    return statistics.median(times), statistics.median(create_to_start)


async def bench_dependency_start(chains: int) -> tuple[float, float]:
    """Prints the figures; returns the median dependency exit -> dependent start delay and
    a bare `docker run`'s invoked -> started time (seconds)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import GitRepo, add_request

    client = docker.from_env()
    with tempfile.TemporaryDirectory() as tmp:
        repo_dir = Path(tmp) / "repos" / "study"
        repo_dir.mkdir(parents=True)
        repo = GitRepo(repo_dir)
        repo.git("init", "--quiet", "-b", "main")
        repo.commit({"project.yaml": "version: '4'\nactions: {}\n"})
        settings = load_settings(
            environ={},
            data_dir=str(Path(tmp) / "data"),
            repos={"allow": [f"{Path(tmp) / 'repos'}/*"]},
            max_workers=2,
            job_memory="256M",
            job_cpus=1,
        )
        label = f"jobsite={settings.site_id}"
        events = DockerEvents(client, label)
        app = create_app(settings)
        delays, to_create, stamps, steps = [], [], {}, []
        try:
            async with app.router.lifespan_context(app):
                time_steps(app.state.executor, stamps)
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
                    user_id = await auth.create_user(app.state.db, "bench", "pw-1234567")
                    token = await auth.create_token(app.state.db, user_id, "bench")
                    headers = {"Authorization": f"Bearer {token}"}
                    response = await http.post(
                        "/api/v1/projects", json={"name": "Bench"}, headers=headers
                    )
                    response = await http.post(
                        "/api/v1/projects/bench/workspaces",
                        json={"name": "ws", "repo": repo.url, "branch": "main", "database": "full"},
                        headers=headers,
                    )
                    assert response.status_code == 201, response.text
                    write_a = "mkdir -p output && echo 1 > output/a.csv"
                    copy = "mkdir -p output && cp output/a.csv output/b.csv"
                    for _ in range(chains):
                        _, ids = await add_request(
                            app, "ws", "bench", [("a", write_a, ()), ("b", copy, ["a"])]
                        )
                        while True:
                            states = await app.state.db.fetchall(
                                "SELECT state FROM jobs WHERE id IN (?, ?)", list(ids.values())
                            )
                            if all(s["state"] in ("succeeded", "failed") for s in states):
                                break
                            await asyncio.sleep(0.02)
                        assert {s["state"] for s in states} == {"succeeded"}, states
                        await asyncio.sleep(0.1)  # the events arrive
                        died = events.at("die", ids["a"])
                        delays.append(events.at("start", ids["b"]) - died)
                        to_create.append(events.at("create", ids["b"]) - died)
                        steps.append(
                            (
                                stamps["collect", ids["a"]] - died,
                                stamps["prepare", ids["b"]] - stamps["collect", ids["a"]],
                                stamps["start", ids["b"]] - stamps["prepare", ids["b"]],
                                events.at("start", ids["b"]) - stamps["start", ids["b"]],
                            )
                        )
            baseline, bare_create_to_start = await asyncio.to_thread(
                bare_docker_run, events, label, chains
            )
        finally:
            events.close()
    delay = statistics.median(delays)
    create = statistics.median(to_create)
    print(f"dependency exits -> dependent's container starts, median of {chains}: {ms(delay)}")
    print(f"  min {ms(min(delays))}, max {ms(max(delays))}")
    print(f"  of which: exit -> dependent's container created: {ms(create)}")
    print(f"            created -> started (Docker's part): {ms(delay - create)}")
    finalized, scheduled, prepared, started = (
        statistics.median(step) for step in zip(*steps, strict=True)
    )
    print("  step by step (medians):")
    print(
        f"    exit -> outputs collected (executor: wait, inspect, logs, outputs): {ms(finalized)}"
    )
    print(f"    outputs collected -> dependent's prepare called (scheduler): {ms(scheduled)}")
    print(f"    prepare (git archive + inputs) -> start called: {ms(prepared)}")
    print(f"    start called -> container started (Docker SDK create + start): {ms(started)}")
    print(f"bare `docker run` of {IMAGE}, invoked -> started, median: {ms(baseline)}")
    print(f"  of which created -> started: {ms(bare_create_to_start)}")
    print(f"beyond a bare `docker run`'s start time: {ms(delay - baseline)}")
    return delay, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--chains", type=int, default=15)
    args = parser.parse_args()
    print("== one scheduling decision")
    bench_decisions(args.decisions)
    print("== a dispatch pass over SQLite")
    asyncio.run(bench_dispatch_pass())
    print("== dependency to dependent (real Docker)")
    asyncio.run(bench_dependency_start(args.chains))


if __name__ == "__main__":
    main()

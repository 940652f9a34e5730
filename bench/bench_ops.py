"""Time a /metrics scrape and a database backup as the jobs table grows.

Run from the repository root:

    python bench/bench_ops.py [--jobs 10000,100000,300000] [--repeat 5]

For each size a database is filled with that many finished jobs (plus a few hundred
pending and running ones). Printed, as medians over --repeat runs:
- the first scrape after a start (``SiteMetrics.render``; it reads every job once) and
  later scrapes (new and active jobs only), with Docker's check answered at once so only
  the database work is timed, against the baseline of computing the same figures with
  aggregate queries over the whole table at each scrape;
- ``jobsite backup`` (SQLite online backup, then its check), against a plain file copy of
  the same database (not consistent while the site writes, but the raw I/O cost).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from jobsite import ops
from jobsite.config import load_settings
from jobsite.db import Database
from jobsite.metrics import DURATION_BUCKETS, WAIT_BUCKETS, SiteMetrics
from jobsite.units import human_size

ROOT = Path(__file__).resolve().parent.parent


class DockerAnswers:
    async def available(self) -> bool:
        return True


def fill(path: Path, jobs: int) -> None:
    with sqlite3.connect(path) as conn:
        now = time.time()
        conn.execute("INSERT INTO users (id, username, created_at) VALUES (1, 'u', ?)", (now,))
        conn.execute(
            "INSERT INTO projects (id, slug, name, created_at) VALUES (1, 'p', 'p', ?)", (now,)
        )
        conn.execute(
            "INSERT INTO workspaces (id, name, project_id, repo, branch, database, created_at) "
            "VALUES (1, 'ws', 1, '/r', 'main', 'full', ?)",
            (now,),
        )
        conn.execute(
            "INSERT INTO job_requests (id, workspace_id, created_by, branch, sha, "
            "requested_actions, created_at) VALUES (1, 1, 1, 'main', 'abc', '[]', ?)",
            (now,),
        )
        rng = random.Random(1)
        rows = []
        for i in range(jobs + 400):
            created = now - rng.uniform(0, 365 * 86400)
            started = created + rng.expovariate(1 / 300)
            if i < 200:
                state, code, completed = "pending", "waiting_on_workers", None
                started = None
            elif i < 400:
                state, code, completed = "running", "executing", None
            else:
                ok = rng.random() < 0.8
                state, code = ("succeeded", "succeeded") if ok else ("failed", "nonzero_exit")
                completed = started + rng.expovariate(1 / 1800)
            rows.append(
                (f"job{i:08d}", state, code, created, started, completed, completed or created)
            )
        conn.executemany(
            "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
            "run_command, image, args, outputs, state, status_code, created_at, started_at, "
            "completed_at, updated_at) VALUES (?, 1, 1, 1, 'a', 'abc', 'python:v2 a.py', "
            "'python:v2', '[]', '{}', ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.close()


def median(times: list[float]) -> float:
    return statistics.median(times)


async def full_scan(db: Database) -> None:
    """The figures of a scrape, from aggregate queries over the whole jobs table."""
    await db.fetchall("SELECT state, count(*) FROM jobs GROUP BY state")
    await db.fetchall(
        "SELECT status_code, count(*) FROM jobs WHERE state IN ('succeeded', 'failed') "
        "GROUP BY status_code"
    )
    for value, bounds, where in (
        ("completed_at - started_at", DURATION_BUCKETS, "completed_at IS NOT NULL"),
        ("started_at - created_at", WAIT_BUCKETS, "1"),
    ):
        sums = ", ".join(f"sum(({value}) <= {bound})" for bound in bounds)
        await db.fetchall(
            f"SELECT {sums}, count(*), total({value}) FROM jobs "
            f"WHERE started_at IS NOT NULL AND {where}"
        )


async def bench_size(jobs: int, repeat: int, work: Path) -> None:
    data_dir = work / f"data-{jobs}"
    data_dir.mkdir()
    db = await Database.open(data_dir / "db.sqlite")
    fill(data_dir / "db.sqlite", jobs)
    settings = load_settings(environ={}, data_dir=str(data_dir), max_workers=8)
    try:
        first, scrape, baseline = [], [], []
        for _ in range(repeat):
            metrics = SiteMetrics(db, settings, DockerAnswers())  # as after a restart
            start = time.perf_counter()
            await metrics.render()
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            await metrics.render()
            scrape.append(time.perf_counter() - start)
            start = time.perf_counter()
            await full_scan(db)
            baseline.append(time.perf_counter() - start)
        backup, copy = [], []
        for i in range(repeat):
            dest = work / f"backup-{jobs}-{i}.sqlite"
            start = time.perf_counter()
            await ops.backup(db, dest)
            backup.append(time.perf_counter() - start)
            start = time.perf_counter()
            shutil.copyfile(data_dir / "db.sqlite", work / f"copy-{jobs}-{i}.sqlite")
            copy.append(time.perf_counter() - start)
            size = dest.stat().st_size
    finally:
        await db.close()
    print(
        f"{jobs:>9} jobs  db {human_size(size):>10}  "
        f"first scrape {median(first) * 1000:7.1f} ms, later {median(scrape) * 1000:6.1f} ms "
        f"(full scan {median(baseline) * 1000:7.1f} ms: x{median(scrape) / median(baseline):.2f})  "
        f"backup {median(backup) * 1000:8.1f} ms (file copy {median(copy) * 1000:6.1f} ms, "
        f"x{median(backup) / median(copy):4.1f})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="10000,100000,300000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in (int(n) for n in args.jobs.split(",")):
            await bench_size(jobs, args.repeat, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())

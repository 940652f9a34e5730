"""`make bench`: every benchmark, printed as one table and kept in bench/RESULTS.md.

    .venv/bin/python bench/table.py [--quick] [--no-opensafely] [--only NAME ...]

Each row is a median with its ratio to a baseline measured in the same run, on the same
machine, so a busy machine slows both alike:
- pages, on a real `jobsite serve` over bench/history.py's history (20 workspaces with
  100-action pipelines, 10,000 job requests, 50,000 finished jobs, 2,000 queued), driven
  open-loop at the issue's rates: median and p95 latency against the health check at the
  same rate; then 150 clients for 60 s (90 % polls, 10 % submit and cancel) while jobs run;
  the server's RSS after it all against its RSS at start;
- a 10-action chain through the site against bare Docker (the `docker run` CLI, and the
  SDK's create/start/wait, the true floor); `jobsite run` and `opensafely run` on the same
  project against the bare CLI;
- 200 independent trivial jobs on 2 workers against 200 `docker run` two at a time;
- a dependency's end to its dependent's start, against a bare `docker run`'s start;
- one scheduling decision with 10,000 queued, against re-sorting the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

import bench_run  # noqa: E402
import bench_scheduler  # noqa: E402
import docker  # noqa: E402
import load  # noqa: E402
from helpers import GitRepo, ServeProcess  # noqa: E402
from history import History, build  # noqa: E402
from images import IMAGES, build_test_images  # noqa: E402

from jobsite import auth  # noqa: E402
from jobsite.db import Database  # noqa: E402

IMAGE = IMAGES[0]  # ghcr.io/opensafely-core/python:v2
RESULTS = BENCH / "RESULTS.md"
KEPT = "\n## Profiles, before and after\n"
NOTES: list[str] = []  # what could not be measured, and why: printed under the table


@dataclass
class Row:
    figure: str
    median: float
    unit: str  # "ms", "s" or "MB"
    baseline: str
    baseline_median: float
    extra: str = ""  # p95, errors, targets

    def cells(self) -> list[str]:
        ratio = self.median / self.baseline_median if self.baseline_median else float("inf")
        return [
            self.figure,
            f"{self.median:.3g} {self.unit}",
            self.baseline,
            f"{self.baseline_median:.3g} {self.unit}",
            f"{ratio:.3g}",
            self.extra,
        ]


HEADER = ["figure", "median", "baseline", "baseline median", "ratio", "also"]


# -- pages -----------------------------------------------------------------------------------


PAGES = [  # (figure, target, rate, signed in, as htmx polls (If-None-Match), p95 target ms)
    ("workspace poll, anonymous", "poll", 100, False, True, 25),
    ("workspace poll, signed in", "poll", 100, True, True, 25),
    ("workspace poll, a tab's first (no ETag)", "poll", 100, False, False, None),
    ("job request fragment", "job-request", 200, False, False, 20),
    ("API job request status", "api-status", 200, False, False, 20),
    ("logs page, deep in the history", "logs", 50, False, False, 50),
    ("/admin/ (admin signed in)", "admin", 50, True, False, 50),
]


async def warm(client: load.Wire, history: History) -> None:
    """Each workspace's page opened once, as a tab does before it polls."""
    for ws in history.workspaces:
        assert (await client.get(f"/{ws}/")).status_code == 200


async def page_rows(history: History, duration: float, writes_for: float) -> list[Row]:
    rows = []
    calls = load.targets(history)
    with load.site_server(history) as server:
        started_rss = server.rss_mb()
        for figure, target, rate, signed_in, conditional, goal in PAGES:
            user = None
            if signed_in:
                user = history.admin if target == "admin" else history.developer
            async with await load.wire_for(server, user, history.password) as client:
                await warm(client, history)
                floor = await load.open_loop(client, "health", calls["health"], rate, duration / 2)
                before = server.cpu_seconds()
                result = await load.open_loop(
                    client, figure, calls[target], rate, duration, conditional=conditional
                )
                result.cpu = server.cpu_seconds() - before
            rows.append(page_row(f"{figure}, {rate} req/s", result, floor, goal))
        before = server.cpu_seconds()
        reads, writes = await load.with_writes(server, history, 150, writes_for)
        load.share_cpu(server.cpu_seconds() - before, reads, writes)
        async with await load.wire_for(server) as client:
            floor = await load.open_loop(client, "health", calls["health"], 75, duration / 2)
        rows.append(page_row(f"150 clients, {writes_for:.0f} s: polls", reads, floor, None))
        rows.append(
            page_row(f"150 clients, {writes_for:.0f} s: submit/cancel", writes, floor, None)
        )
        locked = server.log_says("database is locked")
        rows.append(
            Row(
                "server RSS after all the page runs",
                server.rss_mb(),
                "MB",
                "its RSS after start",
                started_rss,
                f"target ≤ 200 MB; 'database is locked' in its log: {locked}",
            )
        )
    return rows


def page_row(figure: str, result: load.Load, floor: load.Load, goal: float | None) -> Row:
    errors = sum(result.errors.values())
    extra = (
        f"p95 {result.percentile(95):.1f}, p99 {result.percentile(99):.1f} ms; "
        f"served {result.served_rate:.0f}/s; errors {errors}, timeouts {result.timeouts}; "
        f"server CPU {result.cpu_per_request:.2f} ms/req"
    )
    if goal:
        extra += (
            f"; target p95 ≤ {goal} ms ({'met' if result.percentile(95) <= goal else 'MISSED'})"
        )
    return Row(figure, result.p50, "ms", "health check, same rate", floor.p50, extra)


# -- jobs through the site ---------------------------------------------------------------


class JobSite:
    """A small site of its own (one workspace on ``project_yaml``) as a `jobsite serve`
    process with 2 workers, for timing jobs through it."""

    def __init__(self, root: Path, project_yaml: str) -> None:
        self.root = root
        repo_dir = root / "repos" / "study"
        repo_dir.mkdir(parents=True)
        repo = GitRepo(repo_dir)
        repo.git("init", "--quiet", "-b", "main")
        repo.commit({"project.yaml": project_yaml})
        self.repo = repo
        config = root / "jobsite.yaml"
        config.write_text(
            json.dumps(
                {
                    "data_dir": str(root / "data"),
                    "repos": {"allow": [f"{root / 'repos'}/*"]},
                    "max_workers": 2,
                    "allow_pull": False,
                }
            )
        )
        (root / "data").mkdir()
        self.token = asyncio.run(self._user(root / "data" / "db.sqlite"))
        self.server = ServeProcess(config, root / "server.log")

    @staticmethod
    async def _user(path: Path) -> str:
        db = await Database.open(path, readers=1)
        try:
            user_id = await auth.create_user(db, "bench", "pw-1234567")
            return await auth.create_token(db, user_id, "bench")
        finally:
            await db.close()

    def __enter__(self) -> JobSite:
        self.server.start()
        self.client = httpx.Client(
            base_url=self.server.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        )
        self.client.post("/api/v1/projects", json={"name": "Bench"})
        body = {"name": "ws", "repo": self.repo.url, "branch": "main", "database": "sample"}
        response = self.client.post("/api/v1/projects/bench/workspaces", json=body)
        assert response.status_code == 201, response.text
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.stop()

    def run(self, actions: list[str], force: bool = True) -> float:
        """Seconds from submitting a job request to its end (all its jobs succeeded)."""
        body = {"actions": actions, "force_run_dependencies": force}
        started = time.perf_counter()
        response = self.client.post("/api/v1/workspaces/ws/job-requests", json=body)
        assert response.status_code == 201, response.text
        request_id = response.json()["id"]
        while True:
            data = self.client.get(f"/api/v1/job-requests/{request_id}").json()
            if data["status"] in ("succeeded", "failed", "nothing_to_do"):
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        assert data["status"] == "succeeded", data
        return elapsed


def sdk_chain(client: docker.DockerClient, project: Path, actions: int) -> None:
    """The chain's commands as the Docker SDK's create, start, wait and remove, one by one."""
    for i in range(actions):
        container = client.containers.create(
            IMAGE,
            ["-c", bench_run.COMMAND.format(i=i)],
            volumes={str(project): {"bind": "/workspace", "mode": "rw"}},
            network_mode="none",
        )
        container.start()
        container.wait()
        container.remove()


def chain_rows(repeat: int, actions: int, with_opensafely: bool) -> list[Row]:
    times, why = bench_run.measure(repeat, actions, with_opensafely)
    client = docker.from_env()
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        project = Path(tmp) / "study"
        (project / "output").mkdir(parents=True)
        (project / "output").chmod(0o777)
        sdk = []
        for _ in range(repeat):
            started = time.perf_counter()
            sdk_chain(client, project, actions)
            sdk.append(time.perf_counter() - started)
        with JobSite(Path(tmp) / "site", bench_run.project_yaml(actions)) as site:
            last = f"step{actions - 1}"
            site.run([last])  # warm up: the mirror, images, page cache
            through_site = [site.run([last]) for _ in range(repeat)]
    client.close()
    bare = statistics.median(times["bare"])
    median_sdk = statistics.median(sdk)
    rows = [
        Row(f"{actions}-action chain through the site", statistics.median(through_site), "s",
            f"{actions} x `docker run` CLI", bare),
        Row(f"{actions}-action chain through the site", statistics.median(through_site), "s",
            f"{actions} x SDK create/start/wait", median_sdk),
        Row(f"{actions}-action chain, `jobsite run`", statistics.median(times["jobsite"]), "s",
            f"{actions} x `docker run` CLI", bare),
    ]  # fmt: skip
    if "opensafely" in times:
        ratio = statistics.median(times["jobsite"]) / statistics.median(times["opensafely"])
        rows.append(
            Row(f"{actions}-action chain, `opensafely run`",
                statistics.median(times["opensafely"]), "s", f"{actions} x `docker run` CLI", bare,
                f"jobsite run / opensafely run = {ratio:.2f}")
        )  # fmt: skip
    else:
        NOTES.append(f"`opensafely run`: {why}")
    return rows


def independent_yaml(jobs: int) -> str:
    lines = ['version: "4"', "actions:"]
    for i in range(jobs):
        lines += [
            f"  job{i:03d}:",
            f'    run: python:v2 -c "mkdir -p output && echo {i} > output/j{i}.csv"',
            "    outputs:",
            "      moderately_sensitive:",
            f"        out: output/j{i}.csv",
        ]
    return "\n".join(lines) + "\n"


def independent_rows(jobs: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-many-") as tmp:
        project = Path(tmp) / "bare"
        (project / "output").mkdir(parents=True)
        (project / "output").chmod(0o777)

        def one(i: int) -> None:
            subprocess.run(
                ["docker", "run", "--rm", "--network", "none", "-v", f"{project}:/workspace",
                 IMAGE, "-c", f"cd /workspace && echo {i} > output/j{i}.csv"],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip

        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, range(jobs)))
        bare = time.perf_counter() - started
        with JobSite(Path(tmp) / "site", independent_yaml(jobs)) as site:
            through_site = site.run(["run_all"])
    return [
        Row(f"{jobs} independent trivial jobs, 2 workers", through_site, "s",
            f"{jobs} x `docker run`, two at a time", bare,
            f"{jobs / through_site:.1f} jobs/s against {jobs / bare:.1f}")
    ]  # fmt: skip


def scheduler_rows(decisions: int, chains: int) -> list[Row]:
    pick, resort = bench_scheduler.bench_decisions(decisions)
    delay, baseline = asyncio.run(bench_scheduler.bench_dependency_start(chains))
    return [
        Row("scheduling decision, 10,000 queued", pick * 1000, "ms",
            "re-sorting the whole queue", resort * 1000),
        Row("dependency exits → dependent starts", delay * 1000, "ms",
            "bare `docker run` invoked → started", baseline * 1000),
    ]  # fmt: skip


# -- the table -----------------------------------------------------------------------------


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor() or "unknown CPU",
    )  # fmt: skip
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} x {model}, {memory:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer jobs")
    parser.add_argument("--no-opensafely", action="store_true")
    parser.add_argument("--only", nargs="*", choices=["pages", "chain", "independent", "scheduler"])
    args = parser.parse_args()
    parts = args.only or ["pages", "chain", "independent", "scheduler"]
    quick = args.quick
    load_before = os.getloadavg()
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    build_test_images()
    rows: list[Row] = []
    steps: dict[str, Callable[[], list[Row]]] = {
        "chain": lambda: chain_rows(2 if quick else 5, 10, not args.no_opensafely),
        "independent": lambda: independent_rows(40 if quick else 200),
        "scheduler": lambda: scheduler_rows(500 if quick else 2000, 5 if quick else 15),
    }
    for part in parts:
        if part == "pages":
            with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
                history = build(Path(tmp) / "site")
                rows += asyncio.run(page_rows(history, 5 if quick else 10, 15 if quick else 60))
        else:
            rows += steps[part]()
    table = markdown(rows) + "".join(f"\n\n{note}" for note in NOTES)
    print()
    print(table)
    command = (
        "make bench" if not sys.argv[1:] else "python bench/table.py " + " ".join(sys.argv[1:])
    )
    load_after = os.getloadavg()
    # the notes kept below the table (profiles, before and after) survive each run
    kept = RESULTS.read_text().partition(KEPT)[2] if RESULTS.exists() else ""
    RESULTS.write_text(
        "# Benchmark results\n\n"
        f"The latest `{command}`, {began}, on {machine()} (load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after: the machine is shared, so "
        "compare each figure with its baseline, measured in the same run).\n\n"
        "Each figure is a median; ratio = median / baseline median. Page figures are "
        "latencies from when each request was due (open loop), on a real `jobsite serve` "
        "over bench/history.py's history.\n\n" + table + "\n" + (KEPT + kept if kept else "")
    )
    print(f"\n(kept in {RESULTS.relative_to(BENCH.parent)})")


if __name__ == "__main__":
    main()

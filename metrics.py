"""``/metrics`` in the Prometheus text format, computed from the database at scrape time.

Nothing is counted as it happens: every figure is read from SQLite when Prometheus asks,
so a restart loses no counts. Each app has its own ``CollectorRegistry``, holding one
collector that yields what the last read found.

A finished job never changes again, so the figures over finished jobs (counts, durations,
waits) are tallied once per job: each scrape reads only the jobs that finished since the
last one, through the index on ``completed_at``, and keeps jobs that finished in the last
``SETTLE`` seconds out of the tally until their row has surely been written. Should
the number of finished rows stop matching the tally (a row written late, or deleted), the
tally is made again from the whole table. The first scrape after a start reads every job
once; later ones read the new and the active jobs and count an index. Pending and running
jobs are read afresh each time.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import ipaddress
import shutil
import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .config import Settings
from .db import Database, Row
from .executor import Executor
from .states import State, StatusCode

# seconds; jobs run from seconds to a day, and wait from none to hours
DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 24 * 3600)
# a job's sampled peak memory (MB) and mean CPU (percent of one core)
MEMORY_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
CPU_BUCKETS = (5, 10, 25, 50, 75, 100, 150, 200, 400, 800)
DOCKER_CHECK_TIMEOUT = 5.0
# seconds after which a finished job's row is surely written: completed_at is taken when the
# outputs land, and written after the container and temporary dir are removed
SETTLE = 600.0

# generate_latest writes the classic text format, version 0.0.4
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def is_loopback(host: str | None) -> bool:
    """Whether the peer ``host`` is this machine."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Histogram:
    """Counts of values per bucket (``value <= bound``), and their sum."""

    def __init__(self, bounds: tuple[int, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def bucket_sql(self, value: str) -> str:
        """SQL giving the index in ``counts`` of ``value``, as ``add`` would."""
        cases = " ".join(f"WHEN {value} <= {bound} THEN {i}" for i, bound in enumerate(self.bounds))
        return f"CASE {cases} ELSE {len(self.bounds)} END"

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.sum)


# how long a job took, and how long it waited to start; never below 0 (clocks can step back)
DURATION = "max(0.0, completed_at - started_at)"
WAIT = "max(0.0, started_at - created_at)"


class Tally:
    """Figures over a set of jobs."""

    def __init__(self) -> None:
        self.by_state: Counter[str] = Counter()
        self.by_status_code: Counter[str] = Counter()
        self.queued = 0  # pending jobs whose dependencies are met
        self.duration = Histogram(DURATION_BUCKETS)
        self.wait = Histogram(WAIT_BUCKETS)
        self.memory_peak = Histogram(MEMORY_BUCKETS)
        self.cpu_mean = Histogram(CPU_BUCKETS)

    def add(self, job: Row) -> None:
        self.by_state[job["state"]] += 1
        if (
            job["state"] == State.PENDING
            and job["status_code"] != StatusCode.WAITING_ON_DEPENDENCIES
        ):
            self.queued += 1
        if job["completed_at"] is not None:
            self.by_status_code[job["status_code"]] += 1
        if job["started_at"] is not None:
            self.wait.add(max(0.0, job["started_at"] - job["created_at"]))
            if job["completed_at"] is not None:
                self.duration.add(max(0.0, job["completed_at"] - job["started_at"]))
        if job["completed_at"] is not None and job["memory_peak_mb"] is not None:
            self.memory_peak.add(job["memory_peak_mb"])
        if job["completed_at"] is not None and job["cpu_mean"] is not None:
            self.cpu_mean.add(job["cpu_mean"])

    @classmethod
    async def of_finished(cls, db: Database, until: float) -> Tally:
        """The tally of jobs that finished at or before ``until``, added up by SQLite."""
        tally = cls()
        # "+completed_at" keeps SQLite off the index: nearly every row matches, and one pass
        # over the table is faster than a lookup per row
        for row in await db.fetchall(
            "SELECT state, status_code, count(*) AS n FROM jobs WHERE +completed_at <= ? "
            "GROUP BY state, status_code",
            (until,),
        ):
            tally.by_state[row["state"]] += row["n"]
            tally.by_status_code[row["status_code"]] += row["n"]
        for histogram, value, known in (
            (tally.duration, DURATION, "started_at"),
            (tally.wait, WAIT, "started_at"),
            (tally.memory_peak, "memory_peak_mb", "memory_peak_mb"),
            (tally.cpu_mean, "cpu_mean", "cpu_mean"),
        ):
            for row in await db.fetchall(
                f"SELECT {histogram.bucket_sql(value)} AS bucket, count(*) AS n, "
                f"total({value}) AS total FROM jobs "
                f"WHERE +completed_at <= ? AND {known} IS NOT NULL GROUP BY bucket",
                (until,),
            ):
                histogram.counts[row["bucket"]] += row["n"]
                histogram.sum += row["total"]
        return tally


JOB_FIGURES = (
    "SELECT state, status_code, created_at, started_at, completed_at, memory_peak_mb, cpu_mean "
    "FROM jobs"
)


class SiteMetrics(Collector):
    """The site's figures. ``await render()`` reads them and returns the exposition text."""

    def __init__(self, db: Database, settings: Settings, executor: Executor) -> None:
        self.db = db
        self.settings = settings
        self.executor = executor
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._lock = asyncio.Lock()
        self._found: list[Metric] = []
        self._settled: Tally | None = None  # jobs that finished at or before _settled_until
        self._settled_until = 0.0

    async def render(self) -> bytes:
        async with self._lock:
            self._found = await self._read()
            return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        yield from self._found

    async def _jobs(self) -> Tally:
        """A tally over every job: the settled ones, and those read now."""
        settle_before = time.time() - SETTLE
        if self._settled is None:
            self._settled = await Tally.of_finished(self.db, settle_before)
            self._settled_until = settle_before
        finished = await self.db.fetchall(
            f"{JOB_FIGURES} WHERE completed_at > ? ORDER BY completed_at", (self._settled_until,)
        )
        recent = []
        for job in finished:
            if job["completed_at"] <= settle_before:
                self._settled.add(job)
            else:
                recent.append(job)
        self._settled_until = max(self._settled_until, settle_before)
        counted = await self.db.fetchval(
            "SELECT count(*) FROM jobs WHERE completed_at <= ?", (self._settled_until,)
        )
        if counted != self._settled.by_state.total():
            # a row came or went behind the tally's back: count everything again
            self._settled = None
            return await self._jobs()
        tally = copy.deepcopy(self._settled)
        for job in recent:
            tally.add(job)
        for job in await self.db.fetchall(
            f"{JOB_FIGURES} WHERE state IN ('pending', 'running') AND completed_at IS NULL"
        ):
            tally.add(job)
        return tally

    async def _read(self) -> list[Metric]:
        tally = await self._jobs()
        jobs = GaugeMetricFamily("jobsite_jobs", "Jobs in each state", labels=["state"])
        for state in State:
            jobs.add_metric([state], tally.by_state[state])
        finished = CounterMetricFamily(
            "jobsite_jobs_finished",
            "Jobs that have finished, by status code",
            labels=["status_code"],
        )
        for code, count in sorted(tally.by_status_code.items()):
            finished.add_metric([code], count)
        unsent = await self.db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        disk = await asyncio.to_thread(shutil.disk_usage, self.settings.data_dir)
        return [
            jobs,
            finished,
            GaugeMetricFamily(
                "jobsite_queue_length",
                "Pending jobs whose dependencies are met, waiting for a worker or for Docker",
                value=tally.queued,
            ),
            GaugeMetricFamily(
                "jobsite_running_jobs", "Jobs running now", value=tally.by_state["running"]
            ),
            GaugeMetricFamily(
                "jobsite_workers",
                "Jobs that may run at once (max_workers)",
                value=self.settings.max_workers,
            ),
            tally.duration.family(
                "jobsite_job_duration_seconds", "Time from a finished job's start to its end"
            ),
            tally.wait.family(
                "jobsite_job_wait_seconds", "Time from a job's creation to its start"
            ),
            tally.memory_peak.family(
                "jobsite_job_memory_peak_megabytes",
                "Peak memory use of finished jobs, sampled from Docker while they ran",
            ),
            tally.cpu_mean.family(
                "jobsite_job_cpu_mean_percent",
                "Mean CPU use of finished jobs in percent of one core, sampled while they ran",
            ),
            GaugeMetricFamily("jobsite_outbox_unsent", "Emails not (yet) sent", value=unsent),
            GaugeMetricFamily(
                "jobsite_docker_up",
                "1 when the Docker engine answers, else 0",
                value=int(await self._docker_up()),
            ),
            GaugeMetricFamily(
                "jobsite_disk_free_bytes", "Free space on the disk of data_dir", value=disk.free
            ),
        ]

    async def _docker_up(self) -> bool:
        try:
            return await asyncio.wait_for(self.executor.available(), DOCKER_CHECK_TIMEOUT)
        except TimeoutError:
            return False

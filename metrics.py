"""``/metrics`` in the Prometheus text format, computed from the database at scrape time.

Nothing is counted in memory: every figure is read from SQLite when Prometheus asks, so a
restart loses no counts and several processes reading one database agree. Each app has its
own ``CollectorRegistry``, holding one collector that yields what the last read found.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from config import Settings
from db import Database

STATES = ("pending", "running", "succeeded", "failed")
# seconds; jobs run from seconds to a day, and wait from none to hours
DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 24 * 3600)
DOCKER_CHECK_TIMEOUT = 5.0

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


class SiteMetrics(Collector):
    """The site's figures. ``await render()`` reads them and returns the exposition text."""

    def __init__(self, db: Database, settings: Settings, executor: Any) -> None:
        self.db = db
        self.settings = settings
        self.executor = executor
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._lock = asyncio.Lock()
        self._found: list[Metric] = []

    async def render(self) -> bytes:
        async with self._lock:
            self._found = await self._read()
            return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        yield from self._found

    async def _read(self) -> list[Metric]:
        found: list[Metric] = []

        by_state = dict.fromkeys(STATES, 0)
        for row in await self.db.fetchall("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
            by_state[row["state"]] = row["n"]
        jobs = GaugeMetricFamily("jobsite_jobs", "Jobs in each state", labels=["state"])
        for state, n in by_state.items():
            jobs.add_metric([state], n)
        found.append(jobs)

        finished = CounterMetricFamily(
            "jobsite_jobs_finished",
            "Jobs that have finished, by status code",
            labels=["status_code"],
        )
        for row in await self.db.fetchall(
            "SELECT status_code, count(*) AS n FROM jobs "
            "WHERE state IN ('succeeded', 'failed') GROUP BY status_code ORDER BY status_code"
        ):
            finished.add_metric([row["status_code"]], row["n"])
        found.append(finished)

        queued = await self.db.fetchval(
            "SELECT count(*) FROM jobs WHERE state = 'pending' "
            "AND status_code != 'waiting_on_dependencies'"
        )
        found.append(
            GaugeMetricFamily(
                "jobsite_queue_length",
                "Pending jobs whose dependencies are met, waiting for a worker or for Docker",
                value=queued,
            )
        )
        found.append(
            GaugeMetricFamily("jobsite_running_jobs", "Jobs running now", value=by_state["running"])
        )
        found.append(
            GaugeMetricFamily(
                "jobsite_workers",
                "Jobs that may run at once (max_workers)",
                value=self.settings.max_workers,
            )
        )
        found.append(
            await self._histogram(
                "jobsite_job_duration_seconds",
                "Time from a finished job's start to its end",
                "completed_at - started_at",
                "state IN ('succeeded', 'failed') AND started_at IS NOT NULL",
                DURATION_BUCKETS,
            )
        )
        found.append(
            await self._histogram(
                "jobsite_job_wait_seconds",
                "Time from a job's creation to its start",
                "started_at - created_at",
                "started_at IS NOT NULL",
                WAIT_BUCKETS,
            )
        )

        unsent = await self.db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        found.append(
            GaugeMetricFamily("jobsite_outbox_unsent", "Emails not (yet) sent", value=unsent)
        )

        found.append(
            GaugeMetricFamily(
                "jobsite_docker_up",
                "1 when the Docker engine answers, else 0",
                value=int(await self._docker_up()),
            )
        )
        usage = await asyncio.to_thread(shutil.disk_usage, self.settings.data_dir)
        found.append(
            GaugeMetricFamily(
                "jobsite_disk_free_bytes", "Free space on the disk of data_dir", value=usage.free
            )
        )
        return found

    async def _histogram(
        self, name: str, documentation: str, value: str, where: str, buckets: tuple[int, ...]
    ) -> HistogramMetricFamily:
        """A histogram of ``value`` over jobs matching ``where``, in one pass over the table."""
        counts = ", ".join(
            f"sum(({value}) <= {bound}) AS le_{i}" for i, bound in enumerate(buckets)
        )
        row = await self.db.fetchone(
            f"SELECT {counts}, count(*) AS n, total({value}) AS total FROM jobs WHERE {where}"
        )
        assert row is not None
        cumulative = [
            (floatToGoString(bound), row[f"le_{i}"] or 0) for i, bound in enumerate(buckets)
        ]
        cumulative.append(("+Inf", row["n"]))
        return HistogramMetricFamily(
            name, documentation, buckets=cumulative, sum_value=row["total"]
        )

    async def _docker_up(self) -> bool:
        try:
            return await asyncio.wait_for(self.executor.docker_available(), DOCKER_CHECK_TIMEOUT)
        except TimeoutError:
            return False

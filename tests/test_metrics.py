"""``/metrics``: Prometheus text read back with Prometheus' own parser."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from helpers import Site, free_port, until
from prometheus_client.parser import text_string_to_metric_families

from jobsite import metrics
from jobsite.server import create_app


@pytest.fixture(autouse=True)
def docker_host(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker is unreachable here unless a test asks for the real engine. (A missing unix
    socket would do as well, but the Docker SDK leaves that socket unclosed, which this suite
    treats as an error.)"""
    if "docker_client" not in request.fixturenames:
        nothing_listens = free_port()
        monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{nothing_listens}")


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def client_from(app: Any, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@contextlib.asynccontextmanager
async def running_app(settings: Any) -> AsyncIterator[Any]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


async def scrape(app: Any) -> dict[tuple[str, tuple], float]:
    async with client_from(app, "127.0.0.1") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def add_jobs(app: Any) -> None:
    """Jobs of every kind: finished after 5s, 45s and 4000s; one running; three pending."""
    await app.state.scheduler.set_paused(True)  # these jobs are only records: never run them
    site = await Site.make(app.state.db)
    now = time.time()
    await site.add_job("a", created_at=now - 9000, wait=2, duration=5)
    await site.add_job("b", created_at=now - 9000, wait=20, duration=45)
    await site.add_job(
        "c", state="failed", status_code="nonzero_exit", created_at=now - 9000, wait=400,
        duration=4000,
    )  # fmt: skip
    await site.add_job(
        "d", state="failed", status_code="cancelled_by_user", created_at=now - 60, wait=None
    )
    await site.add_job("e", state="running", status_code="executing", created_at=now - 50, wait=3)
    await site.add_job("f", state="pending", status_code="waiting_on_workers", wait=None)
    await site.add_job("g", state="pending", status_code="created", wait=None)
    await site.add_job("h", state="pending", status_code="waiting_on_dependencies", wait=None)


async def test_metrics_count_jobs_from_the_database(app):
    await add_jobs(app)
    found = await scrape(app)

    assert found["jobsite_jobs", (("state", "pending"),)] == 3
    assert found["jobsite_jobs", (("state", "running"),)] == 1
    assert found["jobsite_jobs", (("state", "succeeded"),)] == 2
    assert found["jobsite_jobs", (("state", "failed"),)] == 2
    assert found["jobsite_jobs_finished_total", (("status_code", "succeeded"),)] == 2
    assert found["jobsite_jobs_finished_total", (("status_code", "nonzero_exit"),)] == 1
    assert found["jobsite_jobs_finished_total", (("status_code", "cancelled_by_user"),)] == 1
    assert found["jobsite_queue_length", ()] == 2  # the one waiting on dependencies is not
    assert found["jobsite_running_jobs", ()] == 1
    assert found["jobsite_workers", ()] == 2


async def test_metrics_have_job_duration_and_wait_histograms(app):
    await add_jobs(app)
    found = await scrape(app)

    def bucket(name: str, le: str) -> float:
        return found[f"{name}_bucket", (("le", le),)]

    duration = "jobsite_job_duration_seconds"
    assert bucket(duration, "10.0") == 1
    assert bucket(duration, "60.0") == 2
    assert bucket(duration, "3600.0") == 2
    assert bucket(duration, "10800.0") == 3
    assert bucket(duration, "+Inf") == 3  # the cancelled job never started
    assert found[f"{duration}_count", ()] == 3
    assert found[f"{duration}_sum", ()] == pytest.approx(4050)

    wait = "jobsite_job_wait_seconds"  # four jobs started: after 2, 20, 400 and 3 seconds
    assert bucket(wait, "1.0") == 0
    assert bucket(wait, "5.0") == 2
    assert bucket(wait, "60.0") == 3
    assert bucket(wait, "900.0") == 4
    assert found[f"{wait}_count", ()] == 4
    assert found[f"{wait}_sum", ()] == pytest.approx(425)


async def test_jobs_finishing_between_scrapes_are_each_counted_once(app, monkeypatch):
    monkeypatch.setattr(metrics, "SETTLE", 0.2)
    await app.state.scheduler.set_paused(True)
    site = await Site.make(app.state.db)
    now = time.time()
    await site.add_job("old", created_at=now - 5000, wait=10, duration=100)
    await site.add_job("just_now", created_at=now - 20, wait=10, duration=10)  # unsettled
    first = await scrape(app)
    assert first["jobsite_jobs", (("state", "succeeded"),)] == 2
    assert first["jobsite_job_duration_seconds_count", ()] == 2

    await until(lambda: time.time() > now + metrics.SETTLE, message='"just_now" to settle')
    # two more jobs finish, one long ago
    await site.add_job("late_row", created_at=now - 9000, wait=5, duration=20)
    await site.add_job(
        "failed_now", state="failed", status_code="nonzero_exit", created_at=time.time() - 3,
        wait=1, duration=2,
    )  # fmt: skip
    for _ in range(2):
        found = await scrape(app)
        assert found["jobsite_jobs", (("state", "succeeded"),)] == 3
        assert found["jobsite_jobs", (("state", "failed"),)] == 1
        assert found["jobsite_jobs_finished_total", (("status_code", "nonzero_exit"),)] == 1
        assert found["jobsite_job_duration_seconds_count", ()] == 4
        assert found["jobsite_job_duration_seconds_sum", ()] == pytest.approx(132, abs=0.01)
        assert found["jobsite_job_wait_seconds_sum", ()] == pytest.approx(26, abs=0.01)


async def test_metrics_survive_a_restart(settings):
    async with running_app(settings) as app:
        await add_jobs(app)
        before = await scrape(app)
    async with running_app(settings) as app:
        after = await scrape(app)
    # the running job had no container, so the restart made it pending again
    for state, count in (("succeeded", 2), ("failed", 2), ("running", 0), ("pending", 4)):
        assert after["jobsite_jobs", (("state", state),)] == count
    for name in ("jobsite_jobs_finished_total", "jobsite_job_duration_seconds_bucket"):
        assert {k: v for k, v in after.items() if k[0] == name} == {
            k: v for k, v in before.items() if k[0] == name
        }


async def test_metrics_report_free_disk_and_unsent_emails(app, settings):
    found = await scrape(app)
    free = shutil.disk_usage(settings.data_dir).free
    assert abs(found["jobsite_disk_free_bytes", ()] - free) < 256 * 1024**2
    assert found["jobsite_outbox_unsent", ()] == 0


@pytest.mark.usefixtures("docker_client")
async def test_metrics_say_docker_is_up_when_it_answers(app):
    assert (await scrape(app))["jobsite_docker_up", ()] == 1


async def test_metrics_say_docker_is_down_when_it_does_not_answer(app):
    assert (await scrape(app))["jobsite_docker_up", ()] == 0


# -- who may read them -----------------------------------------------------------------


async def test_metrics_are_served_to_loopback_without_a_token(app):
    for host in ("127.0.0.1", "::1"):
        async with client_from(app, host) as client:
            assert (await client.get("/metrics")).status_code == 200


async def test_metrics_are_refused_to_other_hosts_without_an_admins_token(app, make_user):
    user = await make_user("alice")
    admin = await make_user("root", admin=True)
    async with client_from(app, "203.0.113.7") as client:
        response = await client.get("/metrics")
        assert response.status_code == 403
        assert "loopback" in response.text and "admin's API token" in response.text
        assert (await client.get("/metrics", headers=user)).status_code == 403
        bad = {"Authorization": "Bearer jst_not-a-token"}
        assert (await client.get("/metrics", headers=bad)).status_code == 401

        response = await client.get("/metrics", headers=admin)
    assert response.status_code == 200
    assert ("jobsite_running_jobs", ()) in parse(response.text)


def test_sqlite_puts_a_value_in_the_same_bucket_as_python():
    histogram = metrics.Histogram(metrics.DURATION_BUCKETS)
    values = [0, 0.5, 10, 10.000001, 59.99, 60, 3600, 86400, 86400.5, 1e9]
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        for value in values:
            (bucket,) = conn.execute(
                f"SELECT {histogram.bucket_sql('v')} FROM (SELECT ? AS v)", (value,)
            ).fetchone()
            before = list(histogram.counts)
            histogram.add(value)
            assert histogram.counts[bucket] == before[bucket] + 1, value


async def test_metrics_have_histograms_of_sampled_memory_and_cpu(app):
    await app.state.scheduler.set_paused(True)
    site = await Site.make(app.state.db)
    for action, memory, cpu, age in (
        ("small", 40.0, 3.0, 3600),
        ("big", 3000.0, 180.0, 3600),
        ("short", 1.0, None, 3600),
        ("recent", 100.0, 50.0, 100),  # finished within SETTLE: added up in Python
    ):
        job_id = await site.add_job(action, created_at=time.time() - age)
        await app.state.db.execute(
            "UPDATE jobs SET memory_peak_mb = ?, memory_mean_mb = ?, cpu_mean = ?, cpu_peak = ? "
            "WHERE id = ?",
            (memory, memory / 2, cpu, cpu, job_id),
        )
    await site.add_job("unsampled")  # finished before sampling existed
    for _ in range(2):  # counted from the table, then from the tally it keeps
        found = await scrape(app)
        memory = "jobsite_job_memory_peak_megabytes"
        assert found[f"{memory}_bucket", (("le", "16.0"),)] == 1
        assert found[f"{memory}_bucket", (("le", "64.0"),)] == 2
        assert found[f"{memory}_bucket", (("le", "256.0"),)] == 3
        assert found[f"{memory}_bucket", (("le", "4096.0"),)] == 4
        assert found[f"{memory}_count", ()] == 4
        assert found[f"{memory}_sum", ()] == pytest.approx(3141)
        cpu = "jobsite_job_cpu_mean_percent"
        assert found[f"{cpu}_bucket", (("le", "5.0"),)] == 1
        assert found[f"{cpu}_bucket", (("le", "50.0"),)] == 2
        assert found[f"{cpu}_bucket", (("le", "200.0"),)] == 3
        assert found[f"{cpu}_count", ()] == 3
        assert found[f"{cpu}_sum", ()] == pytest.approx(233)

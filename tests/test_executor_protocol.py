"""The scheduler needs nothing from an executor beyond the Executor protocol: an in-memory one
sees jobs through to their end, with no Docker at all."""

from __future__ import annotations

import time

import pytest
from helpers import Site, until

from jobsite.config import load_settings
from jobsite.db import Database
from jobsite.executor import ContainerExit, Executor, JobSpec, Outcome
from jobsite.runner import Scheduler
from jobsite.states import ACTIVE_STATES, State, StatusCode


class InMemoryExecutor:
    """Runs nothing: each job "exits" with the code its action is given, at once."""

    def __init__(self, exit_codes: dict[str, int]) -> None:
        self.exit_codes = exit_codes
        self.steps: list[tuple[str, str]] = []  # (step, action or job id)

    async def available(self) -> bool:
        return True

    async def missing_images(self, images: list[str]) -> list[str]:
        return []

    async def prepare(self, job: JobSpec) -> None:
        self.steps.append(("prepare", job.action))

    async def create(self, job: JobSpec) -> None:
        self.steps.append(("create", job.action))

    async def start(self, job: JobSpec) -> None:
        self.steps.append(("start", job.action))

    async def wait(self, job: JobSpec, started_at: float) -> ContainerExit:
        self.steps.append(("wait", job.action))
        return ContainerExit(self.exit_codes[job.action], False, False, started_at, time.time())

    async def collect(self, job: JobSpec, exit: ContainerExit) -> Outcome:
        self.steps.append(("collect", job.action))
        if exit.exit_code:
            message = f"Job exited with an error (exit code {exit.exit_code})"
            return Outcome(State.FAILED, StatusCode.NONZERO_EXIT, message, exit.exit_code)
        return Outcome(State.SUCCEEDED, StatusCode.SUCCEEDED, StatusCode.SUCCEEDED.message, 0)

    async def cancel(self, job_id: str) -> None:
        self.steps.append(("cancel", job_id))

    def usage(self, job_id: str) -> None:
        return None  # nothing to sample in memory

    async def adopt(self) -> dict[str, str]:
        return {}

    async def cleanup(self, job_id: str) -> None:
        self.steps.append(("cleanup", job_id))

    def close(self) -> None:
        pass


@pytest.fixture
async def db(tmp_path):
    database = await Database.open(tmp_path / "db.sqlite")
    yield database
    await database.close()


async def run_to_end(db: Database, tmp_path, executor: Executor, job_ids: list[str]) -> dict:
    settings = load_settings(environ={}, data_dir=str(tmp_path / "data"), min_free_disk=0)
    scheduler = Scheduler(db, settings, executor)
    marks = ",".join("?" * len(job_ids))

    async def ended() -> dict | None:
        rows = await db.fetchall(
            f"SELECT id, state, status_code, status_message, exit_code FROM jobs "
            f"WHERE id IN ({marks})",
            job_ids,
        )
        if all(row["state"] not in ACTIVE_STATES for row in rows):
            return {row["id"]: row for row in rows}
        return None

    await scheduler.start()
    try:
        return await until(ended, 10, "every job to end")
    finally:
        await scheduler.stop()


async def test_a_second_executor_runs_a_job_to_success_without_runner_changes(db, tmp_path):
    site = await Site.make(db)
    job_id = await site.add_job("generate", state="pending", status_code="created", wait=None)
    executor = InMemoryExecutor({"generate": 0})
    jobs = await run_to_end(db, tmp_path, executor, [job_id])
    assert jobs[job_id]["state"] == "succeeded"
    assert jobs[job_id]["status_code"] == "succeeded"
    assert jobs[job_id]["exit_code"] == 0
    assert [step for step, _ in executor.steps] == [
        "prepare",
        "start",
        "wait",
        "collect",
        "cleanup",
    ]


async def test_a_second_executor_reports_a_failed_job_without_runner_changes(db, tmp_path):
    site = await Site.make(db)
    job_id = await site.add_job("analyse", state="pending", status_code="created", wait=None)
    executor = InMemoryExecutor({"analyse": 3})
    jobs = await run_to_end(db, tmp_path, executor, [job_id])
    assert jobs[job_id]["state"] == "failed"
    assert jobs[job_id]["status_code"] == "nonzero_exit"
    assert jobs[job_id]["status_message"] == "Job exited with an error (exit code 3)"
    assert ("cleanup", job_id) in executor.steps

"""``jobsite run``: a local checkout's pipeline, run in Docker as the site would run it.

Like ``opensafely run``: the actions asked for (and whichever of their needs have no outputs
from a successful run yet) run one after another, each in a container with the same limits
as on the site, and their outputs land in the checkout's own ``output/...`` paths, with the
logs in ``metadata/<action>.log``. There is no database and no server: what the site keeps
in its database, a local run reads from the checkout's ``metadata/manifest.json``.

Each job starts from the checkout's files as they are on disk (committed or not), less
``.git``, ``metadata/`` and every file an action of the pipeline declares as an output;
then the recorded outputs of the job's direct needs are copied in, as on the site.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pipeline
from .config import Settings, load_settings
from .datadir import action_log_name
from .executor import DockerUnavailable, Executor, JobError, JobSpec, Outcome
from .outputs import Manifest, pattern_matches
from .states import State, StatusCode
from .submit import out_of_date

Print = Callable[[str], None]


@dataclass
class Result:
    """How one planned action ended in this run."""

    action: str
    status_code: str
    message: str
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    log: str | None = None  # where the job's log is, in the checkout

    @property
    def succeeded(self) -> bool:
        return self.status_code == StatusCode.SUCCEEDED


def main(
    project_dir: Path,
    actions: list[str],
    *,
    make_executor: Callable[[Settings], Executor],
    config: str | None = None,
    force_run_dependencies: bool = False,
    continue_on_error: bool = False,
    overrides: dict[str, Any] | None = None,
    out: Print = print,
) -> int:
    """Run the pipeline of the checkout at ``project_dir``; the exit status of ``jobsite run``."""
    with tempfile.TemporaryDirectory(prefix="jobsite-run-") as scratch:
        settings = load_settings(config, data_dir=scratch, **(overrides or {}))
        run = LocalRun(project_dir.resolve(), settings, make_executor(settings), out)
        try:
            return asyncio.run(run.run(actions, force_run_dependencies, continue_on_error))
        except KeyboardInterrupt:
            out("Stopped: the running job was cancelled and its container removed.")
            return 130


class LocalRun:
    def __init__(
        self, project_dir: Path, settings: Settings, executor: Executor, out: Print
    ) -> None:
        self.project_dir = project_dir
        self.settings = settings
        self.out = out
        self.executor = executor
        self.cleanups: list[asyncio.Task] = []
        self.ahead: asyncio.Future[None] | None = None  # creating the next job's container
        self.ran_jobs = False

    async def run(self, requested: list[str], force: bool, continue_on_error: bool) -> int:
        try:
            return await self._run(requested, force, continue_on_error)
        finally:
            await asyncio.gather(*self.cleanups, return_exceptions=True)
            await asyncio.shield(self._remove_leftovers())
            self.executor.close()

    async def _remove_leftovers(self) -> None:
        """After Ctrl-C or an error: no container of this run stays behind."""
        if not self.ran_jobs:
            return
        if self.ahead is not None:
            await asyncio.gather(self.ahead, return_exceptions=True)
        with contextlib.suppress(DockerUnavailable):
            for job_id in await self.executor.adopt():
                await self.executor.cleanup(job_id)

    async def _run(self, requested: list[str], force: bool, continue_on_error: bool) -> int:
        project = self._load_pipeline()
        if project is None:
            return 1
        try:
            plan = pipeline.plan(project, requested, self._workspace_state(project), force)
        except pipeline.UnknownActionError as e:
            self.out(f"Error: {e.args[0] if e.args else e}")
            return 2
        if not plan.jobs:
            self.out(plan.message)
            return 0
        images = self._images(project, plan)
        if images is None:
            return 1
        for action, why in plan.stale.items():
            self.out(f"{action}: its outputs are out of date ({why}); running it again")
        if not await self.executor.available():
            self.out(
                "Error: Docker is not running, or this user may not use it. Start Docker "
                "(and check `docker info` works), then run again."
            )
            return 1
        results = await self._run_plan(project, plan, images, continue_on_error)
        self._print_summary(results)
        return 0 if all(result.succeeded for result in results.values()) else 1

    def _workspace_state(self, project: pipeline.Pipeline) -> dict[str, pipeline.ActionState]:
        """What the site would read from its database: each action's last successful job."""
        manifest = Manifest.load(self.project_dir)
        recorded = manifest.data["actions"]
        stale = out_of_date(manifest, project)
        return {
            name: pipeline.ActionState(
                State.SUCCEEDED,
                recorded[name]["job"],
                manifest.outputs_exist(self.project_dir, name),
                stale.get(name),
            )
            for name in project.actions
            if name in recorded
        }

    async def _run_plan(
        self,
        project: pipeline.Pipeline,
        plan: pipeline.Plan,
        images: dict[str, str],
        continue_on_error: bool,
    ) -> dict[str, Result]:
        """The planned jobs one after another, needs first (the plan's order)."""
        sha = _checkout_commit(self.project_dir)
        files = checkout_files(self.project_dir, project)
        self.ran_jobs = True
        names = [job.action for job in plan.jobs]
        self.out(f"Running {len(names)} action{'s' * (len(names) != 1)}: {', '.join(names)}")
        jobs = [
            JobSpec(
                id=secrets.token_hex(8),
                job_request_id=0,  # no job request: a local run
                workspace=self.project_dir.name,
                repo=str(self.project_dir),
                sha=sha,
                action=action.name,
                run_command=action.run,
                image=images[action.name],
                args=list(action.args),
                outputs=action.outputs,
                needs=list(action.needs),
                source_dir=self.project_dir,
                source_files=files,
                workspace_dir=self.project_dir,
            )
            for action in (project.actions[planned.action] for planned in plan.jobs)
        ]
        results: dict[str, Result] = {}
        stopped = False
        for planned, job, next_job in zip(plan.jobs, jobs, [*jobs[1:], None], strict=True):
            if self.ahead is not None:
                await self.ahead
            failed_needs = [n for n in planned.needs_new if not results[n].succeeded]
            if failed_needs or stopped:
                if failed_needs:
                    code = StatusCode.DEPENDENCY_FAILED
                    message = f"Not run: it needs {', '.join(failed_needs)}, which did not succeed"
                    self.out(f"{job.action}: {code}: {message}")
                else:
                    code = StatusCode.NOT_RUN
                    message = "Not run: an earlier action failed (use --continue-on-error to go on)"
                results[job.action] = Result(job.action, code, message)
                self.cleanups.append(asyncio.create_task(self.executor.cleanup(job.id)))
                continue
            results[job.action] = await self._run_job(job, next_job)
            stopped = not results[job.action].succeeded and not continue_on_error
        return results

    def _load_pipeline(self) -> pipeline.Pipeline | None:
        path = self.project_dir / "project.yaml"
        try:
            text = path.read_text()
        except OSError as e:
            self.out(
                f"Error: cannot read {path}: {e.strerror}. Run this in a checkout of a "
                "study (the folder holding project.yaml), or give --project-dir."
            )
            return None
        try:
            project = pipeline.load_pipeline(text)
        except pipeline.ProjectValidationError as e:
            self.out(f"Error: {path} is not valid:")
            for error in e.errors:
                self.out(f"  - {error}")
            return None
        for warning in project.warnings:
            self.out(f"Warning: {warning}")
        return project

    def _images(self, project: pipeline.Pipeline, plan: pipeline.Plan) -> dict[str, str] | None:
        """The Docker image of each planned action, or None after saying which are unknown."""
        images, unknown = {}, []
        for planned in plan.jobs:
            action = project.actions[planned.action]
            template = self.settings.images.get(action.image)
            if template is None:
                unknown.append(f"action {action.name} uses image {action.image!r}")
                continue
            images[action.name] = template.replace("{name}", action.image).replace(
                "{tag}", action.tag
            )
        if unknown:
            self.out(f"Error: {'; '.join(unknown)}, which jobsite does not know.")
            self.out(f"Known images: {', '.join(sorted(self.settings.images))}. Nothing was run.")
            return None
        return images

    async def _run_job(self, job: JobSpec, next_job: JobSpec | None) -> Result:
        """One job through prepare, run and finalize, saying each step as it begins.

        While it runs, the next job's container is created, so that it can start as soon
        as this job's outputs are in place.
        """
        began = time.monotonic()
        say = self.out
        try:
            say(f"{job.action}: preparing")
            await self.executor.prepare(job)
            started = time.time()
            await self.executor.start(job)
            say(f"{job.action}: executing ({job.run_command})")
            if next_job is not None:
                self.ahead = asyncio.ensure_future(self._create_ahead(next_job))
            exit = await self.executor.wait(job, started)
            say(f"{job.action}: finalizing")
            outcome = await self.executor.collect(job, exit)
        except JobError as e:
            outcome = Outcome(State.FAILED, e.status_code, e.message)
        except DockerUnavailable as e:
            outcome = Outcome(
                State.FAILED, StatusCode.INTERNAL_ERROR, f"{e}. Start Docker and run again."
            )
        except BaseException:  # Ctrl-C, or anything unforeseen: leave no container behind
            await asyncio.shield(self._stop(job.id))
            raise
        # the container and temporary files go while the next job starts
        self.cleanups.append(asyncio.create_task(self.executor.cleanup(job.id)))
        logged = outcome.state == State.SUCCEEDED
        if not logged:
            logged = await asyncio.to_thread(self._keep_failed_log, job)
        message = outcome.status_message
        if outcome.log_excerpt:  # a run of one's own checkout: its log is one's own to read
            message += ": " + " | ".join(outcome.log_excerpt.splitlines())
        result = Result(
            job.action,
            outcome.status_code,
            message,
            outcome.outputs,
            time.monotonic() - began,
            action_log_name(job.action) if logged else None,
        )
        if result.succeeded:
            say(f"{job.action}: succeeded in {result.seconds:.1f}s")
        else:
            say(f"{job.action}: {result.status_code}: {result.message}")
        return result

    async def _create_ahead(self, job: JobSpec) -> None:
        with contextlib.suppress(Exception):  # start() tries again, and says what went wrong
            await self.executor.create(job)

    async def _stop(self, job_id: str) -> None:
        with contextlib.suppress(DockerUnavailable):
            await self.executor.cancel(job_id)
        await self.executor.cleanup(job_id)

    def _keep_failed_log(self, job: JobSpec) -> bool:
        """A failed job changes no outputs, but its log (if it got as far as having one) goes
        where a developer looks next."""
        log = self.settings.data.log(job.id)
        if not log.exists():
            return False
        target = self.project_dir / action_log_name(job.action)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{job.id}.tmp")
        shutil.copyfile(log, tmp)
        os.replace(tmp, target)
        return True

    def _print_summary(self, results: dict[str, Result]) -> None:
        say = self.out
        say("")
        for result in results.values():
            say(f"{result.action}: {result.status_code}")
            if not result.succeeded:
                say(f"  {result.message}")
            if result.log is not None:
                say(f"  log: {result.log}")
            for path, level in sorted(result.outputs.items()):
                say(f"  {path}  ({level})")
        failed = [r.action for r in results.values() if not r.succeeded]
        if failed:
            say(f"\n{len(failed)} of {len(results)} actions did not succeed: {', '.join(failed)}")
        elif len(results) == 1:
            say("\nThe action succeeded.")
        else:
            say(f"\nAll {len(results)} actions succeeded.")


def checkout_files(project_dir: Path, project: pipeline.Pipeline) -> tuple[str, ...]:
    """The checkout's files a job starts from: all but ``.git``, ``metadata/`` and outputs."""
    patterns = [pattern for a in project.actions.values() for _, pattern in a.output_patterns()]
    found = []
    for dirpath, dirnames, filenames in os.walk(project_dir):
        rel_dir = os.path.relpath(dirpath, project_dir)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in (".git", "metadata")]
            rel_dir = ""
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            rel = rel.replace(os.sep, "/")
            if not any(pattern_matches(pattern, rel) for pattern in patterns):
                found.append(rel)
    return tuple(sorted(found))


def _checkout_commit(project_dir: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(project_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "(not known: git is not available)"
    if done.returncode:
        return "(not a git repository)"
    return f"{done.stdout.strip()} (with any uncommitted changes)"

"""``jobsite run``: a local checkout's pipeline, run in Docker as the site would run it.

Like ``opensafely run``: the actions asked for (and whichever of their needs have no outputs
from a successful run yet) run in containers with the same limits as on the site, as many
at once as ``--concurrency`` allows, in the order of the site's fair queue
(``scheduling.JobQueue``): an action starts once the actions it needs have succeeded. Their
outputs land in the checkout's own ``output/...`` paths, with the logs in
``metadata/<action>.log``. There is no database and no server: what the site keeps in its
database, a local run reads from the checkout's ``metadata/manifest.json``.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pipeline
from .config import Settings, load_settings
from .datadir import action_log_name
from .executor import DockerUnavailable, Executor, JobError, JobSpec, Outcome
from .outputs import Manifest, pattern_matches
from .scheduling import JobQueue, Limits, QueuedJob
from .states import State, StatusCode
from .submit import out_of_date
from .units import iso

Print = Callable[[str], None]
LOCAL_USER = 0  # a local run's jobs all belong to the one person running it


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


@dataclass(frozen=True)
class Options:
    """How ``jobsite run`` runs and what it prints (its command-line flags)."""

    concurrency: int = 2  # jobs run at once
    debug: bool = False  # keep containers and job dirs, and say how to remove them
    timestamps: bool = False  # each line starts with the time
    github: bool = False  # each action's output in a GitHub Actions ::group:: block


def main(
    project_dir: Path,
    actions: list[str],
    *,
    make_executor: Callable[[Settings], Executor],
    config: str | None = None,
    force_run_dependencies: bool = False,
    continue_on_error: bool = False,
    overrides: dict[str, Any] | None = None,
    options: Options = Options(),
    out: Print = print,
) -> int:
    """Run the pipeline of the checkout at ``project_dir``; the exit status of ``jobsite run``."""
    if options.timestamps:
        out = timestamped(out)
    with scratch_dir(options.debug) as scratch:
        settings = load_settings(config, data_dir=scratch, **(overrides or {}))
        run = LocalRun(project_dir.resolve(), settings, make_executor(settings), out, options)
        try:
            return asyncio.run(run.run(actions, force_run_dependencies, continue_on_error))
        except KeyboardInterrupt:
            if options.debug:
                out("Stopped: the running jobs were cancelled.")
                run.say_how_to_clean_up()
            else:
                out("Stopped: the running jobs were cancelled and their containers removed.")
            return 130


def timestamped(out: Print) -> Print:
    """``out`` with each line starting with the time it was printed (RFC 3339, UTC)."""

    def say(text: str) -> None:
        stamp = iso(time.time())
        out("\n".join(f"{stamp} {line}" if line else line for line in text.split("\n")))

    return say


@contextlib.contextmanager
def scratch_dir(keep: bool) -> Iterator[str]:
    """Where the run keeps its job dirs and logs: removed afterwards unless ``keep``."""
    if keep:
        yield tempfile.mkdtemp(prefix="jobsite-run-")
    else:
        with tempfile.TemporaryDirectory(prefix="jobsite-run-") as scratch:
            yield scratch


class LocalRun:
    def __init__(
        self,
        project_dir: Path,
        settings: Settings,
        executor: Executor,
        out: Print,
        options: Options = Options(),
    ) -> None:
        self.project_dir = project_dir
        self.settings = settings
        self.out = out
        self.executor = executor
        self.options = options
        self.cleanups: list[asyncio.Task] = []
        # creating the containers of jobs still waiting, while others run: job id -> task
        self.ahead: dict[str, asyncio.Future[None]] = {}
        self._specs: dict[str, JobSpec] = {}  # the jobs of this run, by id
        self.ran_jobs = False

    async def run(self, requested: list[str], force: bool, continue_on_error: bool) -> int:
        try:
            return await self._run(requested, force, continue_on_error)
        finally:
            await asyncio.gather(*self.cleanups, return_exceptions=True)
            await asyncio.shield(self._remove_leftovers())
            self.executor.close()

    async def _remove_leftovers(self) -> None:
        """After Ctrl-C or an error: no container of this run stays behind (unless kept for
        debugging)."""
        if not self.ran_jobs:
            return
        await asyncio.gather(*self.ahead.values(), return_exceptions=True)
        if self.options.debug:
            return
        with contextlib.suppress(DockerUnavailable):
            for job_id in await self.executor.adopt():
                await self.executor.cleanup(job_id)

    def _cleanup(self, job_id: str) -> None:
        """Remove a job's container and temporary files while the run goes on."""
        if not self.options.debug:
            self.cleanups.append(asyncio.create_task(self.executor.cleanup(job_id)))

    def say_how_to_clean_up(self) -> None:
        say = self.out
        say("")
        say("--debug: the containers and job dirs of this run were kept. To remove them:")
        say(
            "  docker container rm --force $(docker container ls --all --quiet "
            f"--filter label=jobsite={self.settings.site_id})"
        )
        say(f"  rm -rf {self.settings.data_dir}")

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
            self.out("Use -f (--force-run-dependencies) to run them again.")
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
        for image in await self.executor.missing_images(sorted(set(images.values()))):
            if self.settings.allow_pull:
                self.out(f"Fetching missing docker image: {image} (this may take some time)")
            else:
                self.out(
                    f"Warning: image {image} is not on this machine and pulling is turned off "
                    "(allow_pull: false): the actions using it will fail. Load it with "
                    "`docker load` or `docker pull`, then run again."
                )
        results = await self._run_plan(project, plan, images, continue_on_error)
        self._print_summary(results)
        if self.options.debug:
            self.say_how_to_clean_up()
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
        """The planned jobs, as many at once as the concurrency allows, each once the jobs
        it needs have succeeded: the site's fair queue decides which starts next."""
        sha = _checkout_commit(self.project_dir)
        files = checkout_files(self.project_dir, project)
        self.ran_jobs = True
        names = [job.action for job in plan.jobs]
        self.out(f"Running {len(names)} action{'s' * (len(names) != 1)}: {', '.join(names)}")
        jobs = {
            action.name: JobSpec(
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
        }
        by_id = self._specs = {job.id: job for job in jobs.values()}
        queue = JobQueue()
        for place, planned in enumerate(plan.jobs):
            queue.add(
                QueuedJob(
                    jobs[planned.action].id,
                    LOCAL_USER,
                    action=planned.action,
                    created_at=place,  # the plan's order: needs first
                    waiting_on={jobs[need].id for need in planned.needs_new},
                )
            )
        limits = Limits(max_workers=self.options.concurrency)
        results: dict[str, Result] = {}
        running: dict[asyncio.Task[Result], str] = {}
        stopped = False
        try:
            while True:
                while not stopped and (picked := queue.pick(time.time(), limits)) is not None:
                    queue.start(picked.id, time.time())
                    task = asyncio.create_task(self._run_job(by_id[picked.id], queue))
                    running[task] = picked.id
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    job = by_id[running.pop(task)]
                    result = results[job.action] = task.result()
                    for failure in queue.finish(job.id, time.time(), result.succeeded):
                        action, need = failure.job.action, failure.dependency.action
                        message = f"Not run: it needs {need}, which did not succeed"
                        self.out(f"{action}: {StatusCode.DEPENDENCY_FAILED}: {message}")
                        results[action] = Result(action, StatusCode.DEPENDENCY_FAILED, message)
                        self._cleanup(failure.job.id)
                    stopped = stopped or not (result.succeeded or continue_on_error)
        except BaseException:  # Ctrl-C: every running job stops, leaving no container
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        for job_id in list(queue.pending):
            action = by_id[job_id].action
            message = "Not run: an earlier action failed (use --continue-on-error to go on)"
            results[action] = Result(action, StatusCode.NOT_RUN, message)
            self._cleanup(job_id)
        return {name: results[name] for name in jobs}

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

    async def _run_job(self, job: JobSpec, queue: JobQueue) -> Result:
        """One job through prepare, run and finalize, saying each step as it begins.

        While it runs, the container of the next job still waiting is created, so that it
        can start as soon as a slot and its needs' outputs are there.
        """
        began = time.monotonic()
        lines: list[str] = []
        say = lines.append if self.options.github else self.out
        try:
            if job.id in self.ahead:
                await self.ahead.pop(job.id)
            say(f"{job.action}: preparing")
            await self.executor.prepare(job)
            started = time.time()
            await self.executor.start(job)
            say(f"{job.action}: executing ({job.run_command})")
            self._create_next(queue)
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
            if not self.options.debug:
                await asyncio.shield(self._stop(job.id))
            raise
        # the container and temporary files go while the next job starts
        self._cleanup(job.id)
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
        if self.options.github:
            await self._print_group(job, result, lines)
        return result

    async def _print_group(self, job: JobSpec, result: Result, lines: list[str]) -> None:
        """An action's lines and its log as one GitHub Actions group, printed when it ends
        (actions running at once would otherwise mix their lines)."""
        log = self.settings.data.log(job.id)
        text = await asyncio.to_thread(log.read_text, errors="replace") if log.exists() else ""
        self.out(f"::group::{job.action}: {result.status_code}")
        for line in lines:
            self.out(line)
        if text:
            self.out(f"--- {action_log_name(job.action)} ---")
            self.out(text.rstrip("\n"))
        self.out("::endgroup::")

    def _create_next(self, queue: JobQueue) -> None:
        """Start creating the container of the first waiting job that has none yet."""
        for job_id in queue.pending:
            if job_id not in self.ahead:
                spec = self._specs[job_id]
                self.ahead[job_id] = asyncio.ensure_future(self._create_ahead(spec))
                return

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

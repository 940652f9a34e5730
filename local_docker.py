"""The local Docker engine as an ``Executor``: prepare a job's directory, run its container,
collect its outputs. The one module that talks to Docker.

These are the steps of DESIGN section 5. Docker SDK calls block, so each runs in a thread and
the event loop stays free for the site. The two calls that block for as long as the job runs
(waiting for the container, following its log) run in daemon threads of their own, so that a
server stopping while a job runs is not held up by them: the container is left running, and
the next process re-adopts it (DESIGN section 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig

from . import jobdir
from .config import Settings, SettingsError
from .datadir import MANIFEST, action_log_name
from .executor import (
    ContainerExit,
    DockerUnavailable,
    JobError,
    JobSpec,
    Outcome,
    ResourceUse,
)
from .outputs import (
    Manifest,
    OutputError,
    action_definition,
    check_visibility,
    input_jobs,
    match_outputs,
)
from .repos import RepoError, Repos
from .states import State, StatusCode
from .units import human_size, iso, precise_duration

CONTAINER_WORKDIR = "/workspace"
LOG_DRAIN_TIMEOUT = 30.0  # seconds to wait for the end of a log after its container exited
STATS_INTERVAL = 1.0  # seconds between two samples of a running job's CPU and memory use
MIN_CPU_INTERVAL = 0.2  # seconds: CPU use over less time than this is mostly noise
DISK_CHECK_INTERVAL = 1.0  # at least this many seconds between two measures of a job's dir

log = logging.getLogger(__name__)

AVAILABLE_FOR = 1.0  # seconds one answer to "is the engine there?" is shared

T = TypeVar("T")


class LocalDockerExecutor:
    """Runs a site's jobs as containers on the local Docker engine."""

    def __init__(self, settings: Settings, repos: Repos | None = None) -> None:
        self.settings = settings
        self.repos = repos
        self.data = settings.data
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        # one manifest update at a time per workspace: jobs of one workspace may end together
        self._workspace_locks: dict[Path, threading.Lock] = {}
        self._created: dict[str, str] = {}  # job id -> container made by create(), not started
        # job id -> when its inputs were in place: files newer than that are the job's own
        self._prepared_at: dict[str, float] = {}
        # job id -> the jobs whose outputs it was given, by action (kept in the manifest)
        self._inputs: dict[str, dict[str, str]] = {}
        self._usage: dict[str, UsageSamples] = {}  # running job id -> its samples so far
        self._over_disk: dict[str, int] = {}  # job id -> bytes its dir held when stopped
        # the last "is the engine there?": (its loop, when it was asked, the answer)
        self._asked: tuple[asyncio.AbstractEventLoop, float, asyncio.Task[bool]] | None = None

    # -- paths -----------------------------------------------------------------

    def container_name(self, job_id: str) -> str:
        return f"jobsite-{job_id}"

    def _workspace(self, job: JobSpec) -> Path:
        return job.workspace_dir or self.data.workspace(job.workspace)

    def time_limit(self, job: JobSpec) -> float:
        """The site's limit, or the job's own when that is shorter."""
        if job.timeout:
            return min(job.timeout, self.settings.job_timeout)
        return self.settings.job_timeout

    # -- docker ----------------------------------------------------------------

    def _api(self) -> docker.APIClient:
        """The low-level client: one HTTP round trip per call, nothing fetched behind our back."""
        with self._client_lock:
            if self._client is None:
                try:
                    # the client asks the engine for its API version, which is our ping
                    self._client = docker.from_env(
                        timeout=60, max_pool_size=max(10, 3 * self.settings.max_workers)
                    )
                except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                    raise DockerUnavailable(f"Docker is not reachable: {e}") from e
            return self._client.api

    def close(self) -> None:
        """Close the connections to the Docker engine."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    @contextlib.contextmanager
    def _docker_calls(self) -> Iterator[None]:
        """Turn a lost connection to the engine into DockerUnavailable (the job is requeued)."""
        try:
            yield
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,  # the engine went away mid-answer
        ) as e:
            self.close()
            raise DockerUnavailable(f"Docker is not reachable: {e}") from e

    async def available(self) -> bool:
        """Whether the engine answers. The pages that show it ask on every view: the engine
        is asked at most once per AVAILABLE_FOR seconds, and callers meanwhile share that
        answer (or the ping under way)."""
        loop = asyncio.get_running_loop()
        asked = self._asked
        if asked is None or asked[0] is not loop or loop.time() - asked[1] >= AVAILABLE_FOR:
            asked = self._asked = (loop, loop.time(), loop.create_task(self._ping()))
        # shielded: a caller that gives up does not stop the ping the others wait for
        return await asyncio.shield(asked[2])

    async def _ping(self) -> bool:
        def ping() -> None:
            with self._docker_calls():
                self._api().ping()

        try:
            await asyncio.to_thread(ping)
            return True
        except (DockerUnavailable, docker.errors.DockerException):
            self.close()
            return False

    async def check_settings(self) -> None:
        """Refuse, naming the setting, a database network that is not an internal Docker
        network: a database action on it could reach the internet. With the engine down the
        site still starts; each database job checks its network before it runs."""

        def check() -> None:
            for name, database in self.settings.databases.items():
                if database.network:
                    problem = self._network_problem(database.network)
                    if problem:
                        raise SettingsError(f"databases.{name}.network: {problem}")

        try:
            await asyncio.to_thread(check)
        except DockerUnavailable as e:
            log.warning("could not check the databases' networks yet: %s", e)
        finally:
            self.close()  # a site refused at start leaves no connection behind

    def _network_problem(self, network: str) -> str | None:
        """What makes ``network`` unfit for database actions, if anything."""
        with self._docker_calls():
            try:
                found = self._api().inspect_network(network)
            except docker.errors.NotFound:
                found = None
        fix = (
            "Database actions may only use an internal network (made with `docker network "
            "create --internal NAME`, the database server attached to it), so that they reach "
            "the database and nothing else."
        )
        if found is None:
            return f"there is no Docker network {network!r}. {fix}"
        if not found.get("Internal"):
            return (
                f"the Docker network {network!r} is not internal: it can reach the internet. {fix}"
            )
        return None

    def _user(self) -> str:
        if os.getuid() == 0:
            return self.settings.job_user
        return f"{os.getuid()}:{os.getgid()}"

    # -- step 1 and 2: prepare -------------------------------------------------

    async def prepare(self, job: JobSpec) -> None:
        """An empty dir holding the repo at the commit (or the checkout's files) and the
        recorded outputs of the job's direct dependencies."""
        workdir = self.data.job_dir(job.id)
        try:
            workdir.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(jobdir.remove_tree, workdir)
            workdir.mkdir()
            if job.source_dir is not None:
                await asyncio.to_thread(
                    jobdir.copy_files, job.source_dir, job.source_files, workdir
                )
            else:
                assert self.repos is not None, "a job from a repo needs Repos"
                await self.repos.export_tree(job.repo, job.sha, workdir)
            await asyncio.to_thread(self._copy_inputs, job, workdir)
            manifest = await asyncio.to_thread(Manifest.load, self._workspace(job))
            self._inputs[job.id] = input_jobs(manifest, job.needs)
            if os.getuid() == 0:
                uid, gid = (int(x) for x in self.settings.job_user.split(":"))
                await asyncio.to_thread(jobdir.chown_tree, workdir, uid, gid)
            self._prepared_at[job.id] = time.time()
        except jobdir.UnsafePath as e:
            raise JobError(
                StatusCode.INTERNAL_ERROR,
                f"Could not prepare the job's files: {e}. jobsite never writes through a "
                "symbolic link or over a directory; change the repo so that nothing of that "
                "kind stands at this path.",
            ) from e
        except RepoError as e:
            raise JobError(
                StatusCode.INTERNAL_ERROR, f"Could not prepare the job's files: {e}"
            ) from e
        except OSError as e:
            raise JobError(
                StatusCode.INTERNAL_ERROR, _os_error_message(e, "prepare the job's files")
            ) from e

    def _copy_inputs(self, job: JobSpec, workdir: Path) -> None:
        ws = self._workspace(job)
        manifest = Manifest.load(ws)
        for action in job.needs:
            for rel in manifest.action_files(action):
                src = ws / rel
                if not src.is_file():
                    raise JobError(
                        StatusCode.INTERNAL_ERROR,
                        f"Input file {rel} is missing from the workspace; it should have been "
                        f"made by action {action}. Run {action} again (or tick Force run "
                        "dependencies).",
                    )
                # over whatever the repo has at that path (a link, say), never through it
                jobdir.copy_in(src, workdir, rel, mode=0o644)

    # -- step 3: run -----------------------------------------------------------

    async def create(self, job: JobSpec) -> None:
        """Create the job's container without starting it.

        Optional: ``start`` creates the container when this was not called. A local run
        creates the next job's container while the current one runs, which takes a round
        trip and the engine's setup off the time between two jobs.
        """
        self._created[job.id] = await asyncio.to_thread(self._create, job)

    async def start(self, job: JobSpec) -> None:
        """Create (unless ``create`` did) and start the container."""
        await asyncio.to_thread(self._start, job)

    def _start(self, job: JobSpec) -> None:
        container_id = self._created.pop(job.id, None) or self._create(job)
        with self._docker_calls():
            try:
                self._api().start(container_id)
            except docker.errors.APIError as e:
                raise _not_started(e) from e

    def _create(self, job: JobSpec) -> str:
        s = self.settings
        with self._docker_calls():
            api = self._api()
            env = {"OPENSAFELY_BACKEND": s.backend, "HOME": "/tmp"}
            network = "none"
            if job.requires_db:
                if job.database_url:
                    env["DATABASE_URL"] = job.database_url
                network = job.database_network or "none"
                problem = network != "none" and self._network_problem(network)
                if problem:
                    raise JobError(
                        StatusCode.INTERNAL_ERROR,
                        f"The database's network is not safe to use: {problem} An admin must "
                        "fix the setting databases.<name>.network; then run the job again.",
                    )
            host_config = api.create_host_config(
                init=True,
                network_mode=network,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                pids_limit=s.job_pids_limit,
                mem_limit=s.job_memory,
                memswap_limit=s.job_memory,
                nano_cpus=int(s.job_cpus * 1e9),
                binds={str(self.data.job_dir(job.id)): {"bind": CONTAINER_WORKDIR, "mode": "rw"}},
                # the job writes only to /workspace (watched against job_disk) and /tmp, a
                # tmpfs whose pages count against the job's memory: nothing lands unbounded
                # in the engine's own storage
                read_only=True,
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={s.job_memory},mode=1777"},
                # the site keeps the log itself (capped); the engine's copy is bounded too
                log_config=LogConfig(
                    type=LogConfig.types.JSON,
                    config={"max-size": str(max(s.log_limit, 1024**2)), "max-file": "2"},
                ),
            )

            def create() -> dict:
                return api.create_container(
                    job.image,
                    job.args,
                    # with no network at all the engine sets up no network sandbox either:
                    # the same empty namespace as --network none, a third faster to start
                    network_disabled=network == "none",
                    name=self.container_name(job.id),
                    user=self._user(),
                    environment=env,
                    labels={"jobsite": s.site_id, "jobsite.job": job.id},
                    working_dir=CONTAINER_WORKDIR,
                    host_config=host_config,
                    use_config_proxy=False,  # no proxy settings leak into a job
                )

            try:
                container = create()
            except docker.errors.ImageNotFound:
                self._pull(job.image)
                container = create()
            except docker.errors.APIError as e:
                if e.status_code != 409:
                    raise _not_started(e) from e
                # a container of an earlier attempt at this job (a restart while preparing)
                self._remove_container(job.id)
                container = create()
        return container["Id"]

    async def missing_images(self, images: list[str]) -> list[str]:
        def missing() -> list[str]:
            found = []
            for image in images:
                try:
                    with self._docker_calls():
                        self._api().inspect_image(image)
                except docker.errors.ImageNotFound:
                    found.append(image)
            return found

        try:
            return await asyncio.to_thread(missing)
        except (DockerUnavailable, docker.errors.DockerException):
            return []  # the jobs say what is wrong with Docker when they start

    def _pull(self, image: str) -> None:
        if not self.settings.allow_pull:
            raise JobError(
                StatusCode.INTERNAL_ERROR,
                f"Image {image} is not on this machine and pulling is turned off "
                "(allow_pull: false). An admin must load the image.",
            )
        repository, _, tag = image.rpartition(":")
        try:
            self._api().pull(repository, tag=tag)
        except docker.errors.APIError as e:
            raise JobError(StatusCode.INTERNAL_ERROR, f"Could not pull image {image}: {e}") from e

    async def wait(self, job: JobSpec, started_at: float) -> ContainerExit:
        """Wait for the container to exit, killing it past its time limit, while its log
        streams into ``data/logs/<id>.log``."""
        log_done = _in_daemon_thread(self._follow_log, job.id)
        # a log that could not be followed is no reason to fail the job: what arrived is kept
        log_done.add_done_callback(lambda f: f.cancelled() or f.exception())
        usage, stop_sampling = UsageSamples(), threading.Event()
        self._usage[job.id] = usage
        sampling = _in_daemon_thread(self._sample_usage, job.id, usage, stop_sampling)
        sampling.add_done_callback(lambda f: f.cancelled() or f.exception())
        remaining = max(0.0, started_at + self.time_limit(job) - time.time())
        timed_out = False
        watch = asyncio.create_task(self._watch_disk(job.id))
        # a measure that failed is no reason to fail the job: collect measures once more
        watch.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait_for(_in_daemon_thread(self._wait, job.id), remaining)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(self._kill, job.id)
            await _in_daemon_thread(self._wait, job.id)
        finally:
            stop_sampling.set()
            self._usage.pop(job.id, None)
            watch.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(log_done), LOG_DRAIN_TIMEOUT)
        exit = await asyncio.to_thread(self._inspect, job, timed_out)
        exit.usage = usage.result()
        return exit

    def usage(self, job_id: str) -> ResourceUse | None:
        samples = self._usage.get(job_id)
        return samples.result() if samples is not None else None

    def _sample_usage(self, job_id: str, usage: UsageSamples, stop: threading.Event) -> None:
        """Sample the container's CPU and memory use until ``stop`` is set or it is gone.
        Sampling is best effort: a sample Docker cannot give is skipped, never a failure."""
        name = self.container_name(job_id)
        try:
            state = self._api().inspect_container(name)["State"]
            usage.started_at = _docker_time(state.get("StartedAt"))
            while not stop.is_set():
                usage.add(self._api().stats(name, stream=False, one_shot=True), time.time())
                stop.wait(STATS_INTERVAL)
        except (DockerUnavailable, docker.errors.DockerException, requests.RequestException):
            return

    async def _watch_disk(self, job_id: str) -> None:
        """Stop the job when its files grow past ``job_disk``. Docker has no size limit for
        a bind mount on most filesystems, so the dir is measured while the job runs, more
        often when measuring is cheap; ``collect`` measures it once more at the end."""
        while True:
            began = time.monotonic()
            used = await asyncio.to_thread(jobdir.disk_usage, self.data.job_dir(job_id))
            if used > self.settings.job_disk:
                self._over_disk[job_id] = used
                await asyncio.to_thread(self._kill, job_id)
                return
            await asyncio.sleep(max(DISK_CHECK_INTERVAL, 20 * (time.monotonic() - began)))

    def _wait(self, job_id: str) -> None:
        with self._docker_calls():
            self._api().wait(self.container_name(job_id))

    def _follow_log(self, job_id: str) -> None:
        path = self.data.log(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._docker_calls(), CappedLog(path, self.settings.log_limit) as log:
            stream = self._api().logs(
                self.container_name(job_id), stream=True, follow=True, timestamps=True
            )
            with contextlib.closing(stream):
                for chunk in stream:
                    log.write(chunk)

    def _kill(self, job_id: str) -> None:
        with self._docker_calls():
            try:
                self._api().kill(self.container_name(job_id))
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if "is not running" not in str(e):
                    raise

    async def cancel(self, job_id: str) -> None:
        """Stop a job's container; a missing container is fine."""
        await asyncio.to_thread(self._kill, job_id)

    def _inspect(self, job: JobSpec, timed_out: bool) -> ContainerExit:
        with self._docker_calls():
            attrs = self._api().inspect_container(self.container_name(job.id))
            digest = self._image_digest(attrs.get("Image"), job.image)
        state = attrs["State"]
        return ContainerExit(
            exit_code=state.get("ExitCode", -1),
            oom_killed=bool(state.get("OOMKilled")),
            timed_out=timed_out,
            started_at=_docker_time(state.get("StartedAt")),
            finished_at=_docker_time(state.get("FinishedAt")),
            image_id=attrs.get("Image"),
            image_digest=digest,
        )

    def _image_digest(self, image_id: str | None, image: str) -> str | None:
        """The registry digest of the job's image (``name@sha256:...``), or None for an image
        that never came from a registry (built or loaded on this machine)."""
        if not image_id:
            return None
        try:
            digests = self._api().inspect_image(image_id).get("RepoDigests") or []
        except docker.errors.NotFound:
            return None
        repository = image.rpartition(":")[0] if "@" not in image else image.partition("@")[0]
        return next((d for d in digests if d.partition("@")[0] == repository), None)

    def _remove_container(self, job_id: str) -> None:
        with self._docker_calls():
            try:
                self._api().remove_container(self.container_name(job_id), force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code != 409:  # 409: its removal is already under way
                    raise

    # -- step 4 and 5: collect -------------------------------------------------

    async def collect(self, job: JobSpec, exit: ContainerExit) -> Outcome:
        """Decide the outcome; on success collect the outputs; write the logs.

        Only a successful job changes the workspace, and it changes it whole or not at all.
        """
        log_text = await asyncio.to_thread(_read_text, self.data.log(job.id))
        stopped_at = self._over_disk.pop(job.id, None)
        used = stopped_at or await asyncio.to_thread(jobdir.disk_usage, self.data.job_dir(job.id))
        outcome = self._judge(job, exit, log_text, used, stopped=stopped_at is not None)
        outcome.exit_code = exit.exit_code
        outcome.image_id = exit.image_id
        if outcome.state == State.SUCCEEDED:
            try:
                outcome.outputs = await asyncio.to_thread(
                    self._collect_outputs, job, log_text, exit, outcome
                )
            except (JobError, OutputError) as e:
                outcome = Outcome(
                    State.FAILED, e.status_code, e.message, exit.exit_code, exit.image_id
                )
            except OSError as e:
                message = _os_error_message(e, "copy the job's outputs into the workspace")
                outcome = Outcome(
                    State.FAILED, StatusCode.INTERNAL_ERROR, message, exit.exit_code, exit.image_id
                )
        if outcome.state != State.SUCCEEDED:
            summary = _summary(job, exit, outcome)
            with contextlib.suppress(OSError):  # a full disk: the job's failure says so already
                await asyncio.to_thread(self._keep_failed_log, job, log_text, summary)
        self._inputs.pop(job.id, None)
        return outcome

    def _keep_failed_log(self, job: JobSpec, log_text: str, summary: str) -> None:
        """A failed job changes no output, but its log goes where a researcher looks next:
        ``metadata/<action>.log``, as for a job that succeeded."""
        _append(self.data.log(job.id), summary)
        ws = self._workspace(job)
        with self._workspace_lock(ws):
            target = ws / action_log_name(job.action)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{job.id}.tmp")
            tmp.write_text(log_text + summary)
            os.replace(tmp, target)

    def _judge(
        self, job: JobSpec, exit: ContainerExit, log_text: str, disk_used: int, stopped: bool
    ) -> Outcome:
        if exit.cancelled:
            return Outcome(
                State.FAILED, StatusCode.CANCELLED_BY_USER, StatusCode.CANCELLED_BY_USER.message
            )
        if exit.timed_out:
            return Outcome(
                State.FAILED,
                StatusCode.TIMED_OUT,
                f"Job ran longer than its time limit of {precise_duration(self.time_limit(job))} "
                "and was stopped",
            )
        if disk_used > self.settings.job_disk:
            return Outcome(
                State.FAILED,
                StatusCode.OUT_OF_DISK,
                f"The job's files (the repo, its inputs and what it wrote) took "
                f"{human_size(disk_used)} of disk (each file or directory counting as at least "
                f"{human_size(jobdir.INODE_SIZE)}), more than this site's limit of "
                f"{human_size(self.settings.job_disk)} per job (job_disk)"
                + (", so the job was stopped" if stopped else "")
                + ". Write less (delete temporary files as you go), or ask an admin to "
                "raise the limit.",
            )
        if exit.exit_code == 137 and exit.oom_killed:
            if exit.usage is None:
                peak = "its use was not sampled: it ran out within a second"
            else:
                peak = f"peak sampled use {human_size(exit.usage.memory_peak_mb * 1e6)}"
            return Outcome(
                State.FAILED,
                StatusCode.OUT_OF_MEMORY,
                f"Job ran out of memory (limit {human_size(self.settings.job_memory)}; {peak}) "
                "and was stopped. Use less memory, or ask an admin for a higher job_memory.",
            )
        if exit.exit_code != 0:
            lines = [line for line in log_text.splitlines() if line.strip()][-3:]
            # the log's lines stay out of the public status message (DESIGN section 10)
            tail = "\n".join(_strip_timestamp(line) for line in lines)
            message = f"Job exited with an error (exit code {exit.exit_code})"
            return Outcome(State.FAILED, StatusCode.NONZERO_EXIT, message, log_excerpt=tail[-1000:])
        return Outcome(State.SUCCEEDED, StatusCode.SUCCEEDED, StatusCode.SUCCEEDED.message)

    def _collect_outputs(
        self, job: JobSpec, log_text: str, exit: ContainerExit, outcome: Outcome
    ) -> dict[str, str]:
        """Copy matched files into the workspace, staged first so that a failure part way
        (a full disk, say) leaves the workspace as it was."""
        workdir = self.data.job_dir(job.id)
        matched = match_outputs(
            workdir,
            job.outputs,
            self.settings.max_output_size,
            made_since=self._prepared_at.get(job.id),
            max_files=self.settings.max_output_files,
        )
        ws = self._workspace(job)
        with self._workspace_lock(ws):
            manifest = Manifest.load(ws)
            previous = set(manifest.action_files(job.action))
            staging = _Staging(ws, job.id)
            try:
                files = {}
                for rel, level in matched.items():
                    tmp, size, digest = staging.copy_in(workdir, rel)
                    visible, reason = check_visibility(tmp, level, suffix=Path(rel).suffix)
                    if not visible:
                        outcome.not_shown[rel] = reason or "not shown"
                    files[rel] = {
                        "action": job.action,
                        "job": job.id,
                        "commit": job.sha,
                        "level": level,
                        "size": size,
                        "sha256": digest,
                        "visible": visible,
                        "not_visible_because": reason,
                    }
                outcome.outputs = dict(matched)
                summary = _summary(job, exit, outcome)
                staging.write(action_log_name(job.action), (log_text + summary).encode())
                manifest.record_action(
                    job.action,
                    job.id,
                    job.sha,
                    files,
                    definition=action_definition(job.run_command, job.args, job.needs),
                    inputs=self._inputs.get(job.id) or input_jobs(manifest, job.needs),
                )
                staging.write(MANIFEST, manifest.dumps().encode())
            except BaseException:
                staging.discard()
                raise
            staging.commit()
            for rel in previous - set(matched):
                (ws / rel).unlink(missing_ok=True)
        _append(self.data.log(job.id), summary)
        return dict(matched)

    def _workspace_lock(self, ws: Path) -> threading.Lock:
        with self._client_lock:
            return self._workspace_locks.setdefault(ws, threading.Lock())

    # -- step 6: clean up ------------------------------------------------------

    async def cleanup(self, job_id: str) -> None:
        """Remove the container and the temporary dir, whatever happened."""

        def clean() -> None:
            self._created.pop(job_id, None)
            self._prepared_at.pop(job_id, None)
            self._inputs.pop(job_id, None)
            self._over_disk.pop(job_id, None)
            try:
                self._remove_container(job_id)
            except DockerUnavailable:
                pass
            try:
                jobdir.remove_tree(self.data.job_dir(job_id))
            except OSError as e:
                log.warning("could not remove the files of job %s: %s", job_id, e)

        await asyncio.to_thread(clean)

    async def adopt(self) -> dict[str, str]:
        """job id -> container state, for every container labelled for this site."""

        def list_them() -> dict[str, str]:
            with self._docker_calls():
                found = self._api().containers(
                    all=True, filters={"label": f"jobsite={self.settings.site_id}"}
                )
            return {c["Labels"]["jobsite.job"]: c["State"] for c in found}

        return await asyncio.to_thread(list_them)


class CappedLog:
    """A log file written as it arrives, keeping its head and tail when it is too long.

    The first half of ``limit`` bytes goes straight to the file, so a page can follow the
    job live; after that only the latest half is kept in memory, and written with a note of
    what was left out when the log ends.
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.written = 0
        self.dropped = 0
        self.tail = bytearray()
        self.file = path.open("wb")

    def __enter__(self) -> CappedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, chunk: bytes) -> None:
        room = self.head_limit - self.written
        if room > 0:
            self.file.write(chunk[:room])
            self.file.flush()
            self.written += min(room, len(chunk))
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            excess = len(self.tail) - self.tail_limit
            if excess > 0:
                del self.tail[:excess]
                self.dropped += excess

    def close(self) -> None:
        if self.dropped:
            limit = self.head_limit + self.tail_limit
            self.file.write(
                f"\n[... {self.dropped} bytes of log left out: logs are capped at {limit} "
                "bytes ...]\n".encode()
            )
        self.file.write(self.tail)
        self.file.close()


class UsageSamples:
    """CPU and memory samples of one container, from Docker's stats, summed as they come.

    CPU use is the change in the container's CPU time between two samples over the time
    between them (the first sample is measured from the container's start), in percent of
    one core; memory is what Docker reports less the reclaimable page cache, as
    ``docker stats`` shows it.
    """

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.cpus: list[float] = []
        self.memory: list[float] = []  # MB
        self._last: tuple[float, int] | None = None  # (at, CPU nanoseconds)

    def add(self, stats: dict[str, Any], at: float) -> None:
        cpu_ns = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage")
        memory = stats.get("memory_stats", {})
        if not memory or not cpu_ns:  # the container has stopped
            return
        cache = memory.get("stats", {})
        used = memory.get("usage", 0) - cache.get(
            "total_inactive_file", cache.get("inactive_file", 0)
        )
        self.memory.append(max(0, used) / 1e6)
        last = self._last or ((self.started_at, 0) if self.started_at else None)
        if last is not None and at - last[0] >= MIN_CPU_INTERVAL:
            self.cpus.append(max(0.0, (cpu_ns - last[1]) / ((at - last[0]) * 1e9) * 100))
        self._last = (at, cpu_ns)

    def result(self) -> ResourceUse | None:
        if not self.memory:
            return None
        cpus = self.cpus
        return ResourceUse(
            cpu_mean=sum(cpus) / len(cpus) if cpus else None,
            cpu_peak=max(cpus) if cpus else None,
            memory_mean_mb=sum(self.memory) / len(self.memory),
            memory_peak_mb=max(self.memory),
            samples=len(self.memory),
        )


class _Staging:
    """Files written next to their final place in a workspace, moved there all at once."""

    def __init__(self, root: Path, job_id: str) -> None:
        self.root = root
        self.suffix = f".{job_id}.tmp"
        self.staged: list[tuple[Path, Path]] = []  # (tmp, final)
        self.made_dirs: list[Path] = []

    def _tmp_for(self, rel: str) -> tuple[Path, Path]:
        final = self.root / rel
        missing = []
        parent = final.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir()
            self.made_dirs.append(directory)
        tmp = final.with_name(f".{final.name}{self.suffix}")
        self.staged.append((tmp, final))
        return tmp, final

    def copy_in(self, workdir: Path, rel: str) -> tuple[Path, int, str]:
        """Copy an output in without following a link; returns (tmp path, size, sha256)."""
        src = workdir / rel
        if not os.path.realpath(src).startswith(os.path.realpath(workdir) + os.sep):
            raise OutputError(
                StatusCode.INTERNAL_ERROR, f"Output {rel} resolves outside the job's files"
            )
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError(StatusCode.INTERNAL_ERROR, f"Output {rel} is not a regular file")
            tmp, _ = self._tmp_for(rel)
            digest = hashlib.sha256()
            with tmp.open("wb") as out:
                size = jobdir.copy_data(f, out, digest)  # a sparse output stays sparse
        return tmp, size, digest.hexdigest()

    def write(self, rel: str, data: bytes) -> None:
        tmp, _ = self._tmp_for(rel)
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())

    def commit(self) -> None:
        for tmp, final in self.staged:
            os.replace(tmp, final)

    def discard(self) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        for directory in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()


def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run a long blocking call in a daemon thread; its result arrives as a future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as e:
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed while we waited
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"jobsite-{fn.__name__}", daemon=True).start()
    return future


def _not_started(e: docker.errors.APIError) -> JobError:
    return JobError(
        StatusCode.INTERNAL_ERROR,
        f"Docker could not start the job's container: {e.explanation or e}. If this is about "
        "a limit, check the settings job_memory and job_cpus (--memory and --cpus of "
        "jobsite run).",
    )


def _os_error_message(e: OSError, doing: str) -> str:
    if e.errno == errno.ENOSPC:
        return (
            f"The disk is full: could not {doing} ({e.filename or 'no file named'}). "
            "The workspace was left as it was. An admin must free some space; then run the "
            "job again."
        )
    return f"Could not {doing}: {e}"


def _summary(job: JobSpec, exit: ContainerExit, outcome: Outcome) -> str:
    lines = [
        "",
        "---- jobsite summary ----",
        f"job id:          {job.id}",
        f"job request id:  {job.job_request_id or 'none (jobsite run)'}",
        f"workspace:       {job.workspace}",
        f"action:          {job.action}",
        f"commit:          {job.sha}",
        f"run:             {job.run_command}",
        f"image:           {job.image} ({exit.image_id or 'unknown id'})",
        f"image digest:    {exit.image_digest or 'none (not pulled from a registry)'}",
        f"exit code:       {exit.exit_code}",
        f"started:         {iso(exit.started_at)}",
        f"finished:        {iso(exit.finished_at)}",
        f"duration:        {precise_duration(max(0.0, exit.finished_at - exit.started_at))}",
        f"status:          {outcome.status_code}: {outcome.status_message}",
    ]
    if exit.usage is not None:
        use = exit.usage
        cpu = "not measured (the job was too short)"
        if use.cpu_mean is not None:
            cpu = f"mean {use.cpu_mean:.1f}%, peak {use.cpu_peak:.1f}% of one core"
        lines.append(f"CPU:             {cpu}")
        lines.append(
            f"memory:          mean {use.memory_mean_mb:.1f} MB, peak {use.memory_peak_mb:.1f} MB "
            f"({use.samples} sample{'s' * (use.samples != 1)})"
        )
    if outcome.outputs:
        lines.append("outputs:")
        lines.extend(f"  {path}  ({level})" for path, level in sorted(outcome.outputs.items()))
    if outcome.not_shown:
        lines.append("not shown to output viewers:")
        lines.extend(f"  {path}: {why}" for path, why in sorted(outcome.not_shown.items()))
    return "\n".join(lines) + "\n"


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text)


def _strip_timestamp(line: str) -> str:
    """A log line without the timestamp Docker puts in front of it."""
    head, _, rest = line.partition(" ")
    return rest if head[:4].isdigit() and head.endswith("Z") else line


def _docker_time(value: str | None) -> float:
    if not value or value.startswith("0001"):
        return time.time()
    # Docker gives nanoseconds; Python parses up to microseconds
    head, _, frac = value.rstrip("Z").partition(".")
    text = f"{head}.{(frac + '000000')[:6]}+00:00"
    return datetime.fromisoformat(text).timestamp()

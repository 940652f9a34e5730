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
import os
import shutil
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

from .config import Settings
from .datadir import MANIFEST, action_log_name
from .executor import ContainerExit, DockerUnavailable, JobError, JobSpec, Outcome
from .outputs import Manifest, OutputError, check_visibility, match_outputs
from .repos import RepoError, Repos
from .states import State, StatusCode
from .units import human_size, iso, precise_duration

CONTAINER_WORKDIR = "/workspace"
LOG_DRAIN_TIMEOUT = 30.0  # seconds to wait for the end of a log after its container exited

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
        def ping() -> None:
            with self._docker_calls():
                self._api().ping()

        try:
            await asyncio.to_thread(ping)
            return True
        except (DockerUnavailable, docker.errors.DockerException):
            self.close()
            return False

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
            if workdir.exists():
                await asyncio.to_thread(shutil.rmtree, workdir)
            workdir.mkdir(parents=True)
            if job.source_dir is not None:
                await asyncio.to_thread(copy_files, job.source_dir, job.source_files, workdir)
            else:
                assert self.repos is not None, "a job from a repo needs Repos"
                await self.repos.export_tree(job.repo, job.sha, workdir)
            await asyncio.to_thread(self._copy_inputs, job, workdir)
            if os.getuid() == 0:
                uid, gid = (int(x) for x in self.settings.job_user.split(":"))
                await asyncio.to_thread(_chown_tree, workdir, uid, gid)
            self._prepared_at[job.id] = time.time()
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
                dest = workdir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)

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
        remaining = max(0.0, started_at + self.time_limit(job) - time.time())
        timed_out = False
        try:
            await asyncio.wait_for(_in_daemon_thread(self._wait, job.id), remaining)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(self._kill, job.id)
            await _in_daemon_thread(self._wait, job.id)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(log_done), LOG_DRAIN_TIMEOUT)
        return await asyncio.to_thread(self._inspect, job.id, timed_out)

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

    def _inspect(self, job_id: str, timed_out: bool) -> ContainerExit:
        with self._docker_calls():
            attrs = self._api().inspect_container(self.container_name(job_id))
        state = attrs["State"]
        return ContainerExit(
            exit_code=state.get("ExitCode", -1),
            oom_killed=bool(state.get("OOMKilled")),
            timed_out=timed_out,
            started_at=_docker_time(state.get("StartedAt")),
            finished_at=_docker_time(state.get("FinishedAt")),
            image_id=attrs.get("Image"),
        )

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
        outcome = self._judge(job, exit, log_text)
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
            await asyncio.to_thread(_append, self.data.log(job.id), summary)
        return outcome

    def _judge(self, job: JobSpec, exit: ContainerExit, log_text: str) -> Outcome:
        if exit.timed_out:
            return Outcome(
                State.FAILED,
                StatusCode.TIMED_OUT,
                f"Job ran longer than its time limit of {precise_duration(self.time_limit(job))} "
                "and was stopped",
            )
        if exit.exit_code == 137 and exit.oom_killed:
            return Outcome(
                State.FAILED,
                StatusCode.OUT_OF_MEMORY,
                f"Job ran out of memory (limit {human_size(self.settings.job_memory)}) "
                "and was stopped",
            )
        if exit.exit_code != 0:
            lines = [line for line in log_text.splitlines() if line.strip()][-3:]
            tail = [_strip_timestamp(line) for line in lines]
            message = f"Job exited with an error (exit code {exit.exit_code})"
            if tail:
                message += ": " + " | ".join(tail)
            return Outcome(State.FAILED, StatusCode.NONZERO_EXIT, message[:1000])
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
                manifest.record_action(job.action, job.id, job.sha, files)
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
            try:
                self._remove_container(job_id)
            except DockerUnavailable:
                pass
            shutil.rmtree(self.data.job_dir(job_id), ignore_errors=True)

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


def copy_files(source: Path, files: tuple[str, ...], dest: Path) -> None:
    """Copy ``files`` (paths relative to ``source``) into ``dest``; links are copied as links,
    as ``git archive`` does, and anything that is neither a file nor a link is left out."""
    made: set[Path] = set()
    for rel in files:
        src = source / rel
        target = dest / rel
        try:
            mode = os.lstat(src).st_mode
        except FileNotFoundError:
            continue  # deleted from the checkout since it was listed
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), target)
        elif stat.S_ISREG(mode):
            shutil.copy(src, target)  # with its mode, so scripts stay executable


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
            size = 0
            with tmp.open("wb") as out:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    size += len(chunk)
                    digest.update(chunk)
                    out.write(chunk)
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
        f"exit code:       {exit.exit_code}",
        f"started:         {iso(exit.started_at)}",
        f"finished:        {iso(exit.finished_at)}",
        f"duration:        {precise_duration(max(0.0, exit.finished_at - exit.started_at))}",
        f"status:          {outcome.status_code}: {outcome.status_message}",
    ]
    if outcome.outputs:
        lines.append("outputs:")
        lines.extend(f"  {path}  ({level})" for path, level in sorted(outcome.outputs.items()))
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


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                os.chown(path, uid, gid)

"""Running one job in Docker: prepare its directory, run its container, collect its outputs.

These are the steps of DESIGN section 5. Each Docker SDK call blocks, so each runs in a
thread (``asyncio.to_thread``) and the event loop stays free for the site.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

from config import Settings
from outputs import Manifest, OutputError, check_visibility, match_outputs
from repos import Repos

CONTAINER_WORKDIR = "/workspace"


class JobError(Exception):
    """The job failed in a way the user should be told about; carries its status code."""

    def __init__(self, status_code: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class DockerUnavailable(Exception):
    """The Docker engine could not be reached."""


@dataclass
class JobSpec:
    """What the executor needs to know about a job; built by the runner from the database."""

    id: str
    job_request_id: int
    workspace: str
    repo: str
    sha: str
    action: str
    run_command: str
    image: str
    args: list[str]
    outputs: dict[str, dict[str, str]]
    needs: list[str]
    requires_db: bool = False
    database_url: str | None = None
    database_network: str | None = None
    timeout: float | None = None


@dataclass
class ContainerExit:
    exit_code: int
    oom_killed: bool
    timed_out: bool
    started_at: float
    finished_at: float
    image_id: str | None = None


@dataclass
class Outcome:
    """How a job ended, and what it produced."""

    state: str
    status_code: str
    status_message: str
    exit_code: int | None = None
    image_id: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # path -> level


class Executor:
    """Runs jobs as Docker containers for one site."""

    def __init__(self, settings: Settings, repos: Repos) -> None:
        self.settings = settings
        self.repos = repos
        self.data_dir = settings.data_dir
        self._client: docker.DockerClient | None = None

    # -- paths -----------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def log_path(self, job_id: str) -> Path:
        return self.data_dir / "logs" / f"{job_id}.log"

    def workspace_dir(self, workspace: str) -> Path:
        return self.data_dir / "workspaces" / workspace

    def container_name(self, job_id: str) -> str:
        return f"jobsite-{job_id}"

    # -- docker ----------------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env(timeout=30)
                self._client.ping()
            except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                self._client = None
                raise DockerUnavailable(f"Docker is not reachable: {e}") from e
        return self._client

    async def docker_available(self) -> bool:
        try:
            await asyncio.to_thread(lambda: self._docker().ping())
            return True
        except (DockerUnavailable, docker.errors.DockerException, requests.RequestException):
            self._client = None
            return False

    def _user(self) -> str:
        if os.getuid() == 0:
            return self.settings.job_user
        return f"{os.getuid()}:{os.getgid()}"

    # -- the steps -------------------------------------------------------------

    async def prepare(self, job: JobSpec) -> Path:
        """Steps 1 and 2: an empty dir holding the repo at the commit and the needed outputs."""
        workdir = self.job_dir(job.id)
        if workdir.exists():
            await asyncio.to_thread(shutil.rmtree, workdir)
        workdir.mkdir(parents=True)
        try:
            await self.repos.export_tree(job.repo, job.sha, workdir)
            await asyncio.to_thread(self._copy_inputs, job, workdir)
        except OSError as e:
            raise JobError("internal_error", f"could not prepare the job: {e}") from e
        if os.getuid() == 0:
            uid, gid = (int(x) for x in self.settings.job_user.split(":"))
            await asyncio.to_thread(_chown_tree, workdir, uid, gid)
        return workdir

    def _copy_inputs(self, job: JobSpec, workdir: Path) -> None:
        ws = self.workspace_dir(job.workspace)
        manifest = Manifest.load(ws)
        for action in job.needs:
            files = manifest.action_files(action)
            for rel in files:
                src = ws / rel
                if not src.is_file():
                    raise JobError(
                        "internal_error",
                        f"input {rel} is missing from the workspace; it should have been made "
                        f"by action {action}. Run {action} again.",
                    )
                dest = workdir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)

    async def start(self, job: JobSpec) -> str:
        """Step 3a: create and start the container; returns its id."""
        return await asyncio.to_thread(self._start, job)

    def _start(self, job: JobSpec) -> str:
        client = self._docker()
        s = self.settings
        try:
            client.images.get(job.image)
        except docker.errors.ImageNotFound:
            if not s.allow_pull:
                raise JobError(
                    "internal_error",
                    f"image {job.image} is not on this machine and pulling is turned off "
                    "(allow_pull: false). An admin must load the image.",
                ) from None
            try:
                client.images.pull(job.image)
            except docker.errors.APIError as e:
                raise JobError("internal_error", f"could not pull image {job.image}: {e}") from e
        env = {"OPENSAFELY_BACKEND": s.backend, "HOME": "/tmp"}
        network = "none"
        if job.requires_db:
            if job.database_url:
                env["DATABASE_URL"] = job.database_url
            network = job.database_network or "none"
        self._remove_container(job.id)
        container = client.containers.create(
            job.image,
            job.args,
            name=self.container_name(job.id),
            init=True,
            network_mode=network,
            user=self._user(),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=s.job_pids_limit,
            mem_limit=s.job_memory,
            memswap_limit=s.job_memory,
            nano_cpus=int(s.job_cpus * 1e9),
            environment=env,
            labels={"jobsite": s.site_id, "jobsite.job": job.id},
            volumes={str(self.job_dir(job.id)): {"bind": CONTAINER_WORKDIR, "mode": "rw"}},
            working_dir=CONTAINER_WORKDIR,
        )
        container.start()
        return container.id

    async def wait(self, job: JobSpec, started_at: float) -> ContainerExit:
        """Step 3b: wait for the container to exit, killing it past its time limit."""
        limit = job.timeout or self.settings.job_timeout
        remaining = max(0.0, started_at + limit - time.time())
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.to_thread(self._wait, job.id), remaining)
        except TimeoutError:
            timed_out = True
            await asyncio.to_thread(self._kill, job.id)
            await asyncio.to_thread(self._wait, job.id)
        return await asyncio.to_thread(self._inspect, job.id, timed_out)

    def _wait(self, job_id: str) -> None:
        container = self._docker().containers.get(self.container_name(job_id))
        container.wait()

    def _kill(self, job_id: str) -> None:
        try:
            self._docker().containers.get(self.container_name(job_id)).kill()
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "is not running" not in str(e):
                raise

    async def stop(self, job_id: str) -> None:
        """Stop a job's container (cancellation); a missing container is fine."""
        await asyncio.to_thread(self._kill, job_id)

    def _inspect(self, job_id: str, timed_out: bool) -> ContainerExit:
        container = self._docker().containers.get(self.container_name(job_id))
        state = container.attrs["State"]
        return ContainerExit(
            exit_code=state.get("ExitCode", -1),
            oom_killed=bool(state.get("OOMKilled")),
            timed_out=timed_out,
            started_at=_docker_time(state.get("StartedAt")),
            finished_at=_docker_time(state.get("FinishedAt")),
            image_id=container.attrs.get("Image"),
        )

    async def container_state(self, job_id: str) -> str | None:
        """'running', 'exited' (or another Docker state), or None when there is no container."""

        def get() -> str | None:
            try:
                container = self._docker().containers.get(self.container_name(job_id))
            except docker.errors.NotFound:
                return None
            return container.status

        return await asyncio.to_thread(get)

    def _container_logs(self, job_id: str) -> bytes:
        container = self._docker().containers.get(self.container_name(job_id))
        return container.logs(stdout=True, stderr=True, timestamps=True)

    def _remove_container(self, job_id: str) -> None:
        try:
            self._docker().containers.get(self.container_name(job_id)).remove(force=True)
        except docker.errors.NotFound:
            pass

    async def finalize(self, job: JobSpec, exit: ContainerExit, context: dict[str, Any]) -> Outcome:
        """Steps 4 and 5: decide the outcome, collect outputs on success, write the logs."""
        raw_log = await asyncio.to_thread(self._container_logs, job.id)
        log_text = cap_log(raw_log, self.settings.log_limit)
        outcome = self._judge(job, exit, log_text)
        if outcome.state == "succeeded":
            try:
                outcome.outputs = await asyncio.to_thread(self._collect_outputs, job, context)
            except (JobError, OutputError) as e:
                outcome = Outcome("failed", e.status_code, e.message, exit.exit_code)
        outcome.exit_code = exit.exit_code
        outcome.image_id = exit.image_id
        summary = _summary(job, exit, outcome, context)
        await asyncio.to_thread(self._write_logs, job, log_text + summary)
        return outcome

    def _judge(self, job: JobSpec, exit: ContainerExit, log_text: str) -> Outcome:
        if exit.timed_out:
            limit = job.timeout or self.settings.job_timeout
            return Outcome(
                "failed", "timed_out", f"Job ran longer than its time limit of {_human(limit)}"
            )
        if exit.exit_code == 137 and exit.oom_killed:
            return Outcome(
                "failed",
                "out_of_memory",
                f"Job ran out of memory (limit {self.settings.job_memory // 1024**2} MiB)",
            )
        if exit.exit_code != 0:
            tail = [line for line in log_text.splitlines() if line.strip()][-3:]
            tail = [line.split(" ", 1)[-1] for line in tail]
            message = f"Job exited with an error (exit code {exit.exit_code})"
            if tail:
                message += ": " + " | ".join(tail)
            return Outcome("failed", "nonzero_exit", message[:1000])
        return Outcome("succeeded", "succeeded", "Completed successfully")

    def _collect_outputs(self, job: JobSpec, context: dict[str, Any]) -> dict[str, str]:
        workdir = self.job_dir(job.id)
        matched = match_outputs(workdir, job.outputs, self.settings.max_output_size)
        ws = self.workspace_dir(job.workspace)
        manifest = Manifest.load(ws)
        previous = set(manifest.action_files(job.action))
        for rel in matched:
            dest = ws / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{job.id}.tmp")
            shutil.copyfile(workdir / rel, tmp)
            os.replace(tmp, dest)
        for rel in previous - set(matched):
            (ws / rel).unlink(missing_ok=True)
        files = {}
        for rel, level in matched.items():
            path = ws / rel
            visible, reason = check_visibility(path, level)
            files[rel] = {
                "action": job.action,
                "job": job.id,
                "commit": job.sha,
                "level": level,
                "size": path.stat().st_size,
                "sha256": _sha256(path),
                "visible": visible,
                "not_visible_because": reason,
            }
        manifest.record_action(job.action, job.id, job.sha, files)
        manifest.save(ws)
        return dict(matched)

    def _write_logs(self, job: JobSpec, text: str) -> None:
        log = self.log_path(job.id)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
        metadata = self.workspace_dir(job.workspace) / "metadata"
        metadata.mkdir(parents=True, exist_ok=True)
        tmp = metadata / f".{job.action}.log.tmp"
        tmp.write_text(text)
        os.replace(tmp, metadata / f"{job.action}.log")

    async def cleanup(self, job_id: str) -> None:
        """Step 6: remove the container and the temporary dir, whatever happened."""

        def clean() -> None:
            try:
                self._remove_container(job_id)
            except DockerUnavailable:
                pass
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

        await asyncio.to_thread(clean)

    async def site_containers(self) -> dict[str, str]:
        """job id -> container status, for every container labelled for this site."""

        def list_them() -> dict[str, str]:
            found = self._docker().containers.list(
                all=True, filters={"label": f"jobsite={self.settings.site_id}"}
            )
            return {c.labels["jobsite.job"]: c.status for c in found}

        return await asyncio.to_thread(list_them)


def cap_log(raw: bytes, limit: int) -> str:
    """The log, keeping its head and tail when it is longer than ``limit`` bytes."""
    if len(raw) > limit:
        half = limit // 2
        dropped = len(raw) - 2 * half
        note = f"\n[... {dropped} bytes of log left out: logs are capped at {limit} bytes ...]\n"
        raw = raw[:half] + note.encode() + raw[-half:]
    return raw.decode(errors="replace")


def _summary(job: JobSpec, exit: ContainerExit, outcome: Outcome, context: dict[str, Any]) -> str:
    lines = [
        "",
        "---- jobsite summary ----",
        f"job id:          {job.id}",
        f"job request id:  {job.job_request_id}",
        f"workspace:       {job.workspace}",
        f"action:          {job.action}",
        f"commit:          {job.sha}",
        f"run:             {job.run_command}",
        f"image:           {job.image} ({exit.image_id or 'unknown id'})",
        f"exit code:       {exit.exit_code}",
        f"started:         {_iso(exit.started_at)}",
        f"finished:        {_iso(exit.finished_at)}",
        f"duration:        {_human(max(0.0, exit.finished_at - exit.started_at))}",
        f"status:          {outcome.status_code}: {outcome.status_message}",
    ]
    if outcome.outputs:
        lines.append("outputs:")
        lines.extend(f"  {path}  ({level})" for path, level in sorted(outcome.outputs.items()))
    return "\n".join(lines) + "\n"


def _docker_time(value: str | None) -> float:
    from datetime import datetime

    if not value or value.startswith("0001"):
        return time.time()
    # Docker gives nanoseconds; Python parses up to microseconds
    head, _, frac = value.rstrip("Z").partition(".")
    text = f"{head}.{(frac + '000000')[:6]}+00:00"
    return datetime.fromisoformat(text).timestamp()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _human(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                os.chown(path, uid, gid)

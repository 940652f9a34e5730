"""What the scheduler needs from whatever runs its jobs: the ``Executor`` protocol, and the
data that crosses it.

The runner (runner.py) and ``jobsite run`` (local_run.py) see a job through these steps
only, so another way to run jobs (a remote Docker engine, a cluster) is a new class with
these methods and no change to either. Today the one implementation is the local Docker
engine (local_docker.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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
    """What the executor needs to know about a job; built by the runner from the database.

    A job normally starts from the repo at ``sha``. A local run (``jobsite run``) sets
    ``source_dir`` and ``source_files`` instead, to start from files of a checkout, and
    ``workspace_dir`` to collect outputs into that checkout.
    """

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
    source_dir: Path | None = None
    source_files: tuple[str, ...] = ()
    workspace_dir: Path | None = None


@dataclass
class ResourceUse:
    """A job's CPU and memory use, sampled while it ran: CPU in percent of one core (None
    when the job ended before its CPU use could be measured), memory in MB."""

    cpu_mean: float | None
    cpu_peak: float | None
    memory_mean_mb: float
    memory_peak_mb: float
    samples: int

    def as_json(self) -> dict[str, float | None]:
        figures = {
            "cpu_mean": self.cpu_mean,
            "cpu_peak": self.cpu_peak,
            "memory_mean_mb": self.memory_mean_mb,
            "memory_peak_mb": self.memory_peak_mb,
        }
        return {key: None if value is None else round(value, 1) for key, value in figures.items()}


@dataclass
class ContainerExit:
    """How a job's run ended (its container's exit, on Docker).

    ``cancelled`` is set by the scheduler when a user stopped the job: ``collect`` then
    only writes its log.
    """

    exit_code: int
    oom_killed: bool
    timed_out: bool
    started_at: float
    finished_at: float
    image_id: str | None = None
    image_digest: str | None = None  # the registry digest of the image, when it has one
    usage: ResourceUse | None = None
    cancelled: bool = False


@dataclass
class Outcome:
    """How a job ended, and what it produced."""

    state: str
    status_code: str
    status_message: str  # public: anyone who may see the job reads it
    exit_code: int | None = None
    image_id: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # path -> level
    log_excerpt: str = ""  # the last lines of a failed job's log: for those who may read it
    not_shown: dict[str, str] = field(default_factory=dict)  # path -> why viewers cannot see it


class Executor(Protocol):
    """Runs a site's jobs: the steps of DESIGN section 5, one job at a time per call.

    A step that fails in a way the user should be told about raises ``JobError``; one that
    cannot reach whatever runs the jobs raises ``DockerUnavailable``, and the scheduler
    puts the job back in the queue.
    """

    async def available(self) -> bool:
        """Whether jobs can be started now."""
        ...

    async def check_settings(self) -> None:
        """At start: refuse settings this executor cannot honour safely, raising
        ``config.SettingsError`` naming the setting."""
        ...

    async def missing_images(self, images: list[str]) -> list[str]:
        """Which of ``images`` are not here yet: a job that uses one fetches it first (when
        the site allows pulling), which may take a while, so callers can say so."""
        ...

    async def prepare(self, job: JobSpec) -> None:
        """Steps 1 and 2: the job's files, and the outputs of its direct needs."""
        ...

    async def create(self, job: JobSpec) -> None:
        """A head start: set the job's run up without starting it. Optional for callers:
        ``start`` does it when this was not called."""
        ...

    async def start(self, job: JobSpec) -> None:
        """Step 3 begins: the job runs."""
        ...

    async def wait(self, job: JobSpec, started_at: float) -> ContainerExit:
        """Until the job's run ends, stopping it past its time limit; its log is written as it
        comes."""
        ...

    async def collect(self, job: JobSpec, exit: ContainerExit) -> Outcome:
        """Steps 4 and 5: how the job ended; on success its outputs go into the workspace.
        Every job that ran gets its log, failed and cancelled ones too."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Stop a job's run; a job that is not running is fine."""
        ...

    def usage(self, job_id: str) -> ResourceUse | None:
        """The CPU and memory use sampled so far of a job that is running, or None (not
        running, or not sampled yet). ``wait`` gives the whole run's in ``ContainerExit``."""
        ...

    async def adopt(self) -> dict[str, str]:
        """The runs of this site's jobs that exist now, whoever started them: job id -> the
        run's state ("running", "exited", ...). After a restart the scheduler waits on these
        again rather than starting their jobs afresh."""
        ...

    async def cleanup(self, job_id: str) -> None:
        """Step 6: remove what the job's run left (its run, its temporary files), whatever
        happened."""
        ...

    def close(self) -> None:
        """Let go of connections; the next call makes them again."""
        ...

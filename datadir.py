"""Where a site keeps its files (DESIGN section 3): every path under ``data_dir`` is built here.

A workspace's own layout (``metadata/<action>.log``, ``metadata/manifest.json``) is the same
in a site's workspace and in a checkout run by ``jobsite run``, so it is given relative to
the workspace too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "metadata/manifest.json"  # in a workspace: every output, and who made it


def action_log_name(action: str) -> str:
    """Where the log of an action's latest job sits in a workspace, relative to it."""
    return f"metadata/{action}.log"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "db.sqlite"

    @property
    def secret_key(self) -> Path:
        return self.root / "secret.key"

    @property
    def repos(self) -> Path:
        """The bare mirrors of workspace repos."""
        return self.root / "repos"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job_dir(self, job_id: str) -> Path:
        """A job's temporary working dir, deleted after the job."""
        return self.jobs / job_id

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, job_id: str) -> Path:
        """The full log of a job, kept after it ends."""
        return self.logs / f"{job_id}.log"

    @property
    def workspaces(self) -> Path:
        return self.root / "workspaces"

    def workspace(self, name: str) -> Path:
        """The outputs of a workspace's successful jobs, at their relative paths."""
        return self.workspaces / name

    def manifest(self, workspace: str) -> Path:
        return self.workspace(workspace) / MANIFEST

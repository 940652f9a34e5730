"""Where a site keeps its files (DESIGN section 3): every path under ``data_dir`` is built here.

A workspace's own layout (``metadata/<action>.log``, ``metadata/manifest.json``) is the same
in a site's workspace and in a checkout run by ``jobsite run``, so it is given relative to
the workspace too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "metadata/manifest.json"  # in a workspace: every output, and who made it

# An action's name becomes a file name (its log, metadata/<action>.log), so it is one safe
# file-name component on every system: these characters only (no `/`, `\`, `.` or NUL, so
# never `..`), not an option's leading `-`, and short enough for any file system.
ACTION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,199}")
ACTION_NAME_RULE = (
    "only ASCII letters, digits, `_` and `-`, must not start with `-`, and be at most 200 "
    "characters long"
)


def action_log_name(action: str) -> str:
    """Where the log of an action's latest job sits in a workspace, relative to it."""
    if not ACTION_NAME.fullmatch(action):
        raise ValueError(f"{action[:200]!r} is not an action name, so it cannot name a log")
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

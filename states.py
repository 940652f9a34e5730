"""Job states and status codes (DESIGN section 5), with the words users see for them.

Both are ``StrEnum``: a member equals its string and SQLite stores it as that string, so the
database, the API and the templates keep the values they always had.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    """Where a job is in its life; a job ends ``succeeded`` or ``failed``."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


ACTIVE_STATES = frozenset({State.PENDING, State.RUNNING})  # a job in these may still change


class StatusCode(enum.StrEnum):
    """Why a job is in its state; each has a message (``message``) for when nothing more
    specific is known."""

    CREATED = "created"
    WAITING_ON_DEPENDENCIES = "waiting_on_dependencies"
    WAITING_ON_WORKERS = "waiting_on_workers"
    WAITING_ON_DOCKER = "waiting_on_docker"
    WAITING_ON_DISK = "waiting_on_disk"
    PREPARING = "preparing"
    EXECUTING = "executing"
    FINALIZING = "finalizing"
    SUCCEEDED = "succeeded"
    NONZERO_EXIT = "nonzero_exit"
    UNMATCHED_PATTERNS = "unmatched_patterns"
    DEPENDENCY_FAILED = "dependency_failed"
    CANCELLED_BY_USER = "cancelled_by_user"
    TIMED_OUT = "timed_out"
    OUT_OF_MEMORY = "out_of_memory"
    OUT_OF_DISK = "out_of_disk"  # the job's files grew past job_disk
    TOO_MUCH_OUTPUT = "too_much_output"  # over max_output_files or max_output_size
    INTERNAL_ERROR = "internal_error"
    NOT_RUN = "not_run"  # jobsite run only: an earlier action failed, so this one was skipped

    @property
    def message(self) -> str:
        return MESSAGES[self]


MESSAGES: dict[StatusCode, str] = {
    StatusCode.CREATED: "Created",
    StatusCode.WAITING_ON_DEPENDENCIES: "Waiting on dependencies",
    StatusCode.WAITING_ON_WORKERS: "Waiting for a free worker",
    StatusCode.WAITING_ON_DOCKER: "Waiting for Docker to be available",
    StatusCode.WAITING_ON_DISK: "Waiting for free disk space",
    StatusCode.PREPARING: "Preparing the job's files",
    StatusCode.EXECUTING: "Running",
    StatusCode.FINALIZING: "Collecting outputs",
    StatusCode.SUCCEEDED: "Completed successfully",
    StatusCode.NONZERO_EXIT: "Job exited with an error",
    StatusCode.UNMATCHED_PATTERNS: "No outputs found matching the action's patterns",
    StatusCode.CANCELLED_BY_USER: "Cancelled by user",
    StatusCode.DEPENDENCY_FAILED: "A job this one needs did not succeed",
    StatusCode.TIMED_OUT: "Job ran longer than its time limit",
    StatusCode.OUT_OF_MEMORY: "Job ran out of memory",
    StatusCode.OUT_OF_DISK: "Job's files grew past its disk limit",
    StatusCode.TOO_MUCH_OUTPUT: "Job's outputs are over the site's limits",
    StatusCode.INTERNAL_ERROR: "Internal error",
    StatusCode.NOT_RUN: "Not run: an earlier action failed",
}


def status_label(code: str | None) -> str:
    """The short label a page shows for a status code: "Waiting on workers"; "Not run" for
    an action that has no job yet."""
    if code is None:
        return "Not run"
    return code.replace("_", " ").capitalize()

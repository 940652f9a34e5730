"""Jobs written straight into a real database, for tests of what is read back from it
(emails, metrics, pruning) without running anything in Docker."""

from __future__ import annotations

import secrets
import time

from jobsite import auth
from jobsite.db import Database


class Site:
    """One user, project and workspace in ``db``; ``add_job`` records jobs in them."""

    def __init__(self, db: Database, user_id: int, workspace_id: int) -> None:
        self.db = db
        self.user_id = user_id
        self.workspace_id = workspace_id

    @classmethod
    async def make(
        cls,
        db: Database,
        username: str = "alice",
        email: str | None = "alice@example.org",
        workspace: str = "ws1",
    ) -> Site:
        user_id = await auth.create_user(db, username, "pw-1234567", email=email)
        now = time.time()
        project_id = await db.execute(
            "INSERT INTO projects (slug, name, created_by, created_at) VALUES (?, ?, ?, ?)",
            (f"{workspace}-study", f"{workspace} study", user_id, now),
        )
        workspace_id = await db.execute(
            "INSERT INTO workspaces (name, project_id, repo, branch, database, created_by, "
            "created_at) VALUES (?, ?, '/repo', 'main', 'sample', ?, ?)",
            (workspace, project_id, user_id, now),
        )
        return cls(db, user_id, workspace_id)

    async def add_job(
        self,
        action: str = "generate",
        *,
        state: str = "succeeded",
        status_code: str = "succeeded",
        status_message: str = "Completed successfully",
        notify: bool = True,
        created_at: float | None = None,
        wait: float | None = 2.0,
        duration: float | None = 65.0,
    ) -> str:
        """A job created at ``created_at`` that started ``wait`` seconds later (None: never)
        and, when finished, ended ``duration`` seconds after starting."""
        created = time.time() - 3600 if created_at is None else created_at
        started = None if wait is None else created + wait
        completed = None
        if state in ("succeeded", "failed"):
            completed = (started + duration) if started is not None else created + 1
        request_id = await self.db.execute(
            "INSERT INTO job_requests (workspace_id, created_by, branch, sha, requested_actions, "
            "notify, created_at) VALUES (?, ?, 'main', 'abc123', ?, ?, ?)",
            (self.workspace_id, self.user_id, f'["{action}"]', int(notify), created),
        )
        job_id = secrets.token_hex(8)
        await self.db.execute(
            "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
            "run_command, image, args, outputs, state, status_code, status_message, created_at, "
            "started_at, completed_at, updated_at) VALUES (?, ?, ?, ?, ?, 'abc123', "
            "'python:v2 analysis.py', 'python:v2', '[]', '{}', ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                request_id,
                self.workspace_id,
                self.user_id,
                action,
                state,
                status_code,
                status_message,
                created,
                started,
                completed,
                completed or created,
            ),
        )
        return job_id

"""Projects, their members and workspaces: registering, creating and reading them.

No HTTP here: callers pass who is acting, and refusals are raised as ``problems``.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import OrderedDict
from typing import Any

from . import auth, pipeline
from .auth import User
from .config import Settings
from .db import Database, Row
from .problems import FieldProblems, NotAllowed, NotFound, Problem
from .queries import LATEST_JOB_PER_ACTION
from .repos import BranchNotFound, FileNotFound, RepoError, Repos, check_allowed

WORKSPACE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# first path segments the site itself uses; a workspace may not take one as its name
RESERVED_NAMES = {
    "login", "logout", "admin", "api", "static", "projects", "jobs", "account", "auth",
    "settings", "metrics", "health", "new", "users", "favicon.ico", "robots.txt",
}  # fmt: skip


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# -- projects -----------------------------------------------------------------------------


async def create_project(db: Database, user: User, name: str) -> Row:
    """Register a project; its creator holds every role on it."""
    name = name.strip()
    slug = slugify(name)
    if not slug:
        raise Problem("a project name needs at least one letter or digit")
    if await db.fetchone("SELECT 1 FROM projects WHERE slug = ? OR name = ?", (slug, name)):
        raise Problem(f"a project named {name!r} already exists; choose another name")
    async with db.transaction() as conn:
        cur = await conn.execute(
            "INSERT INTO projects (slug, name, created_by, created_at) VALUES (?, ?, ?, ?)",
            (slug, name, user.id, time.time()),
        )
        for role in auth.ROLES:
            await conn.execute(
                "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, ?)",
                (cur.lastrowid, user.id, role),
            )
    project = await db.fetchone("SELECT * FROM projects WHERE slug = ?", (slug,))
    assert project is not None
    return project


async def members_of(db: Database, project_id: int) -> list[Row]:
    return await db.fetchall(
        "SELECT u.username, group_concat(m.role, ', ') AS roles FROM project_members m "
        "JOIN users u ON u.id = m.user_id WHERE m.project_id = ? GROUP BY u.id "
        "ORDER BY u.username",
        (project_id,),
    )


def roles_list(member: Row) -> list[str]:
    return sorted(member["roles"].split(", "))


async def set_member(
    db: Database, actor: User, project_id: int, username: str, roles: list[Any]
) -> None:
    """Give a user exactly these roles on the project (none removes them). Only roles the
    actor holds can be given or taken; the caller checks they may manage members at all."""
    bad = [r for r in roles if r not in auth.ROLES]
    if bad:
        raise Problem(f"unknown roles {bad}; roles are {', '.join(auth.ROLES)}")
    member = await db.fetchone("SELECT id FROM users WHERE username = ?", (username,))
    if member is None:
        raise NotFound(f"there is no user {username!r}")
    held = {
        row["role"]
        for row in await db.fetchall(
            "SELECT role FROM project_members WHERE project_id = ? AND user_id = ?",
            (project_id, member["id"]),
        )
    }
    changed = held.symmetric_difference(roles)
    not_yours = sorted(r for r in changed if not actor.has_role(project_id, r))
    if not_yours:
        raise NotAllowed(f"you can only give or take roles you hold; you lack {not_yours}")
    async with db.transaction() as conn:
        await conn.execute(
            "DELETE FROM project_members WHERE project_id = ? AND user_id = ?",
            (project_id, member["id"]),
        )
        await conn.executemany(
            "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, ?)",
            [(project_id, member["id"], role) for role in set(roles)],
        )


# -- workspaces ---------------------------------------------------------------------------


async def create_workspace(
    db: Database,
    settings: Settings,
    repos: Repos,
    user: User,
    project_id: int,
    form: dict[str, Any],
) -> str:
    """Create a workspace from the fields of the new-workspace form; returns its name.

    Every field is checked (the repo and branch against git) before anything is written,
    and all that is wrong is raised together as FieldProblems."""
    name = str(form.get("name") or "").strip()
    repo = str(form.get("repo") or "").strip()
    branch = str(form.get("branch") or "").strip()
    database = str(form.get("database") or "").strip()
    errors: dict[str, str] = {}
    if not WORKSPACE_NAME.fullmatch(name):
        errors["name"] = (
            "a workspace name uses lowercase letters, digits, '-' and '_', starts with a "
            "letter or digit and is at most 63 characters"
        )
    elif name in RESERVED_NAMES:
        errors["name"] = f"{name!r} is used by the site itself; choose another name"
    elif await db.fetchone("SELECT 1 FROM workspaces WHERE name = ?", (name,)):
        errors["name"] = f"a workspace named {name!r} already exists; choose another name"
    if database not in settings.databases:
        errors["database"] = f"database must be one of: {', '.join(settings.databases)}"
    if not repo:
        errors["repo"] = "repo is required"
    elif not branch:
        errors["branch"] = "branch is required"
    else:
        try:
            check_allowed(repo, settings.repos.allow)
            sha = await repos.resolve_branch(repo, branch)
            await repos.read_file(repo, sha, "project.yaml")
        except (BranchNotFound, FileNotFound) as e:
            errors["branch"] = str(e)
        except RepoError as e:
            errors["repo"] = str(e)
    if errors:
        raise FieldProblems(errors)
    try:
        await db.execute(
            "INSERT INTO workspaces (name, project_id, repo, branch, database, purpose, "
            "notify_default, created_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                project_id,
                repo,
                branch,
                database,
                str(form.get("purpose") or "").strip(),
                int(bool(form.get("notify_default"))),
                user.id,
                time.time(),
            ),
        )
    except sqlite3.IntegrityError:  # someone took the name a moment ago
        raise FieldProblems(
            {"name": f"a workspace named {name!r} already exists; choose another name"}
        ) from None
    return name


async def set_archived(db: Database, workspace_id: int, archived: bool) -> None:
    await db.execute(
        "UPDATE workspaces SET archived = ? WHERE id = ?", (int(archived), workspace_id)
    )


class ParsedProjects:
    """project.yaml of a repo at a commit, parsed once: a commit never changes, and pages
    poll the same one every few seconds. The most recently used few are kept. Also the
    head of each workspace branch as last resolved, so a poll needs no git at all."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.parsed: OrderedDict[tuple[str, str], pipeline.Pipeline] = OrderedDict()
        self.heads: dict[tuple[str, str], str] = {}

    async def at(self, repos: Repos, repo: str, sha: str) -> pipeline.Pipeline:
        key = (repo, sha)
        if key in self.parsed:
            self.parsed.move_to_end(key)
        else:
            self.parsed[key] = pipeline.load_pipeline(
                await repos.read_file(repo, sha, "project.yaml")
            )
            if len(self.parsed) > self.size:
                self.parsed.popitem(last=False)
        return self.parsed[key]

    async def head(self, repos: Repos, repo: str, branch: str, fetch: bool = True) -> str:
        """The commit at the head of ``branch``: fetched and resolved again, or (``fetch``
        false) as last resolved here, asking the local mirror only the first time."""
        key = (repo, branch)
        if fetch or key not in self.heads:
            try:
                self.heads[key] = await repos.resolve_branch(repo, branch, fetch=fetch)
            except RepoError:
                self.heads.pop(key, None)
                raise
        return self.heads[key]


async def workspace_actions(
    db: Database, repos: Repos, projects: ParsedProjects, workspace: Row, fetch: bool = True
) -> dict[str, Any]:
    """The workspace's actions at the branch head with their latest jobs, or the errors.

    ``fetch=False`` takes the branch head as last seen, for status polling.
    """
    result: dict[str, Any] = {"actions": [], "error": None, "warnings": [], "sha": None}
    try:
        sha = await projects.head(repos, workspace["repo"], workspace["branch"], fetch=fetch)
        project = await projects.at(repos, workspace["repo"], sha)
    except (RepoError, pipeline.ProjectValidationError) as e:
        result["error"] = str(e)
        result["errors"] = getattr(e, "errors", None) or [str(e)]
        result["error_kind"] = type(e).__name__
        return result
    result["sha"] = sha
    result["warnings"] = list(project.warnings)
    latest = {
        row["action"]: row for row in await db.fetchall(LATEST_JOB_PER_ACTION, (workspace["id"],))
    }
    for name, action in project.actions.items():
        job = latest.get(name)
        result["actions"].append(
            {
                "name": name,
                "needs": list(action.needs),
                "run": action.run,
                "status": job["status_code"] if job else None,
                "state": job["state"] if job else None,
                "job_id": job["id"] if job else None,
                "changed_at": job["updated_at"] if job else None,
            }
        )
    return result

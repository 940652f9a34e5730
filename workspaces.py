"""Projects, their members and workspaces: registering, creating and reading them.

No HTTP here: callers pass who is acting, and refusals are raised as ``problems``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections import OrderedDict
from typing import Any

from . import auth, pipeline, submit
from .auth import User
from .config import Settings
from .db import Database, Row
from .outputs import Manifest
from .problems import FieldProblems, NotAllowed, NotFound, Problem
from .queries import LATEST_JOB_PER_ACTION
from .repos import BranchNotFound, FileNotFound, FileTooLarge, RepoError, Repos, check_allowed
from .submit import action_definitions

WORKSPACE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# first path segments the site itself uses; a workspace may not take one as its name
RESERVED_NAMES = {
    "login", "logout", "admin", "api", "static", "projects", "jobs", "account", "auth",
    "settings", "metrics", "health", "new", "users", "favicon.ico", "robots.txt", "status",
}  # fmt: skip


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# -- projects -----------------------------------------------------------------------------


def name_taken(kind: str, name: str, user: User, project_id: int | None, public: bool) -> str:
    """Why a new project's or workspace's name cannot be used: that it already exists only
    to those who may see the existing one (``project_id``: its project; None when
    unknown), on a private site (not ``public``) no more than that the name is taken."""
    if public or (project_id is not None and user.is_member(project_id)):
        return f"a {kind} named {name!r} already exists; choose another name"
    return f"the name {name!r} cannot be used; choose another name"


async def create_project(db: Database, user: User, name: str, public: bool = True) -> Row:
    """Register a project; its creator holds every role on it. On a private site (not
    ``public``) a taken name is not said to exist (see name_taken)."""
    name = name.strip()
    slug = slugify(name)
    if not slug:
        raise Problem("a project name needs at least one letter or digit")
    existing = await db.fetchval("SELECT id FROM projects WHERE slug = ? OR name = ?", (slug, name))
    if existing is not None:
        raise Problem(name_taken("project", name, user, existing, public))
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
    elif (
        taken := await db.fetchone("SELECT project_id FROM workspaces WHERE name = ?", (name,))
    ) is not None:
        errors["name"] = name_taken(
            "workspace", name, user, taken["project_id"], settings.public_status
        )
    if database not in settings.databases:
        errors["database"] = f"database must be one of: {', '.join(settings.databases)}"
    if not repo:
        errors["repo"] = "repo is required"
    elif not branch:
        errors["branch"] = "branch is required"
    else:
        try:
            repo = check_allowed(repo, settings.repos.allow)
            sha = await repos.resolve_branch(repo, branch, fresh=True)
            # only that it is there matters here; the workspace page explains a file too large
            with contextlib.suppress(FileTooLarge):
                await repos.read_file(repo, sha, "project.yaml", max_size=pipeline.MAX_PROJECT_SIZE)
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
            {"name": name_taken("workspace", name, user, None, settings.public_status)}
        ) from None
    return name


async def set_branch(db: Database, repos: Repos, user: User, workspace: Row, branch: Any) -> bool:
    """Point the workspace at another branch of its repo, recording who changed it and
    when; False when it is on that branch already. The branch must exist and hold a
    project.yaml; the caller checks the user may change the workspace."""
    if not isinstance(branch, str) or not branch.strip():
        raise FieldProblems({"branch": "branch is required: the name of a branch of the repo"})
    branch = branch.strip()
    if branch == workspace["branch"]:
        return False
    try:
        names = await repos.branches(workspace["repo"], fresh=True)
        if branch not in names:  # only a branch: not a tag, a commit or "main~1"
            known = ", ".join(names[:20]) or "none"
            raise BranchNotFound(
                f"branch {branch!r} not found in {workspace['repo']} (branches: {known}). "
                "Push the branch, or choose one of these."
            )
        sha = await repos.resolve_branch(workspace["repo"], branch, fetch=False)
        # only that it is there matters here; the workspace page explains a file too large
        with contextlib.suppress(FileTooLarge):
            await repos.read_file(
                workspace["repo"], sha, "project.yaml", max_size=pipeline.MAX_PROJECT_SIZE
            )
    except RepoError as e:
        raise FieldProblems({"branch": str(e)}) from None
    now = time.time()
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE workspaces SET branch = ? WHERE id = ?", (branch, workspace["id"])
        )
        await conn.execute(
            "INSERT INTO workspace_events (workspace_id, user_id, kind, old_value, new_value, "
            "at) VALUES (?, ?, 'branch', ?, ?, ?)",
            (workspace["id"], user.id, workspace["branch"], branch, now),
        )
    return True


async def workspace_changes(db: Database, workspace_id: int, limit: int = 20) -> list[Row]:
    """The latest changes made to a workspace, newest first, with who made them."""
    return await db.fetchall(
        "SELECT e.kind, e.old_value, e.new_value, e.at, u.username FROM workspace_events e "
        "LEFT JOIN users u ON u.id = e.user_id WHERE e.workspace_id = ? "
        "ORDER BY e.id DESC LIMIT ?",
        (workspace_id, limit),
    )


async def set_archived(db: Database, workspace_id: int, archived: bool) -> None:
    await db.execute(
        "UPDATE workspaces SET archived = ? WHERE id = ?", (int(archived), workspace_id)
    )


class ParsedProjects:
    """project.yaml of a repo at a commit, parsed once, the pipeline or what is wrong with
    it: a commit never changes, and pages poll the same one every few seconds. Callers
    asking for one while it is parsed share that parse. The most recently used few are
    kept. Also the head of each workspace branch as last resolved, so a poll needs no git
    at all."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        # (repo, sha) -> the pipeline, or the problems of its project.yaml
        self.parsed: OrderedDict[tuple[str, str], pipeline.Pipeline | list[str]] = OrderedDict()
        self._parsing: dict[tuple[str, str], asyncio.Future[pipeline.Pipeline | list[str]]] = {}
        self.heads: dict[tuple[str, str], str] = {}

    async def at(self, repos: Repos, repo: str, sha: str) -> pipeline.Pipeline:
        key = (repo, sha)
        found = self.parsed.get(key)
        if found is None:
            parsing = self._parsing.get(key)
            if parsing is None:
                parsing = self._parsing[key] = asyncio.ensure_future(self._parse(repos, key))
                parsing.add_done_callback(lambda _: self._parsing.pop(key, None))
            found = await asyncio.shield(parsing)  # one caller leaving stops it for no other
        else:
            self.parsed.move_to_end(key)
        if isinstance(found, list):
            raise pipeline.ProjectValidationError(found)
        return found

    async def _parse(self, repos: Repos, key: tuple[str, str]) -> pipeline.Pipeline | list[str]:
        found: pipeline.Pipeline | list[str]
        try:
            found = await submit.parse_project(repos, *key)
        except pipeline.ProjectValidationError as e:
            found = e.errors
        self.parsed[key] = found
        if len(self.parsed) > self.size:
            self.parsed.popitem(last=False)
        return found

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
    db: Database,
    repos: Repos,
    projects: ParsedProjects,
    workspace: Row,
    fetch: bool = True,
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """The workspace's actions at the branch head with their latest jobs, or the errors;
    given the workspace's ``manifest``, each with why its outputs are out of date.

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
    stale = manifest.out_of_date(action_definitions(project)) if manifest else {}
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
                "out_of_date": stale.get(name),
            }
        )
    return result


async def workspace_outputs(
    repos: Repos, projects: ParsedProjects, workspace: Row, manifest: Manifest
) -> dict[str, Any]:
    """The workspace's outputs by action and by file, each with ``out_of_date``: why, against
    project.yaml at the head of its branch, or None. When project.yaml cannot be read,
    nothing is known to be out of date and ``project_yaml_error`` says why."""
    try:
        sha = await repos.resolve_branch(workspace["repo"], workspace["branch"])
        project = await projects.at(repos, workspace["repo"], sha)
    except (RepoError, pipeline.ProjectValidationError) as e:
        return {**manifest.with_out_of_date(None), "sha": None, "project_yaml_error": str(e)}
    current = action_definitions(project)
    return {**manifest.with_out_of_date(current), "sha": sha, "project_yaml_error": None}

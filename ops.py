"""Looking after a site's data dir: database backups, and pruning old job files.

Both work while the site runs. A backup uses SQLite's online backup, which copies the
database as it was at one instant even while jobs are being recorded. Pruning removes only
what the site no longer needs: the full logs (``data/logs``) of jobs that finished long ago,
and temporary dirs (``data/jobs``) of jobs that are not running. Workspace outputs, and the
latest log of each action kept beside them, are never touched.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import jobdir
from .config import Settings
from .datadir import DataDir
from .db import Database
from .states import ACTIVE_STATES
from .units import human_size


class OpsError(Exception):
    """The command cannot go ahead; the message says why and what to do."""


def existing_database(settings: Settings) -> Path:
    path = settings.data.db
    if not path.exists():
        raise OpsError(
            f"there is no database at {path}; check data_dir in the settings file (--config)"
        )
    return path


# -- backup ----------------------------------------------------------------------------


def backup_path(path: Path) -> Path:
    """Where a backup asked for at ``path`` goes: the file itself, or a dated file in a dir."""
    path = path.absolute()
    if path.is_dir():
        path = path / f"jobsite-{time.strftime('%Y%m%d-%H%M%S')}.sqlite"
    if path.exists():
        raise OpsError(f"{path} already exists; give a new file name so no backup is overwritten")
    if not path.parent.is_dir():
        raise OpsError(f"cannot write {path}: the directory {path.parent} does not exist")
    return path


async def backup(db: Database, dest: Path) -> None:
    """Copy ``db`` to ``dest``. The copy only appears at ``dest`` once it is whole and checked,
    and is readable by its owner only (it holds password and token hashes)."""
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)
    partial.touch(mode=0o600)
    try:
        await db.backup(partial)
        with contextlib.closing(sqlite3.connect(partial)) as check:
            (result,) = check.execute("PRAGMA quick_check").fetchone()
        if result != "ok":
            raise OpsError(f"the copy of the database failed its check: {result}")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(f"{partial}{suffix}").unlink(missing_ok=True)


# -- prune -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prunable:
    path: Path
    size: int
    why: str


async def prunable(db: Database, data: DataDir, older_than: float) -> list[Prunable]:
    """What ``prune`` removes: logs of jobs finished more than ``older_than`` seconds ago,
    and temporary dirs of jobs that are not running."""
    found = []
    now = time.time()
    logs_dir = data.logs
    logs = {p.stem: p for p in logs_dir.glob("*.log")} if logs_dir.is_dir() else {}
    finished = await _rows(
        db,
        "SELECT id, completed_at FROM jobs WHERE state IN ('succeeded', 'failed') "
        "AND completed_at < ? AND id IN ({ids})",
        list(logs),
        [now - older_than],
    )
    for row in sorted(finished, key=lambda r: r["completed_at"]):
        days = (now - row["completed_at"]) / 86400
        path = logs[row["id"]]
        found.append(
            Prunable(
                path, path.lstat().st_size, f"log of job {row['id']}, finished {days:.0f} days ago"
            )
        )

    jobs_dir = data.jobs
    leftovers = {p.name: p for p in jobs_dir.iterdir()} if jobs_dir.is_dir() else {}
    states = {
        row["id"]: row["state"]
        for row in await _rows(
            db, "SELECT id, state FROM jobs WHERE id IN ({ids})", list(leftovers), []
        )
    }
    for job_id, path in sorted(leftovers.items()):
        state = states.get(job_id)
        if state in ACTIVE_STATES:
            continue  # a pending job may be starting: its dir is being made right now
        why = f"temporary dir of job {job_id} ({state})" if state else "not a job this site knows"
        found.append(Prunable(path, _size(path), why))
    return found


async def _rows(db: Database, sql: str, ids: list[str], params: list) -> list[dict]:
    """``sql`` with ``{ids}`` filled in, run over ``ids`` in chunks SQLite accepts."""
    rows: list[dict] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows += await db.fetchall(sql.format(ids=marks), [*params, *chunk])
    return rows


def _size(path: Path) -> int:
    """Bytes under ``path``, not following symlinks."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    stack = [str(path)]  # iterative: a job may have left a tree thousands deep
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                total += entry.stat(follow_symlinks=False).st_size
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total


def remove(found: list[Prunable], dry_run: bool) -> int:
    """Remove (or, with ``dry_run``, list) ``found``; prints each and the space freed."""
    verb = "Would remove" if dry_run else "Removed"
    freed = 0
    failed = 0
    for item in found:
        if not dry_run:
            try:
                jobdir.remove_tree(item.path)  # whatever a job did to its dir
            except OSError as e:
                print(f"Could not remove {item.path}: {e.strerror or e}", file=sys.stderr)
                failed += 1
                continue
        freed += item.size
        print(f"{verb} {item.path} ({human_size(item.size)}): {item.why}")
    count = len(found) - failed
    if not found:
        print("Nothing to remove.")
    else:
        freeing = "would free" if dry_run else "freed"
        print(f"{verb} {count} item{'s' if count != 1 else ''}; {freeing} {human_size(freed)}.")
    return 1 if failed else 0

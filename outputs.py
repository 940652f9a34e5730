"""A workspace's outputs: matching output patterns, the manifest, and what may be shown."""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import stat
import time
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .datadir import MANIFEST
from .states import StatusCode
from .units import iso

# what an output viewer may see in the browser (DESIGN section 10)
VIEWABLE_TYPES = {
    ".csv", ".tsv", ".txt", ".log", ".md", ".html", ".json",
    ".png", ".jpg", ".jpeg", ".svg", ".pdf",
}  # fmt: skip
MAX_VIEWABLE_SIZE = 16 * 1024**2
MAX_CSV_ROWS = 5000
PREVIEW_ROWS = 1000  # rows of a CSV shown on its preview page
# how each viewable type is previewed: as a table, an image, a sandboxed frame, or text
PREVIEWS = {
    ".csv": "table", ".tsv": "table", ".png": "image", ".jpg": "image", ".jpeg": "image",
    ".svg": "image", ".html": "frame", ".txt": "text", ".log": "text", ".md": "text",
    ".json": "text",
}  # fmt: skip


class OutputError(Exception):
    """Outputs could not be collected; ``status_code`` says how the job ends."""

    def __init__(self, status_code: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def pattern_matches(pattern: str, path: str) -> bool:
    """``*`` matches within one path segment, as in project.yaml output patterns."""
    pattern_parts = pattern.split("/")
    path_parts = path.split("/")
    return len(pattern_parts) == len(path_parts) and all(
        fnmatchcase(part, pat) for pat, part in zip(pattern_parts, path_parts, strict=True)
    )


def _walk(root: Path) -> dict[str, os.stat_result]:
    """Every entry under ``root`` except directories, by relative path; links not followed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, root).replace(os.sep, "/")] = os.lstat(full)
    return found


def match_outputs(
    workdir: Path,
    outputs: dict[str, dict[str, str]],
    max_size: int,
    made_since: float | None = None,
) -> dict[str, str]:
    """Relative path -> privacy level of every file matching the action's output patterns.

    ``made_since`` is when the job's inputs were in place: a pattern that matches nothing
    is shown with the files written since then (the job's own) that look close to it.

    Raises OutputError for a pattern matching nothing (``unmatched_patterns``), and for a
    match that is not a regular file, lies behind a linked directory, or is larger than
    ``max_size``: collecting outputs never follows a link.
    """
    entries = _walk(workdir)
    links = sorted(path for path, st in entries.items() if stat.S_ISLNK(st.st_mode))
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for level, patterns in outputs.items():
        for pattern in patterns.values():
            _refuse_linked_dirs(pattern, links)
            hits = [path for path in entries if pattern_matches(pattern, path)]
            if not hits:
                unmatched.append(pattern)
            for path in hits:
                _check_output(path, entries[path], max_size)
                matched[path] = level
    if unmatched:
        made = sorted(
            path
            for path, st in entries.items()
            if not path.startswith("metadata/") and (made_since is None or st.st_mtime > made_since)
        )
        lines = []
        for pattern in unmatched:
            close = _close_files(pattern, made)
            hint = f" (files the job made that look close: {', '.join(close)})" if close else ""
            lines.append(f"{pattern}{hint}")
        raise OutputError(
            StatusCode.UNMATCHED_PATTERNS,
            "No outputs found matching patterns: " + "; ".join(lines),
        )
    return matched


def _refuse_linked_dirs(pattern: str, links: list[str]) -> None:
    """A link standing where a directory of the pattern should be is refused, not followed."""
    parts = pattern.split("/")
    for depth in range(1, len(parts)):
        prefix = "/".join(parts[:depth])
        for link in links:
            if pattern_matches(prefix, link):
                raise OutputError(
                    StatusCode.INTERNAL_ERROR,
                    f"{link} is a symbolic link, where output pattern {pattern} expects a "
                    "directory. jobsite does not follow links: write outputs as regular "
                    "files in real directories inside the workspace.",
                )


def _check_output(path: str, st: os.stat_result, max_size: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(
            StatusCode.INTERNAL_ERROR,
            f"Output {path} is a symbolic link; jobsite does not follow links. Write outputs "
            "as regular files inside the workspace.",
        )
    if not stat.S_ISREG(st.st_mode):
        kind = "a fifo" if stat.S_ISFIFO(st.st_mode) else "a device, socket or other special file"
        raise OutputError(
            StatusCode.INTERNAL_ERROR,
            f"Output {path} is {kind}, not a regular file; it was not copied.",
        )
    if st.st_size > max_size:
        raise OutputError(
            StatusCode.INTERNAL_ERROR,
            f"Output {path} is {st.st_size} bytes, larger than the site's limit of "
            f"{max_size} bytes for one output file",
        )


def _close_files(pattern: str, files: list[str]) -> list[str]:
    directory = pattern.rsplit("/", 1)[0] if "/" in pattern else ""
    same_dir = [f for f in files if (f.rsplit("/", 1)[0] if "/" in f else "") == directory]
    close = difflib.get_close_matches(pattern.replace("*", ""), files, n=3, cutoff=0.5)
    return sorted(set(close) | set(same_dir[:3]))[:5]


def check_visibility(path: Path, level: str, suffix: str | None = None) -> tuple[bool, str | None]:
    """Whether an output viewer may see this file in the browser, and if not, why not.

    ``suffix`` is the output's file type when ``path`` is a temporary name for it.
    """
    suffix = (path.suffix if suffix is None else suffix).lower()
    if level == "highly_sensitive":
        return False, "highly_sensitive outputs are never shown"
    if suffix not in VIEWABLE_TYPES:
        return False, f"files of type {suffix or '(none)'} are not shown"
    size = path.stat().st_size
    if size > MAX_VIEWABLE_SIZE:
        return False, f"larger than {MAX_VIEWABLE_SIZE // 1024**2} MB"
    if suffix == ".csv":
        with path.open(newline="", errors="replace") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if any(column.strip().lower() == "patient_id" for column in header):
                return False, "has a patient_id column"
            rows = sum(1 for _ in reader)
        if rows > MAX_CSV_ROWS:
            return False, f"has {rows} rows, more than {MAX_CSV_ROWS}"
    return True, None


class Manifest:
    """``metadata/manifest.json``: every output of a workspace and the action that made it."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = data or {"actions": {}, "files": {}}

    @classmethod
    def load(cls, workspace_dir: Path) -> Manifest:
        """The workspace's manifest; empty when there is none, or when the file is not one of
        ours (a checkout last run with ``opensafely run`` has a manifest of its own)."""
        path = workspace_dir / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return cls()
        if not _is_ours(data):
            return cls()
        return cls(data)

    def action_files(self, action: str) -> list[str]:
        return list(self.data["actions"].get(action, {}).get("files", []))

    def outputs_exist(self, workspace_dir: Path, action: str) -> bool:
        """Whether the action's last successful run is recorded and its outputs are on disk."""
        if action not in self.data["actions"]:
            return False
        return all((workspace_dir / rel).is_file() for rel in self.action_files(action))

    def record_action(
        self,
        action: str,
        job_id: str,
        sha: str,
        files: dict[str, Any],
        definition: dict[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
    ) -> None:
        """The action's latest successful job and its files. ``definition`` is what the
        job ran (``action_definition``), ``inputs`` the jobs whose outputs it was given."""
        for rel in self.action_files(action):
            self.data["files"].pop(rel, None)
        self.data["actions"][action] = {
            "job": job_id,
            "commit": sha,
            "completed_at": iso(time.time()),
            "files": sorted(files),
            "definition": definition,
            "inputs": inputs or {},
        }
        self.data["files"].update(files)

    def job_of(self, action: str) -> str | None:
        return self.data["actions"].get(action, {}).get("job")

    def out_of_date(self, current: dict[str, dict[str, Any]]) -> dict[str, str | None]:
        """Why each recorded action's outputs are out of date, or None when they are not.

        ``current`` is each action's definition in project.yaml now (``action_definition``).
        Outputs are out of date when their action changed, when an action whose outputs it
        read has run again since, or when those outputs are themselves out of date.
        """
        found: dict[str, str | None] = {}

        def why(action: str, seen: frozenset[str]) -> str | None:
            if action in found:
                return found[action]
            entry = self.data["actions"][action]
            reason = _changed(action, entry.get("definition"), current.get(action))
            inputs = entry.get("inputs") if isinstance(entry.get("inputs"), dict) else {}
            for need, job in sorted(inputs.items()):
                if reason is not None:
                    break
                now = self.job_of(need)
                if now != job:
                    reason = (
                        f"{need}, whose outputs it read, has run again since"
                        if now
                        else f"the outputs of {need}, which it read, are gone"
                    )
                elif need not in seen and why(need, seen | {need}) is not None:
                    reason = f"the outputs of {need}, which it read, are out of date"
            found[action] = reason
            return reason

        for action in self.data["actions"]:
            why(action, frozenset({action}))
        return found

    def with_out_of_date(self, current: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
        """The manifest as the outputs API gives it: every action and file with its
        ``out_of_date`` (why, or None; None throughout when ``current`` is unknown)."""
        stale = self.out_of_date(current) if current is not None else {}
        return {
            "actions": {
                name: {**entry, "out_of_date": stale.get(name)}
                for name, entry in self.data["actions"].items()
            },
            "files": {
                path: {**entry, "out_of_date": stale.get(entry.get("action"))}
                for path, entry in self.data["files"].items()
            },
        }

    def dumps(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=True)


def action_definition(run: str, args: Iterable[str], needs: Iterable[str]) -> dict[str, Any]:
    """What an action runs, as its outputs remember it: its run command, its arguments (with
    its config) and its needs."""
    return {"run": run, "args": list(args), "needs": sorted(needs)}


def input_jobs(manifest: Manifest, needs: Iterable[str]) -> dict[str, str]:
    """The job whose outputs each needed action gives a job now."""
    return {need: job for need in needs if (job := manifest.job_of(need)) is not None}


def _changed(action: str, made: Any, now: dict[str, Any] | None) -> str | None:
    if now is None:
        return f"{action} is no longer an action in project.yaml"
    if not isinstance(made, dict):  # made before outputs remembered their definition
        return None
    if made.get("run") != now["run"]:
        return f"the run command of {action} has changed in project.yaml"
    if made.get("args") != now["args"]:
        return f"the config of {action} has changed in project.yaml"
    if made.get("needs") != now["needs"]:
        return f"the needs of {action} have changed in project.yaml"
    return None


class UnreadableOutput(Exception):
    """An output that cannot be read as a plain file of the workspace."""


def read_output(workspace_dir: Path, rel: str, limit: int = MAX_VIEWABLE_SIZE) -> bytes:
    """The bytes of output ``rel``, opened one path part at a time without following a link,
    and never more than ``limit`` of them. Raises UnreadableOutput otherwise."""
    parts = rel.split("/")
    if not rel or any(part in ("", ".", "..") for part in parts):
        raise UnreadableOutput(f"{rel!r} is not a path inside the workspace")
    flags = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(workspace_dir, os.O_RDONLY | os.O_DIRECTORY | flags)
    except OSError as e:
        raise UnreadableOutput(f"{rel} is not in the workspace") from e
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | flags, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | flags, dir_fd=fd)
    except OSError as e:
        raise UnreadableOutput(f"{rel} is not a plain file in the workspace") from e
    finally:
        os.close(fd)
    info = os.fstat(file_fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(file_fd)
        raise UnreadableOutput(f"{rel} is not a plain file in the workspace")
    with open(file_fd, "rb") as f:
        if info.st_size > limit:
            raise UnreadableOutput(f"{rel} is larger than {limit} bytes")
        return f.read(limit)


def csv_preview(data: bytes, delimiter: str = ",", rows: int = PREVIEW_ROWS) -> dict[str, Any]:
    """The header and first ``rows`` rows of a CSV file, with its total row and column count
    (rows not counting the header)."""
    reader = csv.reader(io.StringIO(data.decode(errors="replace"), newline=""), delimiter=delimiter)
    header = next(reader, [])
    shown: list[list[str]] = []
    total = 0
    columns = len(header)
    for row in reader:
        total += 1
        columns = max(columns, len(row))
        if total <= rows:
            shown.append(row)
    return {"header": header, "rows": shown, "total_rows": total, "total_columns": columns}


def _is_ours(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("actions"), dict)
        and isinstance(data.get("files"), dict)
        and all(
            isinstance(entry, dict) and isinstance(entry.get("files"), list)
            for entry in data["actions"].values()
        )
    )

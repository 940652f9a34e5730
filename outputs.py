"""A workspace's outputs: matching output patterns, the manifest, and what may be shown."""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import os
import re
import stat
import time
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .datadir import MANIFEST
from .states import StatusCode
from .units import human_size, iso

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
# files that may hold a table of patients: judged by their content (R writes .txt tables)
TABLE_TYPES = {".csv", ".tsv", ".txt"}
# patient_id as a name of its own: not part of a longer word, in any letter case
_PATIENT_ID = re.compile(r"(?<![0-9a-z_])patient_id(?![0-9a-z_])", re.IGNORECASE)


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


def _walk(root: Path, max_depth: int) -> dict[str, os.stat_result]:
    """Every entry under ``root`` except directories, by relative path, down to ``max_depth``
    segments (no pattern reaches deeper); links not followed, unreadable directories left
    out. Iterative: a job may leave a tree thousands deep."""
    found = {}
    stack = [("", 1)]
    while stack:
        prefix, depth = stack.pop()
        try:
            entries = list(os.scandir(root / prefix if prefix else root))
        except OSError:
            continue
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if depth < max_depth:
                    stack.append((f"{rel}/", depth + 1))
            else:
                found[rel] = entry.stat(follow_symlinks=False)
    return found


def match_outputs(
    workdir: Path,
    outputs: dict[str, dict[str, str]],
    max_size: int,
    made_since: float | None = None,
    max_files: int | None = None,
) -> dict[str, str]:
    """Relative path -> privacy level of every file matching the action's output patterns.

    ``made_since`` is when the job's inputs were in place: a pattern that matches nothing
    is shown with the files written since then (the job's own) that look close to it.

    Raises OutputError for a pattern matching nothing (``unmatched_patterns``), for a
    match that is not a regular file or lies behind a linked directory (collecting outputs
    never follows a link), and for matches more than ``max_files`` or together larger than
    ``max_size`` bytes (``too_much_output``; a sparse file counts at its full length, which
    is what reading it gives).
    """
    patterns = [p for by_name in outputs.values() for p in by_name.values()]
    entries = _walk(workdir, max((p.count("/") + 1 for p in patterns), default=1))
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
                _check_output(path, entries[path])
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
    _check_limits({path: entries[path].st_size for path in matched}, max_size, max_files)
    return matched


def _check_limits(sizes: dict[str, int], max_size: int, max_files: int | None) -> None:
    if max_files is not None and len(sizes) > max_files:
        raise OutputError(
            StatusCode.TOO_MUCH_OUTPUT,
            f"The action's output patterns matched {len(sizes)} files, more than this site's "
            f"limit of {max_files} (max_output_files). Write fewer files (combine them into "
            "one table or archive), or ask an admin to raise the limit.",
        )
    total = sum(sizes.values())
    if total > max_size:
        largest = sorted(sizes, key=lambda path: -sizes[path])[:3]
        named = ", ".join(f"{path} ({human_size(sizes[path])})" for path in largest)
        raise OutputError(
            StatusCode.TOO_MUCH_OUTPUT,
            f"The action's outputs add up to {human_size(total)} ({total} bytes), more than "
            f"this site's limit of {human_size(max_size)} (max_output_size); the largest: "
            f"{named}. Write smaller outputs, or ask an admin to raise the limit.",
        )


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


def _check_output(path: str, st: os.stat_result) -> None:
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


def _close_files(pattern: str, files: list[str]) -> list[str]:
    directory = pattern.rsplit("/", 1)[0] if "/" in pattern else ""
    same_dir = [f for f in files if (f.rsplit("/", 1)[0] if "/" in f else "") == directory]
    close = difflib.get_close_matches(pattern.replace("*", ""), files, n=3, cutoff=0.5)
    return sorted(set(close) | set(same_dir[:3]))[:5]


def check_visibility(path: Path, level: str, suffix: str | None = None) -> tuple[bool, str | None]:
    """Whether an output viewer may see this file in the browser, and if not, why not.

    ``suffix`` is the output's file type when ``path`` is a temporary name for it. A file
    whose content cannot be judged is not shown; judging never fails the job.
    """
    suffix = (path.suffix if suffix is None else suffix).lower()
    if level == "highly_sensitive":
        return False, "highly_sensitive outputs are never shown"
    if suffix not in VIEWABLE_TYPES:
        return False, f"files of type {suffix or '(none)'} are not shown"
    size = path.stat().st_size
    if size > MAX_VIEWABLE_SIZE:
        return False, f"larger than {MAX_VIEWABLE_SIZE // 1024**2} MB"
    if suffix in TABLE_TYPES:
        return _check_table(path.read_bytes())
    return True, None


def _check_table(data: bytes) -> tuple[bool, str | None]:
    """A table is judged as text, whatever its separator (``,``, ``;``, tab) or quoting: it
    must be UTF-8 (a byte order mark is fine), must not name patient_id anywhere, and must
    have at most MAX_CSV_ROWS lines after its header."""
    try:
        text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        return False, (
            "is not UTF-8 text (UTF-16, say), so it could not be checked; "
            "write it as UTF-8 to have it shown"
        )
    if _PATIENT_ID.search(text):
        return False, "has a patient_id column"
    # lines are at least as many as records (a quoted field may hold a newline)
    rows = max(0, len(text.splitlines()) - 1)
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


def csv_preview(
    data: bytes, delimiter: str = ",", rows: int = PREVIEW_ROWS
) -> dict[str, Any] | None:
    """The header and first ``rows`` rows of a CSV file, with its total row and column count
    (rows not counting the header); None when it cannot be read as a table (a field larger
    than the csv module takes, say): then it is shown as text."""
    reader = csv.reader(io.StringIO(data.decode(errors="replace"), newline=""), delimiter=delimiter)
    shown: list[list[str]] = []
    total = 0
    try:
        header = next(reader, [])
        columns = len(header)
        for row in reader:
            total += 1
            columns = max(columns, len(row))
            if total <= rows:
                shown.append(row)
    except csv.Error:
        return None
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

"""A workspace's outputs: matching output patterns, the manifest, and what may be shown."""

from __future__ import annotations

import csv
import difflib
import json
import os
import stat
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

MANIFEST = "metadata/manifest.json"

# what an output viewer may see in the browser (DESIGN section 10)
VIEWABLE_TYPES = {
    ".csv", ".tsv", ".txt", ".log", ".md", ".html", ".json",
    ".png", ".jpg", ".jpeg", ".svg", ".pdf",
}  # fmt: skip
MAX_VIEWABLE_SIZE = 16 * 1024**2
MAX_CSV_ROWS = 5000


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
    workdir: Path, outputs: dict[str, dict[str, str]], max_size: int
) -> dict[str, str]:
    """Relative path -> privacy level of every file matching the action's output patterns.

    A pattern matching nothing, a match that is not a regular file, or a file larger than
    ``max_size`` raises OutputError.
    """
    entries = _walk(workdir)
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for level, patterns in outputs.items():
        for pattern in patterns.values():
            hits = [path for path in entries if pattern_matches(pattern, path)]
            if not hits:
                unmatched.append(pattern)
            for path in hits:
                mode = entries[path].st_mode
                if stat.S_ISLNK(mode):
                    raise OutputError(
                        "internal_error",
                        f"output {path} is a symbolic link; outputs must be regular files "
                        "written inside the workspace",
                    )
                if not stat.S_ISREG(mode):
                    raise OutputError(
                        "internal_error",
                        f"output {path} is not a regular file (a fifo, socket or device)",
                    )
                if entries[path].st_size > max_size:
                    raise OutputError(
                        "internal_error",
                        f"output {path} is {entries[path].st_size} bytes, larger than the "
                        f"site's limit of {max_size} bytes",
                    )
                matched[path] = level
    if unmatched:
        made = sorted(p for p in entries if not p.startswith("metadata/"))
        lines = []
        for pattern in unmatched:
            close = _close_files(pattern, made)
            hint = f" (files made that look close: {', '.join(close)})" if close else ""
            lines.append(f"{pattern}{hint}")
        raise OutputError(
            "unmatched_patterns",
            "No outputs found matching patterns: " + "; ".join(lines),
        )
    return matched


def _close_files(pattern: str, files: list[str]) -> list[str]:
    directory = pattern.rsplit("/", 1)[0] if "/" in pattern else ""
    same_dir = [f for f in files if (f.rsplit("/", 1)[0] if "/" in f else "") == directory]
    close = difflib.get_close_matches(pattern.replace("*", ""), files, n=3, cutoff=0.5)
    return sorted(set(close) | set(same_dir[:3]))[:5]


def check_visibility(path: Path, level: str) -> tuple[bool, str | None]:
    """Whether an output viewer may see this file in the browser, and if not, why not."""
    if level == "highly_sensitive":
        return False, "highly_sensitive outputs are never shown"
    if path.suffix.lower() not in VIEWABLE_TYPES:
        return False, f"files of type {path.suffix or '(none)'} are not shown"
    size = path.stat().st_size
    if size > MAX_VIEWABLE_SIZE:
        return False, f"larger than {MAX_VIEWABLE_SIZE // 1024**2} MB"
    if path.suffix.lower() == ".csv":
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
        path = workspace_dir / MANIFEST
        try:
            return cls(json.loads(path.read_text()))
        except FileNotFoundError:
            return cls()

    def action_files(self, action: str) -> list[str]:
        return list(self.data["actions"].get(action, {}).get("files", []))

    def outputs_exist(self, workspace_dir: Path, action: str) -> bool:
        """Whether the action's last successful run is recorded and its outputs are on disk."""
        if action not in self.data["actions"]:
            return False
        return all((workspace_dir / rel).is_file() for rel in self.action_files(action))

    def record_action(self, action: str, job_id: str, sha: str, files: dict[str, Any]) -> None:
        for rel in self.action_files(action):
            self.data["files"].pop(rel, None)
        self.data["actions"][action] = {
            "job": job_id,
            "commit": sha,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": sorted(files),
        }
        self.data["files"].update(files)

    def save(self, workspace_dir: Path) -> None:
        path = workspace_dir / MANIFEST
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        os.replace(tmp, path)

"""Git repositories: a bare mirror per repo URL, branches, files at a commit, tree export.

Everything goes through the git command line (the one tool that knows every transport and
credential helper a site may use), run as a subprocess with a time limit so that a
hanging remote cannot hold up the site.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import jobdir

GIT_TIMEOUT = 120.0
# However many pages show a repo, its mirror is fetched at most once per this many seconds
# (unless someone acts on it: creating a workspace or submitting a job request fetches anew)
FETCH_INTERVAL = 10.0
_SHA = re.compile(r"[0-9a-f]{40}")
_COMMIT = re.compile(r"[0-9a-f]{4,40}")  # a full sha, or a prefix of one as git accepts it


class RepoError(Exception):
    """A git operation failed; the message says what to do."""


class RepoNotAllowed(RepoError):
    pass


class RepoUnreachable(RepoError):
    pass


class BranchNotFound(RepoError):
    pass


class FileNotFound(RepoError):
    pass


class FileTooLarge(RepoError):
    def __init__(self, path: str, size: int) -> None:
        super().__init__(f"{path} is {size} bytes, more than this site reads")
        self.size = size


# A repo address is an https (or http, ssh, git) URL of a host, or an absolute local path,
# whose path is made of these segments only: never `.` or `..`, so no dot segment can walk
# out of an allowed prefix, and no `%`, `?`, `#`, `@` or `\\` to smuggle one past the match.
_URL = re.compile(
    r"(?P<scheme>https|http|ssh|git)://(?P<host>[a-z0-9.-]+(:[0-9]{1,5})?)(?P<path>/.*)"
)
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_ADDRESS = 1000
ADDRESS_RULE = (
    "a repo is an https URL (https://host/owner/repo) or an absolute path on this machine, "
    "and each part of its path has only letters, digits, '.', '_' and '-' (no '.' or '..' "
    "parts, no '%', '?', '#', '@' or backslashes)"
)


def repo_address(repo: str) -> str:
    """``repo`` as the site matches, stores and fetches it; RepoNotAllowed when it is not a
    repo address (ADDRESS_RULE). A URL's scheme and host are lowercased and one trailing
    ``/`` dropped; a local path becomes its real path (links resolved), as git would reach
    it."""
    candidate = repo.removesuffix("/")
    if len(candidate) <= _MAX_ADDRESS:
        if candidate.startswith("/"):
            if _segments_ok(candidate[1:]):
                return os.path.realpath(candidate)
        else:
            scheme, sep, rest = candidate.partition("://")
            host, _, path = rest.partition("/")
            url = f"{scheme.lower()}{sep}{host.lower()}/{path}"
            match = _URL.fullmatch(url)
            if match and _segments_ok(match["path"][1:]):
                return url
    shown = repo[:200] + ("..." if len(repo) > 200 else "")
    raise RepoNotAllowed(f"{shown!r} is not a repo this site can use: {ADDRESS_RULE}.")


def _segments_ok(path: str) -> bool:
    return all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in path.split("/"))


class CommitNotFound(RepoError):
    """A commit asked for is not in the repo, is ambiguous, or is not on the branch."""


@dataclass(frozen=True)
class ChangedFile:
    """One file changed between two commits, as ``git diff --name-status`` says it."""

    status: str  # A added, M modified, D deleted, R renamed, T type changed, C copied
    path: str
    old_path: str | None = None  # where a renamed or copied file came from


@dataclass(frozen=True)
class Changes:
    files: tuple[ChangedFile, ...]
    total: int  # files changed; more than len(files) when the list was cut short


def is_allowed(url: str, patterns: list[str]) -> bool:
    """Whether ``url`` is a repo address (repo_address) matching one of the site's
    ``repos.allow`` patterns."""
    try:
        check_allowed(url, patterns)
    except RepoNotAllowed:
        return False
    return True


def check_allowed(url: str, patterns: list[str]) -> str:
    """``url`` as repo_address gives it, when it matches one of ``patterns``; else
    RepoNotAllowed saying what is wrong."""
    address = repo_address(url)
    if not any(fnmatch.fnmatchcase(address, _real_pattern(p)) for p in patterns):
        allowed = ", ".join(patterns) or "(none)"
        raise RepoNotAllowed(
            f"repo {address} is not allowed on this site; repos must match one of: {allowed}. "
            "An admin can add a pattern to repos.allow in the settings."
        )
    return address


def _real_pattern(pattern: str) -> str:
    """A local path pattern with its fixed leading directories as their real path, so that
    it compares with the real paths repo_address gives."""
    if not pattern.startswith("/"):
        return pattern
    parts = pattern.split("/")
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    prefix = "/".join(parts[:fixed]) or "/"
    return "/".join([os.path.realpath(prefix), *parts[fixed:]])


async def _git(
    *args: str, git_dir: Path | None = None, timeout: float = GIT_TIMEOUT
) -> tuple[int, bytes, str]:
    cmd = ["git"]
    if git_dir is not None:
        cmd.append(f"--git-dir={git_dir}")
    cmd.extend(args)
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",  # never wait for a password on stdin
        "GIT_ASKPASS": "true",
        "LC_ALL": "C",
    }
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RepoUnreachable(
            f"git {args[0]} took longer than {timeout:.0f}s and was stopped"
        ) from None
    return proc.returncode or 0, out, err.decode(errors="replace").strip()


class Repos:
    """Bare mirrors of workspace repos under ``<data_dir>/repos``."""

    def __init__(
        self, root: Path, timeout: float = GIT_TIMEOUT, fetch_interval: float = FETCH_INTERVAL
    ) -> None:
        self.root = root
        self.timeout = timeout
        self.fetch_interval = fetch_interval
        self._locks: dict[str, asyncio.Lock] = {}
        # url -> when its last fetch began (time.monotonic) and why it failed, if it did
        self._fetched: dict[str, tuple[float, str | None]] = {}

    def mirror_path(self, url: str) -> Path:
        return self.root / f"{hashlib.sha1(url.encode()).hexdigest()}.git"

    async def fetch(self, url: str, fresh: bool = False) -> Path:
        """Create or update the mirror of ``url``; returns its git dir.

        A fetch that began less than ``fetch_interval`` seconds ago stands (its failure
        too), so callers arriving together share one; ``fresh`` asks for a fetch begun
        after the call, to see what was pushed just before it."""
        asked = time.monotonic()
        async with self._locks.setdefault(url, asyncio.Lock()):
            began, failure = self._fetched.get(url, (-math.inf, None))
            if began >= asked or (not fresh and asked - began < self.fetch_interval):
                if failure is not None:
                    raise RepoUnreachable(failure)
                return self.mirror_path(url)
            began = time.monotonic()
            try:
                path = await self._update(url)
            except RepoUnreachable as e:
                self._fetched[url] = (began, str(e))
                raise
            self._fetched[url] = (began, None)
            return path

    async def _update(self, url: str) -> Path:
        """Clone the mirror of ``url``, or fetch into it."""
        path = self.mirror_path(url)
        if not (path / "HEAD").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".clone-"))
            try:
                code, _, err = await _git(
                    "clone", "--mirror", "--quiet", "--", url, str(tmp), timeout=self.timeout
                )
                if code:
                    raise RepoUnreachable(f"could not clone {url}: {_last_line(err)}")
                tmp.rename(path)
            finally:
                # a failed, timed-out or cancelled clone leaves nothing behind
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            code, _, err = await _git(
                "fetch", "--prune", "--quiet", "origin", git_dir=path, timeout=self.timeout
            )
            if code:
                raise RepoUnreachable(f"could not fetch {url}: {_last_line(err)}")
        return path

    async def branches(self, url: str, fresh: bool = False) -> list[str]:
        path = await self.fetch(url, fresh)
        code, out, err = await _git(
            "for-each-ref", "--format=%(refname:short)", "refs/heads", git_dir=path
        )
        if code:
            raise RepoError(f"could not list branches of {url}: {_last_line(err)}")
        return sorted(out.decode().split())

    async def resolve_branch(
        self, url: str, branch: str, fetch: bool = True, fresh: bool = False
    ) -> str:
        """The commit sha at the head of ``branch`` (``fetch`` and ``fresh``: as ``fetch``)."""
        path = await self.fetch(url, fresh) if fetch else self.mirror_path(url)
        code, out, _ = await _git(
            "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}", git_dir=path
        )
        if code:
            names = await self.branches(url) if fetch else []
            known = ", ".join(names[:20]) or "none"
            raise BranchNotFound(
                f"branch {branch!r} not found in {url} (branches: {known}). "
                "Push the branch, or choose one of these."
            )
        sha = out.decode().strip()
        assert _SHA.fullmatch(sha), sha
        return sha

    async def resolve_commit(self, url: str, branch: str, commit: str, fresh: bool = False) -> str:
        """The full sha of ``commit`` (a full sha, or a prefix of one that names a single
        commit), which must be on ``branch``: its head or one of the head's ancestors
        (``fresh``: as ``fetch``)."""
        head = await self.resolve_branch(url, branch, fresh=fresh)
        wanted = commit.strip().lower()
        if not _COMMIT.fullmatch(wanted):
            raise CommitNotFound(
                f"commit {commit!r} is not a commit id: give a commit's sha (4 to 40 hex "
                f"digits), such as {head[:7]} for the head of {branch}"
            )
        path = self.mirror_path(url)
        code, out, err = await _git("rev-parse", "--verify", f"{wanted}^{{commit}}", git_dir=path)
        if code:
            if "ambiguous" in err:
                raise CommitNotFound(
                    f"commit {wanted} is ambiguous in {url}: more than one object's id starts "
                    "with it. Give more of the sha."
                )
            raise CommitNotFound(
                f"commit {wanted} is not in {url}. Push it to {branch}, or give a commit of "
                f"{branch} (its head is {head[:7]})."
            )
        sha = out.decode().strip()
        code, _, err = await _git("merge-base", "--is-ancestor", sha, head, git_dir=path)
        if code == 1:
            raise CommitNotFound(
                f"commit {sha[:7]} is not on branch {branch} of {url}. Give a commit of "
                f"{branch} (its head is {head[:7]}), or change the workspace's branch."
            )
        if code:
            raise RepoError(f"could not check commit {sha[:7]} in {url}: {_last_line(err)}")
        return sha

    async def changed_files(self, url: str, old: str, new: str, limit: int) -> Changes:
        """The files that differ between commits ``old`` and ``new`` (the mirror must hold
        both), the first ``limit`` of them listed."""
        code, out, err = await _git(
            "diff", "--name-status", "-z", "-M", old, new, "--", git_dir=self.mirror_path(url)
        )
        if code:
            raise RepoError(
                f"could not compare {old[:7]} and {new[:7]} in {url}: {_last_line(err)}"
            )
        fields = out.decode(errors="replace").split("\0")
        files: list[ChangedFile] = []
        total = 0
        i = 0
        while i + 1 < len(fields):
            status = fields[i]
            if status[:1] in ("R", "C") and i + 2 < len(fields):
                change = ChangedFile(status[0], fields[i + 2], fields[i + 1])
                i += 3
            else:
                change = ChangedFile(status[:1], fields[i + 1])
                i += 2
            total += 1
            if len(files) < limit:
                files.append(change)
        return Changes(tuple(files), total)

    async def read_file(self, url: str, sha: str, path: str, max_size: int | None = None) -> str:
        """The text of ``path`` at commit ``sha`` (the mirror must already hold it);
        FileTooLarge, without reading it, when it is larger than ``max_size`` bytes."""
        git_dir = self.mirror_path(url)
        if max_size is not None:
            code, out, _ = await _git("cat-file", "-s", f"{sha}:{path}", git_dir=git_dir)
            if code:
                raise FileNotFound(f"{path} not found in {url} at commit {sha[:7]}")
            if int(out) > max_size:
                raise FileTooLarge(path, int(out))
        code, out, _ = await _git("show", f"{sha}:{path}", git_dir=git_dir)
        if code:
            raise FileNotFound(f"{path} not found in {url} at commit {sha[:7]}")
        return out.decode(errors="replace")

    async def export_tree(self, url: str, sha: str, dest: Path) -> None:
        """Write every file of the repo at ``sha`` into the existing directory ``dest``."""
        with tempfile.TemporaryFile() as archive:
            proc = await asyncio.create_subprocess_exec(
                "git",
                f"--git-dir={self.mirror_path(url)}",
                "archive",
                "--format=tar",
                sha,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=archive,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, err = await asyncio.wait_for(proc.communicate(), self.timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise RepoError(f"exporting {url} at {sha[:7]} took too long") from None
            if proc.returncode:
                raise RepoError(f"could not export {url} at {sha[:7]}: {_last_line(err.decode())}")
            await asyncio.to_thread(_extract, archive, dest)


def _extract(archive, dest: Path) -> None:
    archive.seek(0)
    jobdir.extract_archive(archive, dest)  # by our own rules: no link is ever followed


def _last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else "git gave no reason"

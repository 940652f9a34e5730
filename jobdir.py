"""A job's temporary directory, written and removed without ever following a link.

Everything in a job's directory may have been put there by an attacker: the study's repo
(committed symbolic links, chains of them), and the job itself, which can make links,
unreadable directories and trees deeper than any recursion. So every write walks the path
one component at a time from a directory file descriptor, opening each directory with
``O_NOFOLLOW``: a link is never followed, so no path written can land outside the directory,
whatever the links say. Removal walks the same way, iteratively, and gives each directory
back the permissions it needs to be emptied.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
# the disk a file or directory counts as at least: the bytes per inode of an ext4 filesystem
# by default, so a job's share of the inodes is no larger than its share of the bytes
INODE_SIZE = 16 * 1024


class UnsafePath(Exception):
    """A file could not be put in a job's directory without following a link; the message
    says which and why."""


def _parts(rel: str) -> list[str]:
    """The components of a relative path, refused when one could leave the directory."""
    parts = rel.rstrip("/").split("/")
    if rel.startswith("/") or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"{rel!r} is not a plain relative path")
    return parts


def _open_dir(root_fd: int, parts: list[str], replace: bool) -> int:
    """An fd of the directory ``parts`` under ``root_fd``, made where missing.

    Something other than a real directory in the way (a link, a file) is removed when
    ``replace``, else refused; it is never followed.
    """
    fd = os.dup(root_fd)
    try:
        for depth, name in enumerate(parts):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(name, 0o755, dir_fd=fd)
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                # ELOOP: a link; ENOTDIR: a file or other non-directory
                where = "/".join(parts[: depth + 1])
                if not replace:
                    raise UnsafePath(
                        f"{where} is a symbolic link or a file, where a directory is needed"
                    ) from e
                os.unlink(name, dir_fd=fd)
                os.mkdir(name, 0o755, dir_fd=fd)
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_new(dir_fd: int, name: str, source: IO[bytes], mode: int) -> None:
    fd = os.open(name, _NEW_FILE_FLAGS, mode, dir_fd=dir_fd)
    with open(fd, "wb") as out:
        copy_data(source, out)


def copy_data(source: IO[bytes], out: IO[bytes], digest: Any = None) -> int:
    """Copy ``source`` into the new, empty file ``out``, leaving a hole wherever a chunk
    reads as zeros, so that a sparse file takes no more disk than it did; returns the
    length, and feeds every byte to ``digest`` (a hashlib object) when given."""
    size = 0
    while chunk := source.read(_CHUNK):
        size += len(chunk)
        if digest is not None:
            digest.update(chunk)
        if chunk.count(0) == len(chunk):
            out.seek(len(chunk), os.SEEK_CUR)
        else:
            out.write(chunk)
    out.truncate(size)
    return size


def extract_archive(archive: IO[bytes], dest: Path) -> None:
    """Write the files of a tar archive (``git archive``'s) into the directory ``dest``.

    Only directories, regular files and symbolic links are written (the only things git
    stores); a link is written as a link and never followed, so a file the archive places
    under one is refused. Mode bits are reduced to executable or not, as git keeps them.
    """
    root = os.open(dest, _DIR_FLAGS)
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            for member in tar:
                if not (member.isdir() or member.isreg() or member.issym()):
                    continue
                parts = _parts(member.name)
                if member.isdir():
                    os.close(_open_dir(root, parts, replace=False))
                    continue
                parent = _open_dir(root, parts[:-1], replace=False)
                try:
                    if member.issym():
                        os.symlink(member.linkname, parts[-1], dir_fd=parent)
                    else:
                        source = tar.extractfile(member)
                        assert source is not None
                        mode = 0o755 if member.mode & 0o111 else 0o644
                        _write_new(parent, parts[-1], source, mode)
                except FileExistsError as e:
                    raise UnsafePath(f"{member.name} appears twice in the archive") from e
                finally:
                    os.close(parent)
    finally:
        os.close(root)


def copy_in(source: Path, dest: Path, rel: str, mode: int | None = None) -> None:
    """Copy the regular file ``source`` to ``rel`` under the directory ``dest``.

    Whatever stands at ``rel`` or in its way (a file, a link: the repo's, say) is replaced,
    never followed; a real directory standing at ``rel`` itself is refused. ``source`` is
    opened without following a link. ``mode`` defaults to the source file's.
    """
    parts = _parts(rel)
    src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with open(src_fd, "rb") as src:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{source} is not a regular file")
        root = os.open(dest, _DIR_FLAGS)
        try:
            parent = _open_dir(root, parts[:-1], replace=True)
        finally:
            os.close(root)
        try:
            name = parts[-1]
            try:
                existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISDIR(existing.st_mode):
                    raise UnsafePath(f"{rel} is a directory, where a file is needed")
                os.unlink(name, dir_fd=parent)
            _write_new(parent, name, src, stat.S_IMODE(st.st_mode) if mode is None else mode)
        finally:
            os.close(parent)


def copy_files(source: Path, files: Iterable[str], dest: Path) -> None:
    """Copy ``files`` (paths relative to ``source``) into ``dest``; links are copied as links,
    as ``git archive`` does, and anything that is neither a file nor a link is left out."""
    root = os.open(dest, _DIR_FLAGS)
    try:
        for rel in files:
            src = source / rel
            try:
                mode = os.lstat(src).st_mode
            except FileNotFoundError:
                continue  # deleted from the checkout since it was listed
            if stat.S_ISREG(mode):
                copy_in(src, dest, rel)  # with its mode, so scripts stay executable
            elif stat.S_ISLNK(mode):
                parts = _parts(rel)
                parent = _open_dir(root, parts[:-1], replace=False)
                try:
                    os.symlink(os.readlink(src), parts[-1], dir_fd=parent)
                finally:
                    os.close(parent)
    finally:
        os.close(root)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it, whatever a job did to it.

    Iterative (a tree thousands deep is fine), one directory fd open at a time, links never
    followed, and a directory the job made unreadable or unwritable (``chmod 000``) is given
    back its owner's permissions first. A missing ``path`` is fine.
    """
    parent_fd = os.open(path.parent, _DIR_FLAGS)
    try:
        try:
            st = os.stat(path.name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path.name, dir_fd=parent_fd)
            return
        _remove_dir(parent_fd, path.name)
    finally:
        os.close(parent_fd)


def _enter(dir_fd: int, name: str) -> int:
    """Open the directory ``name`` under ``dir_fd`` so that it can be emptied."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=dir_fd)  # a directory, as its lstat said a moment ago
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def _remove_dir(parent_fd: int, name: str) -> None:
    # the path from parent_fd down to the directory open as fd, and per level the
    # subdirectories still to remove (None until that level has been scanned)
    names = [name]
    pending: list[list[str] | None] = [None]
    fd = _enter(parent_fd, name)
    try:
        while True:
            subdirs = pending[-1]
            if subdirs is None:
                subdirs = []
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                        else:
                            os.unlink(entry.name, dir_fd=fd)
                pending[-1] = subdirs
            if subdirs:
                child = subdirs.pop()
                inner = _enter(fd, child)
                os.close(fd)
                fd = inner
                names.append(child)
                pending.append(None)
                continue
            done = names.pop()
            pending.pop()
            if not names:
                os.close(fd)
                fd = -1
                os.rmdir(done, dir_fd=parent_fd)
                return
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(done, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give ``path`` and everything under it (links themselves, not what they point to) to
    ``uid``:``gid``; iterative, like ``remove_tree``."""
    parent_fd = os.open(path.parent, _DIR_FLAGS)
    try:
        os.chown(path.name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
        depth = 0
        pending: list[list[str]] = []
        fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            while True:
                if len(pending) == depth:
                    subdirs = []
                    with os.scandir(fd) as entries:
                        for entry in entries:
                            os.chown(entry.name, uid, gid, dir_fd=fd, follow_symlinks=False)
                            if entry.is_dir(follow_symlinks=False):
                                subdirs.append(entry.name)
                    pending.append(subdirs)
                if pending[-1]:
                    inner = os.open(pending[-1].pop(), _DIR_FLAGS, dir_fd=fd)
                    depth += 1
                elif depth == 0:
                    return
                else:
                    pending.pop()
                    depth -= 1
                    inner = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)


def disk_usage(path: Path) -> int:
    """The disk the files under ``path`` take, as a job's limit counts it: their real blocks
    (a sparse file by what it holds; links not followed), as GNU ``du`` counts them, but each
    file or directory at least INODE_SIZE, so that a million empty files cannot use up the
    filesystem's inodes either. 0 when ``path`` is gone."""
    return max(_du(path, "--block-size=1"), _du(path, "--inodes") * INODE_SIZE)


def _du(path: Path, unit: str) -> int:
    result = subprocess.run(
        ["du", "--summarize", unit, "--one-file-system", "--", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    # du still totals what it could read when some of it was unreadable
    first = result.stdout.split("\t", 1)[0]
    return int(first) if first.isdigit() else 0

"""``jobsite backup`` and ``jobsite prune``, run through the command line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from helpers import Site, wait_until

from jobsite import cli
from jobsite.db import Database, schema_version

DAY = 86400


@pytest.fixture
def config(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "jobsite.yaml"
    path.write_text(f"data_dir: {data_dir}\n")
    return path


@pytest.fixture
def make_site(data_dir: Path):
    """Makes the site's database (as `jobsite serve` would) and returns a Site in it."""

    async def make() -> tuple[Database, Site]:
        data_dir.mkdir(parents=True, exist_ok=True)
        db = await Database.open(data_dir / "db.sqlite")
        return db, await Site.make(db)

    return make


# -- backup ----------------------------------------------------------------------------


class Writer(threading.Thread):
    """Writes to the database the way the site does, until stopped: each transaction adds a
    user and that user's API token, so a consistent copy has as many of one as the other."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.done = threading.Event()
        self.written = 0

    def run(self) -> None:
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.execute("PRAGMA busy_timeout = 10000")
            while not self.done.is_set():
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "INSERT INTO users (username, created_at) VALUES (?, ?)",
                    (f"writer-{self.written}", time.time()),
                )
                conn.execute(
                    "INSERT INTO api_tokens (user_id, name, token_hash, created_at) "
                    "VALUES (?, 't', ?, ?)",
                    (cur.lastrowid, f"hash-{self.written}", time.time()),
                )
                conn.execute("COMMIT")
                self.written += 1


def test_backup_is_consistent_while_the_site_writes(config, data_dir, tmp_path, capsys):
    async def make() -> None:
        data_dir.mkdir(parents=True)
        db = await Database.open(data_dir / "db.sqlite")
        await db.close()

    asyncio.run(make())
    with contextlib.closing(sqlite3.connect(data_dir / "db.sqlite")) as conn, conn:
        # bulk, so that the copy takes long enough for writes to land meanwhile
        conn.executemany(
            "INSERT INTO site_state (key, value) VALUES (?, ?)",
            ((f"filler-{i}", os.urandom(2000).hex()) for i in range(10_000)),
        )
    writer = Writer(data_dir / "db.sqlite")
    writer.start()
    try:
        wait_until(lambda: writer.written >= 50 or not writer.is_alive(), message="50 writes")
        assert writer.is_alive(), "the writer stopped"
        before = writer.written
        dest = tmp_path / "copy.sqlite"
        assert cli.main(["--config", str(config), "backup", str(dest)]) == 0
        after = writer.written
        during = after - before
        wait_until(
            lambda: writer.written > after or not writer.is_alive(),
            message="a write after the backup",
        )
    finally:
        writer.done.set()
        writer.join()

    assert during > 0, "no write landed while the backup ran"
    assert f"to {dest} (" in capsys.readouterr().out
    assert dest.stat().st_mode & 0o777 == 0o600
    with contextlib.closing(sqlite3.connect(dest)) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("PRAGMA user_version").fetchone() == (schema_version(),)
        users = copy.execute("SELECT count(*) FROM users").fetchone()[0]
        tokens = copy.execute("SELECT count(*) FROM api_tokens").fetchone()[0]
        filler = copy.execute("SELECT count(*) FROM site_state").fetchone()[0]
    assert users == tokens
    assert before <= users < writer.written
    assert filler == 10_000
    assert not list(tmp_path.glob(".copy.sqlite*")), "a partial copy was left behind"


def test_a_backup_restores_as_a_working_site(config, data_dir, tmp_path, make_site):
    async def make() -> None:
        db, site = await make_site()
        await site.add_job("generate")
        await db.close()

    asyncio.run(make())
    backups = tmp_path / "backups"
    backups.mkdir()
    assert cli.main(["--config", str(config), "backup", str(backups)]) == 0
    (copy,) = backups.glob("jobsite-*.sqlite")

    async def restored() -> list[dict]:
        db = await Database.open(copy)
        try:
            return await db.fetchall("SELECT action, state FROM jobs")
        finally:
            await db.close()

    assert asyncio.run(restored()) == [{"action": "generate", "state": "succeeded"}]


def test_backup_never_overwrites_a_file(config, data_dir, tmp_path, make_site, capsys):
    async def make() -> None:
        db, _ = await make_site()
        await db.close()

    asyncio.run(make())
    dest = tmp_path / "precious.sqlite"
    dest.write_text("do not lose me")
    assert cli.main(["--config", str(config), "backup", str(dest)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert dest.read_text() == "do not lose me"


def test_backup_says_when_there_is_no_database(config, data_dir, tmp_path, capsys):
    assert cli.main(["--config", str(config), "backup", str(tmp_path / "b.sqlite")]) == 1
    err = capsys.readouterr().err
    assert f"there is no database at {data_dir / 'db.sqlite'}" in err
    assert not (data_dir / "db.sqlite").exists()
    assert not (tmp_path / "b.sqlite").exists()


# -- prune -----------------------------------------------------------------------------


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


@pytest.fixture
def old_site(data_dir, make_site):
    """A site with jobs of every age and state, their logs, leftovers and workspace outputs."""

    async def make() -> dict[str, str]:
        db, site = await make_site()
        now = time.time()
        jobs = {
            "old_ok": await site.add_job("a", created_at=now - 40 * DAY),
            "old_failed": await site.add_job(
                "b", state="failed", status_code="nonzero_exit", created_at=now - 35 * DAY
            ),
            "recent": await site.add_job("c", created_at=now - 5 * DAY),
            "running": await site.add_job(
                "d", state="running", status_code="executing", created_at=now - 40 * DAY
            ),
            "pending": await site.add_job(
                "e", state="pending", status_code="created", created_at=now - 40 * DAY, wait=None
            ),
        }
        await db.close()
        return jobs

    jobs = asyncio.run(make())
    for name in ("old_ok", "old_failed", "recent"):
        write(data_dir / "logs" / f"{jobs[name]}.log", 1000)
    write(data_dir / "jobs" / jobs["old_failed"] / "output" / "big.csv", 5000)
    write(data_dir / "jobs" / jobs["recent"] / "analysis.py", 300)
    write(data_dir / "jobs" / jobs["running"] / "output" / "partial.csv", 700)
    write(data_dir / "jobs" / jobs["pending"] / "project.yaml", 100)
    write(data_dir / "jobs" / "0123456789abcdef" / "stray.txt", 50)
    ws = data_dir / "workspaces" / "ws1"
    old = time.time() - 100 * DAY
    for path in (
        write(ws / "output" / "a.csv", 2000),
        write(ws / "metadata" / "a.log", 1000),
        write(ws / "metadata" / "manifest.json", 10),
    ):
        os.utime(path, (old, old))
    return jobs


def files(root: Path) -> set[str]:
    """Files under ``root``, leaving out the database's own (its WAL comes and goes)."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("db.sqlite")
    }


def test_prune_removes_old_logs_and_leftovers_but_no_outputs(config, data_dir, old_site, capsys):
    jobs = old_site
    assert cli.main(["--config", str(config), "prune", "--older-than", "30"]) == 0
    out = capsys.readouterr().out

    assert files(data_dir / "logs") == {f"{jobs['recent']}.log"}
    assert sorted(p.name for p in (data_dir / "jobs").iterdir()) == sorted(
        [jobs["running"], jobs["pending"]]
    )
    assert files(data_dir / "workspaces") == {
        "ws1/output/a.csv",
        "ws1/metadata/a.log",
        "ws1/metadata/manifest.json",
    }
    assert f"Removed {data_dir / 'logs' / jobs['old_ok']}.log (1000 bytes)" in out
    assert f"log of job {jobs['old_failed']}, finished 35 days ago" in out
    assert f"temporary dir of job {jobs['recent']} (succeeded)" in out
    assert "0123456789abcdef (50 bytes): not a job this site knows" in out
    # two logs of 1000 bytes, dirs holding 5000 + 300 + 50 bytes of files (plus dir entries)
    assert "Removed 5 items; freed " in out
    freed = out.rsplit("freed ", 1)[1]
    assert freed.endswith(" KiB.\n") and 7.0 < float(freed.split()[0]) < 60


def test_prune_dry_run_removes_nothing(config, data_dir, old_site, capsys):
    before = files(data_dir)
    assert cli.main(["--config", str(config), "prune", "--older-than", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert files(data_dir) == before
    assert f"Would remove {data_dir / 'logs' / old_site['old_ok']}.log (1000 bytes)" in out
    assert "Would remove 5 items; would free " in out


def test_prune_with_nothing_old_says_so(config, data_dir, make_site, capsys):
    async def make() -> None:
        db, site = await make_site()
        job_id = await site.add_job("a")
        write(data_dir / "logs" / f"{job_id}.log", 10)
        await db.close()

    asyncio.run(make())
    assert cli.main(["--config", str(config), "prune", "--older-than", "7"]) == 0
    assert capsys.readouterr().out == "Nothing to remove.\n"


def test_prune_refuses_a_negative_age(config, capsys):
    assert cli.main(["--config", str(config), "prune", "--older-than", "-1"]) == 2
    assert "--older-than must be 0 or more days" in capsys.readouterr().err

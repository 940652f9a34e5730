"""The database: schema on a new file, version checks, one writer, readers, closing."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from jobsite import db as db_module
from jobsite.db import Database, DatabaseVersionError, schema_version


async def test_a_new_database_gets_the_schema_in_wal_mode(tmp_path):
    database = await Database.open(tmp_path / "db.sqlite")
    try:
        assert await database.fetchval("PRAGMA user_version") == schema_version()
        assert await database.fetchval("PRAGMA journal_mode") == "wal"
        assert await database.fetchval("PRAGMA busy_timeout") == db_module.BUSY_TIMEOUT_MS
        tables = {r["name"] for r in await database.fetchall("SELECT name FROM sqlite_master")}
        assert {"users", "jobs", "job_requests", "workspaces", "outbox"} <= tables
    finally:
        await database.close()


async def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "db.sqlite"
    await (await Database.open(path)).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema_version() + 1}")
    conn.close()
    with pytest.raises(DatabaseVersionError, match="made by a newer version of jobsite"):
        await Database.open(path)


async def test_an_older_database_is_migrated(tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite"
    await (await Database.open(path)).close()
    # a later jobsite whose schema is one version ahead, with its migration
    current = schema_version()
    monkeypatch.setattr(db_module, "schema_version", lambda: current + 1)
    monkeypatch.setitem(db_module.MIGRATIONS, current, "ALTER TABLE users ADD COLUMN nickname;")
    database = await Database.open(path)
    try:
        assert await database.fetchval("PRAGMA user_version") == current + 1
        columns = {r["name"] for r in await database.fetchall("PRAGMA table_info(users)")}
        assert "nickname" in columns
    finally:
        await database.close()


async def test_a_missing_migration_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite"
    await (await Database.open(path)).close()
    current = schema_version()
    monkeypatch.setattr(db_module, "schema_version", lambda: current + 1)
    with pytest.raises(DatabaseVersionError, match=f"no migration from schema version {current}"):
        await Database.open(path)


async def test_a_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(DatabaseVersionError, match="not a jobsite database"):
        await Database.open(path)


async def test_concurrent_writes_never_lock(tmp_path):
    database = await Database.open(tmp_path / "db.sqlite")
    try:

        async def write(i: int) -> None:
            async with database.transaction() as conn:
                await conn.execute(
                    "INSERT INTO site_state (key, value) VALUES (?, ?)", (f"k{i}", str(i))
                )
                await asyncio.sleep(0)

        await asyncio.gather(*(write(i) for i in range(200)))
        assert await database.fetchval("SELECT count(*) FROM site_state") == 200
    finally:
        await database.close()


async def test_a_failed_transaction_leaves_nothing(tmp_path):
    database = await Database.open(tmp_path / "db.sqlite")
    try:
        with pytest.raises(RuntimeError):
            async with database.transaction() as conn:
                await conn.execute("INSERT INTO site_state (key, value) VALUES ('a', '1')")
                raise RuntimeError("boom")
        assert await database.fetchval("SELECT count(*) FROM site_state") == 0
    finally:
        await database.close()


async def test_backup_is_a_consistent_copy(tmp_path):
    database = await Database.open(tmp_path / "db.sqlite")
    try:
        await database.execute("INSERT INTO site_state (key, value) VALUES ('a', '1')")
        await database.backup(tmp_path / "copy.sqlite")
    finally:
        await database.close()
    conn = sqlite3.connect(tmp_path / "copy.sqlite")
    assert conn.execute("SELECT value FROM site_state").fetchall() == [("1",)]
    conn.close()


def test_a_full_disk_is_told_from_other_storage_errors():
    import errno
    import sqlite3

    from jobsite.db import out_of_space

    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(sqlite3.OperationalError("database or disk is full"))
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not out_of_space(sqlite3.OperationalError("no such table: jobs"))


async def test_closing_folds_the_write_ahead_log_into_the_database_file(tmp_path):
    path = tmp_path / "db.sqlite"
    db = await Database.open(path)
    onlooker = sqlite3.connect(path)  # another connection: SQLite's own checkpoint waits
    onlooker.execute("SELECT count(*) FROM users").fetchone()
    try:
        await db.execute("INSERT INTO users (username, created_at) VALUES ('last-write', 0)")
        await db.close()
        assert (tmp_path / "db.sqlite-wal").stat().st_size == 0
        copy = tmp_path / "copy.sqlite"
        copy.write_bytes(path.read_bytes())  # the file alone, as people copy it
        alone = sqlite3.connect(copy)
        assert alone.execute("SELECT username FROM users").fetchall() == [("last-write",)]
        alone.close()
    finally:
        onlooker.close()


async def test_a_lookup_by_key_is_answered_on_the_loop_and_sees_every_commit(tmp_path):
    database = await Database.open(tmp_path / "db.sqlite")
    held = []
    try:
        await database.execute(
            "INSERT INTO users (username, created_at) VALUES ('ann', 0), ('bob', 0)"
        )
        # every reader thread taken: a read that needs one would wait for good
        while not database._readers.empty():
            held.append(database._readers.get_nowait())
        find = "SELECT id, username FROM users WHERE username = ?"
        assert (await asyncio.wait_for(database.lookup(find, ("bob",)), 1))["username"] == "bob"
        assert await database.lookup(find, ("nobody",)) is None
        await database.execute("UPDATE users SET username = 'cy' WHERE username = 'bob'")
        assert await database.lookup(find, ("bob",)) is None  # the write just committed
        assert (await database.lookup(find, ("cy",)))["username"] == "cy"
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await database.lookup("SELECT * FROM missing WHERE id = ?", (1,))
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await database.lookup("DELETE FROM users WHERE id = ?", (1,))  # reads only
    finally:
        for conn in held:
            database._readers.put_nowait(conn)
        await database.close()


async def test_a_lookup_that_would_wait_for_a_lock_goes_to_a_reader_thread(tmp_path):
    database = await Database.open(tmp_path / "db.sqlite")
    other = tmp_path / "locked.sqlite"
    locker = sqlite3.connect(other, isolation_level=None)
    try:
        await database.execute("INSERT INTO users (username, created_at) VALUES ('ann', 0)")
        # the loop's connection swapped for one whose file another connection has locked
        # (a rollback journal, exclusive): SQLite answers "database is locked" at once
        locker.execute("CREATE TABLE users (id, username)")
        locker.execute("BEGIN EXCLUSIVE")
        database._quick.close()
        database._quick = sqlite3.connect(other, isolation_level=None, timeout=0)
        database._quick.row_factory = db_module._row_factory
        row = await database.lookup("SELECT username FROM users WHERE id = ?", (1,))
        assert row == {"username": "ann"}  # from db.sqlite, through a reader thread
        # and asked from another thread (with a loop of its own), where the loop's
        # connection may not be used, the lookup goes to a reader thread as well
        database._quick.close()
        database._quick = sqlite3.connect(":memory:", check_same_thread=False)  # no users
        row = await asyncio.to_thread(
            asyncio.run, database.lookup("SELECT username FROM users WHERE id = ?", (1,))
        )
        assert row == {"username": "ann"}
    finally:
        locker.close()
        await database.close()

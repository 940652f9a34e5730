"""SQLite state: one writer connection behind a lock, a small pool of readers.

SQLite allows one writer at a time. Rather than let several connections race for the
write lock (and meet "database is locked" under load), every write goes through a single
connection guarded by an asyncio lock, inside ``BEGIN IMMEDIATE`` so the lock is taken up
front. Reads use their own connections and, in WAL mode, never wait for the writer.
aiosqlite runs each connection in its own thread, so the event loop is never blocked.

One kind of read is answered on the event loop itself: a lookup by key (a session, a token,
a row by its id), which SQLite answers in tens of microseconds, less than the trip to a
thread and back costs a busy site. It uses a read-only connection of the loop's own that
never waits: if SQLite would make it wait for a lock (a checkpoint in progress), or the
lookup is asked from another thread, it goes to a reader thread like any other read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).with_name("schema.sql")
READERS = 4
BUSY_TIMEOUT_MS = 10_000

# SQL that takes a database from version N to N+1, keyed by N. schema.sql always holds the
# whole current schema; a migration is added here whenever schema.sql changes.
# hostile-http: jobs that failed before log lines had a field of their own carry them in
# their public status message ("...(exit code 3): line | line"): they move to log_excerpt
SPLIT_LOG_LINES = """
UPDATE jobs SET
    log_excerpt = replace(substr(status_message, instr(status_message, '): ') + 3), ' | ',
        char(10)),
    status_message = substr(status_message, 1, instr(status_message, '): '))
WHERE status_code = 'nonzero_exit'
    AND status_message LIKE 'Job exited with an error (exit code %): %';
UPDATE job_events SET status_message = substr(status_message, 1, instr(status_message, '): '))
WHERE status_code = 'nonzero_exit'
    AND status_message LIKE 'Job exited with an error (exit code %): %';
"""

MIGRATIONS: dict[int, str] = {
    1: """
-- hostile-http: server-side sessions, expiring API tokens, a failed job's log excerpt
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at REAL NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_created ON sessions (created_at);
ALTER TABLE api_tokens ADD COLUMN expires_at REAL;
ALTER TABLE jobs ADD COLUMN log_excerpt TEXT NOT NULL DEFAULT '';
"""
    + SPLIT_LOG_LINES
    + """
-- end hostile-http
-- researcher-jobs: each job's sampled CPU and memory use
ALTER TABLE jobs ADD COLUMN cpu_mean REAL;
ALTER TABLE jobs ADD COLUMN cpu_peak REAL;
ALTER TABLE jobs ADD COLUMN memory_mean_mb REAL;
ALTER TABLE jobs ADD COLUMN memory_peak_mb REAL;
-- researcher-requests: what was changed in a workspace, by whom
CREATE TABLE workspace_events (
    id INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
    user_id INTEGER REFERENCES users(id),
    kind TEXT NOT NULL,
    old_value TEXT NOT NULL,
    new_value TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX workspace_events_workspace ON workspace_events (workspace_id, id);
-- end researcher-requests
-- load: indexes the pages' reads use
CREATE INDEX job_requests_creator ON job_requests (created_by, id);
""",
}


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` says the disk is full (from the OS, or from SQLite writing)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error)


class DatabaseVersionError(Exception):
    """The database file was written by a newer jobsite than this one."""


def schema_version() -> int:
    for line in SCHEMA_PATH.read_text().splitlines():
        if line.strip().upper().startswith("PRAGMA USER_VERSION"):
            return int(line.split("=")[1].strip().rstrip(";"))
    raise RuntimeError("schema.sql does not set PRAGMA user_version")


Row = dict[str, Any]


def _row_factory(cursor: sqlite3.Cursor, row: tuple) -> Row:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


class Database:
    """The site's database. Open with ``await Database.open(path)``; close with ``close()``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []
        # the loop's own read-only connection for lookups by key, and its thread
        self._quick: sqlite3.Connection | None = None
        self._quick_thread = 0

    @classmethod
    async def open(cls, path: Path | str, readers: int = READERS) -> Database:
        db = cls(Path(path))
        try:
            db._writer = await db._connect()
            await db._writer.execute("PRAGMA journal_mode = WAL")
            await db._migrate()
            for _ in range(readers):
                db._readers.put_nowait(await db._connect(readonly=True))
            db._quick = sqlite3.connect(
                f"file:{db.path}?mode=ro", uri=True, isolation_level=None, timeout=0
            )
            db._quick.row_factory = _row_factory
            db._quick_thread = threading.get_ident()
        except BaseException:
            await db.close()
            raise
        return db

    async def _connect(self, readonly: bool = False) -> aiosqlite.Connection:
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        self._all.append(conn)
        conn.row_factory = _row_factory
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            await conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    async def _migrate(self) -> None:
        assert self._writer is not None
        current = schema_version()
        async with self._writer.execute("PRAGMA user_version") as cur:
            (found,) = (await cur.fetchone()).values()
        if found > current:
            raise DatabaseVersionError(
                f"{self.path} was made by a newer version of jobsite (schema version {found}; "
                f"this version understands up to {current}). Upgrade jobsite, or restore a "
                "backup taken with this version."
            )
        if found == current:
            return
        if found == 0:
            async with self._writer.execute("SELECT count(*) AS n FROM sqlite_master") as cur:
                (tables,) = (await cur.fetchone()).values()
            if tables:
                raise DatabaseVersionError(
                    f"{self.path} is not a jobsite database (it has tables but no schema "
                    "version). Point data_dir at an empty directory or a jobsite data dir."
                )
            script = SCHEMA_PATH.read_text()
        else:
            missing = [v for v in range(found, current) if v not in MIGRATIONS]
            if missing:
                raise DatabaseVersionError(
                    f"no migration from schema version {missing[0]} of {self.path}"
                )
            script = "".join(MIGRATIONS[v] for v in range(found, current))
            script += f"\nPRAGMA user_version = {current};"
        await self._writer.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")

    async def close(self) -> None:
        """Closes every connection. The writer goes last, after the last write, folding the
        write-ahead log into the database file first: people copy ``db.sqlite`` alone, and
        a copy without its ``-wal`` would lose the recent writes."""
        conns, self._all = self._all, []
        writer, self._writer = self._writer, None
        quick, self._quick = self._quick, None
        if quick is not None:
            quick.close()
        for conn in conns:
            if conn is not writer:
                await conn.close()
        if writer is None:
            return
        async with self._write_lock:
            try:
                await writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as e:
                # a statement still open on the writer (a task stopped part way): nothing is
                # lost, the -wal file stays beside db.sqlite and SQLite reads it when opened
                log.warning("could not fold %s-wal into the database at shutdown: %s", self.path, e)
            finally:
                await writer.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """The writer connection inside ``BEGIN IMMEDIATE``; commits, or rolls back on error."""
        assert self._writer is not None, "database is closed"
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            else:
                await self._writer.execute("COMMIT")

    async def execute(self, sql: str, params: Iterable[Any] | dict = ()) -> int:
        """Run one write statement in its own transaction; returns lastrowid."""
        async with self.transaction() as conn:
            cur = await conn.execute(sql, params)
            return cur.lastrowid or cur.rowcount

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            self._readers.put_nowait(conn)

    async def fetchall(self, sql: str, params: Iterable[Any] | dict = ()) -> list[Row]:
        # one trip to the reader's thread (a cursor's execute, fetch and close are three: on
        # a busy site each trip waits its turn on the event loop)
        async with self._reader() as conn:
            return list(await conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Iterable[Any] | dict = ()) -> Row | None:
        """The first row, for a query that matches one row or a few (by a key, or a count):
        the rows are fetched in the same trip as the query."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def lookup(self, sql: str, params: Iterable[Any] | dict = ()) -> Row | None:
        """The row of a lookup by key (a primary key or a unique index: one row at most),
        read on the event loop without a trip to a thread; in a reader thread if the read
        would have to wait."""
        quick = self._quick
        if quick is not None and threading.get_ident() == self._quick_thread:
            try:
                rows = quick.execute(sql, params).fetchall()  # to its end: no read left open
                return rows[0] if rows else None
            except sqlite3.OperationalError as e:
                if e.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
        return await self.fetchone(sql, params)

    async def fetchval(self, sql: str, params: Iterable[Any] | dict = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()))

    async def backup(self, dest: Path) -> None:
        """A consistent copy of the database at ``dest`` while the site keeps running."""
        async with self._reader() as conn:
            target = await aiosqlite.connect(dest)
            try:
                await conn.backup(target)
            finally:
                await target.close()

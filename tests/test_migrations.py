"""A database made by an earlier jobsite, migrated, has just what a new one has."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from jobsite.db import Database, schema_version

DATA = Path(__file__).with_name("data")


def shape(path: Path) -> dict[str, object]:
    """Every table's columns (name, type, not null, default, key; in any order: a migration
    adds them at the end) and every index's SQL."""
    conn = sqlite3.connect(path)
    try:
        found: dict[str, object] = {}
        for kind, name, sql in conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ):
            if kind == "table":
                found[name] = sorted(row[1:] for row in conn.execute(f"PRAGMA table_info({name})"))
            else:
                found[name] = " ".join((sql or "").split())
        found["user_version"] = conn.execute("PRAGMA user_version").fetchone()[0]
        return found
    finally:
        conn.close()


async def test_a_version_1_database_migrates_to_the_current_schema(tmp_path):
    old = tmp_path / "old.sqlite"
    conn = sqlite3.connect(old)
    conn.executescript((DATA / "schema-v1.sql").read_text())
    conn.execute("INSERT INTO users (username, password_hash, created_at) VALUES ('ann', 'x', 1)")
    conn.commit()
    conn.close()
    new = tmp_path / "new.sqlite"
    for path in (old, new):
        db = await Database.open(path)
        await db.close()

    assert shape(old) == shape(new)
    assert shape(old)["user_version"] == schema_version() > 1
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT username FROM users").fetchall() == [("ann",)]
    conn.close()

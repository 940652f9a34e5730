"""The check every hostile scenario ends with finds what it is there to find."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from helpers import serve

from jobsite.server import create_app


async def test_a_site_that_was_not_attacked_is_intact(client, intact):
    await intact.check(client)


async def test_a_file_written_beside_the_data_dir_is_found(client, intact, tmp_path):
    (tmp_path / "PWNED.csv").write_text("x")
    with pytest.raises(AssertionError, match="outside the data dir"):
        await intact.check(client)
    await intact.check(client, allowed=lambda path: path == "PWNED.csv")


async def test_a_damaged_database_is_found(client, intact, data_dir):
    conn = sqlite3.connect(data_dir / "db.sqlite")
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET rootpage = 999 WHERE name = 'jobs_request'")
    conn.commit()
    conn.close()
    assert intact.database_ok() != "ok"


def test_the_site_answers_on_loopback(settings):
    with serve(create_app(settings)) as (url, _loop):
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/api/v1/health").status_code == 200

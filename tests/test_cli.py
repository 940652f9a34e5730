"""The jobsite command: users, tokens, check, and the first start."""

from __future__ import annotations

import asyncio
import logging

import pytest
import uvicorn

from jobsite import auth, cli
from jobsite.db import Database


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("JOBSITE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_user_add_and_token_create(env, capsys):
    assert cli.main(["user", "add", "ada", "--admin", "--password", "s3cret-pw"]) == 0
    assert "Added admin ada." in capsys.readouterr().out
    assert cli.main(["user", "add", "ada"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["token", "create", "ada"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("jst_")
    assert cli.main(["token", "create", "nobody"]) == 1

    async def check() -> None:
        db = await Database.open(env / "db.sqlite")
        try:
            user = await auth.authenticate_token(db, token)
            assert user is not None and user.username == "ada" and user.is_admin
            stored = await db.fetchval("SELECT token_hash FROM api_tokens")
            assert token not in stored
            assert await auth.authenticate_password(db, "ada", "s3cret-pw") is not None
            assert await auth.authenticate_password(db, "ada", "wrong") is None
        finally:
            await db.close()

    asyncio.run(check())


def test_user_add_prints_a_password_when_none_given(env, capsys):
    assert cli.main(["user", "add", "bob", "--email", "bob@example.org"]) == 0
    out = capsys.readouterr().out
    assert "Password (shown only now):" in out


@pytest.fixture
def site_logger():
    """`jobsite serve` sets up the site's logger; put it back as it was for the next test."""
    site = logging.getLogger("jobsite")
    before = (list(site.handlers), site.level, site.propagate)
    yield site
    site.handlers[:], site.level, site.propagate = before


@pytest.fixture
def served(monkeypatch):
    """`jobsite serve` up to the point where uvicorn would serve: the apps it was given."""
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    return apps


def test_first_start_makes_an_admin_and_says_how_to_sign_in(env, capsys, site_logger, served):
    assert cli.main(["serve"]) == 0
    assert len(served) == 1
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8000/login" in out
    password = out.split("password: ")[1].split()[0]

    async def check() -> None:
        db = await Database.open(env / "db.sqlite")
        try:
            assert await auth.authenticate_password(db, "admin", password) is not None
        finally:
            await db.close()

    asyncio.run(check())
    assert cli.main(["serve"]) == 0
    assert capsys.readouterr().out == ""


def test_a_bad_setting_stops_the_command(env, monkeypatch, capsys):
    monkeypatch.setenv("JOBSITE_PORT", "eighty")
    assert cli.main(["user", "add", "x"]) == 2
    assert "port: expected int" in capsys.readouterr().err


def test_check(tmp_path, capsys):
    (tmp_path / "project.yaml").write_text(
        'version: "4"\nactions:\n  a:\n    run: python:v2 a.py\n'
        "    outputs:\n      moderately_sensitive:\n        t: output/t.csv\n"
    )
    assert cli.main(["check", "--project-dir", str(tmp_path)]) == 0
    assert "Valid project.yaml" in capsys.readouterr().out
    (tmp_path / "project.yaml").write_text("actions: [\n")
    assert cli.main(["check", "--project-dir", str(tmp_path)]) == 1
    assert "is not valid" in capsys.readouterr().err
    assert cli.main(["check", "--project-dir", str(tmp_path / "nowhere")]) == 1


def test_serve_logs_the_sites_own_lines_on_stderr(capsys, site_logger):
    cli.configure_logging()
    logging.getLogger("jobsite.runner").info("job=abc status=succeeded")
    assert "jobsite.runner: job=abc status=succeeded" in capsys.readouterr().err

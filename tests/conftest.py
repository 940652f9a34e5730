"""Fixtures for every test: a temp data dir, real git repos, the app over ASGI, Docker."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from jobsite import auth
from jobsite.config import Settings, load_settings
from jobsite.server import create_app

REQUIRE_DOCKER = os.environ.get("JOBSITE_REQUIRE_DOCKER") == "1"


def _docker_client() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception:
        return None


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The Docker engine, with the test images built. Skips (or fails when
    JOBSITE_REQUIRE_DOCKER=1) when no engine answers."""
    client = _docker_client()
    if client is None:
        if REQUIRE_DOCKER:
            pytest.fail("JOBSITE_REQUIRE_DOCKER=1 but no Docker engine answers")
        pytest.skip("no Docker engine answers (set JOBSITE_REQUIRE_DOCKER=1 to fail instead)")
    from images import build_test_images

    build_test_images(client)
    yield client
    client.close()


@pytest.fixture
def docker_cleanup(docker_client: docker.DockerClient, settings: Settings) -> Iterator[None]:
    """Removes every container labelled for this test's site when the test ends."""
    yield
    for container in docker_client.containers.list(
        all=True, filters={"label": f"jobsite={settings.site_id}"}
    ):
        container.remove(force=True)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def repos_dir(tmp_path: Path) -> Path:
    path = tmp_path / "repos"
    path.mkdir()
    return path


@pytest.fixture
def settings(data_dir: Path, repos_dir: Path) -> Settings:
    return load_settings(
        environ={},
        data_dir=str(data_dir),
        repos={"allow": [f"{repos_dir}/*"]},
        max_workers=2,
        job_memory="256M",
        job_cpus=1,
    )


class GitRepo:
    """A real git repository made by a test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = str(path)

    def git(self, *args: str) -> str:
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }
        return subprocess.run(
            ["git", "-C", str(self.path), *args],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip()

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        for name, content in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self.git("add", "-A")
        self.git("commit", "--quiet", "-m", message)
        return self.git("rev-parse", "HEAD")

    def branch(self, name: str) -> None:
        self.git("checkout", "--quiet", "-B", name)


@pytest.fixture
def make_repo(repos_dir: Path):
    def make(files: dict[str, str], name: str = "study", branch: str = "main") -> GitRepo:
        path = repos_dir / name
        path.mkdir()
        repo = GitRepo(path)
        repo.git("init", "--quiet", "-b", branch)
        repo.commit(files, "first commit")
        return repo

    return make


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
def make_user(app: Any):
    """Creates a user; returns the headers that authenticate as them on the API."""

    async def make(username: str, *, admin: bool = False, password: str = "pw-1234567") -> dict:
        user_id = await auth.create_user(app.state.db, username, password, is_admin=admin)
        token = await auth.create_token(app.state.db, user_id, "test")
        return {"Authorization": f"Bearer {token}"}

    return make

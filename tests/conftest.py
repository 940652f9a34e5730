"""Fixtures for every test: a temp data dir, real git repos, the app over ASGI, Docker, and
what a test needs that may be missing here (Docker, chromium, the corpus)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import uvicorn
from helpers import Browser, FakeGitHub, GitRepo, Intact, wait_until

from jobsite import auth
from jobsite.config import Settings, load_settings
from jobsite.server import create_app

# Set by CI (.ci/run) so that a missing requirement fails the tests that need it instead of
# skipping them. Read here and taken out of the environment: the site's settings loader, and
# any server a test starts, never see them.
REQUIRED = {
    name: os.environ.pop(name, "") == "1"
    for name in ("JOBSITE_REQUIRE_DOCKER", "JOBSITE_REQUIRE_CORPUS")
}
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "project-yaml"


@pytest.fixture(scope="session")
def missing():
    """``missing(variable, what)`` ends a test whose requirement ``what`` is missing: a skip
    that says so, or a failure when ``variable`` (JOBSITE_REQUIRE_...) was set to 1."""

    def stop(variable: str, what: str) -> None:
        if REQUIRED[variable]:
            pytest.fail(f"{variable}=1 but {what}")
        pytest.skip(f"{what} (set {variable}=1 to fail instead)")

    return stop


@pytest.fixture(scope="session")
def corpus(missing) -> Path:
    """The shared corpus of real project.yaml files, beside the project (as in CI)."""
    if not CORPUS.is_dir():
        missing(
            "JOBSITE_REQUIRE_CORPUS",
            f"the shared corpus is not here: expected it at {CORPUS} (../shared/corpus "
            "beside the repository)",
        )
    return CORPUS


def _docker_client() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception:
        return None


@pytest.fixture(scope="session")
def docker_client(missing) -> Iterator[docker.DockerClient]:
    """The Docker engine, with the test images built. Skips (or fails when
    JOBSITE_REQUIRE_DOCKER=1) when no engine answers."""
    client = _docker_client()
    if client is None:
        missing("JOBSITE_REQUIRE_DOCKER", "no Docker engine answers")
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
        # every page fetches, so that a test's commit shows at once
        repos={"allow": [f"{repos_dir}/*"], "fetch_interval": 0},
        max_workers=2,
        job_memory="256M",
        job_cpus=1,
    )


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


@pytest.fixture
def intact(tmp_path: Path, data_dir: Path) -> Intact:
    """Notes the files around the data dir before a hostile scenario; ``await
    intact.check(client)`` afterwards asserts the site survived it (see helpers.Intact)."""
    return Intact(tmp_path, data_dir)


@pytest.fixture
def fake_github() -> Iterator[FakeGitHub]:
    """A fake GitHub (helpers.FakeGitHub) served by uvicorn on loopback."""
    fake = FakeGitHub()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(fake.app(), lifespan="off", ws="none", log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 15, "the fake GitHub to start")
    yield fake
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
async def browser(app: Any):
    """Makes a browser session; signed in as ``username`` (created on first use) unless None."""
    clients: list[httpx.AsyncClient] = []

    async def make(username: str | None = None, *, admin: bool = False) -> Browser:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        clients.append(client)
        session = Browser(client)
        if username is not None:
            if not await app.state.db.fetchone(
                "SELECT 1 FROM users WHERE username = ?", (username,)
            ):
                await auth.create_user(app.state.db, username, "pw-1234567", is_admin=admin)
            await session.get("/login")
            response = await session.post(
                "/login", {"username": username, "password": "pw-1234567"}
            )
            assert response.status_code == 303, response.text
            await session.get("/")  # signing in starts a new session with a new CSRF token
        return session

    yield make
    for client in clients:
        await client.aclose()

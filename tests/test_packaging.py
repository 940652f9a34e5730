"""The wheel: one top-level name, the files the site needs at run time, and a `jobsite serve`
that works from the installed wheel alone, in any folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # built from a copy: setuptools leaves a build/ folder in the tree it builds, and reuses
    # it, so a module deleted from the checkout could still ship
    source = tmp_path_factory.mktemp("source") / "jobsite"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "data", "*.egg-info", "__pycache__"
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (path,) = out.glob("jobsite-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("target")
    pip_install = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet"]
    subprocess.run(
        [*pip_install, "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def test_the_wheel_holds_one_package_with_its_templates_static_files_and_schema(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"jobsite", wheel.name.split("-py3")[0] + ".dist-info"}, sorted(top)
    for required in ("jobsite/__init__.py", "jobsite/cli.py", "jobsite/schema.sql"):
        assert required in names
    for folder, files in (
        ("templates", (ROOT / "templates").glob("*.html")),
        ("static", (ROOT / "static").iterdir()),
        ("views", (ROOT / "views").glob("*.py")),
    ):
        expected = sorted(f"jobsite/{folder}/{path.name}" for path in files)
        assert expected, folder
        assert sorted(n for n in names if n.startswith(f"jobsite/{folder}/")) == expected
    assert not [n for n in names if n.startswith(("jobsite/tests/", "jobsite/bench/"))]


@pytest.fixture
def elsewhere(tmp_path: Path, installed: Path) -> tuple[Path, dict[str, str]]:
    """A folder that is not this checkout, and an environment that finds only the wheel's
    copy of jobsite."""
    cwd = tmp_path / "somewhere-else"
    cwd.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(installed),
        "JOBSITE_DATA_DIR": str(tmp_path / "data"),
        "JOBSITE_PORT": str(free_port()),
    }
    return cwd, env


def test_the_installed_wheel_is_the_jobsite_that_is_imported(installed, elsewhere):
    cwd, env = elsewhere
    found = subprocess.run(
        [sys.executable, "-c", "import jobsite; print(jobsite.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found).is_relative_to(installed), found


@pytest.fixture
def served(installed, elsewhere, tmp_path) -> Iterator[str]:
    """`jobsite serve` (the wheel's console script) running in another folder; its URL."""
    cwd, env = elsewhere
    output = tmp_path / "serve.log"
    with output.open("w") as log:
        server = subprocess.Popen(
            [str(installed / "bin" / "jobsite"), "serve"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{env['JOBSITE_PORT']}"

    def answers() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"jobsite serve exited:\n{output.read_text()}")
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, 30, f"jobsite serve to answer at {url}")
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_jobsite_serve_from_the_wheel_serves_its_pages_and_static_files(served):
    login = httpx.get(f"{served}/login")
    assert login.status_code == 200
    assert "<form" in login.text
    for name in ("jobsite.css", "jobsite.js"):
        response = httpx.get(f"{served}/static/{name}")
        assert response.status_code == 200, name
        assert response.content == (ROOT / "static" / name).read_bytes()

"""Hostile jobs and containers: what a study's committed files and a job's own files can do
to the machine. Each scenario runs through the real site, with a real git repo and real
containers, and ends with the intact check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import GitRepo, submit, wait_for_request

pytestmark = pytest.mark.usefixtures("docker_cleanup")

TWO_ACTIONS = """\
version: "4"
actions:
  make_x:
    run: python:v2 -c "mkdir -p out && echo 'n,total' > out/x.csv"
    outputs:
      moderately_sensitive:
        x: out/x.csv
  use_x:
    run: python:v2 -c "mkdir -p used && cat out/x.csv > used/x.csv"
    needs: [make_x]
    outputs:
      moderately_sensitive:
        used: used/x.csv
"""


def commit_links(repo: GitRepo, links: dict[str, str], message: str = "links") -> str:
    """Commits symbolic links (path in the repo -> link text)."""
    for name, target in links.items():
        path = repo.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
    repo.git("add", "-A")
    repo.git("commit", "--quiet", "-m", message)
    return repo.git("rev-parse", "HEAD")


async def run_actions(client, headers, actions: list[str]) -> dict[str, dict]:
    """Runs ``actions`` in workspace ws1; action -> its job as the API shows it."""
    request = await wait_for_request(client, headers, await submit(client, headers, actions))
    return {job["action"]: job for job in request["jobs"]}


@pytest.fixture
async def alice(client, make_user):
    return await make_user("alice")


@pytest.fixture
async def study(client, alice, make_repo):
    from helpers import setup_workspace

    repo = make_repo({"project.yaml": TWO_ACTIONS})
    await setup_workspace(client, alice, repo)
    return repo


def made_by_test(path: str) -> bool:
    """The study repo's own files, which the test commits after the intact snapshot."""
    return path.startswith("repos/study")


def landed(settings, rel: str) -> Path:
    return settings.data.workspace("ws1") / rel


@pytest.mark.parametrize(
    "links",
    [
        pytest.param({"out/x.csv": "../q/y/../../PWNED.csv", "q/y": ".."}, id="chain"),
        pytest.param({"out/x.csv": "{data}/PWNED.csv"}, id="absolute"),
        pytest.param({"out": "{data}"}, id="linked-dir"),
        pytest.param({"out": "/etc"}, id="dir-to-etc"),
        pytest.param({"out/x.csv": "/etc/passwd"}, id="file-to-etc"),
    ],
)
async def test_committed_links_do_not_carry_inputs_out_of_the_job(
    client, settings, alice, study, intact, links
):
    jobs = await run_actions(client, alice, ["make_x"])
    assert jobs["make_x"]["status_code"] == "succeeded", jobs
    data = str(settings.data_dir)
    commit_links(study, {name: target.format(data=data) for name, target in links.items()})
    passwd = Path("/etc/passwd").read_bytes()

    jobs = await run_actions(client, alice, ["use_x"])

    assert jobs["use_x"]["status_code"] == "succeeded", jobs
    assert landed(settings, "used/x.csv").read_text() == "n,total\n"
    assert not (settings.data_dir / "PWNED.csv").exists()
    assert not Path("/etc/x.csv").exists()
    assert Path("/etc/passwd").read_bytes() == passwd
    await intact.check(client, allowed=made_by_test)

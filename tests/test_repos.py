"""Git mirrors: fetch, branches, files at a commit, tree export, and clear errors."""

from __future__ import annotations

import pytest

from jobsite.repos import (
    BranchNotFound,
    FileNotFound,
    RepoNotAllowed,
    Repos,
    RepoUnreachable,
    check_allowed,
)


@pytest.fixture
def repos(tmp_path):
    return Repos(tmp_path / "mirrors", timeout=30, fetch_interval=0)


async def test_branch_head_file_and_export(repos, make_repo, tmp_path):
    repo = make_repo({"project.yaml": "version: 4\n", "analysis/a.py": "print(1)\n"})
    first = repo.git("rev-parse", "HEAD")
    assert await repos.resolve_branch(repo.url, "main") == first
    assert await repos.read_file(repo.url, first, "project.yaml") == "version: 4\n"

    second = repo.commit({"analysis/a.py": "print(2)\n"})
    repo.branch("dev")
    repo.commit({"dev.txt": "x"})
    assert await repos.resolve_branch(repo.url, "main") == second
    assert await repos.branches(repo.url) == ["dev", "main"]

    dest = tmp_path / "export"
    dest.mkdir()
    await repos.export_tree(repo.url, first, dest)
    assert (dest / "analysis/a.py").read_text() == "print(1)\n"
    assert sorted(p.name for p in dest.iterdir()) == ["analysis", "project.yaml"]
    assert len(list((tmp_path / "mirrors").glob("*.git"))) == 1


async def test_unknown_branch_names_the_branches_there(repos, make_repo):
    repo = make_repo({"project.yaml": "x"})
    with pytest.raises(BranchNotFound, match=r"branch 'nope' not found .* \(branches: main\)"):
        await repos.resolve_branch(repo.url, "nope")


async def test_unreachable_repo(repos, tmp_path):
    with pytest.raises(RepoUnreachable, match="could not clone"):
        await repos.resolve_branch(str(tmp_path / "no-such-repo"), "main")
    assert not list((tmp_path / "mirrors").glob("*.git"))


async def test_missing_file(repos, make_repo):
    repo = make_repo({"README.md": "x"})
    sha = await repos.resolve_branch(repo.url, "main")
    with pytest.raises(FileNotFound, match=r"project\.yaml not found"):
        await repos.read_file(repo.url, sha, "project.yaml")


def test_allow_list():
    check_allowed("https://github.com/opensafely/study", ["https://github.com/opensafely/*"])
    with pytest.raises(RepoNotAllowed, match=r"repos\.allow"):
        check_allowed("https://evil.example/x", ["https://github.com/opensafely/*"])
    with pytest.raises(RepoNotAllowed):
        check_allowed("/srv/repos/x", [])

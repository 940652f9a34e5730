"""Git mirrors: fetch, branches, files at a commit, tree export, and clear errors."""

from __future__ import annotations

import subprocess

import pytest

from jobsite.repos import (
    BranchNotFound,
    ChangedFile,
    CommitNotFound,
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


async def test_a_commit_of_the_branch_is_found_by_its_sha_or_a_prefix(repos, make_repo):
    repo = make_repo({"project.yaml": "version: 4\n"})
    first = repo.git("rev-parse", "HEAD")
    second = repo.commit({"a.txt": "a"})
    assert await repos.resolve_commit(repo.url, "main", first) == first
    assert await repos.resolve_commit(repo.url, "main", second[:7].upper()) == second

    repo.branch("dev")
    elsewhere = repo.commit({"dev.txt": "x"})
    with pytest.raises(CommitNotFound, match=f"commit {elsewhere[:7]} is not on branch main"):
        await repos.resolve_commit(repo.url, "main", elsewhere)
    assert await repos.resolve_commit(repo.url, "dev", elsewhere) == elsewhere
    with pytest.raises(CommitNotFound, match="is not in"):
        await repos.resolve_commit(repo.url, "main", "deadbeef" * 5)
    for hostile in ("--output=/tmp/x", "HEAD~1", "main", "abc", ""):
        with pytest.raises(CommitNotFound, match="is not a commit id"):
            await repos.resolve_commit(repo.url, "main", hostile)


async def test_an_ambiguous_prefix_asks_for_more_of_the_sha(repos, make_repo):
    repo = make_repo({"project.yaml": "version: 4\n"})
    # 1,500 commits on a branch (in one git process): two of them share a four-digit prefix
    stream = "".join(
        f"commit refs/heads/many\ncommitter T <t@example.com> {1_700_000_000 + n} +0000\n"
        f"data {len(str(n))}\n{n}\n"
        for n in range(1500)
    )
    subprocess.run(
        ["git", "-C", str(repo.path), "fast-import", "--quiet"],
        input=stream,
        text=True,
        check=True,
    )
    seen: dict[str, str] = {}
    for sha in repo.git("rev-list", "many").split():
        if sha[:4] in seen:
            break
        seen[sha[:4]] = sha
    with pytest.raises(CommitNotFound, match="is ambiguous"):
        await repos.resolve_commit(repo.url, "many", sha[:4])
    assert await repos.resolve_commit(repo.url, "many", sha[:12]) == sha


async def test_files_changed_between_two_commits(repos, make_repo):
    repo = make_repo({"project.yaml": "version: 4\n", "a.py": "1\n", "gone.txt": "x\n"})
    first = repo.git("rev-parse", "HEAD")
    repo.git("mv", "a.py", "b.py")
    (repo.path / "gone.txt").unlink()
    second = repo.commit({"project.yaml": "version: 5\n", "new dir/n\u00e9w.txt": "n\n"})
    await repos.fetch(repo.url)
    changes = await repos.changed_files(repo.url, first, second, 100)
    assert changes.total == 4
    assert sorted(changes.files, key=lambda c: c.path) == [
        ChangedFile("R", "b.py", "a.py"),
        ChangedFile("D", "gone.txt"),
        ChangedFile("A", "new dir/n\u00e9w.txt"),
        ChangedFile("M", "project.yaml"),
    ]
    cut = await repos.changed_files(repo.url, first, second, limit=2)
    assert len(cut.files) == 2 and cut.total == 4
    assert (await repos.changed_files(repo.url, second, second, 100)).total == 0

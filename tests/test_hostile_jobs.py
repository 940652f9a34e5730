"""Hostile jobs and containers: what a study's committed files and a job's own files can do
to the machine. Each scenario runs through the real site, with a real git repo and real
containers, and ends with the intact check."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from helpers import GitRepo, submit, wait_for_request

from jobsite import jobdir

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


def archive(members: list[tuple[tarfile.TarInfo, bytes]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, content in members:
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content else None)
    buf.seek(0)
    return buf


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info


def test_an_archive_writes_only_files_dirs_and_links_inside_its_dir(tmp_path):
    dest = tmp_path / "job"
    dest.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("kept\n")
    jobdir.extract_archive(
        archive(
            [
                (member("a/", tarfile.DIRTYPE), b""),
                (member("a/run.sh"), b"echo hi\n"),
                (member("up", tarfile.SYMTYPE, ".."), b""),
                (member("hard", tarfile.LNKTYPE, "a/run.sh"), b""),
                (member("fifo", tarfile.FIFOTYPE), b""),
                (member("dev", tarfile.CHRTYPE), b""),
            ]
        ),
        dest,
    )
    assert sorted(os.listdir(dest)) == ["a", "up"]
    assert os.readlink(dest / "up") == ".."
    assert (dest / "a" / "run.sh").read_text() == "echo hi\n"
    assert outside.read_text() == "kept\n"


@pytest.mark.parametrize(
    "members, why",
    [
        ([("up", tarfile.SYMTYPE, ".."), ("up/outside.txt", tarfile.REGTYPE, "")], "up is a"),
        ([("../outside.txt", tarfile.REGTYPE, "")], "not a plain relative path"),
        ([("/tmp/x.txt", tarfile.REGTYPE, "")], "not a plain relative path"),
        ([("a.txt", tarfile.REGTYPE, ""), ("a.txt", tarfile.REGTYPE, "")], "appears twice"),
    ],
)
def test_an_archive_placing_a_file_through_a_link_or_outside_is_refused(tmp_path, members, why):
    dest = tmp_path / "job"
    dest.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("kept\n")
    with pytest.raises(jobdir.UnsafePath, match=why):
        jobdir.extract_archive(
            archive(
                [(member(name, kind, link), b"" if link else b"x") for name, kind, link in members]
            ),
            dest,
        )
    assert outside.read_text() == "kept\n"


def test_an_input_over_a_real_directory_is_refused(tmp_path):
    source = tmp_path / "x.csv"
    source.write_text("n\n")
    (tmp_path / "job" / "out" / "x.csv").mkdir(parents=True)
    with pytest.raises(jobdir.UnsafePath, match=r"out/x\.csv is a directory"):
        jobdir.copy_in(source, tmp_path / "job", "out/x.csv")


TRAPS = """\
version: "4"
actions:
  trap:
    run: >-
      python:v2 -c "mkdir -p output locked/inner readonly &&
      echo n > output/a.csv && echo x > locked/inner/f && echo y > readonly/f &&
      chmod 000 locked/inner locked && chmod 500 readonly &&
      i=0; while [ $i -lt 1200 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done;
      echo leaf > leaf && cd /workspace && chmod 000 ."
    outputs:
      moderately_sensitive:
        a: output/a.csv
"""


async def test_unreadable_and_deep_trees_do_not_outlive_the_job(
    client, settings, alice, make_repo, intact
):
    from helpers import setup_workspace, until

    await setup_workspace(client, alice, make_repo({"project.yaml": TRAPS}))
    jobs = await run_actions(client, alice, ["trap"])
    assert jobs["trap"]["status_code"] == "succeeded", jobs
    job_dir = settings.data.job_dir(jobs["trap"]["id"])
    await until(lambda: not job_dir.exists(), 30, "the job's dir to be removed")
    assert landed(settings, "output/a.csv").read_text() == "n\n"
    await intact.check(client, allowed=made_by_test)


def build_traps(root: Path) -> None:
    """What a job can leave behind, made by whoever runs this."""
    (root / "locked" / "inner").mkdir(parents=True)
    (root / "locked" / "inner" / "f").write_text("x")
    (root / "readonly").mkdir()
    (root / "readonly" / "f").write_text("y")
    os.symlink("/etc", root / "etc")
    os.symlink("..", root / "up")
    os.chmod(root / "locked" / "inner", 0)
    os.chmod(root / "locked", 0)
    os.chmod(root / "readonly", 0o500)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    os.chmod(root, 0)


def test_clean_up_as_the_job_s_own_user_removes_what_it_could_not_read(tmp_path):
    """A site not run as root runs jobs as its own user, so permissions bind it: the
    removal runs in a child process that is that user, with no privileges."""
    if os.getuid() == 0:
        home = Path(tempfile.mkdtemp())  # /tmp: a directory the unprivileged user can reach
        os.chown(home, 65534, 65534)
    else:
        home = tmp_path
    root = home / "job"
    pid = os.fork()
    if pid == 0:  # the child: drop to the job's user, make the traps, remove them
        code = 3
        try:
            if os.getuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            root.mkdir()
            build_traps(root)
            jobdir.remove_tree(root)
            code = 1 if os.path.lexists(root) else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert not os.path.lexists(root)
        assert Path("/etc/passwd").exists()
    finally:
        if home != tmp_path:
            jobdir.remove_tree(home)

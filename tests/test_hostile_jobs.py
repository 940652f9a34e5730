"""Hostile jobs and containers: what a study's committed files and a job's own files can do
to the machine. Each scenario runs through the real site, with a real git repo and real
containers, and ends with the intact check."""

from __future__ import annotations

import glob
import io
import os
import re
import socket
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest
from helpers import GitRepo, setup_workspace, submit, until, wait_for_request

from jobsite import jobdir, ops
from jobsite.config import load_settings
from jobsite.repos import Repos, RepoUnreachable

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


@pytest.fixture
def settings(data_dir, repos_dir):
    """The test site, with small limits for a job's disk, outputs and log."""
    return load_settings(
        environ={},
        data_dir=str(data_dir),
        repos={"allow": [f"{repos_dir}/*"]},
        max_workers=2,
        job_memory="256M",
        job_cpus=1,
        job_disk="32M",
        max_output_files=20,
        max_output_size="8M",
        log_limit="1M",
    )


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


async def test_a_committed_directory_where_an_input_goes_fails_clearly(
    client, settings, alice, study, intact
):
    jobs = await run_actions(client, alice, ["make_x"])
    assert jobs["make_x"]["status_code"] == "succeeded", jobs
    study.commit({"out/x.csv/readme.txt": "a directory, not a table\n"})

    jobs = await run_actions(client, alice, ["use_x"])

    job = jobs["use_x"]
    assert job["state"] == "failed", job
    assert "out/x.csv is a directory, where a file is needed" in job["status_message"]
    assert "change the repo" in job["status_message"]
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
    """A site not run as root runs jobs as its own user, so permissions bind it: here the
    traps are made and removed as an unprivileged user (the effective uid, when root)."""
    root_user = os.geteuid() == 0
    home = Path(tempfile.mkdtemp()) if root_user else tmp_path  # reachable by that user
    if root_user:
        os.chown(home, 65534, 65534)
    root = home / "job"
    try:
        if root_user:
            os.setegid(65534)
            os.seteuid(65534)
        try:
            root.mkdir()
            build_traps(root)
            jobdir.remove_tree(root)
        finally:
            if root_user:
                os.seteuid(0)
                os.setegid(0)
        assert not os.path.lexists(root)
        assert Path("/etc/passwd").exists()
    finally:
        if root_user:
            jobdir.remove_tree(home)


def test_removing_a_link_or_nothing_leaves_what_it_points_to(tmp_path):
    target = tmp_path / "kept"
    target.mkdir()
    (target / "f").write_text("x")
    os.symlink(target, tmp_path / "link")
    jobdir.remove_tree(tmp_path / "link")
    jobdir.remove_tree(tmp_path / "never-made")
    assert not os.path.lexists(tmp_path / "link")
    assert (target / "f").read_text() == "x"


def test_a_local_checkout_is_copied_with_links_as_links_and_nothing_else(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "analysis").mkdir(parents=True)
    (checkout / "analysis" / "run.sh").write_text("echo hi\n")
    os.chmod(checkout / "analysis" / "run.sh", 0o755)
    os.symlink("../../outside.txt", checkout / "analysis" / "up.txt")
    os.mkfifo(checkout / "fifo")
    dest = tmp_path / "job"
    dest.mkdir()
    files = ("analysis/run.sh", "analysis/up.txt", "fifo", "deleted-since.txt")
    jobdir.copy_files(checkout, files, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "analysis",
        "analysis/run.sh",
        "analysis/up.txt",
    ]
    assert os.readlink(dest / "analysis" / "up.txt") == "../../outside.txt"
    assert os.stat(dest / "analysis" / "run.sh").st_mode & 0o777 == 0o755


LIMITS = """\
version: "4"
actions:
  fill:
    run: python:v2 -c "dd if=/dev/zero of=big.csv bs=1M count=48 && sleep 600"
    outputs:
      moderately_sensitive:
        a: big.csv
  files:
    run: python:v2 -c "mkdir -p empty && cd empty && seq 3000 | xargs touch && sleep 600"
    outputs:
      moderately_sensitive:
        a: empty/1.csv
  many:
    run: python:v2 -c "mkdir -p out/many && for i in $(seq 30); do echo n > out/many/$i.csv; done"
    outputs:
      moderately_sensitive:
        tables: out/many/*.csv
  large:
    run: >-
      python:v2 -c "mkdir -p out/large && dd if=/dev/urandom of=out/large/a.csv bs=1M count=5 &&
      dd if=/dev/urandom of=out/large/b.csv bs=1M count=5"
    outputs:
      moderately_sensitive:
        tables: out/large/*.csv
  sparse:
    run: python:v2 -c "mkdir -p out/sparse && truncate -s 100G out/sparse/huge.csv"
    outputs:
      moderately_sensitive:
        tables: out/sparse/*.csv
  holes:
    run: python:v2 -c "mkdir out && echo n > out/h.csv && truncate -s 6M out/h.csv"
    outputs:
      moderately_sensitive:
        table: out/h.csv
  outside:
    run: >-
      python:v2 -c "(echo x > /evil) 2>/dev/null && echo ROOT_WRITABLE_$((6*7));
      dd if=/dev/zero of=/tmp/fill bs=1M count=400 2>/dev/null;
      echo in-tmp=$(du -sm /tmp | cut -f1); echo n > outside.csv"
    outputs:
      moderately_sensitive:
        a: outside.csv
  chatty:
    run: >-
      python:v2 -c "yes 0123456789012345678901234567890123456789 | head -c 30000000;
      touch said-it-all.txt; sleep 600"
    outputs:
      moderately_sensitive:
        a: said-it-all.txt
"""


@pytest.fixture
async def limits(client, alice, make_repo):
    await setup_workspace(client, alice, make_repo({"project.yaml": LIMITS}))


@pytest.mark.parametrize("action", ["fill", "files"])  # bytes; empty files using up inodes
async def test_a_job_writing_past_job_disk_is_stopped_and_fails_clearly(
    client, settings, alice, limits, intact, action
):
    jobs = await run_actions(client, alice, [action])
    job = jobs[action]
    assert job["status_code"] == "out_of_disk", job
    assert "more than this site's limit of 32 MiB per job (job_disk)" in job["status_message"]
    assert "stopped" in job["status_message"]
    await intact.check(client, allowed=made_by_test)


@pytest.mark.parametrize(
    "action, found",
    [
        pytest.param("many", "matched 30 files, more than this site's limit of 20", id="count"),
        pytest.param("large", "add up to 10 MiB", id="size"),
        pytest.param("sparse", "add up to 100 GiB", id="sparse"),
    ],
)
async def test_outputs_over_the_site_s_limits_fail_the_job_and_change_nothing(
    client, settings, alice, limits, intact, action, found
):
    jobs = await run_actions(client, alice, [action])
    job = jobs[action]
    assert job["status_code"] == "too_much_output", job
    assert found in job["status_message"]
    limit = "max_output_files" if action == "many" else "max_output_size"
    assert limit in job["status_message"]
    assert not landed(settings, f"out/{action}").exists()
    await intact.check(client, allowed=made_by_test)


async def test_a_sparse_output_lands_sparse(client, settings, alice, limits, intact):
    jobs = await run_actions(client, alice, ["holes"])
    assert jobs["holes"]["status_code"] == "succeeded", jobs
    landed_file = landed(settings, "out/h.csv")
    with landed_file.open("rb") as f:
        assert f.read(2) == b"n\n"
    assert landed_file.stat().st_size == 6 * 1024**2
    assert landed_file.stat().st_blocks * 512 <= 2 * 1024**2  # the chunk holding "n"
    await intact.check(client, allowed=made_by_test)


async def test_a_job_cannot_write_outside_its_dir_and_tmp_is_bounded(
    client, settings, alice, limits, intact
):
    jobs = await run_actions(client, alice, ["outside"])
    job = jobs["outside"]
    log = (await client.get(f"/api/v1/jobs/{job['id']}/log", headers=alice)).text
    assert "ROOT_WRITABLE_42" not in log
    if job["status_code"] != "out_of_memory":  # /tmp's pages count against job_memory
        assert job["status_code"] == "succeeded", job
        (in_tmp,) = re.findall(r"in-tmp=(\d+)", log)
        assert int(in_tmp) <= 256
    await intact.check(client, allowed=made_by_test)


async def test_the_engine_s_own_copy_of_a_chatty_log_is_bounded(
    client, settings, alice, limits, intact, docker_client
):
    request_id = await submit(client, alice, ["chatty"])

    async def running_job():
        data = (await client.get(f"/api/v1/job-requests/{request_id}", headers=alice)).json()
        (job,) = data["jobs"]
        return job if job["status_code"] == "executing" else None

    job = await until(running_job, 30, "the chatty job to run")
    await until(
        lambda: settings.data.job_dir(job["id"]).joinpath("said-it-all.txt").exists(),
        60,
        "the job to write its 30 MB of log",
    )
    container = docker_client.containers.get(f"jobsite-{job['id']}")
    config = container.attrs["HostConfig"]["LogConfig"]
    engine_log = engine_log_size(container.attrs["LogPath"])
    await client.post(f"/api/v1/job-requests/{request_id}/cancel", json={}, headers=alice)
    await wait_for_request(client, alice, request_id)

    assert config == {"Type": "json-file", "Config": {"max-file": "2", "max-size": "1048576"}}
    assert engine_log <= 2 * 1024**2 + 64 * 1024
    site_log = (await client.get(f"/api/v1/jobs/{job['id']}/log", headers=alice)).text
    assert "bytes of log left out" in site_log
    await intact.check(client, allowed=made_by_test)


def engine_log_size(path: str) -> int:
    """The bytes of Docker's own log of a container, its rotated files too: read again when
    a file went away between listing and measuring it (the engine was rotating it)."""
    for _ in range(20):
        try:
            return sum(os.path.getsize(p) for p in glob.glob(path + "*"))
        except FileNotFoundError:
            continue
    raise AssertionError(f"{path}: the engine kept rotating its log while it was measured")


@pytest.fixture
def silent_remote():
    """A git:// URL on loopback whose server accepts and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"git://127.0.0.1:{server.getsockname()[1]}/study.git"
    server.close()
    for conn in accepted:
        conn.close()


async def test_a_clone_that_times_out_leaves_nothing_behind(
    client, settings, silent_remote, intact
):
    root = settings.data_dir / "repos"
    with pytest.raises(RepoUnreachable, match="took longer than 1s"):
        await Repos(root, timeout=1).fetch(silent_remote)
    assert os.listdir(root) == []
    await intact.check(client)


DEBIAN_PYTHON = Path("/usr/bin/python3.11")


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="no Debian system Python 3.11 here")
def test_the_checkout_is_written_by_debian_s_python_without_tarfile_filters(tmp_path, make_repo):
    """Debian 12's Python 3.11.2 has no tarfile extraction filters; jobsite needs none."""
    repo = make_repo({"project.yaml": TWO_ACTIONS})
    commit_links(repo, {"out/x.csv": "../q/y/../../PWNED.csv", "q/y": ".."})
    archive_file = tmp_path / "tree.tar"
    with archive_file.open("wb") as out:
        subprocess.run(["git", "-C", str(repo.path), "archive", "HEAD"], stdout=out, check=True)
    (tmp_path / "path").mkdir()
    os.symlink(Path(jobdir.__file__).parent, tmp_path / "path" / "jobsite")
    dest = tmp_path / "job"
    dest.mkdir()
    script = (
        "import sys; sys.path.insert(0, sys.argv[3]); from pathlib import Path; "
        "from jobsite import jobdir; "
        "jobdir.extract_archive(open(sys.argv[1], 'rb'), Path(sys.argv[2]))"
    )
    result = subprocess.run(
        [
            str(DEBIAN_PYTHON),
            "-I",
            "-c",
            script,
            str(archive_file),
            str(dest),
            str(tmp_path / "path"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert os.readlink(dest / "out" / "x.csv") == "../q/y/../../PWNED.csv"
    assert (dest / "project.yaml").read_text() == TWO_ACTIONS
    assert not (tmp_path / "PWNED.csv").exists()


async def test_prune_removes_a_leftover_job_dir_whatever_it_holds(app, client, settings, intact):
    leftover = settings.data.job_dir("0123456789abcdef")
    leftover.mkdir(parents=True)
    build_traps(leftover)

    found = await ops.prunable(app.state.db, settings.data, older_than=0)
    assert [item.path for item in found] == [leftover]
    assert ops.remove(found, dry_run=False) == 0

    assert not os.path.lexists(leftover)
    assert Path("/etc/passwd").exists()
    await intact.check(client)

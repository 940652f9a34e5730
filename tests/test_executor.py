"""One job in real Docker: the container's limits as the job sees them, outcomes, outputs,
logs, and a workspace that only a successful job changes."""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import json
import os
import re
import secrets
import threading
import time
from datetime import datetime
from pathlib import Path

import docker
import pytest
from helpers import until

from jobsite import local_docker as executor_module
from jobsite.config import Settings, load_settings
from jobsite.executor import DockerUnavailable, Executor, JobError, JobSpec, Outcome
from jobsite.local_docker import CappedLog, LocalDockerExecutor
from jobsite.repos import Repos

pytestmark = pytest.mark.usefixtures("docker_cleanup")

IMAGE = "ghcr.io/opensafely-core/python:v2"


@pytest.fixture
async def study(make_repo, settings):
    """A repo at a commit, mirrored as the site would."""
    repo = make_repo({"project.yaml": "version: '4'\n", "analysis/data.txt": "from the repo\n"})
    repos = Repos(settings.data_dir / "repos")
    await repos.fetch(repo.url)
    return repo, repos, repo.git("rev-parse", "HEAD")


@pytest.fixture
def make_executor(settings: Settings, study):
    """Executors over the test's site, with settings overridden; closed at the end."""
    made: list[LocalDockerExecutor] = []

    def make(**overrides) -> LocalDockerExecutor:
        base = {"job_memory": settings.job_memory, "job_cpus": settings.job_cpus}
        site = load_settings(
            environ={},
            data_dir=str(settings.data_dir),
            site_id=settings.site_id,
            **{**base, **overrides},
        )
        made.append(LocalDockerExecutor(site, study[1]))
        return made[-1]

    yield make
    for executor in made:
        executor.close()


def spec(study, command: str, outputs=None, *, action="generate", **fields) -> JobSpec:
    repo, _, sha = study
    return JobSpec(
        id=fields.pop("id", secrets.token_hex(8)),
        job_request_id=7,
        workspace="ws",
        repo=repo.url,
        sha=sha,
        action=action,
        run_command=f"python:v2 -c {command!r}",
        image=fields.pop("image", IMAGE),
        args=["-c", command],
        outputs=outputs or {},
        needs=fields.pop("needs", []),
        **fields,
    )


async def run(executor: Executor, job: JobSpec, before_cleanup=None) -> Outcome:
    """A job's steps as the scheduler takes them; cleanup always runs."""
    try:
        await executor.prepare(job)
        started = time.time()
        await executor.start(job)
        exit = await executor.wait(job, started)
        if before_cleanup:
            await before_cleanup()
        return await executor.collect(job, exit)
    except JobError as e:
        return Outcome("failed", e.status_code, e.message)
    finally:
        await executor.cleanup(job.id)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def workspace(settings: Settings) -> Path:
    return settings.data_dir / "workspaces" / "ws"


async def test_container_runs_locked_down_as_seen_from_inside(
    settings, study, make_executor, docker_client: docker.DockerClient
):
    executor = make_executor(job_pids_limit=77)
    command = (
        "echo uid=$(id -u); echo gid=$(id -g); echo init=$(cat /proc/1/comm); "
        "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status; "
        "echo interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '); "
        "echo pids=$(cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null); "
        "echo memory=$(cat /sys/fs/cgroup/memory.max "
        "/sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null); "
        "echo cpu=$(cat /sys/fs/cgroup/cpu.max 2>/dev/null || "
        "echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) "
        "$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)); "
        "env | sort; "
        "echo netns=$(readlink /proc/self/ns/net); "
        "cat analysis/data.txt; pwd"
    )
    job = spec(study, command)
    seen = {}

    async def look_at_container():
        container = docker_client.containers.get(f"jobsite-{job.id}")
        seen.update(
            name=container.name,
            labels=container.labels,
            network=container.attrs["HostConfig"]["NetworkMode"],
        )

    outcome = await run(executor, job, look_at_container)
    assert outcome.status_code == "succeeded", outcome
    log = (executor.data.log(job.id)).read_text()
    lines = {}
    for line in log.splitlines():
        text = line.split(" ", 1)[-1]
        key, sep, value = text.partition("=")
        if sep and " " not in key:
            lines[key] = value
        if ":\t" in text:
            key, value = text.split(":\t", 1)
            lines[key] = value.strip()
    uid, gid = (
        settings.job_user.split(":") if os.getuid() == 0 else (str(os.getuid()), str(os.getgid()))
    )
    assert lines["uid"] == uid and lines["uid"] != "0"
    assert lines["gid"] == gid
    assert lines["init"] == "docker-init"
    assert lines["CapEff"] == lines["CapPrm"] == lines["CapBnd"] == "0000000000000000"
    assert lines["NoNewPrivs"] == "1"
    assert lines["interfaces"] == "lo"
    assert lines["netns"] != os.readlink("/proc/self/ns/net")  # not the host's network
    assert lines["pids"] == "77"
    assert int(lines["memory"]) == 256 * 1024**2
    quota, period = lines["cpu"].split()
    assert int(quota) / int(period) == 1.0
    assert lines["OPENSAFELY_BACKEND"] == settings.backend
    assert lines["HOME"] == "/tmp"
    assert "DATABASE_URL" not in lines
    assert "from the repo" in log
    assert "/workspace" in log
    assert seen == {
        "name": f"jobsite-{job.id}",
        "labels": {"jobsite": settings.site_id, "jobsite.job": job.id},
        "network": "none",
    }


async def test_database_action_gets_the_database_url_and_network(
    settings, study, make_executor, docker_client: docker.DockerClient
):
    network = docker_client.networks.create(f"jobsite-test-{secrets.token_hex(4)}", internal=True)
    try:
        job = spec(
            study,
            "echo url=$DATABASE_URL; echo interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1)",
            requires_db=True,
            database_url="mssql://db.example:1433/full",
            database_network=network.name,
        )
        outcome = await run(make_executor(), job)
    finally:
        network.remove()
    assert outcome.status_code == "succeeded", outcome
    log = (settings.data_dir / "logs" / f"{job.id}.log").read_text()
    assert "url=mssql://db.example:1433/full" in log
    assert "eth0" in log


async def test_outputs_go_to_the_workspace_with_logs_and_manifest(settings, study, make_executor):
    executor = make_executor()
    command = (
        "mkdir -p output && printf 'n,total\\n1,2\\n' > output/counts.csv && "
        "printf 'patient_id,age\\n1,50\\n' > output/patients.csv && "
        "echo secret > output/model.rds && echo made outputs"
    )
    outputs = {
        "moderately_sensitive": {"counts": "output/counts.csv", "rows": "output/patients.csv"},
        "highly_sensitive": {"model": "output/*.rds"},
    }
    job = spec(study, command, outputs)
    outcome = await run(executor, job)

    assert outcome.status_code == "succeeded", outcome
    assert outcome.outputs == {
        "output/counts.csv": "moderately_sensitive",
        "output/patients.csv": "moderately_sensitive",
        "output/model.rds": "highly_sensitive",
    }
    ws = workspace(settings)
    assert (ws / "output/counts.csv").read_text() == "n,total\n1,2\n"
    manifest = json.loads((ws / "metadata/manifest.json").read_text())
    counts = manifest["files"]["output/counts.csv"]
    assert counts == {
        "action": "generate",
        "job": job.id,
        "commit": job.sha,
        "level": "moderately_sensitive",
        "size": 12,
        "sha256": hashlib.sha256(b"n,total\n1,2\n").hexdigest(),
        "visible": True,
        "not_visible_because": None,
    }
    assert manifest["files"]["output/patients.csv"]["visible"] is False
    assert "patient_id" in manifest["files"]["output/patients.csv"]["not_visible_because"]
    assert manifest["files"]["output/model.rds"]["visible"] is False
    assert manifest["actions"]["generate"]["files"] == sorted(outcome.outputs)

    log = (ws / "metadata/generate.log").read_text()
    assert log == executor.data.log(job.id).read_text()
    first = log.splitlines()[0]
    assert first.endswith(" made outputs") and first[:4].isdigit()  # timestamped
    for expected in (
        f"job id:          {job.id}",
        "job request id:  7",
        "action:          generate",
        f"commit:          {job.sha}",
        "exit code:       0",
        "status:          succeeded: Completed successfully",
        "output/counts.csv  (moderately_sensitive)",
        "output/model.rds  (highly_sensitive)",
    ):
        assert expected in log
    assert "image:           ghcr.io/opensafely-core/python:v2 (sha256:" in log
    assert "image digest:    none (not pulled from a registry)" in log  # built by the tests
    assert "not shown to output viewers:\n" in log
    assert "  output/model.rds: highly_sensitive outputs are never shown\n" in log
    assert "  output/patients.csv: has a patient_id column\n" in log
    assert not executor.data.job_dir(job.id).exists()


async def test_rerun_drops_outputs_the_new_run_did_not_make(settings, study, make_executor):
    executor = make_executor()
    outputs = {"moderately_sensitive": {"tables": "output/*.csv"}}
    first = spec(study, "mkdir output; echo a > output/a.csv; echo b > output/b.csv", outputs)
    assert (await run(executor, first)).state == "succeeded"
    second = spec(study, "mkdir output; echo a2 > output/a.csv", outputs)
    assert (await run(executor, second)).state == "succeeded"
    ws = workspace(settings)
    assert (ws / "output/a.csv").read_text() == "a2\n"
    assert not (ws / "output/b.csv").exists()
    manifest = json.loads((ws / "metadata/manifest.json").read_text())
    assert sorted(manifest["files"]) == ["output/a.csv"]


def outputs_and_manifest(root: Path) -> dict[str, bytes]:
    """The workspace less the action logs, which every job that ran rewrites."""
    return {
        path: data
        for path, data in snapshot(root).items()
        if not (path.startswith("metadata/") and path.endswith(".log"))
    }


async def test_failed_jobs_change_no_output_and_leave_their_log(
    settings, study, make_executor, docker_client
):
    executor = make_executor()
    outputs = {"moderately_sensitive": {"tables": "output/*.csv"}}
    good = spec(study, "mkdir output; echo good > output/a.csv", outputs)
    assert (await run(executor, good)).state == "succeeded"
    before = outputs_and_manifest(workspace(settings))
    action_log = workspace(settings) / "metadata/generate.log"

    failing = spec(
        study, "mkdir output; echo bad > output/a.csv; echo one; echo two; exit 3", outputs
    )
    outcome = await run(executor, failing)
    assert outcome.status_code == "nonzero_exit"
    assert outcome.status_message == "Job exited with an error (exit code 3)"
    assert outcome.log_excerpt == "one\ntwo", "the log's lines are kept apart from the message"
    assert outcome.exit_code == 3
    assert outputs_and_manifest(workspace(settings)) == before
    log = action_log.read_text()
    assert log == executor.data.log(failing.id).read_text()
    assert [line.split(" ", 1)[1] for line in log.splitlines()[:2]] == ["one", "two"]
    assert datetime.fromisoformat(log.split(" ", 1)[0])  # RFC 3339, as Docker writes it
    assert f"job id:          {failing.id}" in log
    assert "exit code:       3" in log
    assert "status:          nonzero_exit: Job exited with an error (exit code 3)" in log

    unmatched = spec(study, "mkdir output; echo x > output/a.txt", outputs)
    outcome = await run(executor, unmatched)
    assert outcome.status_code == "unmatched_patterns"
    assert "output/*.csv" in outcome.status_message
    assert "output/a.txt" in outcome.status_message
    assert outputs_and_manifest(workspace(settings)) == before
    assert "status:          unmatched_patterns: No outputs found" in action_log.read_text()

    cancelled = spec(study, "mkdir output; echo bad > output/a.csv; sleep 30", outputs)
    await executor.prepare(cancelled)
    started = time.time()
    await executor.start(cancelled)
    written = executor.data.job_dir(cancelled.id) / "output/a.csv"
    await until(written.exists, 10, "the job to write output/a.csv before it is stopped")
    await executor.cancel(cancelled.id)
    exit = await executor.wait(cancelled, started)
    exit.cancelled = True  # as the scheduler marks a job a user cancelled
    outcome = await executor.collect(cancelled, exit)
    await executor.cleanup(cancelled.id)
    assert outcome.status_code == "cancelled_by_user"
    assert outputs_and_manifest(workspace(settings)) == before
    assert f"job id:          {cancelled.id}" in action_log.read_text()
    assert "status:          cancelled_by_user" in action_log.read_text()

    for job in (failing, unmatched, cancelled):
        assert not executor.data.job_dir(job.id).exists()
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(f"jobsite-{job.id}")
        assert "---- jobsite summary ----" in executor.data.log(job.id).read_text()


async def test_job_past_its_time_limit_is_stopped(settings, study, make_executor):
    executor = make_executor()
    job = spec(study, "mkdir output; echo early > output/a.csv; sleep 60", timeout=1)
    before = time.monotonic()
    outcome = await run(executor, job)
    assert time.monotonic() - before < 15
    assert outcome.status_code == "timed_out"
    assert "time limit of 1.0s" in outcome.status_message
    assert sorted(snapshot(workspace(settings))) == ["metadata/generate.log"]


async def test_job_over_its_memory_limit_is_out_of_memory(settings, study, make_executor):
    executor = make_executor(job_memory="16M")
    outcome = await run(executor, spec(study, "tail /dev/zero"))
    assert outcome.status_code == "out_of_memory"
    assert outcome.exit_code == 137
    assert "limit 16 MiB" in outcome.status_message

    # sampled for a while first, the message names the peak it saw
    outcome = await run(executor, spec(study, "sleep 2.5; tail /dev/zero"))
    assert outcome.status_code == "out_of_memory"
    assert re.search(r"limit 16 MiB; peak sampled use [\d.]+ (KiB|MiB)\)", outcome.status_message)


async def test_cpu_and_memory_are_sampled_while_the_job_runs(settings, study, make_executor):
    executor = make_executor(job_cpus=1.0)
    # about 3 seconds of one busy core, holding some 8 MB in a shell variable
    command = (
        "x=$(head -c 8000000 /dev/zero | tr '\\0' a); end=$(($(date +%s) + 3)); "
        "while [ $(date +%s) -lt $end ]; do :; done; echo ${#x}"
    )
    job = spec(study, command)
    await executor.prepare(job)
    started = time.time()
    await executor.start(job)
    exit = await executor.wait(job, started)
    outcome = await executor.collect(job, exit)
    await executor.cleanup(job.id)
    assert outcome.status_code == "succeeded"
    use = exit.usage
    assert use is not None and use.samples >= 2, use
    # one core, as job_cpus allows (a sample's interval is timed on our side, not the
    # engine's, so one sample may read a little over)
    assert 30 <= use.cpu_peak <= 125, use
    assert use.cpu_mean <= use.cpu_peak
    assert 8 <= use.memory_peak_mb < 64, use
    assert use.memory_mean_mb <= use.memory_peak_mb
    log = (workspace(settings) / "metadata/generate.log").read_text()
    assert f"CPU:             mean {use.cpu_mean:.1f}%, peak {use.cpu_peak:.1f}% of one core" in log
    assert (
        f"memory:          mean {use.memory_mean_mb:.1f} MB, peak {use.memory_peak_mb:.1f} MB ("
        in log
    )


async def test_a_linked_output_fails_the_job_and_is_not_read(settings, study, make_executor):
    executor = make_executor()
    file_link = spec(
        study,
        "mkdir output; ln -s /etc/passwd output/a.csv",
        {"moderately_sensitive": {"a": "output/a.csv"}},
    )
    outcome = await run(executor, file_link)
    assert outcome.state == "failed"
    assert "output/a.csv is a symbolic link" in outcome.status_message

    dir_link = spec(study, "ln -s /etc output", {"moderately_sensitive": {"a": "output/*"}})
    outcome = await run(executor, dir_link)
    assert outcome.state == "failed"
    assert "output is a symbolic link" in outcome.status_message
    assert sorted(snapshot(workspace(settings))) == ["metadata/generate.log"]  # no output


async def test_log_streams_while_the_job_runs_and_is_capped(settings, study, make_executor):
    executor = make_executor(log_limit=4000)
    job = spec(
        study,
        "echo first line; sleep 1.5; i=0; while [ $i -lt 2000 ]; do echo chatty $i; "
        "i=$((i+1)); done; echo last line",
    )
    ticks = 0
    seen_live = False

    async def watch():
        nonlocal ticks, seen_live
        path = executor.data.log(job.id)
        while True:
            ticks += 1
            if path.exists() and "first line" in path.read_text():
                seen_live = seen_live or (await executor.adopt()).get(job.id) == "running"
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        outcome = await run(executor, job)
    finally:
        watcher.cancel()
    assert outcome.status_code == "succeeded", outcome
    assert seen_live  # the log was readable while the container ran
    assert ticks > 20  # the event loop kept running meanwhile
    log = executor.data.log(job.id).read_text()
    body = log.split("---- jobsite summary ----")[0]
    assert len(body.encode()) < 4000 + 200
    assert "first line" in body and "last line" in body
    assert "bytes of log left out: logs are capped at 4000 bytes" in body
    assert "chatty 1000" not in body


async def test_inputs_are_the_outputs_of_direct_dependencies(settings, study, make_executor):
    executor = make_executor()
    make = spec(
        study,
        "mkdir output; echo 'from generate' > output/a.csv",
        {"highly_sensitive": {"a": "output/a.csv"}},
    )
    assert (await run(executor, make)).state == "succeeded"
    use = spec(
        study,
        "cat output/a.csv > output/b.csv",
        {"moderately_sensitive": {"b": "output/b.csv"}},
        action="analyse",
        needs=["generate"],
    )
    assert (await run(executor, use)).state == "succeeded"
    assert (workspace(settings) / "output/b.csv").read_text() == "from generate\n"


async def test_missing_input_names_the_file_and_its_action(settings, study, make_executor):
    executor = make_executor()
    make = spec(
        study, "mkdir output; echo a > output/a.csv", {"highly_sensitive": {"a": "output/a.csv"}}
    )
    assert (await run(executor, make)).state == "succeeded"
    (workspace(settings) / "output/a.csv").unlink()
    use = spec(study, "true", action="analyse", needs=["generate"])
    outcome = await run(executor, use)
    assert outcome.state == "failed"
    assert "output/a.csv is missing" in outcome.status_message
    assert "made by action generate" in outcome.status_message
    assert not executor.data.job_dir(use.id).exists()


async def test_full_disk_while_preparing_fails_clearly(settings, study, make_executor, monkeypatch):
    executor = make_executor()
    make = spec(
        study, "mkdir output; echo a > output/a.csv", {"highly_sensitive": {"a": "output/a.csv"}}
    )
    assert (await run(executor, make)).state == "succeeded"
    before = snapshot(workspace(settings))

    def full(src, dest, rel, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / rel))

    monkeypatch.setattr(executor_module.jobdir, "copy_in", full)
    use = spec(study, "true", action="analyse", needs=["generate"])
    outcome = await run(executor, use)
    assert outcome.status_code == "internal_error"
    assert outcome.status_message.startswith("The disk is full: could not prepare")
    assert snapshot(workspace(settings)) == before
    assert not executor.data.job_dir(use.id).exists()


async def test_full_disk_while_collecting_outputs_changes_nothing(
    settings, study, make_executor, monkeypatch
):
    executor = make_executor()
    outputs = {"moderately_sensitive": {"tables": "output/*.csv"}}
    assert (await run(executor, spec(study, "mkdir output; echo 1 > output/a.csv", outputs))).state
    before = outputs_and_manifest(workspace(settings))

    def full(self, rel, data):
        raise OSError(errno.ENOSPC, "No space left on device", rel)

    monkeypatch.setattr(executor_module._Staging, "write", full)
    job = spec(study, "mkdir -p output/new; echo 2 > output/a.csv; echo 3 > output/b.csv", outputs)
    outcome = await run(executor, job)
    assert outcome.status_code == "internal_error"
    assert outcome.status_message.startswith("The disk is full: could not copy the job's outputs")
    assert outputs_and_manifest(workspace(settings)) == before
    assert sorted(os.listdir(workspace(settings) / "output")) == ["a.csv"]


# docker-py leaves the socket of a failed connection unclosed
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_docker_down_raises_docker_unavailable(
    settings, study, make_executor, monkeypatch, tmp_path
):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    executor = make_executor()
    job = spec(study, "true")
    await executor.prepare(job)
    with pytest.raises(DockerUnavailable):
        await executor.start(job)
    assert not await executor.available()
    await executor.cleanup(job.id)
    gc.collect()  # the unclosed sockets are reported now, while the warning is ignored


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_docker_lost_while_waiting_raises_docker_unavailable(
    settings, study, make_executor, monkeypatch, tmp_path
):
    executor = make_executor()
    job = spec(study, "sleep 30")
    await executor.prepare(job)
    await executor.start(job)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/gone.sock")
    executor.close()  # the engine is gone: the next call connects again, and fails
    with pytest.raises(DockerUnavailable):
        await executor.wait(job, time.time())
    monkeypatch.undo()
    await executor.cleanup(job.id)
    for thread in threading.enumerate():  # the log follower fails in its own time
        if thread.name.startswith("jobsite-"):
            thread.join(10)
    gc.collect()


def test_capped_log_keeps_head_and_tail(tmp_path):
    path = tmp_path / "job.log"
    with CappedLog(path, 20) as log:
        for i in range(100):
            log.write(f"{i:03d}\n".encode())
            if i == 1:
                assert path.read_bytes() == b"000\n001\n"  # written as it arrives
    text = path.read_text()
    assert text.startswith("000\n001\n00")
    assert text.endswith("\n098\n099\n")
    assert "[... 380 bytes of log left out: logs are capped at 20 bytes ...]" in text


def test_capped_log_under_the_cap_is_whole(tmp_path):
    path = tmp_path / "job.log"
    with CappedLog(path, 100) as log:
        log.write(b"short\n")
    assert path.read_text() == "short\n"


async def test_a_limit_docker_refuses_is_a_clear_failure(settings, study, make_executor):
    executor = make_executor(job_cpus=4096)
    outcome = await run(executor, spec(study, "true"))
    assert outcome.status_code == "internal_error"
    assert outcome.status_message.startswith("Docker could not start the job's container: ")
    assert "CPU" in outcome.status_message


async def test_a_new_process_adopts_a_finished_container(settings, study, make_executor):
    """After a restart the scheduler waits on the container it finds, with a new Executor."""
    job = spec(
        study,
        "mkdir output; echo adopted > output/a.csv; echo done",
        {"moderately_sensitive": {"a": "output/a.csv"}},
    )
    first = make_executor()
    await first.prepare(job)
    started = time.time()
    await first.start(job)
    first.close()

    second = make_executor()
    outcome = await run_adopted(second, job, started)
    assert outcome.status_code == "succeeded", outcome
    assert (workspace(settings) / "output/a.csv").read_text() == "adopted\n"
    assert " done\n" in second.data.log(job.id).read_text()


async def run_adopted(executor: Executor, job: JobSpec, started: float) -> Outcome:
    try:
        assert (await executor.adopt()).get(job.id) in ("running", "exited")
        return await executor.collect(job, await executor.wait(job, started))
    finally:
        await executor.cleanup(job.id)


async def test_a_missing_image_is_not_pulled_when_pulling_is_off(settings, study, make_executor):
    executor = make_executor(allow_pull=False)
    job = spec(study, "true", image="ghcr.io/opensafely-core/python:not-on-this-machine")
    outcome = await run(executor, job)
    assert outcome.status_code == "internal_error"
    assert outcome.status_message == (
        "Image ghcr.io/opensafely-core/python:not-on-this-machine is not on this machine and "
        "pulling is turned off (allow_pull: false). An admin must load the image."
    )


def docker_stats(cpu_ns: int, usage: int, cache: dict | None = None) -> dict:
    """A one-shot sample as Docker's stats endpoint gives it."""
    return {
        "cpu_stats": {"cpu_usage": {"total_usage": cpu_ns}},
        "memory_stats": {"usage": usage, "stats": cache or {}},
    }


def test_usage_samples_give_cpu_per_core_and_memory_less_page_cache():
    samples = executor_module.UsageSamples()
    samples.started_at = 100.0
    samples.add(docker_stats(500_000_000, 12_000_000, {"total_inactive_file": 2_000_000}), 101.0)
    samples.add(docker_stats(1_500_000_000, 32_000_000, {"inactive_file": 2_000_000}), 102.0)
    samples.add(docker_stats(1_600_000_000, 21_000_000, {"inactive_file": 1_000_000}), 102.1)
    samples.add({"cpu_stats": {"cpu_usage": {"total_usage": 0}}, "memory_stats": {}}, 103.0)
    use = samples.result()
    # 0.5 s of CPU in the first second, 1 s in the next; 0.1 s apart is too close to count
    assert (use.cpu_mean, use.cpu_peak) == (pytest.approx(75), pytest.approx(100))
    assert (use.memory_mean_mb, use.memory_peak_mb, use.samples) == (
        pytest.approx(20),
        30,
        3,
    )
    assert use.as_json() == {
        "cpu_mean": 75.0,
        "cpu_peak": 100.0,
        "memory_mean_mb": 20.0,
        "memory_peak_mb": 30.0,
    }


def test_a_job_too_short_to_sample_has_no_figures_or_only_memory():
    assert executor_module.UsageSamples().result() is None
    samples = executor_module.UsageSamples()  # its start unknown: no interval to measure
    samples.add(docker_stats(5_000_000, 4_000_000), 101.0)
    use = samples.result()
    assert (use.cpu_mean, use.cpu_peak, use.memory_peak_mb) == (None, None, 4.0)
    assert use.as_json()["cpu_mean"] is None


def test_an_out_of_memory_job_not_yet_sampled_says_so(settings, study, make_executor):
    executor = make_executor(job_memory="32M")
    exit = executor_module.ContainerExit(137, True, False, 1.0, 2.0)
    outcome = executor._judge(spec(study, "true"), exit, "", disk_used=0, stopped=False)
    assert outcome.status_message.startswith(
        "Job ran out of memory (limit 32 MiB; its use was not sampled: it ran out within a second)"
    )

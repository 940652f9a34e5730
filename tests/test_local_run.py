"""`jobsite run` on a local checkout, as a developer types it, in real Docker."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import until

from jobsite import cli, local_run
from jobsite.local_docker import LocalDockerExecutor

pytestmark = pytest.mark.usefixtures("docker_cleanup")

CHAIN = """\
version: "5"
actions:
  generate:
    run: python:v2 -c "mkdir -p output && echo 'n,total' > output/counts.csv && analysis/tool.sh"
    outputs:
      moderately_sensitive:
        counts: output/counts.csv
  analyse:
    run: python:v2 -c "cat output/counts.csv analysis/extra.txt > output/report.csv"
    needs: [generate]
    outputs:
      highly_sensitive:
        report: output/report.csv
"""


@pytest.fixture
def checkout(tmp_path):
    """A study checkout: project.yaml and a file of analysis code, not committed anywhere."""

    def make(project_yaml: str = CHAIN) -> Path:
        root = tmp_path / "study"
        (root / "analysis").mkdir(parents=True)
        (root / "project.yaml").write_text(project_yaml)
        (root / "analysis/extra.txt").write_text("from the working tree\n")
        (root / "analysis/tool.sh").write_text("echo from a script\n")
        (root / "analysis/tool.sh").chmod(0o755)
        return root

    return make


@pytest.fixture
def jobsite_run(settings, monkeypatch, capsys):
    """Runs `jobsite run ARGS` and returns (exit status, what it printed). Its containers
    carry the test site's label, so the docker_cleanup fixture finds any left behind."""
    real_main = local_run.main

    def main(*args, **kwargs):
        kwargs["overrides"] = {"site_id": settings.site_id, **kwargs["overrides"]}
        return real_main(*args, **kwargs)

    monkeypatch.setattr(local_run, "main", main)
    monkeypatch.setenv("JOBSITE_CONFIG", "")

    def run(*args: str) -> tuple[int, str]:
        status = cli.main(["run", *args])
        return status, capsys.readouterr().out

    return run


def manifest(root: Path) -> dict:
    return json.loads((root / "metadata/manifest.json").read_text())


def test_a_chain_runs_and_its_outputs_land_in_the_checkout(checkout, jobsite_run):
    root = checkout()
    status, out = jobsite_run("analyse", "--project-dir", str(root))
    assert status == 0, out
    assert (root / "output/counts.csv").read_text() == "n,total\n"
    assert (root / "output/report.csv").read_text() == "n,total\nfrom the working tree\n"
    assert out.splitlines()[:5] == [
        "Running 2 actions: generate, analyse",
        "generate: preparing",
        "generate: executing (python:v2 -c \"mkdir -p output && echo 'n,total' > "
        'output/counts.csv && analysis/tool.sh")',
        "generate: finalizing",
        out.splitlines()[4],
    ]
    assert out.splitlines()[4].startswith("generate: succeeded in ")
    assert "analyse: succeeded\n  log: metadata/analyse.log\n" in out
    assert "  output/report.csv  (highly_sensitive)" in out
    assert out.rstrip().endswith("All 2 actions succeeded.")
    log = (root / "metadata/generate.log").read_text()
    assert " from a script\n" in log and "status:          succeeded" in log
    assert sorted(manifest(root)["files"]) == ["output/counts.csv", "output/report.csv"]


def test_needed_actions_with_outputs_are_not_run_again(checkout, jobsite_run):
    root = checkout()
    assert jobsite_run("analyse", "--project-dir", str(root))[0] == 0
    first_job = manifest(root)["actions"]["generate"]["job"]

    status, out = jobsite_run("analyse", "--project-dir", str(root))
    assert status == 0
    assert out.startswith("Running 1 action: analyse\n")
    assert manifest(root)["actions"]["generate"]["job"] == first_job

    (root / "output/counts.csv").unlink()
    status, out = jobsite_run("analyse", "--project-dir", str(root))
    assert out.startswith("Running 2 actions: generate, analyse\n")

    status, out = jobsite_run("analyse", "-f", "--project-dir", str(root))
    assert out.startswith("Running 2 actions: generate, analyse\n")

    status, out = jobsite_run("run_all", "--project-dir", str(root))
    assert status == 0
    assert out.splitlines() == [
        "All actions have already completed successfully",
        "Use -f (--force-run-dependencies) to run them again.",
    ]


def test_a_failure_stops_the_run_and_keeps_the_outputs(checkout, jobsite_run):
    root = checkout()
    assert jobsite_run("generate", "--project-dir", str(root))[0] == 0
    before = (root / "output/counts.csv").read_bytes()
    (root / "project.yaml").write_text(
        CHAIN.replace('analysis/tool.sh"', 'echo broken; exit 4"') + "  other:\n"
        '    run: python:v2 -c "mkdir -p output && echo 1 > output/other.csv"\n'
        "    outputs:\n"
        "      moderately_sensitive:\n"
        "        other: output/other.csv\n"
    )
    # one at a time: other, which needs nothing, was to run after generate
    status, out = jobsite_run("generate", "analyse", "other", "-c", "1", "--project-dir", str(root))
    assert status == 1
    assert "generate: nonzero_exit: Job exited with an error (exit code 4): broken" in out
    assert "  log: metadata/generate.log\n" in out
    assert "analyse: dependency_failed: Not run: it needs generate" in out
    assert "other: not_run" in out
    assert "3 of 3 actions did not succeed: generate, analyse, other" in out
    assert not (root / "output/other.csv").exists()
    assert (root / "output/counts.csv").read_bytes() == before
    # the failed job's log is where a developer looks for it
    log = (root / "metadata/generate.log").read_text()
    assert log.splitlines()[0].endswith("Z broken")  # with Docker's timestamp
    assert "status:          nonzero_exit: Job exited with an error (exit code 4)\n" in log
    assert "job request id:  none (jobsite run)" in log

    status, out = jobsite_run(
        "generate", "analyse", "other", "-c", "1", "--continue-on-error", "--project-dir", str(root)
    )
    assert status == 1
    assert "other: succeeded in" in out
    assert (root / "output/other.csv").read_text() == "1\n"


def test_outputs_of_earlier_runs_are_not_inputs_unless_needed(checkout, jobsite_run):
    root = checkout(
        'version: "5"\n'
        "actions:\n"
        "  check:\n"
        '    run: python:v2 -c "ls output > listing.txt 2>&1; mkdir -p out2; '
        'cp listing.txt out2/listing.txt"\n'
        "    outputs:\n"
        "      moderately_sensitive:\n"
        "        listing: out2/listing.txt\n"
        "  stale:\n"
        '    run: python:v2 -c "true"\n'
        "    outputs:\n"
        "      moderately_sensitive:\n"
        "        old: output/*.csv\n"
    )
    (root / "output").mkdir()
    (root / "output/old.csv").write_text("from an earlier run\n")
    assert jobsite_run("check", "--project-dir", str(root))[0] == 0
    assert "old.csv" not in (root / "out2/listing.txt").read_text()


def test_an_unknown_image_stops_before_anything_runs(checkout, jobsite_run):
    root = checkout(CHAIN.replace('run: python:v2 -c "cat', 'run: nosuchimage:v1 -c "cat'))
    status, out = jobsite_run("analyse", "--project-dir", str(root))
    assert status == 1
    assert "Error: action analyse uses image 'nosuchimage', which jobsite does not know." in out
    assert "Nothing was run." in out
    assert not (root / "output").exists()
    assert not (root / "metadata").exists()


def test_an_invalid_project_lists_its_errors(checkout, jobsite_run):
    root = checkout("version: '4'\nactions:\n  a:\n    run: python:v2\n")
    status, out = jobsite_run("a", "--project-dir", str(root))
    assert status == 1
    assert out.startswith(f"Error: {root / 'project.yaml'} is not valid:\n  - ")
    assert not (root / "metadata").exists()


def test_no_project_yaml_says_where_to_run(tmp_path, jobsite_run):
    status, out = jobsite_run("a", "--project-dir", str(tmp_path))
    assert status == 1
    assert "cannot read" in out and "give --project-dir" in out


def test_timeout_limits_each_job(checkout, jobsite_run):
    root = checkout(CHAIN.replace("analysis/tool.sh", "sleep 30"))
    status, out = jobsite_run("generate", "--timeout", "1s", "--project-dir", str(root))
    assert status == 1
    assert "generate: timed_out: Job ran longer than its time limit of 1.0s" in out


def test_bad_limits_are_refused_by_the_command(checkout, jobsite_run, capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "generate", "--memory", "lots"])
    assert "'lots' is not a size such as 512M or 4G" in capsys.readouterr().err


# docker-py leaves the socket of a failed connection unclosed
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_docker_down_is_said_plainly(checkout, jobsite_run, monkeypatch, tmp_path):
    root = checkout()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    status, out = jobsite_run("generate", "--project-dir", str(root))
    assert status == 1
    assert "Error: Docker is not running" in out
    gc.collect()


async def test_stopping_a_run_leaves_no_container_behind(checkout, settings, docker_client):
    root = checkout(CHAIN.replace("analysis/tool.sh", "sleep 30"))
    printed: list[str] = []
    run = local_run.LocalRun(root, settings, LocalDockerExecutor(settings), printed.append)
    task = asyncio.create_task(run.run(["analyse"], False, False))

    def containers():
        # the engine's own list: inspecting each (as containers.list does) can meet a
        # container the engine lists while still creating it, and answer 404
        return docker_client.api.containers(
            all=True, filters={"label": f"jobsite={settings.site_id}"}
        )

    await until(lambda: "generate: executing" in " ".join(printed), message="generate to run")
    # meanwhile the container of analyse is created ahead
    await until(lambda: asyncio.to_thread(lambda: len(containers()) == 2), 10, "two containers")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert containers() == []
    assert not (root / "output").exists()


def test_config_reaches_the_action_as_arguments(checkout, jobsite_run):
    root = checkout(
        'version: "5"\n'
        "actions:\n"
        "  configured:\n"
        "    run: python:v2 -c 'mkdir -p output; echo \"$1 $2\" > output/args.txt' arg0\n"
        "    config:\n"
        "      weeks: 4\n"
        "    outputs:\n"
        "      moderately_sensitive:\n"
        "        args: output/args.txt\n"
    )
    status, out = jobsite_run("configured", "--project-dir", str(root))
    assert status == 0, out
    assert (root / "output/args.txt").read_text() == '--config {"weeks": 4}\n'


def test_an_out_of_date_dependency_runs_again_and_says_why(checkout, jobsite_run):
    root = checkout()
    assert jobsite_run("analyse", "--project-dir", str(root))[0] == 0
    (root / "project.yaml").write_text(CHAIN.replace("analysis/tool.sh", "echo changed"))
    status, out = jobsite_run("analyse", "--project-dir", str(root))
    assert status == 0, out
    assert out.splitlines()[:2] == [
        "generate: its outputs are out of date (the run command of generate has changed in "
        "project.yaml); running it again",
        "Running 2 actions: generate, analyse",
    ]
    status, out = jobsite_run("analyse", "--project-dir", str(root))
    assert out.startswith("Running 1 action: analyse\n")


# -- running actions at once, and what opensafely run users look for ------------------------

PAIR = """\
version: "5"
actions:
  first:
    run: python:v2 -c "sleep 3; mkdir -p output && echo 1 > output/first.csv"
    outputs:
      moderately_sensitive:
        first: output/first.csv
  second:
    run: python:v2 -c "sleep 3; mkdir -p output && echo 2 > output/second.csv"
    outputs:
      moderately_sensitive:
        second: output/second.csv
  after:
    run: python:v2 -c "cat output/first.csv output/second.csv > output/both.csv"
    needs: [first, second]
    outputs:
      moderately_sensitive:
        both: output/both.csv
"""


def steps(out: str) -> list[str]:
    """The progress lines, each as "action: step"."""
    return [
        " ".join(line.split()[:2]).rstrip(":")
        for line in out.splitlines()
        if re.match(r"\w+: (preparing|executing|finalizing)", line)
    ]


def test_independent_actions_run_at_once_and_needs_wait(checkout, jobsite_run):
    root = checkout(PAIR)
    status, out = jobsite_run("after", "--project-dir", str(root))
    assert status == 0, out
    order = steps(out)
    # both sleepers execute before either finishes; after starts once both are done
    assert order.index("second: executing") < order.index("first: finalizing")
    assert order.index("after: preparing") > max(
        order.index("first: finalizing"), order.index("second: finalizing")
    )
    assert (root / "output/both.csv").read_text() == "1\n2\n"

    status, out = jobsite_run("after", "-f", "-c", "1", "--project-dir", str(root))
    assert status == 0, out
    assert steps(out) == [
        f"{action}: {step}"
        for action in ("first", "second", "after")
        for step in ("preparing", "executing", "finalizing")
    ]


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_concurrency_that_is_not_a_positive_number_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "first", "-c", value])
    assert f"{value!r} is not a whole number of jobs, 1 or more" in capsys.readouterr().err


def test_an_unknown_action_lists_the_actions_there_are(checkout, jobsite_run):
    root = checkout()
    status, out = jobsite_run("generat", "--project-dir", str(root))
    assert status == 2
    assert out == (
        "Error: `generat` is not an action in project.yaml. "
        "The actions are: generate, analyse, run_all.\n"
    )
    assert not (root / "metadata").exists()


def test_timestamps_start_every_line(checkout, jobsite_run):
    root = checkout()
    status, out = jobsite_run("generate", "--timestamps", "--project-dir", str(root))
    assert status == 0, out
    lines = [line for line in out.splitlines() if line]
    assert len(lines) > 5
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  *\S", line), line
    assert re.search(r"Z generate: succeeded in ", out)


def test_github_output_groups_each_actions_lines_and_log(checkout, jobsite_run):
    root = checkout(PAIR)
    status, out = jobsite_run("after", "--format-output-for-github", "--project-dir", str(root))
    assert status == 0, out
    groups = re.findall(r"^::group::(.*?)\n(.*?)^::endgroup::$", out, re.M | re.S)
    assert sorted(title for title, _ in groups) == [
        "after: succeeded",
        "first: succeeded",
        "second: succeeded",
    ]
    for title, body in groups:
        action = title.split(":")[0]
        # one action's lines only, never another's mixed in, then its log
        assert {line.split(":")[0] for line in body.splitlines()[:4]} == {action}
        assert f"--- metadata/{action}.log ---" in body
        assert "status:          succeeded" in body
    assert "::group::" not in out.split("::endgroup::")[-1]  # the summary follows the groups
    assert "All 3 actions succeeded." in out


def run_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`jobsite ARGS` as a researcher types it, in its own process."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("jobsite")), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def command_env(settings):
    """The environment `jobsite run` runs in: containers labelled for the test site."""
    return {**os.environ, "JOBSITE_SITE_ID": settings.site_id, "JOBSITE_CONFIG": ""}


def test_debug_keeps_containers_and_job_dirs_and_says_how_to_remove_them(
    checkout, jobsite_run, docker_client, settings
):
    root = checkout()
    status, out = jobsite_run("generate", "--debug", "--project-dir", str(root))
    assert status == 0, out
    assert "--debug: the containers and job dirs of this run were kept. To remove them:" in out
    commands = [line.strip() for line in out.splitlines()[-2:]]
    assert commands[0].startswith("docker container rm --force $(docker container ls")
    assert commands[1].startswith("rm -rf ")
    scratch = Path(commands[1].removeprefix("rm -rf "))

    def containers():
        return docker_client.containers.list(
            all=True, filters={"label": f"jobsite={settings.site_id}"}
        )

    (kept,) = containers()
    (job_dir,) = (scratch / "jobs").iterdir()
    assert kept.labels["jobsite.job"] == job_dir.name
    assert (job_dir / "output/counts.csv").read_text() == "n,total\n"  # as the job left it
    assert (root / "output/counts.csv").exists()

    for command in commands:  # what the run said to do
        subprocess.run(command, shell=True, check=True, capture_output=True)
    assert containers() == [] and not scratch.exists()


def test_ctrl_c_stops_the_running_jobs_and_removes_their_containers(
    checkout, command_env, docker_client, settings
):
    root = checkout(PAIR.replace("sleep 3", "sleep 60"))
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("jobsite")), "run", "after", "--project-dir",
         str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=command_env,
    )  # fmt: skip
    assert process.stdout is not None
    seen = []
    while len([line for line in seen if ": executing" in line]) < 2:  # first and second
        line = process.stdout.readline()
        assert line, f"jobsite run ended before both sleepers ran: {''.join(seen)}"
        seen.append(line)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Stopped: the running jobs were cancelled and their containers removed." in out
    assert (
        docker_client.containers.list(all=True, filters={"label": f"jobsite={settings.site_id}"})
        == []
    )
    assert not (root / "output").exists()


def test_help_and_messages_that_opensafely_run_users_rely_on(checkout, command_env):
    done = run_command("run", "--help", env=command_env)
    assert done.returncode == 0
    # every option of `opensafely run` has its counterpart, under the same names
    for option in (
        "-f, --force-run-dependencies",
        "--project-dir",
        "--continue-on-error",
        "--timestamps",
        "--debug",
        "--format-output-for-github",
        "-c N, --concurrency N",
        "-m MEMORY, --memory MEMORY",
        "--cpus CPUS, --cpu CPUS",
    ):
        assert option in done.stdout, option

    root = checkout()
    done = run_command("run", "nosuch", "--project-dir", str(root), env=command_env)
    assert done.returncode == 2
    assert done.stdout == (
        "Error: `nosuch` is not an action in project.yaml. "
        "The actions are: generate, analyse, run_all.\n"
    )
    done = run_command("run", "--project-dir", str(root), env=command_env)
    assert done.returncode == 2
    assert "No actions were requested: choose one or more of generate, analyse, run_all" in (
        done.stdout
    )


MISSING_IMAGE = """\
version: "4"
actions:
  generate:
    run: python:v99 -c "echo never"
    outputs:
      moderately_sensitive:
        out: output/out.csv
"""


def test_an_image_not_on_this_machine_is_named_before_the_run(checkout, jobsite_run, monkeypatch):
    monkeypatch.setenv("JOBSITE_ALLOW_PULL", "false")  # never a pull from the internet here
    root = checkout(MISSING_IMAGE)
    status, out = jobsite_run("generate", "--project-dir", str(root))
    assert status == 1
    assert (
        "Warning: image ghcr.io/opensafely-core/python:v99 is not on this machine and "
        "pulling is turned off (allow_pull: false)" in out
    )
    assert out.index("Warning: image") < out.index("generate: preparing")
    assert "generate: internal_error: Image ghcr.io/opensafely-core/python:v99" in out
    # an image that is here is fetched from nowhere
    status, out = jobsite_run("generate", "--project-dir", str(checkout_with_image(root)))
    assert status == 0, out
    assert "image" not in out.split("Running")[0].lower()


def checkout_with_image(root: Path) -> Path:
    (root / "project.yaml").write_text(
        MISSING_IMAGE.replace("v99", "v2").replace(
            '"echo never"', '"mkdir -p output && echo n > output/out.csv"'
        )
    )
    return root

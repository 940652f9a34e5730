"""How much `jobsite run` adds to Docker's own cost.

A chain of ten trivial actions (each needs the one before and writes one small output) runs
through `jobsite run`, and the same ten commands run as ten sequential bare
`docker run --rm` of the same image. Each is repeated; the medians and their ratio are
printed. When `opensafely` (the OpenSAFELY CLI) can be installed into a temporary venv
outside the repo, `opensafely run` of the same project is a second baseline; otherwise the
reason it was skipped is printed.

    .venv/bin/python bench/bench_run.py [--repeat 5] [--actions 10] [--no-opensafely]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from images import IMAGES, build_test_images  # noqa: E402

IMAGE = IMAGES[0]  # ghcr.io/opensafely-core/python:v2
# the test images have no WORKDIR, so each command goes to /workspace itself (opensafely
# relies on the image's WORKDIR; jobsite sets it)
COMMAND = "cd /workspace && mkdir -p output && echo {i} > output/step{i}.csv"


def project_yaml(actions: int) -> str:
    lines = ['version: "5"', "actions:"]
    for i in range(actions):
        lines += [
            f"  step{i}:",
            f'    run: python:v2 -c "{COMMAND.format(i=i)}"',
        ]
        if i:
            lines.append(f"    needs: [step{i - 1}]")
        lines += [
            "    outputs:",
            "      moderately_sensitive:",
            f"        out: output/step{i}.csv",
        ]
    return "\n".join(lines) + "\n"


def fresh(project: Path) -> None:
    for name in ("output", "metadata"):
        shutil.rmtree(project / name, ignore_errors=True)


def timed(runs: dict[str, Callable[[], None]], repeat: int, before: Callable[[], None]):
    """Seconds per run of each, interleaved so that a busy machine slows each alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            before()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


# what jobsite asks of Docker for every job (DESIGN section 6)
JOBSITE_FLAGS = [
    "--init", "--network", "none", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
    "--pids-limit", "1024", "--memory", "4g", "--memory-swap", "4g", "--cpus", "2",
    "--user", "65534:65534", "-e", "HOME=/tmp", "-e", "OPENSAFELY_BACKEND=jobsite",
]  # fmt: skip


def bare_docker(project: Path, actions: int, flags: tuple[str, ...] = ()) -> None:
    for i in range(actions):
        subprocess.run(
            ["docker", "run", "--rm", *flags, "-v", f"{project}:/workspace", IMAGE, "-c",
             COMMAND.format(i=i)],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip


def jobsite_run(project: Path, actions: int) -> None:
    names = [f"step{i}" for i in range(actions)]
    done = subprocess.run(
        [str(ROOT / ".venv/bin/jobsite"), "run", *names, "--project-dir", str(project)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"jobsite run failed:\n{done.stdout}\n{done.stderr}")


def opensafely_cli(scratch: Path) -> tuple[Path | None, str]:
    """The `opensafely` command in a temporary venv, or None and why not."""
    venv = scratch / "opensafely-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin/pip"), "install", "--quiet", "opensafely"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode:
        lines = install.stderr.strip().splitlines()
        return None, f"`pip install opensafely` failed: {lines[-1] if lines else '?'}"
    # opensafely manages its job volumes with this image; our busybox test image serves
    import docker

    client = docker.from_env()
    try:
        client.images.get("ghcr.io/opensafely-core/busybox:latest")
    except docker.errors.ImageNotFound:
        client.images.get(IMAGE).tag("ghcr.io/opensafely-core/busybox", "latest")
    finally:
        client.close()
    return venv / "bin/opensafely", ""


def offline_env(cli: Path) -> dict[str, str]:
    """The environment `opensafely` runs in here: it sends nothing off loopback. Its
    version checks (PyPI, the image registry) are skipped while the file recording the last
    check is newer than four hours, so that file is made fresh in its own temp dir; and any
    HTTP it tries anyway goes to a closed port on loopback."""
    tmp = cli.parent.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / "opensafely-version-check").touch()
    proxy = "http://127.0.0.1:9"
    return {**os.environ, "TMPDIR": str(tmp), "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy,
            "http_proxy": proxy, "https_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}  # fmt: skip


def opensafely_run(cli: Path, project: Path, actions: int) -> None:
    done = subprocess.run(
        [str(cli), "run", f"step{actions - 1}", "-f", "--concurrency", "1",
         "--project-dir", str(project)],
        capture_output=True,
        text=True,
        env=offline_env(cli),
    )  # fmt: skip
    if done.returncode or not (project / f"output/step{actions - 1}.csv").exists():
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])


def measure(repeat: int, actions: int, with_opensafely: bool = True) -> tuple[dict, str]:
    """Seconds per run of the chain: bare `docker run`, the same with jobsite's flags,
    `jobsite run` and (when it can run offline) `opensafely run`; and why opensafely was
    left out, if it was."""
    build_test_images()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        scratch = Path(tmp)
        project = scratch / "study"
        project.mkdir()
        (project / "project.yaml").write_text(project_yaml(actions))

        def prepare() -> None:
            fresh(project)
            (project / "output").mkdir()
            (project / "output").chmod(0o777)  # for the bare runs as an unprivileged user

        jobsite_run(project, actions)  # warm up: images, page cache, imports
        times = timed(
            {
                "bare": lambda: bare_docker(project, actions),
                "flags": lambda: bare_docker(project, actions, tuple(JOBSITE_FLAGS)),
                "jobsite": lambda: jobsite_run(project, actions),
            },
            repeat,
            prepare,
        )
        for i in range(actions):
            assert (project / f"output/step{i}.csv").read_text() == f"{i}\n"
        if not with_opensafely:
            return times, "skipped (--no-opensafely)"
        cli, why = opensafely_cli(scratch)
        if cli is None:
            return times, f"skipped: {why}"
        try:
            times |= timed(
                {"opensafely": lambda: opensafely_run(cli, project, actions)}, repeat, prepare
            )
        except (RuntimeError, subprocess.SubprocessError) as e:
            return times, f"skipped: it could not run the project offline: {e}"
        return times, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--actions", type=int, default=10)
    parser.add_argument("--no-opensafely", action="store_true")
    args = parser.parse_args()
    times, why = measure(args.repeat, args.actions, not args.no_opensafely)
    print(f"{args.actions} chained trivial actions, {args.repeat} repetitions (interleaved):")
    print(f"  {'':30} {'median':>7} {'min':>7}  ratio to bare (medians; median of pairs)")
    report("bare `docker run --rm` x10", times["bare"], times["bare"])
    report("... with jobsite's flags", times["flags"], times["bare"])
    report("jobsite run", times["jobsite"], times["bare"])
    if "opensafely" in times:
        report("opensafely run -c 1", times["opensafely"], times["bare"], paired=False)
    else:
        print(f"  opensafely run: {why}")


def report(label: str, times: list[float], bare: list[float], paired: bool = True) -> None:
    median = statistics.median(times)
    ratio = f"{median / statistics.median(bare):.2f}"
    if paired:  # each run against the bare run next to it: steadier on a busy machine
        ratio += f"; {statistics.median(t / b for t, b in zip(times, bare, strict=True)):.2f}"
    print(f"  {label:30} {median:6.2f}s {min(times):6.2f}s  {ratio}")


if __name__ == "__main__":
    main()

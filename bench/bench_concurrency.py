"""`jobsite run -c 2` against `jobsite run -c 1` on a pipeline of actions that wait on I/O.

A project of 100 independent actions, each sleeping (as an ehrQL action waits on its
database) and writing one small output, runs through `jobsite run run_all -f` with
`-c 1` and with `-c 2`, interleaved and repeated. The medians and the ratio of `-c 1` to
`-c 2` (close to 2 means the second worker is used in full) are printed.

    .venv/bin/python bench/bench_concurrency.py [--actions 100] [--sleep 1] [--repeat 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from images import build_test_images  # noqa: E402


def project_yaml(actions: int, sleep: float) -> str:
    lines = ['version: "5"', "actions:"]
    for i in range(actions):
        lines += [
            f"  wait{i}:",
            f'    run: python:v2 -c "sleep {sleep}; mkdir -p output && echo {i} > '
            f'output/wait{i}.csv"',
            "    outputs:",
            "      moderately_sensitive:",
            f"        out: output/wait{i}.csv",
        ]
    return "\n".join(lines) + "\n"


def jobsite_run(project: Path, concurrency: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [str(ROOT / ".venv/bin/jobsite"), "run", "run_all", "-f", "-c", str(concurrency),
         "--project-dir", str(project)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"jobsite run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=100)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each action waits")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    build_test_images()
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        project = Path(tmp) / "study"
        project.mkdir()
        (project / "project.yaml").write_text(project_yaml(args.actions, args.sleep))
        jobsite_run(project, 2)  # warm up: images, page cache, imports
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeat):
            for concurrency in times:
                times[concurrency].append(jobsite_run(project, concurrency))
        for i in range(args.actions):
            assert (project / f"output/wait{i}.csv").read_text() == f"{i}\n"
    one, two = (statistics.median(times[c]) for c in (1, 2))
    print(
        f"{args.actions} independent actions sleeping {args.sleep:g}s each, "
        f"{args.repeat} repetition(s) (interleaved):"
    )
    print(f"  jobsite run -c 1   median {one:7.1f}s  ({one / args.actions:.2f}s per action)")
    print(f"  jobsite run -c 2   median {two:7.1f}s  ({two / args.actions:.2f}s per action)")
    print(f"  ratio -c 1 / -c 2: {one / two:.2f} (2.00 would use the second worker in full)")


if __name__ == "__main__":
    main()

"""What writing and removing a job's directory by our own rules costs, against the standard
library doing the same without them.

Run from the repository root:

    python bench/bench_jobdir.py [--files N] [--runs R]

A tar of N small files in nested directories (as ``git archive`` writes one) is extracted
with ``jobdir.extract_archive`` and with ``tarfile``'s ``extractall(filter="data")``; the
tree is removed with ``jobdir.remove_tree`` and with ``shutil.rmtree``; and it is measured
with ``jobdir.disk_usage`` (what the disk watcher runs while a job runs). Each figure is the
median of R runs; ratios are against the standard-library baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from jobsite import jobdir


def make_archive(files: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(files):
            content = f"line {i}\n".encode() * 20
            info = tarfile.TarInfo(f"analysis/part{i % 20}/sub{i % 7}/file{i}.py")
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def median_ms(runs: int, setup: Callable[[Path], None], call: Callable[[Path], None]) -> float:
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / "job"
            dest.mkdir()
            setup(dest)
            start = time.perf_counter()
            call(dest)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(files: int, runs: int) -> None:
    data = make_archive(files)

    def ours(dest: Path) -> None:
        jobdir.extract_archive(io.BytesIO(data), dest)

    def stdlib(dest: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.extractall(dest, filter="data")

    def nothing(dest: Path) -> None:
        pass

    print(f"{files} files, median of {runs} runs")
    base = median_ms(runs, nothing, stdlib)
    mine = median_ms(runs, nothing, ours)
    print(
        f"extract  tarfile data filter {base:8.1f} ms   jobdir {mine:8.1f} ms   x{mine / base:.2f}"
    )
    base = median_ms(runs, ours, shutil.rmtree)
    mine = median_ms(runs, ours, jobdir.remove_tree)
    print(
        f"remove   shutil.rmtree       {base:8.1f} ms   jobdir {mine:8.1f} ms   x{mine / base:.2f}"
    )
    measure = median_ms(runs, ours, jobdir.disk_usage)
    print(f"measure  du (disk watcher)   {measure:8.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    main(args.files, args.runs)

"""What sampling a job's CPU and memory (Docker stats, once a second, in a thread) costs.

Jobs run through ``LocalDockerExecutor`` (prepare, start, wait, collect, cleanup) from a
checkout, as ``jobsite run`` runs them, once with sampling and once with the sampler
replaced by one that does nothing (the baseline), interleaved. Printed, as medians over
--repeat runs: a trivial job's whole lifecycle, and the event loop's worst stall (a 10 ms
ticker's largest lateness) while a 3-second job is sampled.

    .venv/bin/python bench/bench_sampling.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from images import IMAGES, build_test_images  # noqa: E402

from jobsite.config import load_settings  # noqa: E402
from jobsite.executor import JobSpec  # noqa: E402
from jobsite.local_docker import LocalDockerExecutor  # noqa: E402


def job(checkout: Path, command: str) -> JobSpec:
    return JobSpec(
        id=secrets.token_hex(8), job_request_id=0, workspace="bench", repo=str(checkout),
        sha="bench", action="step", run_command=command, image=IMAGES[0], args=["-c", command],
        outputs={}, needs=[], source_dir=checkout, source_files=("project.yaml",),
        workspace_dir=checkout,
    )  # fmt: skip


async def lifecycle(executor: LocalDockerExecutor, spec: JobSpec) -> tuple[float, float]:
    """Seconds for the job's whole lifecycle, and the loop's worst lateness meanwhile."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            worst = max(worst, time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    try:
        await executor.prepare(spec)
        started = time.time()
        await executor.start(spec)
        exit = await executor.wait(spec, started)
        await executor.collect(spec, exit)
    finally:
        await executor.cleanup(spec.id)
    took = time.perf_counter() - start
    done = True
    await tick
    return took, worst


async def main(repeat: int) -> None:
    build_test_images()
    with tempfile.TemporaryDirectory(prefix="jobsite-bench-") as scratch:
        checkout = Path(scratch) / "study"
        checkout.mkdir()
        (checkout / "project.yaml").write_text("version: '4'\n")
        settings = load_settings(environ={}, data_dir=str(Path(scratch) / "data"))
        sampled = LocalDockerExecutor(settings)
        unsampled = LocalDockerExecutor(settings)
        unsampled._sample_usage = lambda *args: None  # the baseline: no sampling at all
        results: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for name, command in (("trivial job", "true"), ("3 s job", "sleep 3")):
            results[name] = {"sampled": [], "not sampled": []}
            for _ in range(repeat):
                for label, executor in (("sampled", sampled), ("not sampled", unsampled)):
                    results[name][label].append(await lifecycle(executor, job(checkout, command)))
        for executor in (sampled, unsampled):
            executor.close()
    for name, runs in results.items():
        took = {label: statistics.median(t for t, _ in r) for label, r in runs.items()}
        stall = {label: statistics.median(w for _, w in r) for label, r in runs.items()}
        print(
            f"{name}: sampled {took['sampled']:.3f}s, not sampled {took['not sampled']:.3f}s "
            f"(ratio {took['sampled'] / took['not sampled']:.2f}); worst event-loop stall "
            f"{stall['sampled'] * 1000:.1f} ms sampled, {stall['not sampled'] * 1000:.1f} ms not"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    asyncio.run(main(parser.parse_args().repeat))

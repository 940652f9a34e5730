"""Time `load_pipeline` over the shared corpus of real project.yaml files.

Run from the repository root:

    python bench/bench_pipeline.py [--repeat N] [--reference-path DIR]

Each corpus file is loaded N times (default 5); the median time per file is printed for
the largest file and summed over the corpus. When the OpenSAFELY pipeline library can be
imported (installed as `pipeline` or vendored in the `opensafely` package, or found under
--reference-path, a directory holding its `pipeline` package and dependencies), it is timed
the same way and the ratio printed; otherwise the bench says the reference is absent.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared/corpus/project-yaml"


def ours() -> Callable[[str], object]:
    from jobsite.pipeline import load_pipeline

    return load_pipeline


def reference(path: str | None) -> Callable[[str], object] | None:
    if path:
        sys.path.insert(0, path)
    for name in ("pipeline", "opensafely._vendor.pipeline"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "load_pipeline") and hasattr(module, "RUN_ALL_COMMAND"):
            return module.load_pipeline
    return None


def median_seconds(load: Callable[[str], object], text: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            load(text)
        except Exception:  # invalid files are timed too: rejecting them is work as well
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--reference-path")
    options = parser.parse_args()
    files = sorted(CORPUS.glob("*.yaml"))
    if not files:
        sys.exit(f"no corpus at {CORPUS}")
    texts = {path.name: path.read_text() for path in files}
    largest = max(texts, key=lambda name: len(texts[name]))
    loaders = {"jobsite": ours()}
    ref = reference(options.reference_path)
    if ref is not None:
        loaders["reference"] = ref
    print(f"{len(files)} corpus files, {options.repeat} loads each; largest: {largest} "
          f"({len(texts[largest]) // 1024} KiB)")  # fmt: skip
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference warns about old versions
        for label, load in loaders.items():
            per_file = {
                name: median_seconds(load, text, options.repeat) for name, text in texts.items()
            }
            results[label] = (per_file[largest], sum(per_file.values()))
            print(f"{label:>10}: largest file {per_file[largest] * 1000:8.2f} ms, "
                  f"corpus total {sum(per_file.values()) * 1000:9.2f} ms")  # fmt: skip
    if "reference" in results:
        (our_largest, our_total), (ref_largest, ref_total) = (
            results["jobsite"],
            results["reference"],
        )
        print(f"     ratio: reference / jobsite = {ref_largest / our_largest:.1f}x on the largest "
              f"file, {ref_total / our_total:.1f}x on the corpus")  # fmt: skip
    else:
        print(" reference: absent (install opensafely-pipeline, or pass --reference-path)")


if __name__ == "__main__":
    main()

"""jobsite: a self-hosted site for running research pipelines in Docker.

The repository root is this package; docs/architecture.md shows its layers.
"""

from __future__ import annotations

import sys

# The oldest Python jobsite runs on (pyproject.toml's requires-python; Debian 12's 3.11.2
# included); every later one is supported too. Checked on import, so that every way of
# starting jobsite says so plainly rather than failing somewhere inside.
OLDEST_PYTHON = (3, 11)


def check_python(version: tuple[int, ...] = tuple(sys.version_info)) -> None:
    if version[:2] < OLDEST_PYTHON:
        raise SystemExit(
            f"jobsite needs Python {OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} or later, but this is "
            f"Python {'.'.join(map(str, version[:3]))} ({sys.executable}). Install a newer "
            "Python and make jobsite's virtual environment with it: make clean run "
            "PYTHON=python3.12, say."
        )


check_python()

"""jobsite: a self-hosted site for running research pipelines in Docker.

The repository root is this package; docs/architecture.md shows its layers.
"""

import sys

# the oldest Python jobsite supports (Debian 12's 3.11.2 included): checked on import, so that
# an older one stops at start with this message rather than failing part way
SUPPORTED_PYTHON = (3, 11)
if sys.version_info < SUPPORTED_PYTHON:  # pragma: no cover - this Python is supported
    raise ImportError(
        f"jobsite needs Python {'.'.join(map(str, SUPPORTED_PYTHON))} or newer; "
        f"this is Python {sys.version.split()[0]}"
    )

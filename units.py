"""Times, durations and sizes: reading them from settings, and writing them for people.

Each format here is one that users, tests or other tools already see in a place of their
own (a page, an email, a job's log, the API), so where two places print a duration
differently there are two clearly named functions rather than one with a mode.
"""

from __future__ import annotations

import re
import time
from typing import Any

# -- points in time --------------------------------------------------------------------


def iso(ts: float | None) -> str | None:
    """RFC 3339 in UTC to the second, ``2024-05-01T12:00:00Z``; None for no time."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def iso_ms(ts: float | None) -> str | None:
    """RFC 3339 in UTC to the millisecond, as the JSON API gives times; None for no time."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def when(ts: float | None) -> str:
    """A time as pages and emails show it, ``2024-05-01 12:00:00 UTC``; "" for no time."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else ""


def ago(ts: float | None, now: float | None = None) -> str:
    """How long ago, in the largest whole unit: "just now", "5 min ago", "3 days ago"."""
    if not ts:
        return ""
    seconds = max(0, (now or time.time()) - ts)
    for unit, size in (("day", 86400), ("hour", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 and unit != 'min' else ''} ago"
    return "just now"


# -- durations -------------------------------------------------------------------------


def human_duration(seconds: float | None) -> str:
    """The pages' duration, two units at most like a clock: "5s", "1m 34s", "1h 01m"."""
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def expected_in(seconds: float | None) -> str:
    """When a waiting job should start, roughly: "in about 4 min", "in about 2 h"."""
    if seconds is None:
        return ""
    if seconds < 60:
        return "in under a minute"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"in about {minutes} min"
    hours = round(seconds / 3600)
    if hours < 36:
        return f"in about {hours} h"
    return f"in about {round(seconds / 86400)} days"


def precise_duration(seconds: float) -> str:
    """A job's time limit or run time in its log and status: tenths below ten seconds, where
    a short limit is set on purpose ("1.0s"), then two units: "1m 5s", "2h 3m"."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def elapsed(seconds: float) -> str:
    """Every unit down to whole seconds, as emails say how long a job took: "3h 0m 4s"."""
    seconds = round(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


def runtime(job: dict[str, Any], now: float | None = None) -> str:
    """How long a job ran (or has been running) so far, as pages show it."""
    if not job.get("started_at"):
        return ""
    end = job.get("completed_at") or (now or time.time())
    return human_duration(end - job["started_at"])


# -- sizes -----------------------------------------------------------------------------


def human_size(size: float) -> str:
    """Bytes as people read them, in the binary units settings use: ``512 MiB``, ``1.5 GiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    if unit == "bytes":
        return f"{size:.0f} bytes"
    return f"{size:.1f}".removesuffix(".0") + f" {unit}"


def disk_space(size: float) -> str:
    """Free disk space in a waiting job's status, as ``df -h`` writes it: ``12.3 GB``."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- reading settings ------------------------------------------------------------------


class Duration(float):
    """Seconds, written as a number or a number with a unit: ``90s``, ``30m``, ``24h``, ``2d``."""


class Size(int):
    """Bytes, written as a number or a number with a unit: ``512M``, ``4G``."""


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(value: Any) -> Duration:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 30m or 24h")
    if isinstance(value, int | float):
        return Duration(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value).lower())
    if not match:
        raise ValueError(f"{value!r} is not a duration such as 90s, 30m or 24h")
    number, unit = match.groups()
    return Duration(float(number) * _DURATION_UNITS[unit or "s"])


def parse_size(value: Any) -> Size:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M or 4G")
    if isinstance(value, int):
        return Size(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not match:
        raise ValueError(f"{value!r} is not a size such as 512M or 4G")
    number, unit = match.groups()
    return Size(int(float(number) * _SIZE_UNITS[unit]))

"""An open-loop load generator against a real `jobsite serve` process on loopback.

    .venv/bin/python bench/load.py ROOT [--target poll] [--rate 100] [--duration 20]
        [--signed-in] [--timeout 5] [--build]

ROOT is a history made by bench/history.py (``--build`` makes one there first). The server
runs as its own process (so its RSS can be read from /proc), with ROOT's settings, on a
free loopback port. Requests are sent at a fixed arrival rate whatever the server does
(open loop: a slow answer does not slow the next request), and each one's latency counts
from when it was due, so queueing in the client is charged to the server as a user would
feel it. Printed: sent, served rate, p50/p95/p99, errors, timeouts, the server's RSS, and
whether its log says "database is locked".

Targets (the pages a site's open tabs poll, and the heavy pages):
poll (GET /<ws>/ as htmx), job-request (a job request's fragment), api-status
(GET /api/v1/job-requests/<id>), logs (a logs page deep in the history, by ``?before=``),
admin (/admin/), home.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from helpers import ServeProcess  # noqa: E402
from history import History, build  # noqa: E402
from wire import Answer, Wire, signed_in_as  # noqa: E402

JOBSITE = Path(sys.executable).with_name("jobsite")
OK_CODES = (200, 286, 304)


# -- the server, as its own process --------------------------------------------------------


SERVER_CPU = 0  # on a machine with more than one core, the server has this one to itself


@contextlib.contextmanager
def site_server(history: History, **env: str) -> Iterator[ServeProcess]:
    """The site over a built history, as its own process, for the ``with`` block. With two
    cores or more, the server runs on core SERVER_CPU and this process on the others, so the
    load generator never takes the server's CPU (a real site's clients are elsewhere); this
    process gets all its cores back after the block, so what it runs next (`jobsite run`,
    containers' clients) is not confined to one."""
    server = ServeProcess(Path(history.config), Path(history.root) / "server.log", **env)
    cores = os.sched_getaffinity(0)
    pinned = len(cores) > 1 and SERVER_CPU in cores
    if pinned:
        server.command[:0] = ["taskset", "--cpu-list", str(SERVER_CPU)]
        os.sched_setaffinity(0, cores - {SERVER_CPU})
    try:
        with server:
            yield server
    finally:
        if pinned:
            os.sched_setaffinity(0, cores)


async def sign_in(client: httpx.AsyncClient, username: str, password: str) -> None:
    """A browser's sign-in: the form (for its CSRF token), then the post; keeps the cookie."""
    page = await client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, "no CSRF token on the sign-in page"
    response = await client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token.group(1)},
    )
    assert response.status_code in (302, 303), f"sign-in answered {response.status_code}"


# -- open-loop load ------------------------------------------------------------------------


def nearest_rank(values: list[float], p: float) -> float:
    """The p-th percentile of ``values`` (not empty), by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class Load:
    """What one run at a fixed rate saw."""

    name: str
    rate: float
    duration: float
    latencies: list[float] = field(default_factory=list)  # seconds, of answers in OK_CODES
    errors: Counter = field(default_factory=Counter)  # status code or exception name
    timeouts: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # server CPU seconds used during the run

    @property
    def sent(self) -> int:
        return len(self.latencies) + sum(self.errors.values()) + self.timeouts

    @property
    def served_rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        """The p-th percentile latency in ms (nearest rank); inf when nothing was served."""
        if not self.latencies:
            return float("inf")
        return nearest_rank(self.latencies, p) * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("inf")

    def line(self) -> str:
        errors = ", ".join(f"{k}: {n}" for k, n in self.errors.items()) or "0"
        return (
            f"{self.name:<32} {self.rate:6.0f}/s  served {self.served_rate:6.1f}/s  "
            f"p50 {self.p50:7.1f}  p95 {self.percentile(95):7.1f}  "
            f"p99 {self.percentile(99):7.1f} ms  errors {errors}  timeouts {self.timeouts}  "
            f"server CPU {self.cpu_per_request:5.2f} ms/request"
        )

    @property
    def cpu_per_request(self) -> float:
        return self.cpu / self.sent * 1000 if self.sent else 0.0


def share_cpu(cpu: float, *loads: Load) -> None:
    """Server CPU seconds used while ``loads`` ran together, shared per request sent."""
    sent = sum(load.sent for load in loads)
    for load in loads:
        load.cpu = cpu * load.sent / sent if sent else 0.0


# a request to send: (method, path, headers, JSON body or None)
Call = tuple[str, str, dict[str, str], dict | None]


async def open_loop(
    client: Wire,
    name: str,
    call: Callable[[int], Call],
    rate: float,
    duration: float,
    timeout: float = 5.0,
    ok: tuple[int, ...] = OK_CODES,
    conditional: bool = False,
    on_answer: Callable[[Answer], None] | None = None,
) -> Load:
    """Send ``call(i)`` at ``rate`` per second for ``duration`` seconds, not waiting for
    answers; latency counts from each request's due time. ``conditional``: as htmx polls,
    each request names the version (ETag) last seen of its URL."""
    result = Load(name, rate, duration)
    seen: dict[str, str] = {}
    count = int(rate * duration)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int, due: float) -> None:
        method, path, headers, body = call(i)
        if conditional and path in seen:
            headers = {**headers, "If-None-Match": seen[path]}
        try:
            async with asyncio.timeout(timeout):
                response = await client.request(method, path, headers=headers, json=body)
        except TimeoutError:
            result.timeouts += 1
            return
        except OSError as e:
            result.errors[type(e).__name__] += 1
            return
        if on_answer is not None:
            on_answer(response)
        if response.status_code in ok:
            result.latencies.append(loop.time() - due)
            if "etag" in response.headers:
                seen[path] = response.headers["etag"]
        else:
            result.errors[response.status_code] += 1

    tasks = []
    for i in range(count):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    result.elapsed = loop.time() - start
    return result


def client_for(server: ServeProcess) -> httpx.AsyncClient:
    """A browser-like client, for signing in (forms, cookies); the load itself goes
    through ``wire_for``."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    return httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30.0)


async def wire_for(server: ServeProcess, user: str | None = None, password: str = "") -> Wire:
    """The lean client the load goes through, signed in as ``user`` if one is given."""
    wire = Wire(server.url)
    if user is not None:
        async with client_for(server) as browser:
            await sign_in(browser, user, password)
            signed_in_as(browser, wire)
    return wire


HTMX = {"HX-Request": "true"}
TARGETS = ("poll", "job-request", "api-status", "logs", "admin", "home", "health")


def targets(history: History) -> dict[str, Callable[[int], Call]]:
    """Each target's request for the i-th send, spread over the history's workspaces."""
    ws = history.workspaces
    finished = history.finished_requests
    api = {"Authorization": f"Bearer {history.developer_token}"}

    def pick(items: list, i: int):
        return items[i % len(items)]

    return {
        "poll": lambda i: ("GET", f"/{pick(ws, i)}/", HTMX, None),
        "job-request": lambda i: (
            "GET",
            f"/{pick(finished, i)[0]}/logs/{pick(finished, i)[1]}",
            HTMX,
            None,
        ),
        "api-status": lambda i: ("GET", f"/api/v1/job-requests/{pick(finished, i)[1]}", api, None),
        # a page of older requests, half-way down the workspace's history (keyset: ?before=)
        "logs": lambda i: (
            "GET",
            f"/{pick(finished, i)[0]}/logs?before={pick(finished, i)[1] // 2}",
            {},
            None,
        ),
        "admin": lambda i: ("GET", "/admin/", {}, None),
        "home": lambda i: ("GET", "/", {}, None),
        "health": lambda i: ("GET", "/api/v1/health", {}, None),
    }


async def with_writes(
    server: ServeProcess, history: History, clients: int, duration: float, timeout: float = 10.0
) -> tuple[Load, Load]:
    """``clients`` open tabs for ``duration`` seconds, each sending a request every 2 s:
    90 % the polls of open pages (workspace polls as htmx sends them, job request
    fragments), 10 % writes (job requests submitted, and the newest cancelled), while the
    queue runs jobs. Returns (reads, writes)."""
    rate = clients / 2
    api = {"Authorization": f"Bearer {history.developer_token}"}
    ws, finished = history.workspaces, history.finished_requests
    submitted: list[int] = []

    def read(i: int) -> Call:
        if i % 3 == 2:
            where, request_id = finished[i % len(finished)]
            return ("GET", f"/{where}/logs/{request_id}", HTMX, None)
        return ("GET", f"/{ws[i % len(ws)]}/", HTMX, None)

    def write(i: int) -> Call:
        if i % 2 and submitted:
            return ("POST", f"/api/v1/job-requests/{submitted.pop()}/cancel", api, None)
        path = f"/api/v1/workspaces/{ws[i % len(ws)]}/job-requests"
        return ("POST", path, api, {"actions": ["action_000"]})

    def note(response: Answer) -> None:
        if response.request.method == "POST" and response.status_code == 201:
            submitted.append(response.json()["id"])

    async with client_for(server) as browser:
        resumed = await browser.post(
            "/api/v1/admin/queue/resume",
            headers={"Authorization": f"Bearer {history.admin_token}"},
        )
        assert resumed.status_code == 200, resumed.text
    async with Wire(server.url) as client:
        reads, writes = await asyncio.gather(
            open_loop(client, f"{clients} clients: polls", read, rate * 0.9, duration, timeout,
                      conditional=True),
            open_loop(client, f"{clients} clients: submit/cancel", write, rate * 0.1, duration,
                      timeout, ok=(200, 201), on_answer=note),
        )  # fmt: skip
    return reads, writes


async def run(
    history: History,
    target: str,
    rate: float,
    duration: float,
    signed_in: bool,
    timeout: float,
    profile: Path | None = None,
    conditional: bool = False,
) -> None:
    with site_server(history) as server:
        spy = None
        if profile:
            spy = subprocess.Popen(
                [str(JOBSITE.with_name("py-spy")), "record", "--format", "raw", "-o",
                 str(profile), "--pid", str(server.proc.pid), "--duration", str(int(duration))],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        user = None
        if signed_in or target == "admin":
            user = history.admin if target == "admin" else history.developer
        async with await wire_for(server, user, history.password) as client:
            call = targets(history)[target]
            name = (
                target + (" (signed in)" if signed_in else "") + (" (ETag)" if conditional else "")
            )
            before = server.cpu_seconds()
            result = await open_loop(
                client, name, call, rate, duration, timeout, conditional=conditional
            )
            result.cpu = server.cpu_seconds() - before
        if spy:
            spy.wait()
        print(result.line())
        print(f"server RSS {server.rss_mb():.0f} MB; ", end="")
        print(f'"database is locked" in its log: {server.log_says("database is locked")}')


async def run_with_writes(history: History, clients: int, duration: float) -> None:
    with site_server(history) as server:
        before = server.cpu_seconds()
        reads, writes = await with_writes(server, history, clients, duration)
        share_cpu(server.cpu_seconds() - before, reads, writes)
        print(reads.line())
        print(writes.line())
        print(f"server RSS {server.rss_mb():.0f} MB; ", end="")
        print(f'"database is locked" in its log: {server.log_says("database is locked")}')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--build", action="store_true", help="build the history in ROOT first")
    parser.add_argument("--target", default="poll", choices=TARGETS)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--timeout", type=float, default=5)
    parser.add_argument("--signed-in", action="store_true")
    parser.add_argument(
        "--conditional", action="store_true", help="send If-None-Match as htmx polls do"
    )
    parser.add_argument(
        "--profile", type=Path, help="record the server with py-spy into this file (raw stacks)"
    )
    parser.add_argument(
        "--writes",
        type=int,
        metavar="CLIENTS",
        help="instead of one target: CLIENTS open tabs, 90%% polls, 10%% submit/cancel",
    )
    args = parser.parse_args()
    history = build(args.root) if args.build else History.load(args.root)
    if args.writes:
        asyncio.run(run_with_writes(history, args.writes, args.duration))
        raise SystemExit(0)
    asyncio.run(
        run(
            history,
            args.target,
            args.rate,
            args.duration,
            args.signed_in,
            args.timeout,
            args.profile,
            args.conditional,
        )
    )

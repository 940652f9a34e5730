"""Overload: at three times the capacity of the slowest page, the site answers what it
admits in time, refuses the rest at once, keeps its cheap pages as fast as ever, and stays
small.

    .venv/bin/python bench/bench_overload.py [ROOT] [--duration 20] [--light 5]

ROOT is a history made by bench/history.py (default: one is built in a temporary dir:
50,000 finished jobs, 2,000 queued). The server is `jobsite serve` as its own process on
loopback, with its default request limits. In one run:

1. capacity: each page asked for one request after another (nothing else running); the
   slowest page's capacity is 1 / its median time;
2. baseline: home and an API job-request status at a light rate (--light per second),
   alone: their normal p50 and p95; and the health check alone at the flood's rate, the
   floor any answer has on this machine at that rate;
3. overload: the slowest page at 3x its capacity (open loop: requests go out at that rate
   whatever the answers), with home and the API status at the light rate alongside; the
   server's RSS read every 0.25 s;
4. after: the server's RSS 5 s after the load ends.

Printed: the admitted requests' p95 (target <= 100 ms), the refused ones' p95 (503, target
<= 10 ms), the cheap pages' p95 under load against their baseline (ratio), and the RSS
during and after (target <= 300 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from history import History, build  # noqa: E402
from load import Load, client_for, open_loop, sign_in, site_server, targets  # noqa: E402

PAGES = ("admin", "logs", "job-request", "poll", "home", "api-status")
CHEAP = ("home", "api-status")
CLOSED_LOOP_SECONDS = 3.0
ANSWERED = (200, 286, 304, 503)


async def service_time(client: httpx.AsyncClient, call, seconds: float) -> float:
    """Median ms of one request after another for ``seconds``."""
    times = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline or len(times) < 5:
        method, path, headers, body = call(i)
        start = time.monotonic()
        response = await client.request(method, path, headers=headers, json=body)
        times.append(time.monotonic() - start)
        assert response.status_code in (200, 286), (path, response.status_code)
        i += 1
    return statistics.median(times) * 1000


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Split:
    """The latencies (ms) of one open-loop run, split into admitted and refused answers."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def note(self, response: httpx.Response) -> None:
        if response.status_code in ANSWERED:
            self.statuses.append(response.status_code)

    def of(self, load: Load, refused: bool) -> list[float]:
        # open_loop records the latency right after calling note(), for the same answer
        return [
            latency * 1000
            for latency, status in zip(load.latencies, self.statuses, strict=True)
            if (status == 503) == refused
        ]


async def main(
    history: History, duration: float, light: float, rate: float | None, **env: str
) -> None:
    with site_server(history, **env) as server:
        calls = targets(history)
        async with client_for(server) as anyone, client_for(server) as admin:
            await sign_in(admin, history.admin, history.password)
            client = {page: admin if page == "admin" else anyone for page in PAGES}

            print(f"1. each page alone, one request after another ({CLOSED_LOOP_SECONDS:g} s):")
            medians = {}
            for page in PAGES:
                medians[page] = await service_time(client[page], calls[page], CLOSED_LOOP_SECONDS)
                print(f"   {page:<12} median {medians[page]:7.1f} ms")
            slowest = max(medians, key=medians.__getitem__)
            capacity = 1000 / medians[slowest]
            rate = rate or 3 * capacity
            print(f"   slowest: {slowest}, capacity {capacity:.1f} req/s; load {rate:.1f} req/s "
                  f"(x{rate / capacity:.1f})")  # fmt: skip

            print(f"2. cheap pages alone at {light:g}/s for {duration:g} s:")
            alone = await asyncio.gather(
                *(open_loop(client[page], page, calls[page], light, duration) for page in CHEAP)
            )
            for load in alone:
                print(
                    f"   {load.name:<12} p50 {load.p50:6.1f} ms  p95 {load.percentile(95):6.1f} ms"
                )

            # the floor on this machine: the cheapest answer there is, at the flood's rate
            floor = await open_loop(anyone, "health", calls["health"], rate, duration / 2)
            print(f"   health at {rate:.1f} req/s (the cheapest answer, as a floor): "
                  f"p50 {floor.p50:.1f} ms  p95 {floor.percentile(95):.1f} ms")  # fmt: skip

            print(f"3. {slowest} at {rate:.1f} req/s for {duration:g} s, with the "
                  "cheap pages alongside:")  # fmt: skip
            rss: list[float] = []
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    rss.append(server.rss_mb())
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            split = Split()
            cpu_before, own_before = server.cpu_seconds(), time.process_time()
            flood, *during = await asyncio.gather(
                open_loop(
                    client[slowest], slowest, calls[slowest], rate, duration,
                    ok=ANSWERED, on_answer=split.note,
                ),
                *(open_loop(client[page], page, calls[page], light, duration) for page in CHEAP),
            )  # fmt: skip
            done.set()
            await sampler
            server_cpu = server.cpu_seconds() - cpu_before
            own_cpu = time.process_time() - own_before

        admitted, refused = split.of(flood, refused=False), split.of(flood, refused=True)
        lost = sum(flood.errors.values()) + flood.timeouts
        print(f"   admitted {len(admitted):5d}  p50 {percentile(admitted, 50):6.1f} ms  "
              f"p95 {percentile(admitted, 95):6.1f} ms  (target <= 100 ms)")  # fmt: skip
        print(f"   refused  {len(refused):5d}  p50 {percentile(refused, 50):6.1f} ms  "
              f"p95 {percentile(refused, 95):6.1f} ms  (503; target <= 10 ms; "
              f"x{percentile(refused, 95) / floor.percentile(95):.2f} the floor)")  # fmt: skip
        print(f"   other errors or timeouts: {lost} {dict(flood.errors) or ''}")
        print(f"   CPU: the server {server_cpu / duration:.0%} of a core, this load generator "
              f"{own_cpu / duration:.0%}")  # fmt: skip
        for before, load in zip(alone, during, strict=True):
            ratio = load.percentile(95) / before.percentile(95)
            print(f"   {load.name:<12} p95 {load.percentile(95):6.1f} ms  (alone "
                  f"{before.percentile(95):.1f} ms: x{ratio:.2f})  errors "
                  f"{dict(load.errors) or 0}  timeouts {load.timeouts}")  # fmt: skip
        await asyncio.sleep(5)
        print(f"4. server RSS: at most {max(rss):.0f} MB during the load, {server.rss_mb():.0f} MB"
              " 5 s after it (target <= 300 MB)")  # fmt: skip
        print(f'   "Traceback" in its log: {server.log_says("Traceback")}; "client went away": '
              f'{server.log_says("client went away")}')  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, nargs="?", help="a history from bench/history.py")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--light", type=float, default=5, help="cheap pages' rate per second")
    parser.add_argument("--rate", type=float, help="the flood's rate (default: 3x capacity)")
    parser.add_argument(
        "--per-page", help="the server's max_requests_per_page (default: its own default)"
    )
    args = parser.parse_args()
    env = {"JOBSITE_MAX_REQUESTS_PER_PAGE": args.per_page} if args.per_page else {}
    if args.root:
        history = History.load(args.root)
        asyncio.run(main(history, args.duration, args.light, args.rate, **env))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            history = build(Path(tmp) / "history")
            asyncio.run(main(history, args.duration, args.light, args.rate, **env))

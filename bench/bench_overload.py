"""Overload: at three times the capacity of the slowest page, the site answers what it
admits in time, refuses the rest at once, keeps its cheap pages as fast as ever, and stays
small.

    .venv/bin/python bench/bench_overload.py [ROOT] [--duration 20] [--light 20] [--repeat 3]

ROOT is a history made by bench/history.py (default: one is built in a temporary dir:
50,000 finished jobs, 2,000 queued). The server is `jobsite serve` as its own process on
loopback, with its default request limits, on a core of its own (bench/load.py); the load
goes through bench/wire.py, a client lean enough that what is measured is the server. In
one run:

1. capacity: each page asked for one request after another (nothing else running); the
   slowest page's capacity is 1 / its median time;
2. baseline: home and an API job-request status at a light rate (--light per second),
   alone: their normal p50 and p95; and the health check alone at the flood's rate, the
   floor any answer has on this machine at that rate;
3. overload: the slowest page at 3x its capacity (open loop: requests go out at that rate
   whatever the answers), with home and the API status at the light rate alongside; the
   server's RSS read every 0.25 s;
4. after: the server's RSS 5 s after the load ends.

Phases 2 and 3 run --repeat times (the machine is shared and noisy) and each figure is the
median of the rounds: the admitted requests' p95 (target <= 100 ms) and rate (against the
capacity), the refused ones' p95 (503, target <= 10 ms), the cheap pages' p95 under load
against their baseline (ratio), and the RSS during and after (target <= 300 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from history import History, build  # noqa: E402
from load import Load, nearest_rank, open_loop, site_server, targets, wire_for  # noqa: E402
from wire import Answer, Wire  # noqa: E402

PAGES = ("admin", "logs", "job-request", "poll", "home", "api-status")
CHEAP = ("home", "api-status")
CLOSED_LOOP_SECONDS = 3.0
ANSWERED = (200, 286, 304, 503)


async def service_time(client: Wire, call, seconds: float) -> float:
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
    return nearest_rank(values, p) if values else float("nan")


class Split:
    """The latencies (ms) of one open-loop run, split into admitted and refused answers."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def note(self, response: Answer) -> None:
        if response.status_code in ANSWERED:
            self.statuses.append(response.status_code)

    def of(self, load: Load, refused: bool) -> list[float]:
        # open_loop records the latency right after calling note(), for the same answer
        return [
            latency * 1000
            for latency, status in zip(load.latencies, self.statuses, strict=True)
            if (status == 503) == refused
        ]


async def one_round(
    server, calls, client, slowest: str, rate: float, duration: float, light: float
) -> dict[str, float]:
    """Phases 2 and 3 once: the cheap pages alone, the floor, then the flood; the figures."""
    figures: dict[str, float] = {}
    alone = await asyncio.gather(
        *(open_loop(client[page], page, calls[page], light, duration) for page in CHEAP)
    )
    for load in alone:
        figures[f"{load.name} alone p95"] = load.percentile(95)
    # the floor on this machine: the cheapest answer there is, at the flood's rate
    floor = await open_loop(client["home"], "health", calls["health"], rate, duration / 2)
    figures["floor p95"] = floor.percentile(95)

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
    admitted, refused = split.of(flood, refused=False), split.of(flood, refused=True)
    figures.update(
        {
            "admitted p95": percentile(admitted, 95),
            "admitted per s": len(admitted) / flood.elapsed,
            "refused p95": percentile(refused, 95),
            "lost": sum(flood.errors.values()) + flood.timeouts,
            "server CPU": (server.cpu_seconds() - cpu_before) / flood.elapsed,
            "generator CPU": (time.process_time() - own_before) / flood.elapsed,
            "RSS during": max(rss),
        }
    )
    for load in (flood, *during):
        if load.errors or load.timeouts:
            print(f"   {load.name}: {load.timeouts} timeouts, errors {dict(load.errors)}")
    for load in during:
        figures[f"{load.name} p95"] = load.percentile(95)
        figures[f"{load.name} lost"] = sum(load.errors.values()) + load.timeouts
    return figures


async def main(
    history: History, duration: float, light: float, rate: float | None, repeat: int, **env: str
) -> None:
    with site_server(history, **env) as server:
        calls = targets(history)
        anyone = await wire_for(server)
        admin = await wire_for(server, history.admin, history.password)
        async with anyone, admin:
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

            print(f"2-3. {repeat} rounds of: home and the API status alone at {light:g}/s for "
                  f"{duration:g} s (their normal p95); the health check at {rate:.1f} req/s "
                  f"(the floor); {slowest} at {rate:.1f} req/s for {duration:g} s with the "
                  "cheap pages alongside")  # fmt: skip
            rounds = []
            for i in range(repeat):
                figures = await one_round(server, calls, client, slowest, rate, duration, light)
                rounds.append(figures)
                print(f"   round {i + 1}: " + ", ".join(
                    f"{name} {value:.1f}" for name, value in figures.items()
                ))  # fmt: skip
        await asyncio.sleep(5)
        after = server.rss_mb()
        tracebacks = server.log_says("Traceback")
        went_away = server.log_says("client went away")

    def median(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    print(f"medians of {repeat} rounds:")
    print(f"   admitted p95 {median('admitted p95'):6.1f} ms (target <= 100 ms); "
          f"{median('admitted per s'):.0f} req/s admitted, "
          f"{median('admitted per s') / capacity:.0%} of the capacity")  # fmt: skip
    print(f"   refused  p95 {median('refused p95'):6.1f} ms (503; target <= 10 ms; "
          f"x{median('refused p95') / median('floor p95'):.2f} the health check's floor "
          f"{median('floor p95'):.1f} ms)")  # fmt: skip
    for page in CHEAP:
        under, alone = median(f"{page} p95"), median(f"{page} alone p95")
        print(f"   {page:<12} p95 {under:6.1f} ms under the load, {alone:.1f} ms alone: "
              f"x{under / alone:.2f}  (target: within its normal p95)")  # fmt: skip
    lost = sum(r["lost"] + sum(r[f"{p} lost"] for p in CHEAP) for r in rounds)
    print(f"   errors or timeouts (not 503): {lost:.0f} in all rounds")
    print(f"   CPU: the server {median('server CPU'):.0%} of a core, this load generator "
          f"{median('generator CPU'):.0%}")  # fmt: skip
    print(f"4. server RSS: at most {max(r['RSS during'] for r in rounds):.0f} MB during the "
          f"load, {after:.0f} MB 5 s after it (target <= 300 MB)")  # fmt: skip
    print(f'   "Traceback" in its log: {tracebacks}; "client went away": {went_away}')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, nargs="?", help="a history from bench/history.py")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of phases 2 and 3")
    parser.add_argument("--light", type=float, default=20, help="cheap pages' rate per second")
    parser.add_argument("--rate", type=float, help="the flood's rate (default: 3x capacity)")
    parser.add_argument(
        "--per-page", help="the server's max_requests_per_page (default: its own default)"
    )
    args = parser.parse_args()
    env = {"JOBSITE_MAX_REQUESTS_PER_PAGE": args.per_page} if args.per_page else {}
    if args.root:
        history = History.load(args.root)
        asyncio.run(main(history, args.duration, args.light, args.rate, args.repeat, **env))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            history = build(Path(tmp) / "history")
            asyncio.run(main(history, args.duration, args.light, args.rate, args.repeat, **env))

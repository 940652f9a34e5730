"""Admission: how much work the site takes on at once, and what it does with the rest.

Every request holds one of ``max_requests`` places while it is handled. Past that the site
answers at once with 503 and ``Retry-After`` (a small page, or JSON for the API) instead of
queueing work it cannot finish in time: queued requests are what made every page slow for
everyone. One page may hold at most ``max_requests_per_page`` places, so a flood of one
page cannot crowd out the others. The requests that must get through when the site is busy
— the health check, signing in, submitting a job request, the pages' own CSS and JS — are
never refused before the rest: they skip the per-page limits and have a reserve of places
that no other request may take.

Counting requests is not enough: the site answers on one event loop, so twenty requests of
a page that computes for 4 ms are 80 ms of waiting for the last of them, and for any other
request that arrives meanwhile. So each page's cost is measured as it is answered (the time
it takes when no other request is in flight), and while the site is busy a page may have at
most WORK_BUDGET of work in flight (``WORK_BUDGET / cost`` requests, at least one). A heavy
page is then admitted a few at a time and each answered within about WORK_BUDGET, the other
pages keep the rest of the site, and the surplus is refused at once. (A quiet site takes a
burst of one page, up to ``max_requests_per_page``: ten tabs opened at once all load.)

A page asked for faster than the site answers it (some of its requests were refused within
FLOOD_MEMORY) is flooded: it may then take at most PAGE_SHARE of the site's time, counted
in its measured cost per request admitted, so the flood leaves the site room (CPU it does
not use) for every other page however long it lasts. One person clicking through pages is
never refused, so never held to a share.

Busy is what the site watches: how far its event loop runs behind for its own work, and how
much CPU it uses. While it is behind, or near the end of its core (BUSY_LIMIT), and other
requests are at work (not waiting for their client to send the body), it also refuses the
pages that usually take longest, and keeps answering the cheap ones and the reserved ones:
the cheap pages keep their speed, the quick 503s stay quick. A loop that is late because the
machine's other processes (the jobs) had the CPU is not behind for its own work: on Linux the
time the loop's thread waited for a CPU (``/proc/self/task/<id>/schedstat``) is taken off
its lateness, so a busy machine does not make a quiet site refuse its users.

The quick pages also go first for the CPU. A page that costs at most QUICK_SHARE of the
costliest is quick: it is rendered on the event loop, and while one is at work the long
renders of the other pages (in their own thread) pause between pieces of their output, for
at most GIVE_WAY_MAX each, instead of taking the interpreter's lock from it every switch
interval (under bench_overload's flood the cheap pages' p95 went from 2.6-2.9x their
idle p95 to 1.4-1.6x, with the lookups by key of db.Database.lookup; and to 0.8-1.0x once
the long renders also hand the lock back every millisecond: views.base.HAND_OVER).

A request whose client has gone away stops its work: its handler is cancelled, and the
disconnect is logged as one line. The requests refused as busy get no access log line of
their own (a flood would write one a request, as fast as the site refuses them): one line
every SUMMARY_EVERY counts them, page by page, and a last one when the site stops.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from starlette.routing import BaseRoute, Match

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER = 2  # seconds a refused client is asked to wait
TICK = 0.02  # seconds between two looks at the event loop's lag
LAG_DECAY = 0.9  # per tick: a lag is remembered for a while (0.9**22 < 0.1: about 0.5 s)
LAG_LIMIT = 0.005  # seconds behind past which the site sheds its costly pages
BUSY_LIMIT = 0.8  # of one core: past it the site keeps the rest for its cheap pages
CHEAP = 0.002  # seconds: a page that costs less is never shed for lag
WORK_BUDGET = 0.02  # seconds of one page's work a busy site takes at once (by its cost)
PAGE_SHARE = 0.5  # of the site's time at most for a flooded page
FLOOD_MEMORY = 1.0  # seconds: a page refused less long ago than this is flooded
FIRST_COST = 0.005  # seconds: the cost assumed of a page not answered yet
QUICK_SHARE = 0.25  # of the costliest page's cost: a page that costs at most this is quick
GIVE_WAY_MAX = 0.02  # seconds a long render may pause for the quick requests, in all
SUMMARY_EVERY = 10.0  # seconds between two log lines counting the requests refused as busy
BUSY_MESSAGE = (
    "The site is busy: it is answering as many requests as it can at once. "
    f"Nothing was done; try again in {RETRY_AFTER} seconds."
)
STOPPING_MESSAGE = (
    "The site is restarting: this request was stopped before it finished. "
    f"Try again in {RETRY_AFTER} seconds."
)


# whether the request this task answers is quick (set by AdmissionMiddleware)
answering_quick: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "answering_quick", default=False
)


# set while a request is refused as busy: its access log line is left out (QuietRefusals)
refusing_as_busy: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "refusing_as_busy", default=False
)


class QuietRefusals(logging.Filter):
    """Leaves out the access log lines of the requests refused as busy (for uvicorn's access
    handler): Admission.summarise counts them instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not refusing_as_busy.get()


class Admission:
    """The requests in flight, per page and in all; which to admit."""

    def __init__(
        self,
        routes: list[BaseRoute],
        max_requests: int,
        max_requests_per_page: int,
        reserved: Collection[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = routes
        self.clock = clock  # seconds, for the pages' shares
        self.max_requests = max_requests
        self.max_requests_per_page = max_requests_per_page
        self.reserved = frozenset(reserved)
        # the reserved requests' own places, on top of max_requests
        self.reserve = max(2, max_requests // 4)
        self.in_flight = 0
        self.per_page: Counter[str] = Counter()
        self.waiting: Counter[str] = Counter()  # of those, waiting for their client's body
        # each page's work admitted lately (seconds of its cost, draining at PAGE_SHARE a
        # second), and when that was reckoned
        self.work: dict[str, tuple[float, float]] = {}
        self.refused_at: dict[str, float] = {}  # when a request of each page was last refused
        self.refused = 0
        self.unlogged: Counter[str] = Counter()  # refused per page since the last count logged
        self.unlogged_since = 0.0  # when the first of those was refused
        self.logged_at = -SUMMARY_EVERY  # when the last count was logged
        self.abandoned = 0
        # how far the event loop runs behind for its own work (seconds), and each page's usual
        # time to answer
        self.lag = 0.0
        self.busy = 0.0  # the CPU the site used lately, as a share of one core
        self.cost: dict[str, float] = {}
        self.measured: Counter[str] = Counter()  # how many answers each page's cost is from
        self.heaviest = 0.0  # the usual cost of the costliest page that may be refused
        self._watching = False
        self.started = 0  # requests admitted so far
        self.quick_at_work = 0
        # set while no quick request is at work: a long render waits for it (another thread)
        self.no_quick_at_work = threading.Event()
        self.no_quick_at_work.set()

    @property
    def all_waiting(self) -> int:
        """The requests in flight that wait for their client's body."""
        return sum(self.waiting.values())

    def page(self, scope: Scope) -> str:
        """The name of the route that will answer (server.ROUTES), or "" for none."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.name  # type: ignore[attr-defined]
        return ""

    def admit(self, page: str) -> bool:
        if page in self.reserved:
            return self.in_flight < self.max_requests + self.reserve or self.shed(page)
        if self.in_flight >= self.max_requests or self.per_page[page] >= self.max_requests_per_page:
            return self.shed(page)
        cost = self.cost.get(page, FIRST_COST)
        now = self.clock()
        level, then = self.work.get(page, (0.0, now))
        level = max(0.0, level - (now - then) * PAGE_SHARE)  # the page's work not yet drained
        if self.busy > BUSY_LIMIT or self.lag > LAG_LIMIT:
            # busy: while other requests are at work the costly pages wait first, and no
            # page may hold more than WORK_BUDGET of work (the requests waiting for their
            # client to send the body do no work meanwhile)
            if self.in_flight > self.all_waiting and cost > CHEAP and cost * 2 >= self.heaviest:
                return self.shed(page)
            if self.per_page[page] - self.waiting[page] >= self.page_limit(cost):
                return self.shed(page)
        # a page asked for faster than it is answered (some of it was refused lately: never
        # one person's clicks) takes at most its share of the site's time
        # (the work counted is capped at a burst: what was answered in full before the
        # flood does not count against it)
        burst = max(WORK_BUDGET, 2 * cost)
        flooded = now - self.refused_at.get(page, -FLOOD_MEMORY) < FLOOD_MEMORY
        if flooded and level + cost > burst:
            return self.shed(page)
        self.work[page] = (min(level + cost, burst), now)
        return True

    def is_quick(self, page: str) -> bool:
        return self.cost.get(page, FIRST_COST) <= self.heaviest * QUICK_SHARE

    def page_limit(self, cost: float) -> int:
        """How many requests of a page that costs ``cost`` seconds may be at work at once."""
        return max(1, min(self.max_requests_per_page, int(WORK_BUDGET / cost)))

    def shed(self, page: str) -> bool:
        """Notes that a request of ``page`` is refused; False."""
        now = self.clock()
        self.refused += 1
        self.refused_at[page] = now
        if not self.unlogged:
            self.unlogged_since = now
        self.unlogged[page or "no page"] += 1
        return False

    def summarise(self, stopping: bool = False) -> None:
        """Logs how many requests were refused as busy since the last such line, page by
        page, once SUMMARY_EVERY has passed since it (at once when the site is stopping)."""
        now = self.clock()
        if not self.unlogged or (not stopping and now - self.logged_at < SUMMARY_EVERY):
            return
        pages = ", ".join(f"{page} {count}" for page, count in self.unlogged.most_common())
        log.warning(
            "refused %d requests in %.1f s, the site being busy (503, Retry-After): %s",
            self.unlogged.total(),
            now - self.unlogged_since,
            pages,
        )
        self.unlogged.clear()
        self.logged_at = now

    def answered(self, page: str, seconds: float, alone: bool) -> None:
        """A page took ``seconds`` to answer, ``alone`` if no other request was in flight
        meanwhile. Its usual cost is a moving average of the times it took alone: a request
        that shared the site took longer for the others' sake (until there is such a time,
        any will do). The first answer of a page is cold (its templates compiled, its first
        connection opened: home took 22 ms, then 3 ms), so the next one alone replaces it."""
        usual = self.cost.get(page)
        if usual is None or (alone and self.measured[page] == 1):
            self.cost[page] = seconds
        elif alone:
            self.cost[page] = usual * 0.8 + seconds * 0.2
        else:
            return
        self.measured[page] += 1
        if page not in self.reserved:
            # (signing in costs a password hash: the pages that may be shed are compared
            # with each other only)
            self.heaviest = max(c for p, c in self.cost.items() if p not in self.reserved)

    def watch_the_loop(self) -> None:
        """Measures, from now on, how late the event loop runs a callback due every TICK: a
        loop that falls behind answers everything late, however few requests are in flight
        (a page that computes for 20 ms holds up every other one for as long)."""
        if self._watching:
            return
        self._watching = True
        loop = asyncio.get_running_loop()
        waited = cpu_waits()

        def tick(due: float, cpu: float, before: float) -> None:
            now, used, after = loop.time(), time.process_time(), waited()
            # late for the loop's own work: not the time its thread waited for a CPU
            self.lag = max(now - due - (after - before), self.lag * LAG_DECAY)
            # over about five ticks
            self.busy = self.busy * 0.8 + 0.2 * (used - cpu) / (now - due + TICK)
            self.summarise()
            loop.call_at(now + TICK, tick, now + TICK, used, after)

        start = loop.time() + TICK
        loop.call_at(start, tick, start, time.process_time(), waited())


def cpu_waits() -> Callable[[], float]:
    """A clock of the seconds the calling thread has spent ready to run but waiting for a
    CPU (Linux's schedstat); one that stands still where there is none to read."""
    path = f"/proc/self/task/{threading.get_native_id()}/schedstat"

    def waited() -> float:
        try:
            with open(path, "rb", buffering=0) as stat:
                return int(stat.read(64).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    return waited


class AdmissionMiddleware:
    """Admits a request or refuses it at once; cancels the admitted ones whose client went
    away. Pure ASGI, outermost, so that a refusal costs next to nothing."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = self.admission
        admission.watch_the_loop()
        page = admission.page(scope)
        if not admission.admit(page):
            marked = refusing_as_busy.set(True)
            try:
                await refuse(scope, send)
            finally:
                refusing_as_busy.reset(marked)
            return
        alone = not admission.in_flight
        admission.started += 1
        ticket = admission.started
        admission.in_flight += 1
        admission.per_page[page] += 1
        quick = admission.is_quick(page)
        if quick:
            admission.quick_at_work += 1
            admission.no_quick_at_work.clear()
        marked = answering_quick.set(quick)
        start = time.monotonic()
        try:
            await self.handle(scope, receive, send, page)
        finally:
            answering_quick.reset(marked)
            admission.in_flight -= 1
            admission.per_page[page] -= 1
            if quick:
                admission.quick_at_work -= 1
                if not admission.quick_at_work:
                    admission.no_quick_at_work.set()
            alone = alone and admission.started == ticket  # and no other request came
            admission.answered(page, time.monotonic() - start, alone)

    async def handle(self, scope: Scope, receive: Receive, send: Send, page: str) -> None:
        """The request, cancelled when its client disconnects before the answer is sent."""
        handler = asyncio.current_task()
        assert handler is not None
        body: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)
        started = False  # the answer began
        answered = False  # the whole answer was sent
        finished = False  # the handler returned
        gone = False

        async def watch() -> None:
            # the one reader of the client's side: the body goes to the handler through
            # `body` (one message at a time, so a large upload still waits for the handler)
            nonlocal gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not (answered or finished):
                        gone = True
                        handler.cancel()
                    return
                await body.put(message)

        async def handler_receive() -> Message:
            if not body.empty():
                return body.get_nowait()
            waiting = self.admission.waiting
            waiting[page] += 1
            try:
                return await body.get()
            finally:
                waiting[page] -= 1

        async def handler_send(message: Message) -> None:
            nonlocal started, answered
            started = True
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True
            await send(message)

        watcher = asyncio.create_task(watch(), name="client-watch")
        try:
            await self.app(scope, handler_receive, handler_send)
        except asyncio.CancelledError:
            # the client went away, or the server is stopping (uvicorn cancels the requests
            # still running after its grace period): either way one line, not a traceback
            handler.uncancel()
            if gone:
                self.admission.abandoned += 1
                log.info(
                    "client went away before the answer: %s %s (its work was stopped)",
                    scope["method"],
                    scope["path"],
                )
                return
            log.info(
                "stopped answering %s %s: the site is stopping", scope["method"], scope["path"]
            )
            if not started:
                await refuse(scope, send, STOPPING_MESSAGE)
        finally:
            finished = True
            watcher.cancel()


@functools.cache
def busy_bodies(message: str) -> tuple[bytes, bytes]:
    """A refusal as a small page and as the API's JSON error."""
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Busy</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'></head>"
        f"<body><h1>The site is busy</h1><p>{message}</p>"
        "<p><a href=''>Try again</a></p></body></html>"
    )
    return page.encode(), json.dumps({"error": message}).encode()


async def refuse(scope: Scope, send: Send, message: str = BUSY_MESSAGE) -> None:
    """503 with Retry-After, as JSON for the API (or a client asking for JSON), else a page."""
    accept = b""
    for name, value in scope["headers"]:
        if name == b"accept":
            accept = value
    wants_json = scope["path"].startswith("/api/") or b"application/json" in accept
    page, error = busy_bodies(message)
    body = error if wants_json else page
    kind = b"application/json" if wants_json else b"text/html; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", kind),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

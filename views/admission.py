"""Admission: how much work the site takes on at once, and what it does with the rest.

Every request holds one of ``max_requests`` places while it is handled. Past that the site
answers at once with 503 and ``Retry-After`` (a small page, or JSON for the API) instead of
queueing work it cannot finish in time: queued requests are what made every page slow for
everyone. One page may hold at most ``max_requests_per_page`` places, so a flood of one
slow page (``/admin/`` polled by many tabs) cannot crowd out the others. The requests that
must get through when the site is busy — the health check, signing in, submitting a job
request, the pages' own CSS and JS — are never refused before the rest: they skip the
per-page share and have a reserve of places that no other request may take.

In-flight limits alone do not keep the site quick: one page that computes for 20 ms at a
time holds up every other request, the quick 503s too. So the site also watches how far its
event loop runs behind; while it is behind and busy, it refuses the pages that usually take
longest (at least half as long as the slowest, and more than a few milliseconds: the heavy
ones, measured as they are answered) and keeps answering
the cheap ones and the reserved ones.

A request whose client has gone away stops its work: its handler is cancelled, and the
disconnect is logged as one line.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
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
LAG_LIMIT = 0.02  # seconds behind past which the site sheds its costly pages
CHEAP = 0.005  # seconds: a page answered in less is never shed for lag
BUSY_MESSAGE = (
    "The site is busy: it is answering as many requests as it can at once. "
    f"Nothing was done; try again in {RETRY_AFTER} seconds."
)
STOPPING_MESSAGE = (
    "The site is restarting: this request was stopped before it finished. "
    f"Try again in {RETRY_AFTER} seconds."
)


class Admission:
    """The requests in flight, per page and in all; which to admit."""

    def __init__(
        self,
        routes: list[BaseRoute],
        max_requests: int,
        max_requests_per_page: int,
        reserved: Collection[str],
    ) -> None:
        self.routes = routes
        self.max_requests = max_requests
        self.max_requests_per_page = max_requests_per_page
        self.reserved = frozenset(reserved)
        # the reserved requests' own places, on top of max_requests
        self.reserve = max(2, max_requests // 4)
        self.in_flight = 0
        self.per_page: Counter[str] = Counter()
        self.refused = 0
        self.abandoned = 0
        # how far the event loop runs behind (seconds), and each page's usual time to answer
        self.lag = 0.0
        self.cost: dict[str, float] = {}
        self._watching = False

    def page(self, scope: Scope) -> str:
        """The name of the route that will answer (server.ROUTES), or "" for none."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.name  # type: ignore[attr-defined]
        return ""

    def admit(self, page: str) -> bool:
        if page in self.reserved:
            return self.in_flight < self.max_requests + self.reserve
        if self.in_flight >= self.max_requests_per_page and self.lag > LAG_LIMIT:
            # the site is behind: the pages that cost the most wait first
            cost = self.cost.get(page, 0.0)
            if cost > CHEAP and cost * 2 >= max(self.cost.values()):
                return False
        return (
            self.in_flight < self.max_requests and self.per_page[page] < self.max_requests_per_page
        )

    def answered(self, page: str, seconds: float) -> None:
        """A page took ``seconds`` to answer: its usual cost, a moving average."""
        self.cost[page] = self.cost.get(page, seconds) * 0.8 + seconds * 0.2

    def watch_the_loop(self) -> None:
        """Measures, from now on, how late the event loop runs a callback due every TICK: a
        loop that falls behind answers everything late, however few requests are in flight
        (a page that computes for 20 ms holds up every other one for as long)."""
        if self._watching:
            return
        self._watching = True
        loop = asyncio.get_running_loop()

        def tick(due: float) -> None:
            now = loop.time()
            self.lag = max(now - due, self.lag * LAG_DECAY)
            loop.call_at(now + TICK, tick, now + TICK)

        loop.call_at(loop.time() + TICK, tick, loop.time() + TICK)


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
            admission.refused += 1
            await refuse(scope, send)
            return
        admission.in_flight += 1
        admission.per_page[page] += 1
        start = time.monotonic()
        try:
            await self.handle(scope, receive, send)
        finally:
            admission.in_flight -= 1
            admission.per_page[page] -= 1
            admission.answered(page, time.monotonic() - start)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            return await body.get()

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

"""Admission: how much work the site takes on at once, and what it does with the rest.

Every request holds one of ``max_requests`` places while it is handled. Past that the site
answers at once with 503 and ``Retry-After`` (a small page, or JSON for the API) instead of
queueing work it cannot finish in time: queued requests are what made every page slow for
everyone. One page may hold at most ``max_requests_per_page`` places, so a flood of one
slow page (``/admin/`` polled by many tabs) cannot crowd out the others. The requests that
must get through when the site is busy — the health check, signing in, submitting a job
request, the pages' own CSS and JS — are never refused before the rest: they skip the
per-page share and have a reserve of places that no other request may take.

A request whose client has gone away stops its work: its handler is cancelled, and the
disconnect is logged as one line.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
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
        return (
            self.in_flight < self.max_requests and self.per_page[page] < self.max_requests_per_page
        )


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
        page = admission.page(scope)
        if not admission.admit(page):
            admission.refused += 1
            await refuse(scope, send)
            return
        admission.in_flight += 1
        admission.per_page[page] += 1
        try:
            await self.handle(scope, receive, send)
        finally:
            admission.in_flight -= 1
            admission.per_page[page] -= 1

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

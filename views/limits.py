"""What a request may send: a body of at most ``max_request_size`` bytes, all of it within
``request_body_timeout`` seconds; and the plain answer given to a request refused below
the app's own error pages (here and by the CSRF middleware)."""

from __future__ import annotations

import asyncio
import html

from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..units import human_size


class BodyRefused(Exception):
    """The body being read broke a limit; the middleware answers with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyLimitMiddleware:
    """Refuses a request body that is too large or arrives too slowly, whoever reads it
    (a handler, the CSRF check, the form parser), so that no request can make the site
    hold more than ``limit`` bytes of it or wait on it for ever.

    A body announced as too large (Content-Length) is refused before any of it is read;
    one that turns out too large is refused as soon as the limit is passed. Checking as
    the body arrives, above everything that reads it, covers every route.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = BodyRefused(
            413,
            f"the request body is larger than this site accepts ({human_size(self.limit)})",
        )
        announced = Headers(scope=scope).get("content-length")
        if announced is not None and not (announced.isascii() and announced.isdigit()):
            await answer(scope, receive, send, 400, "the Content-Length header is not a number")
            return
        if int(announced or 0) > self.limit:
            await answer(scope, receive, send, too_large.status, too_large.message)
            return
        received = 0
        deadline: float | None = None
        whole = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, whole
            if whole:  # after the body: waiting for a disconnect may take as long as it takes
                return await receive()
            deadline = deadline or asyncio.get_running_loop().time() + self.timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyRefused(
                    408,
                    f"the request body did not arrive within {self.timeout:g} seconds",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise too_large
                whole = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyRefused as refused:  # every handler reads its body before it answers
            await answer(scope, receive, send, refused.status, refused.message)


async def answer(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """An error from below the app's own error pages: JSON on the API, plain HTML elsewhere."""
    headers = {"Connection": "close"} if status in (408, 413) else None
    if scope["path"].startswith("/api/"):
        response: Response = JSONResponse({"error": message}, status_code=status, headers=headers)
    else:
        title = "Not allowed" if status == 403 else "Something is wrong"
        sentence = message[0].upper() + message[1:].rstrip(".") + "."
        home = scope["app"].url_path_for("home")
        response = HTMLResponse(
            f"<!doctype html><title>{title} · jobsite</title>"
            f'<main><h1>{title}</h1><p role="alert">{html.escape(sentence)}</p>'
            f'<p><a href="{home}">Back to your projects</a></p></main>',
            status_code=status,
            headers=headers,
        )
    await response(scope, receive, send)

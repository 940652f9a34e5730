"""What the browser tests share: the live site they drive, the watch on every page, and
screenshots for the README. (The fixtures that make them are in conftest.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import BrowserContext, ConsoleMessage, Frame, Page, Request, Response

from jobsite import auth

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PASSWORD = "correct-horse-battery"


@dataclass
class LiveServer:
    """The site answering on 127.0.0.1, its app and the event loop it runs on."""

    url: str
    app: Any
    loop: asyncio.AbstractEventLoop
    token: str = ""

    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Runs a coroutine on the server's loop (where its database connections live)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def add_user(self, username: str, password: str = PASSWORD) -> None:
        """A local account (as `jobsite user add` makes), with an API token for setup calls."""
        db = self.app.state.db
        user_id = self.call(auth.create_user(db, username, password))
        self.token = self.call(auth.create_token(db, user_id, "browser tests"))

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)


@dataclass
class PageProblems:
    """What went wrong in the pages of one browser context, as a user's browser saw it:
    console errors, uncaught exceptions, failed requests and 5xx answers.

    Two things are not problems: a request cut short because its page navigated away (an
    HTMX poll in flight when the user follows a link), and the console's "Failed to load
    resource" for a page answered with a 4xx status (a page explaining an error, such as a
    refused sign-in); a 4xx for anything else a page loads still counts.
    """

    problems: list[str] = field(default_factory=list)
    console_errors: list[tuple[str, str]] = field(default_factory=list)
    error_pages: set[str] = field(default_factory=set)
    navigations: dict[Page, int] = field(default_factory=dict)
    started_at: dict[Request, int] = field(default_factory=dict)

    def watch(self, context: BrowserContext) -> None:
        context.on("page", self.watch_page)
        context.on("request", self.request_started)
        context.on("requestfailed", self.request_failed)
        context.on("response", self.response)

    def watch_page(self, page: Page) -> None:
        self.navigations[page] = 0
        page.on("console", lambda message: self.console(page, message))
        page.on("pageerror", lambda error: self.problems.append(f"{page.url}: {error}"))
        page.on("framenavigated", lambda frame: self.navigated(page, frame))

    def console(self, page: Page, message: ConsoleMessage) -> None:
        if message.type == "error":
            source = message.location.get("url") or page.url
            text = f"console error on {page.url}: {message.text}"
            self.console_errors.append(
                (source, text if source == page.url else f"{text} ({source})")
            )

    def navigated(self, page: Page, frame: Frame) -> None:
        if frame == page.main_frame:
            self.navigations[page] += 1

    def request_started(self, request: Request) -> None:
        self.started_at[request] = self.navigations.get(request.frame.page, 0)

    def request_failed(self, request: Request) -> None:
        navigated_since = self.navigations.get(request.frame.page) != self.started_at.get(request)
        if not (request.failure == "net::ERR_ABORTED" and navigated_since):
            self.problems.append(
                f"request failed: {request.method} {request.url}: {request.failure}"
            )

    def response(self, response: Response) -> None:
        if response.status >= 500:
            self.problems.append(
                f"HTTP {response.status} for {response.request.method} {response.url}"
            )
        elif response.status >= 400 and response.request.is_navigation_request():
            self.error_pages.add(response.url)

    def report(self) -> list[str]:
        failed_loads = [
            message
            for source, message in self.console_errors
            if not (source in self.error_pages and "Failed to load resource" in message)
        ]
        return [*self.problems, *failed_loads]


def screenshot(page: Page, name: str) -> None:
    """Saves the whole page as docs/screenshots/<name>.png (the README shows them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)

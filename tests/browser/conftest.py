"""The real site in a real browser: uvicorn serving create_app on a loopback port, driven by
Playwright through Debian's chromium (never a downloaded browser).

Every page a test opens is watched: a console error, a failed request or an HTTP 5xx answer
fails the test when it ends.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Frame,
    Page,
    Request,
    Response,
    sync_playwright,
)

from jobsite import auth
from jobsite.config import Settings
from jobsite.server import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
]
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


@pytest.fixture
def live_server(settings: Settings, docker_cleanup: None) -> Iterator[LiveServer]:
    """uvicorn serving the app (scheduler, real Docker) in a thread, on a free port."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", ws="none", lifespan="on", access_log=False)
    )
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[sock])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="live-server")
    thread.start()
    try:
        for _ in range(300):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError("the live server did not start; see the log above")
        yield LiveServer(f"http://127.0.0.1:{port}", app, loops[0])
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
    assert not thread.is_alive(), "the live server did not stop within 60 s"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless. Missing chromium skips, or fails when
    JOBSITE_REQUIRE_DOCKER=1 (CI installs it with apt-get)."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found: install it with `apt-get install -y chromium`"
        if os.environ.get("JOBSITE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"JOBSITE_REQUIRE_DOCKER=1 but {message}")
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


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


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    """A fresh browser session on the live server; fails the test on any page problem."""
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1200, "height": 800})
    context.set_default_timeout(15_000)
    watcher = PageProblems()
    watcher.watch(context)
    page = context.new_page()
    yield page
    problems = watcher.report()
    context.close()
    assert not problems, "the pages had problems:\n" + "\n".join(problems)


def screenshot(page: Page, name: str) -> None:
    """Saves the whole page as docs/screenshots/<name>.png (the README shows them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)

"""The real site in a real browser: uvicorn serving create_app on a loopback port, driven by
Playwright through Debian's chromium (never a downloaded browser).

Every page a test opens is watched: a console error, a failed request or an HTTP 5xx answer
fails the test when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import serve
from playwright.sync_api import Browser, Page, sync_playwright

from jobsite.config import Settings
from jobsite.server import create_app

from .helpers import LiveServer, PageProblems

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


@pytest.fixture
def live_server(settings: Settings, docker_cleanup: None) -> Iterator[LiveServer]:
    """uvicorn serving the app (scheduler, real Docker) in a thread, on a free port."""
    app = create_app(settings)
    with serve(app) as (url, loop):
        yield LiveServer(url, app, loop)


@pytest.fixture(scope="module")
def browser(missing) -> Iterator[Browser]:
    """Debian's chromium, headless. Missing chromium skips, or fails when
    JOBSITE_REQUIRE_DOCKER=1 (CI installs it with apt-get)."""
    if not CHROMIUM.exists():
        missing(
            "JOBSITE_REQUIRE_DOCKER",
            f"{CHROMIUM} not found: install it with `apt-get install -y chromium`",
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


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

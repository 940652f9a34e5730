"""The watch every browser test relies on: it must see what a user's browser would report."""

from __future__ import annotations

import pytest
from helpers import free_port
from playwright.sync_api import Browser

from .helpers import LiveServer, PageProblems

pytestmark = [pytest.mark.browser, pytest.mark.docker]


def test_console_errors_failed_requests_and_5xx_are_reported(
    browser: Browser, live_server: LiveServer
) -> None:
    closed_port = free_port()
    context = browser.new_context(base_url=live_server.url)
    watcher = PageProblems()
    watcher.watch(context)
    page = context.new_page()
    page.route("**/broken-upstream", lambda route: route.fulfill(status=502, body="down"))
    page.goto("/")
    # each through Playwright's own wait for the event the watch reports
    with page.expect_console_message(lambda message: "something broke" in message.text):
        page.evaluate("console.error('something broke')")
    with page.expect_console_message(lambda message: "404" in message.text):
        page.evaluate("fetch('/static/missing.js').catch(() => {})")
    with page.expect_response("**/broken-upstream"):
        page.evaluate("fetch('/broken-upstream').catch(() => {})")
    with page.expect_event("requestfailed"):
        page.evaluate(f"fetch('http://127.0.0.1:{closed_port}/').catch(() => {{}})")
    page.goto("/no-such-workspace/")
    report = "\n".join(watcher.report())
    context.close()

    assert "something broke" in report
    assert "404" in report and "/static/missing.js" in report
    assert "HTTP 502 for GET" in report
    assert f"request failed: GET http://127.0.0.1:{closed_port}/" in report
    # the 404 page a user is shown for a missing workspace is an answer, not a problem
    assert "no-such-workspace" not in report

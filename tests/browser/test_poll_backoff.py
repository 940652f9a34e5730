"""A page's htmx poll backs off while the site is busy and comes back when it is not:
Chromium on a job request's page, the real site filled up by clients that never finish."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time

import pytest
from helpers import Site, slow_upload, wait_until
from playwright.sync_api import Browser

from jobsite.config import Settings

from .helpers import LiveServer

pytestmark = pytest.mark.browser


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # two places: two slow clients fill the site
    return dataclasses.replace(settings, max_requests=2, max_requests_per_page=2)


def test_a_poll_waits_longer_each_time_the_site_is_busy_and_resumes_after(
    browser: Browser, live_server: LiveServer
):
    app = live_server.app
    live_server.call(app.state.scheduler.set_paused(True))
    site = live_server.call(Site.make(app.state.db))
    live_server.call(site.add_job(state="pending", status_code="created", wait=None))
    request_id = live_server.call(app.state.db.fetchval("SELECT max(id) FROM job_requests"))
    live_server.add_user("ada")

    context = browser.new_context(base_url=live_server.url)
    polls: list[tuple[float, int]] = []  # when each poll was answered, and how
    path = f"/ws1/logs/{request_id}"

    def answered(response) -> None:
        if response.request.headers.get("hx-request") and response.url.endswith(path):
            polls.append((time.monotonic(), response.status))

    context.on("response", answered)
    page = context.new_page()
    page.goto(path)
    assert page.locator("h1").inner_text().startswith("Job request #")

    def polled(condition):
        # Playwright hands over the page's events only while it is called
        def check():
            page.wait_for_timeout(20)
            return condition()

        return check

    wait_until(polled(lambda: len(polls) >= 1), 10, "the page to poll")

    with contextlib.ExitStack() as open_sockets:
        for _ in range(2):
            headers = {"Authorization": f"Bearer {live_server.token}"}
            open_sockets.enter_context(slow_upload(live_server.url, headers))
        admission = app.state.admission
        wait_until(lambda: admission.in_flight == 2, 10, "the slow clients to fill the site")
        wait_until(polled(lambda: [s for _, s in polls].count(503) >= 3), 30, "three refused polls")
        refused = [at for at, status in polls if status == 503]
        gaps = [later - earlier for earlier, later in itertools.pairwise(refused)]
        # Retry-After is 2 s: the poll waits 2 s, then 4 s (it polls every 2 s when well)
        assert gaps[0] >= 1.8 and gaps[1] >= 3.8, gaps

        open_sockets.close()
        wait_until(polled(lambda: polls[-1][1] == 200), 30, "a poll answered once the site is free")
        first_ok = len(polls) - 1
        wait_until(polled(lambda: len(polls) >= first_ok + 3), 15, "the poll to go on as before")
        well = [at for at, _ in polls[first_ok:]]
        assert all(later - earlier < 3 for earlier, later in itertools.pairwise(well))
        assert all(status == 200 for _, status in polls[first_ok:])
    context.close()

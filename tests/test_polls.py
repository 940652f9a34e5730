"""The polls of open pages: the workspace page's sends only its live part, needs no git,
and says "nothing changed" with a 304; a finished job request's is the same for everyone
and answered as first rendered."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from helpers import TWO_ACTIONS as PROJECT_YAML
from helpers import setup_workspace, submit, user_headers

HX = {"HX-Request": "true"}


@pytest.fixture
async def watched(app, client, make_repo):
    """ws1 with a pending job request (the queue is paused), its page open in a browser."""
    await app.state.scheduler.set_paused(True)
    headers = await user_headers(app, "alice")
    repo = make_repo({"project.yaml": PROJECT_YAML})
    await setup_workspace(client, headers, repo)
    request_id = await submit(client, headers, ["analyse"])
    page = await client.get("/ws1/")
    assert page.status_code == 200
    return {"headers": headers, "repo": repo, "page": page, "request_id": request_id}


def polled_with(page_text: str) -> dict[str, str]:
    """The headers htmx sends with the page's poll (hx-headers of the polling element)."""
    found = re.search(r'id="workspace-live"[^>]*hx-headers=\'([^\']+)\'', page_text)
    assert found, "the page does not poll with its version"
    return {**HX, **json.loads(found.group(1).replace("&#34;", '"'))}


async def test_a_poll_sends_only_the_pills_and_the_graph(client, watched):
    poll = await client.get("/ws1/", headers=HX)
    assert poll.status_code == 200
    assert poll.text.count('hx-swap-oob="true"') == 3  # two pills and the graph
    assert poll.text.count("data-status=") == 2 and 'data-status="not_run"' not in poll.text
    assert "<table" not in poll.text and "Submit" not in poll.text
    assert poll.headers["ETag"] and poll.headers["Cache-Control"] == "no-cache"


async def test_nothing_changed_is_a_304_until_a_job_changes(app, client, watched):
    headers = polled_with(watched["page"].text)
    unchanged = await client.get("/ws1/", headers=headers)
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["ETag"] == headers["If-None-Match"]

    cancel = await client.post(
        f"/api/v1/job-requests/{watched['request_id']}/cancel", json={}, headers=watched["headers"]
    )
    assert cancel.status_code == 200, cancel.text
    changed = await client.get("/ws1/", headers=headers)
    assert changed.status_code == 286  # everything has finished: htmx stops polling
    assert 'data-status="cancelled_by_user"' in changed.text
    assert changed.headers["ETag"] != headers["If-None-Match"]


async def test_a_waiting_jobs_new_place_in_the_queue_is_not_a_change(app, client, watched):
    headers = polled_with(watched["page"].text)
    # as the scheduler writes it when the queue moves: same status code, a new message
    await app.state.db.execute(
        "UPDATE jobs SET status_message = '1 job ahead of this one', updated_at = updated_at + 5"
    )
    assert (await client.get("/ws1/", headers=headers)).status_code == 304


async def test_a_tab_without_a_version_gets_the_current_one(client, watched):
    first = await client.get("/ws1/", headers=HX)
    again = await client.get("/ws1/", headers=HX)  # another tab: answered as rendered
    assert (again.status_code, again.text, again.headers["ETag"]) == (
        first.status_code,
        first.text,
        first.headers["ETag"],
    )
    await client.post(
        f"/api/v1/job-requests/{watched['request_id']}/cancel", json={}, headers=watched["headers"]
    )
    after = await client.get("/ws1/", headers=HX)
    assert after.headers["ETag"] != first.headers["ETag"]
    assert after.text.count('data-status="cancelled_by_user"') == 2


async def test_a_poll_needs_no_git(app, client, settings, watched):
    # the page resolved the branch and parsed project.yaml; with the mirror and the repo
    # gone, any git command would fail, yet the poll still answers from what the site holds
    shutil.rmtree(settings.data_dir / "repos")
    shutil.rmtree(watched["repo"].path)
    poll = await client.get("/ws1/", headers=HX)
    assert poll.status_code == 200
    assert poll.text.count("data-status=") == 2 and 'data-status="not_run"' not in poll.text
    assert ">prepare</text>" in poll.text and ">analyse</text>" in poll.text  # the graph


async def test_a_version_the_site_never_gave_gets_the_whole_live_part(client, watched):
    for sent in ('"nonsense"', "*x, W/", "", '"' + "f" * 5000 + '"'):
        poll = await client.get("/ws1/", headers={**HX, "If-None-Match": sent})
        assert poll.status_code == 200 and ">analyse</text>" in poll.text


async def test_a_finished_job_request_is_polled_as_rendered_and_304_once_seen(app, client, watched):
    url = f"/ws1/logs/{watched['request_id']}"
    assert (await client.get(url, headers=HX)).headers.get("ETag") is None  # still live
    await client.post(
        f"/api/v1/job-requests/{watched['request_id']}/cancel", json={}, headers=watched["headers"]
    )
    first = await client.get(url, headers=HX)
    assert first.status_code == 286 and "Cancelled" in first.text
    again = await client.get(url, headers=HX)
    assert (again.status_code, again.text) == (286, first.text)
    seen = await client.get(url, headers={**HX, "If-None-Match": first.headers["ETag"]})
    assert seen.status_code == 304
    page = await client.get(url)  # the whole page is never answered from the poll's cache
    assert page.status_code == 200 and "<html" in page.text

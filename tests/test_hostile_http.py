"""Hostile input: HTTP and sessions. Odd ids and page numbers, a private site asked about
what exists, the session key, request bodies (too large, too slow, too deep), sign-in
timing and lock-out, sessions and tokens that must end. Each scenario ends with the
site intact (helpers.Intact)."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import setup_workspace, user_headers

from jobsite.config import SettingsError
from jobsite.server import create_app, secret_key

PROJECT_YAML = """\
version: "4"
actions:
  generate:
    run: python:v2 -c "print(1)"
    outputs:
      moderately_sensitive:
        counts: output/counts.csv
"""


def made_here(path: str) -> bool:
    """The files a test makes itself outside the data dir: its git repos."""
    return path.startswith("repos/")


# -- one strict rule for numbers in addresses -------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/job-requests/%C2%B2",  # "²": a digit to Python, not to int()
        "/api/v1/job-requests/%D9%A3",  # an Arabic-Indic three
        "/api/v1/job-requests/99999999999999999999",  # past SQLite's integers
        "/api/v1/job-requests/-1",
        "/api/v1/job-requests/1%00",
    ],
)
async def test_an_id_that_is_not_plain_ascii_digits_is_not_found(app, client, intact, path):
    headers = await user_headers(app, "alice")
    response = await client.get(path, headers=headers)
    assert response.status_code == 404, response.text
    assert "there is no job request" in response.json()["error"]
    await intact.check(client, made_here)


@pytest.mark.parametrize("path", ["/account/tokens/%C2%B2/revoke", "/admin/users/%C2%B2/activate"])
async def test_ids_in_page_addresses_follow_the_same_rule(app, client, intact, path):
    headers = await user_headers(app, "root", admin=True)
    response = await client.post(path, headers=headers)
    assert response.status_code == 404, response.text
    await intact.check(client, made_here)


@pytest.mark.parametrize("page", ["99999999999999999999", "%C2%B2", "0", "-3", "1e3", ""])
async def test_a_page_number_out_of_bounds_is_a_clear_400(app, client, intact, make_repo, page):
    headers = await user_headers(app, "alice")
    await setup_workspace(client, headers, make_repo({"project.yaml": PROJECT_YAML}))
    response = await client.get(f"/ws1/logs?page={page}")
    assert response.status_code == 400, response.text
    assert "page must be a whole number from 1 to" in response.text
    assert (await client.get("/ws1/logs?page=2")).status_code == 200
    await intact.check(client, made_here)


async def test_a_queue_limit_that_is_not_plain_digits_is_a_400(app, client, intact):
    headers = await user_headers(app, "root", admin=True)
    response = await client.get("/api/v1/admin/queue?limit=%C2%B2", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"] == "limit must be a whole number of jobs"
    await intact.check(client, made_here)


# -- a private site reveals nothing -----------------------------------------------------


async def private_site_with_a_workspace(app, client, make_repo) -> dict[str, dict]:
    """A workspace with one job request on a private site; headers for a member and for a
    signed-in stranger."""
    member = await user_headers(app, "alice")
    stranger = await user_headers(app, "mallory")
    await setup_workspace(client, member, make_repo({"project.yaml": PROJECT_YAML}))
    await app.state.scheduler.set_paused(True)
    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": ["generate"]}, headers=member
    )
    assert response.status_code == 201, response.text
    app.state.settings.public_status = False
    return {"member": member, "stranger": stranger, "request": response.json()}


@pytest.mark.parametrize("who", ["stranger", "anonymous"])
async def test_a_private_site_answers_existing_and_missing_things_alike(
    app, client, intact, make_repo, who
):
    site = await private_site_with_a_workspace(app, client, make_repo)
    request_id, job_id = site["request"]["id"], site["request"]["jobs"][0]["id"]
    headers = site.get(who, {})
    pairs = [
        ("/api/v1/projects/study-one/members", "/api/v1/projects/study-two/members"),
        ("/api/v1/workspaces/ws1", "/api/v1/workspaces/ws2"),
        (f"/api/v1/job-requests/{request_id}", f"/api/v1/job-requests/{request_id + 1}"),
        (f"/api/v1/jobs/{job_id}", "/api/v1/jobs/0123456789abcdef"),
        ("/projects/study-one/", "/projects/study-two/"),
        ("/ws1/", "/ws2/"),
        ("/ws1/logs", "/ws2/logs"),
        (f"/ws1/logs/{request_id}", f"/ws2/logs/{request_id + 1}"),
        (f"/jobs/{job_id}", "/jobs/0123456789abcdef"),
    ]
    for existing, missing in pairs:
        seen = await client.get(existing, headers=headers)
        unseen = await client.get(missing, headers=headers)
        assert seen.status_code == unseen.status_code == 404, existing
        names = [(job_id, "0123456789abcdef"), ("study-one", "study-two"), ("ws1", "ws2")]
        text = seen.text.replace(existing, missing)  # the sign-in link's next=
        for shown, instead in names:
            text = text.replace(shown, instead)
        for quote in ("'", "&#39;"):
            text = text.replace(f"{quote}{request_id}{quote}", f"{quote}{request_id + 1}{quote}")
        assert text == unseen.text, existing
    # the member still sees everything
    response = await client.get("/api/v1/workspaces/ws1", headers=site["member"])
    assert response.status_code == 200
    await intact.check(client, made_here)


async def test_a_signed_out_visitor_is_offered_the_sign_in_page(app, client, intact, make_repo):
    await private_site_with_a_workspace(app, client, make_repo)
    response = await client.get("/ws1/")
    assert response.status_code == 404
    assert "there is no workspace &#39;ws1&#39; that you can see" in response.text
    assert 'href="/login?next=/ws1/"' in response.text
    await intact.check(client, made_here)


async def test_taken_names_are_not_said_to_exist_to_strangers(app, client, intact, make_repo):
    site = await private_site_with_a_workspace(app, client, make_repo)
    stranger = site["stranger"]
    response = await client.post("/api/v1/projects", json={"name": "Study One"}, headers=stranger)
    assert response.status_code == 400
    assert response.json()["error"] == "the name 'Study One' cannot be used; choose another name"
    response = await client.post("/api/v1/projects", json={"name": "Mine"}, headers=stranger)
    assert response.status_code == 201
    response = await client.post(
        "/api/v1/projects/mine/workspaces",
        json={"name": "ws1", "repo": "/nowhere", "branch": "main", "database": "sample"},
        headers=stranger,
    )
    assert response.status_code == 400
    assert "the name 'ws1' cannot be used" in response.text
    assert "exists" not in response.text
    # a member is told plainly
    response = await client.post(
        "/api/v1/projects", json={"name": "Study One"}, headers=site["member"]
    )
    assert (
        response.json()["error"]
        == "a project named 'Study One' already exists; choose another name"
    )
    await intact.check(client, made_here)


# -- the session key -----------------------------------------------------------------------


def test_the_session_key_is_made_whole_and_private(settings):
    key = secret_key(settings.data)
    path = settings.data.secret_key
    assert len(key) >= 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_key(settings.data) == key
    assert sorted(os.listdir(settings.data.root)) == ["secret.key"]  # no temporary left


@pytest.mark.parametrize("content", ["", "\n", "short-key"])
def test_a_session_key_too_short_stops_the_site(settings, content):
    settings.data.root.mkdir(parents=True)
    settings.data.secret_key.write_text(content)
    with pytest.raises(SettingsError, match=r"needs at least 32\. Delete the file and restart"):
        create_app(settings)


def test_a_session_key_made_meanwhile_by_another_process_is_used(settings, monkeypatch):
    settings.data.root.mkdir(parents=True)
    theirs = "k" * 64
    real_link = os.link

    def link_after_them(source, target):
        settings.data.secret_key.write_text(theirs)
        real_link(source, target)

    monkeypatch.setattr(os, "link", link_after_them)
    assert secret_key(settings.data) == theirs
    assert sorted(os.listdir(settings.data.root)) == ["secret.key"]

"""Accounts as a person uses them: signing in and out (password, GitHub), the account
page, site admins managing users, project members, and the site's CSRF and cookie rules."""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from helpers import FakeGitHub, through_github

from jobsite import auth
from jobsite.config import GitHub, Settings
from jobsite.server import create_app

PASSWORD = "a long password"


def csrf_of(page: httpx.Response) -> str:
    match = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert match, f"no CSRF token on the page:\n{page.text}"
    return match.group(1)


async def sign_in(client: httpx.AsyncClient, username: str, password: str = PASSWORD) -> str:
    """Signs in through the form as a browser would; returns the new session's CSRF token."""
    page = await client.get("/login")
    response = await client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": csrf_of(page)},
    )
    assert response.status_code == 303, response.text
    return csrf_of(await client.get("/account"))


@contextlib.asynccontextmanager
async def site(settings: Settings, base_url: str = "http://testserver") -> AsyncIterator[Any]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield app, client


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    """Passwords hashed at a lower cost, for speed: test_auth checks the real cost."""
    monkeypatch.setitem(auth._SCRYPT, "n", 2**10)


@pytest.fixture
async def second_browser(app) -> AsyncIterator[httpx.AsyncClient]:
    """Another browser on the same site, with its own cookies."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def add_user(app):
    async def add(username: str, **kwargs: Any) -> int:
        return await auth.create_user(app.state.db, username, PASSWORD, **kwargs)

    return add


# -- signing in and out ---------------------------------------------------------------


async def test_signing_in_and_out_with_a_password(client, add_user):
    await add_user("alice")
    page = await client.get("/login")
    response = await client.post(
        "/login?next=/account",
        data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_of(page)},
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/account"
    home = await client.get("/")
    assert "Signed in as <strong>alice</strong>" in home.text

    response = await client.post("/logout", data={"csrf_token": csrf_of(home)})
    assert response.status_code == 303
    assert "Sign in" in (await client.get("/")).text
    assert (await client.get("/account")).headers["location"].startswith("/login")


async def test_a_wrong_password_is_refused_with_a_message(client, add_user, caplog):
    await add_user("alice")
    page = await client.get("/login")
    response = await client.post(
        "/login", data={"username": "alice", "password": "wrong", "csrf_token": csrf_of(page)}
    )
    assert response.status_code == 400
    assert "That username and password do not match." in response.text
    assert 'value="alice"' in response.text, "the username is kept"
    assert "sign-in failed: user 'alice' from 127.0.0.1" in caplog.text, "operators see it"


@pytest.mark.parametrize(
    ("target", "goes_to"),
    [
        ("/projects/study/", "/projects/study/"),
        ("//evil.example/", "/"),
        ("/\\evil.example/", "/"),
        ("https://evil.example/", "/"),
    ],
)
async def test_sign_in_goes_only_to_a_page_of_this_site(client, add_user, target, goes_to):
    await add_user("alice")
    page = await client.get("/login")
    response = await client.post(
        "/login",
        params={"next": target},
        data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_of(page)},
    )
    assert response.headers["location"] == goes_to


async def test_sign_in_attempts_are_limited_per_account(client, add_user):
    await add_user("alice")
    page = await client.get("/login")
    token = csrf_of(page)
    for _ in range(10):
        response = await client.post(
            "/login", data={"username": "alice", "password": "guess", "csrf_token": token}
        )
        assert "do not match" in response.text
    response = await client.post(
        "/login", data={"username": "ALICE", "password": PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 400
    assert "Too many sign-in attempts" in response.text, "even the right password waits"


async def test_sign_in_attempts_are_limited_per_address(client, add_user):
    await add_user("zoe")
    token = csrf_of(await client.get("/login"))
    for n in range(50):
        await client.post(
            "/login", data={"username": f"user{n}", "password": "guess", "csrf_token": token}
        )
    response = await client.post(
        "/login", data={"username": "zoe", "password": PASSWORD, "csrf_token": token}
    )
    assert "Too many sign-in attempts" in response.text


async def test_a_site_without_local_accounts_refuses_passwords(settings, data_dir):
    settings.local_accounts = False
    async with site(settings) as (app, client):
        await auth.create_user(app.state.db, "alice", PASSWORD)
        page = await client.get("/login")
        assert 'name="password"' not in page.text
        assert "no way to sign in" in page.text
        response = await client.post(
            "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_of(page)}
        )
        assert response.status_code == 400
        assert "signs in with GitHub only" in response.text


# -- cookies and CSRF -----------------------------------------------------------------


async def test_the_session_cookie_is_signed_httponly_and_samesite_lax(client, add_user):
    await add_user("alice")
    page = await client.get("/login")
    response = await client.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_of(page)}
    )
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("jobsite_session=")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=lax" in cookie.lower()
    assert "secure" not in attributes, "plain http: a Secure cookie would never come back"

    value = cookie.split(";")[0].split("=", 1)[1]
    forged = value[:-6] + ("A" * 6 if not value.endswith("A" * 6) else "B" * 6)
    client.cookies.set("jobsite_session", forged)
    assert "Sign in" in (await client.get("/")).text, "a tampered cookie signs in nobody"


async def test_the_session_cookie_is_secure_when_the_site_is_https(settings, data_dir):
    settings.base_url = "https://jobs.example.org"
    async with site(settings, base_url="https://jobs.example.org") as (app, client):
        await auth.create_user(app.state.db, "alice", PASSWORD)
        page = await client.get("/login")
        response = await client.post(
            "/login",
            data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_of(page)},
        )
        assert response.status_code == 303
        assert "; secure" in response.headers["set-cookie"].lower()


async def test_a_cross_site_form_post_is_refused(client, add_user, app):
    await add_user("alice")
    token = await sign_in(client, "alice")
    forged = await client.post("/account/tokens", data={"name": "evil"})
    assert forged.status_code == 403
    assert "came from another site" in forged.text
    for guess in ("x" * 32, "é"):
        wrong = await client.post("/account/tokens", data={"name": "evil", "csrf_token": guess})
        assert wrong.status_code == 403
    other_origin = await client.post(
        "/account/tokens",
        data={"name": "evil", "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert other_origin.status_code == 403
    assert await app.state.db.fetchval("SELECT count(*) FROM api_tokens") == 0

    same_site = await client.post(
        "/account/tokens",
        data={"name": "laptop", "csrf_token": token},
        headers={"Origin": "http://testserver"},
    )
    assert same_site.status_code == 200
    assert await app.state.db.fetchval("SELECT count(*) FROM api_tokens") == 1


async def test_a_multipart_form_carries_the_token_too(client, add_user, app):
    await add_user("alice")
    token = await sign_in(client, "alice")
    response = await client.post(
        "/account/tokens", files={"name": (None, "laptop"), "csrf_token": (None, token)}
    )
    assert response.status_code == 200
    assert "shown only this once" in response.text, "the form reached the page intact"
    refused = await client.post(
        "/account/tokens", files={"name": (None, "evil"), "csrf_token": (None, "forged")}
    )
    assert refused.status_code == 403
    assert await app.state.db.fetchval("SELECT count(*) FROM api_tokens") == 1


async def test_a_form_too_big_to_read_is_refused_clearly(client, add_user, app):
    await add_user("alice")
    token = await sign_in(client, "alice")
    fields = {f"f{n}": (None, "x") for n in range(1001)}
    response = await client.post(
        "/account/tokens", files={**fields, "name": (None, "laptop"), "csrf_token": (None, token)}
    )
    assert response.status_code == 400
    assert "The form cannot be read: Too many fields. Maximum number of fields is 1000." in (
        response.text
    )
    assert await app.state.db.fetchval("SELECT count(*) FROM api_tokens") == 0


async def test_htmx_and_fetch_requests_send_the_token_as_a_header(client, add_user, app):
    await add_user("alice")
    token = await sign_in(client, "alice")
    response = await client.post(
        "/api/v1/projects", json={"name": "Study"}, headers={"X-CSRF-Token": token}
    )
    assert response.status_code == 201
    refused = await client.post("/api/v1/projects", json={"name": "Study 2"})
    assert refused.status_code == 403
    assert "came from another site" in refused.json()["error"]
    page = await client.get("/")
    assert f'hx-headers=\'{{"X-CSRF-Token": "{token}"}}\'' in page.text


async def test_signing_in_from_another_site_is_refused(client, add_user):
    await add_user("alice")
    response = await client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 403
    assert "Sign in" in (await client.get("/")).text


# -- the account page -----------------------------------------------------------------


async def test_api_tokens_are_made_shown_once_used_and_revoked(client, add_user, app):
    await add_user("alice")
    csrf = await sign_in(client, "alice")
    page = await client.post("/account/tokens", data={"name": "laptop", "csrf_token": csrf})
    assert "shown only this once" in page.text
    token = re.search(r'<pre id="new-token">(jst_[^<]+)</pre>', page.text).group(1)
    stored = await app.state.db.fetchall("SELECT * FROM api_tokens")
    assert token not in str(stored)

    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    async with api:
        headers = {"Authorization": f"Bearer {token}"}
        response = await api.post("/api/v1/projects", json={"name": "Study"}, headers=headers)
        assert response.status_code == 201

        account = await client.get("/account")
        assert "laptop" in account.text
        assert token not in account.text, "a token is never shown again"
        token_id = stored[0]["id"]
        response = await client.post(
            f"/account/tokens/{token_id}/revoke", data={"csrf_token": csrf}
        )
        assert response.status_code == 303
        assert "You have no API tokens." in (await client.get("/account")).text
        response = await api.get("/api/v1/workspaces/x", headers=headers)
        assert response.status_code == 401
        assert "not valid" in response.json()["error"]


async def test_nobody_revokes_another_users_token(client, add_user, app):
    bob = await add_user("bob")
    await auth.create_token(app.state.db, bob, "bob's")
    await add_user("alice")
    csrf = await sign_in(client, "alice")
    token_id = await app.state.db.fetchval("SELECT id FROM api_tokens")
    response = await client.post(f"/account/tokens/{token_id}/revoke", data={"csrf_token": csrf})
    assert response.status_code == 404
    response = await client.post(f"/account/tokens/{2**64}/revoke", data={"csrf_token": csrf})
    assert response.status_code == 404
    assert await app.state.db.fetchval("SELECT count(*) FROM api_tokens") == 1


async def test_changing_your_password(client, add_user, second_browser):
    await add_user("alice")
    csrf = await sign_in(client, "alice")
    laptop = second_browser
    await sign_in(laptop, "alice")

    async def change(current: str, new: str, confirm: str | None = None) -> httpx.Response:
        data = {"current_password": current, "new_password": new, "csrf_token": csrf}
        return await client.post(
            "/account/password", data={**data, "confirm_password": confirm or new}
        )

    cases = [
        (await change("wrong password", "a new long password"), "current password is not right"),
        (await change(PASSWORD, "a new long password", "another"), "are not the same"),
        (await change(PASSWORD, "short"), "at least 10 characters"),
    ]
    for response, message in cases:
        assert response.status_code == 400
        assert message in response.text
    response = await change(PASSWORD, "a new long password")
    assert response.status_code == 200, response.text
    assert "Your password has been changed." in response.text

    assert "Your other sessions are signed out." in response.text
    assert "Signed in as <strong>alice</strong>" in (await client.get("/")).text
    assert "Sign in" in (await laptop.get("/")).text, "the other session has ended"

    csrf = csrf_of(await client.get("/account"))
    await client.post("/logout", data={"csrf_token": csrf})
    page = await client.get("/login")
    refused = await client.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_of(page)}
    )
    assert refused.status_code == 400
    await sign_in(client, "alice", "a new long password")


# -- site admins ----------------------------------------------------------------------


async def test_an_admin_adds_a_user_who_can_then_sign_in(client, add_user, app):
    await add_user("root", is_admin=True)
    csrf = await sign_in(client, "root")
    page = await client.post(
        "/admin/users",
        data={"username": "carol", "email": "carol@example.org", "csrf_token": csrf},
    )
    assert page.status_code == 200
    assert "Added carol." in page.text
    password = re.search(r'<pre id="new-password">([^<]+)</pre>', page.text).group(1)
    again = await client.post("/admin/users", data={"username": "Carol", "csrf_token": csrf})
    assert again.status_code == 400
    assert "already exists" in again.text
    bad = await client.post("/admin/users", data={"username": "no spaces", "csrf_token": csrf})
    assert "A username is 1 to 39 letters" in bad.text

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as carol:
        await sign_in(carol, "carol", password)
        assert (await carol.get("/admin/users")).status_code == 403


async def test_an_admin_resets_a_password_makes_admins_and_deactivates(client, add_user, app):
    await add_user("root", is_admin=True)
    bob_id = await add_user("bob")
    bob_token = await auth.create_token(app.state.db, bob_id, "cli")
    csrf = await sign_in(client, "root")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as bob:
        await sign_in(bob, "bob")

        page = await client.post(f"/admin/users/{bob_id}/reset-password", data={"csrf_token": csrf})
        assert "Reset the password of bob: their sessions and API tokens have ended." in page.text
        new_password = re.search(r'<pre id="new-password">([^<]+)</pre>', page.text).group(1)
        assert "Sign in" in (await bob.get("/")).text, "a reset ends their sessions"
        await sign_in(bob, "bob", new_password)
        assert auth.verify_password(
            new_password,
            await app.state.db.fetchval("SELECT password_hash FROM users WHERE id = ?", (bob_id,)),
        )

        page = await client.post(f"/admin/users/{bob_id}/make-admin", data={"csrf_token": csrf})
        assert "bob is now a site admin." in page.text
        assert (await bob.get("/admin/users")).status_code == 200

        page = await client.post(f"/admin/users/{bob_id}/deactivate", data={"csrf_token": csrf})
        assert "Deactivated bob" in page.text
        assert "Sign in" in (await bob.get("/")).text, "their session ends at once"
        response = await bob.get(
            "/api/v1/workspaces/x", headers={"Authorization": f"Bearer {bob_token}"}
        )
        assert response.status_code == 401, "and so do their tokens"

    for unknown in (999, 2**64):
        page = await client.post(f"/admin/users/{unknown}/activate", data={"csrf_token": csrf})
        assert page.status_code == 404
    page = await client.post(f"/admin/users/{bob_id}/promote", data={"csrf_token": csrf})
    assert page.status_code == 404
    assert "no user action &#39;promote&#39;" in page.text

    root_id = await app.state.db.fetchval("SELECT id FROM users WHERE username = 'root'")
    page = await client.post(f"/admin/users/{root_id}/deactivate", data={"csrf_token": csrf})
    assert page.status_code == 400
    assert "cannot do that to yourself" in page.text


# -- project members ------------------------------------------------------------------


async def test_members_are_added_changed_and_removed_over_the_api(client, make_user):
    alice = await make_user("alice")
    await make_user("bob")
    await client.post("/api/v1/projects", json={"name": "Study"}, headers=alice)
    url = "/api/v1/projects/study/members"

    response = await client.post(
        url, json={"username": "bob", "roles": ["collaborator"]}, headers=alice
    )
    assert response.json() == {"username": "bob", "roles": ["collaborator"]}
    response = await client.post(
        url, json={"username": "bob", "roles": ["developer", "output_viewer"]}, headers=alice
    )
    assert response.status_code == 200
    members = (await client.get(url)).json()["members"]
    assert {"username": "bob", "roles": ["developer", "output_viewer"]} in members

    response = await client.delete(f"{url}/bob", headers=alice)
    assert response.status_code == 204
    assert [m["username"] for m in (await client.get(url)).json()["members"]] == ["alice"]
    response = await client.delete(f"{url}/bob", headers=alice)
    assert response.status_code == 404
    assert "not a member" in response.json()["error"]


async def test_only_roles_you_hold_can_be_given(client, make_user, app):
    alice = await make_user("alice")
    bob = await make_user("bob")
    await make_user("carol")
    await client.post("/api/v1/projects", json={"name": "Study"}, headers=alice)
    url = "/api/v1/projects/study/members"
    await client.post(url, json={"username": "bob", "roles": ["developer"]}, headers=alice)

    response = await client.post(
        url, json={"username": "carol", "roles": ["output_viewer"]}, headers=bob
    )
    assert response.status_code == 403
    assert "you lack ['output_viewer']" in response.json()["error"]
    response = await client.post(
        url, json={"username": "bob", "roles": ["developer", "output_viewer"]}, headers=bob
    )
    assert response.status_code == 403, "nor can a developer raise themselves"
    response = await client.post(
        url, json={"username": "carol", "roles": ["developer"]}, headers=bob
    )
    assert response.status_code == 200
    response = await client.post(
        url, json={"username": "nobody", "roles": ["developer"]}, headers=bob
    )
    assert response.status_code == 404
    response = await client.post(url, json={"username": "carol", "roles": ["boss"]}, headers=bob)
    assert response.status_code == 400
    assert "unknown roles" in response.json()["error"]


async def test_the_members_form_on_the_project_page(client, add_user, make_user):
    alice = await make_user("alice", password=PASSWORD)
    await add_user("bob")
    await client.post("/api/v1/projects", json={"name": "Study"}, headers=alice)
    csrf = await sign_in(client, "alice")
    page = await client.get("/projects/study/")
    assert 'id="members"' in page.text
    assert 'hx-post="/projects/study/members"' in page.text

    partial = await client.post(
        "/projects/study/members",
        data={"username": "bob", "roles": ["collaborator", "output_viewer"], "csrf_token": csrf},
        headers={"HX-Request": "true"},
    )
    assert partial.status_code == 200
    assert partial.text.lstrip().startswith('<section id="members">')
    assert 'bob <span class="muted">' in partial.text

    partial = await client.post(
        "/projects/study/members",
        data={"username": "nobody", "roles": ["collaborator"], "csrf_token": csrf},
        headers={"HX-Request": "true"},
    )
    assert "There is no user &#39;nobody&#39;." in partial.text
    assert 'value="nobody"' in partial.text, "the form keeps what was entered"
    assert 'value="collaborator" checked' in partial.text

    response = await client.post("/projects/study/members/bob/remove", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert "bob" not in (await client.get("/projects/study/")).text


# -- GitHub ---------------------------------------------------------------------------


@pytest.fixture
async def github_site(settings: Settings, fake_github: FakeGitHub) -> AsyncIterator[Any]:
    settings.github = GitHub(
        client_id=FakeGitHub.CLIENT_ID,
        client_secret=FakeGitHub.CLIENT_SECRET,
        base_url=fake_github.url,
        api_url=f"{fake_github.url}/api/v3",
        allowed_orgs=["opensafely"],  # octocat's org: hubot is not in it
    )
    async with site(settings) as app_and_client:
        yield app_and_client


async def test_signing_in_with_github_for_the_first_time_makes_a_user(github_site, fake_github):
    app, client = github_site
    page = await client.get("/login")
    assert 'href="/auth/github?next=/"' in page.text

    response = await through_github(client, fake_github, next="/account")
    assert response.status_code == 303
    assert response.headers["location"] == "/account"
    account = await client.get("/account")
    assert "Signed in as <strong>octocat</strong>" in account.text
    assert "linked to GitHub" in account.text
    user = await app.state.db.fetchone("SELECT * FROM users WHERE username = 'octocat'")
    assert user["github_id"] == 583231
    assert user["email"] == "mona@example.org", "the primary verified address"
    assert user["full_name"] == "Mona Lisa"
    assert user["password_hash"] is None

    await client.post("/logout", data={"csrf_token": csrf_of(account)})
    await through_github(client, fake_github)
    assert "Signed in as <strong>octocat</strong>" in (await client.get("/")).text
    assert await app.state.db.fetchval("SELECT count(*) FROM users") == 1, "the same user"


async def test_the_github_token_stays_out_of_the_database_and_the_clear(
    github_site, fake_github, settings
):
    app, client = github_site
    response = await through_github(client, fake_github)
    assert await app.state.db.fetchval("SELECT count(*) FROM users") == 1
    (token,) = fake_github.tokens
    cookie = response.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    payload = base64.b64decode(cookie.split(".")[0] + "==")
    assert token.encode() not in payload
    assert b"github_token" in payload
    files = list(settings.data_dir.glob("db.sqlite*"))
    assert files
    for path in files:  # the database and its write-ahead log
        assert token.encode() not in path.read_bytes()


async def test_listing_your_github_repositories(github_site, fake_github):
    _, client = github_site
    await through_github(client, fake_github)
    response = await client.get("/api/v1/github/repos")
    assert response.status_code == 200
    repos = response.json()["repos"]
    assert len(repos) == 150, "every page of them"
    assert repos[0] == {
        "full_name": "octocat/study-0",
        "url": "https://github.example/octocat/study-0",
        "private": True,
        "default_branch": "main",
    }

    fake_github.tokens.clear()  # the user revoked the site's access on GitHub
    response = await client.get("/api/v1/github/repos")
    assert response.status_code == 502
    assert "sign in with GitHub again" in response.json()["error"]


async def test_listing_repositories_needs_a_github_sign_in(github_site, fake_github):
    app, client = github_site
    await auth.create_user(app.state.db, "alice", PASSWORD)
    await sign_in(client, "alice")
    response = await client.get("/api/v1/github/repos")
    assert response.status_code == 400
    assert "sign in with GitHub" in response.json()["error"]
    assert (await client.get("/api/v1/github/repos", headers={})).status_code == 400
    anonymous = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    async with anonymous:
        assert (await anonymous.get("/api/v1/github/repos")).status_code == 401


async def test_a_github_login_that_is_taken_is_a_clear_error(github_site, fake_github):
    app, client = github_site
    await auth.create_user(app.state.db, "octocat", PASSWORD)
    response = await through_github(client, fake_github)
    assert response.status_code == 409
    assert "a user named &#39;octocat&#39; already exists on this site" in response.text
    assert "Sign in" in (await client.get("/")).text

    # the local octocat links their GitHub account by signing in with both
    await sign_in(client, "octocat")
    await through_github(client, fake_github)
    assert await app.state.db.fetchval("SELECT github_id FROM users") == 583231


async def test_a_github_callback_that_did_not_start_here_is_refused(github_site, fake_github):
    app, client = github_site
    response = await client.get("/auth/github/callback", params={"code": "x", "state": "forged"})
    assert response.status_code == 400
    assert "did not start here" in response.text

    for forged in ("forged", "ünïcode"):
        await client.get("/auth/github")  # started, but someone else's callback arrives
        response = await client.get("/auth/github/callback", params={"code": "x", "state": forged})
        assert response.status_code == 400
    assert await app.state.db.fetchval("SELECT count(*) FROM users") == 0

    response = await client.get(
        "/auth/github/callback", params={"error": "access_denied", "state": "s"}
    )
    assert "GitHub did not sign you in: access_denied" in response.text


async def test_a_code_github_rejects_is_a_clear_error(github_site, fake_github):
    _, client = github_site
    response = await client.get("/auth/github")
    state = httpx.URL(response.headers["location"]).params["state"]
    response = await client.get("/auth/github/callback", params={"code": "stale", "state": state})
    assert response.status_code == 400
    assert "The code passed is incorrect or expired." in response.text


async def test_github_sign_in_is_off_unless_configured(client):
    response = await client.get("/auth/github")
    assert response.status_code == 404
    assert "not set up on this site" in response.text
    assert "/auth/github" not in (await client.get("/login")).text


async def test_signing_in_with_github_goes_on_without_an_email_address(github_site, fake_github):
    app, client = github_site
    fake_github.emails = None  # GitHub refuses the address list
    response = await through_github(client, fake_github)
    assert response.status_code == 303
    assert await app.state.db.fetchval("SELECT email FROM users") is None


async def test_a_deactivated_github_user_cannot_sign_in(github_site, fake_github):
    app, client = github_site
    await through_github(client, fake_github)
    await app.state.db.execute("UPDATE users SET is_active = 0")
    client.cookies.clear()
    response = await through_github(client, fake_github)
    assert response.status_code == 403
    assert "deactivated" in response.text


async def test_a_user_an_admin_added_is_linked_on_their_first_github_sign_in(
    github_site, fake_github
):
    app, client = github_site
    await auth.create_user(app.state.db, "hubot")  # no password: signs in with GitHub
    fake_github.signing_in = "hubot"
    response = await through_github(client, fake_github)
    assert response.status_code == 303
    assert "Signed in as <strong>hubot</strong>" in (await client.get("/")).text
    row = await app.state.db.fetchone("SELECT count(*) AS n, github_id FROM users")
    assert (row["n"], row["github_id"]) == (1, 1000)


async def test_the_new_workspace_form_offers_your_allowed_github_repositories(
    github_site, fake_github, settings
):
    _, client = github_site
    settings.repos.allow = ["https://github.example/octocat/study-1*"]
    await through_github(client, fake_github)
    home = await client.get("/")
    response = await client.post(
        "/projects/", data={"name": "Octo study", "csrf_token": csrf_of(home)}
    )
    assert response.status_code == 303, response.text
    page = await client.get("/projects/octo-study/new-workspace")
    assert page.status_code == 200
    assert 'list="github-repos"' in page.text
    offered = re.findall(r'<option value="([^"]+)">', page.text)
    assert "https://github.example/octocat/study-1" in offered
    assert "https://github.example/octocat/study-12" in offered
    assert "https://github.example/octocat/study-2" not in offered, "not allowed here"

    fake_github.tokens.clear()  # GitHub refuses: the form still works, without a list
    page = await client.get("/projects/octo-study/new-workspace")
    assert page.status_code == 200
    assert 'list="github-repos"' not in page.text

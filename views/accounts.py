"""Accounts and access pages: signing in and out (password or GitHub), a user's account
(password, API tokens), site admins managing users, and project members."""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .. import auth, workspaces
from ..db import Database, Row
from ..problems import Problem
from ..units import iso_ms
from . import csrf
from .base import (
    GITHUB_TOKEN,
    HTTPError,
    as_http,
    check_role,
    current_user,
    get_project,
    github,
    is_htmx,
    local_path,
    parse_number,
    redirect,
    redirect_to,
    render,
    require_admin,
    require_user,
    site,
    url,
)

# sign-ins and refusals, for the site's operators (and tools such as fail2ban)
log = logging.getLogger("jobsite.accounts")

# GitHub logins are at most 39 letters, digits and single hyphens; local names may also
# use '.' and '_'
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,38}")
GITHUB_STATE = "github_state"
# when the session last signed in with GitHub: a user with no password sets one only
# soon after, so that a session left open (or a stolen cookie) cannot give itself one
GITHUB_SIGNED_IN_AT = "github_signed_in_at"
GITHUB_RECENT = 10 * 60
# how long a new API token may last, by the choice on the account page (days; "" never)
TOKEN_LIFETIMES = {"30": 30, "90": 90, "365": 365, "": None}


# -- signing in and out ---------------------------------------------------------------


async def login_page(request: Request, error: str | None = None, username: str = "") -> Response:
    return await render(
        request,
        "login.html",
        {
            "error": error,
            "username": username,
            "next": local_path(request.query_params.get("next"), url(request, "home")),
        },
        status=400 if error else 200,
    )


async def login(request: Request) -> Response:
    state = site(request)
    form = await request.form()
    username = str(form.get("username", "")).strip()
    password = str(form.get("password", ""))
    throttle = state.sign_in_throttle
    client = request.client.host if request.client else "unknown"
    if not state.settings.local_accounts:
        return await login_page(request, "This site signs in with GitHub only.", username)
    if not throttle.allow(username, client):
        log.warning("sign-in refused, too many attempts: user %r from %s", username, client)
        return await login_page(
            request, "Too many sign-in attempts. Wait a few minutes and try again.", username
        )
    user = await auth.authenticate_password(state.db, username, password)
    if user is None:
        log.warning("sign-in failed: user %r from %s", username, client)
        return await login_page(request, "That username and password do not match.", username)
    log.info("signed in with a password: %s from %s", user.username, client)
    throttle.succeeded(username, client)
    await auth.start_session(state.db, request.session, user.id, session_max_age(request))
    return redirect_to(local_path(request.query_params.get("next"), url(request, "home")))


async def logout(request: Request) -> Response:
    state = site(request)
    await auth.end_session(state.db, request.session, session_max_age(request))
    return redirect(request, "home")


def session_max_age(request: Request) -> float:
    return float(site(request).settings.session_max_age)


def github_callback_url(request: Request) -> str:
    return site(request).settings.base_url + request.app.url_path_for("github_callback")


async def github_start(request: Request) -> Response:
    """Send the browser to GitHub, remembering a random state to check when it returns."""
    client = github(request)
    state = secrets.token_urlsafe(24)
    request.session[GITHUB_STATE] = {
        "state": state,
        "next": local_path(request.query_params.get("next"), url(request, "home")),
    }
    return redirect_to(client.authorize_url(github_callback_url(request), state))


async def github_callback(request: Request) -> Response:
    client = github(request)
    started = request.session.pop(GITHUB_STATE, None) or {}
    params = request.query_params
    if params.get("error"):
        why = params.get("error_description") or params["error"]
        raise HTTPError(400, f"GitHub did not sign you in: {why}")
    expected = started.get("state")
    if not expected or not auth.same_secret(expected, params.get("state", "")):
        raise HTTPError(
            400,
            "this sign-in with GitHub did not start here or has expired; "
            "go to the sign-in page and try again",
        )
    try:
        token = await client.exchange_code(params.get("code", ""), github_callback_url(request))
        account = await client.user(token)
    except auth.GitHubError as e:
        raise HTTPError(400, f"signing in with GitHub failed: {e}") from None
    state = site(request)

    async def in_allowed_org() -> bool:
        org = await client.allowed_org(token)
        if org:
            log.info("GitHub user %s joins as a member of %s", account.login, org)
        return org is not None

    try:
        user_id = await auth.user_for_github(
            state.db, account, await current_user(request), in_allowed_org
        )
    except auth.GitHubError as e:
        raise HTTPError(400, f"signing in with GitHub failed: {e}") from None
    log.info("signed in with GitHub: %s (GitHub id %s)", account.login, account.id)
    await auth.start_session(state.db, request.session, user_id, session_max_age(request))
    request.session[GITHUB_TOKEN] = state.sealer.seal(token)
    request.session[GITHUB_SIGNED_IN_AT] = time.time()
    return redirect_to(started.get("next") or url(request, "home"))


# -- a user's own account -------------------------------------------------------------


async def account_page(request: Request, **context: Any) -> Response:
    user = await require_user(request)
    db: Database = site(request).db
    row = await db.fetchone(
        "SELECT password_hash IS NOT NULL AS has_password, github_id FROM users WHERE id = ?",
        (user.id,),
    )
    tokens = [
        {
            **token,
            "created_at": iso_ms(token["created_at"]),
            "last_used_at": iso_ms(token["last_used_at"]),
            "expires_at": iso_ms(token["expires_at"]),
            "expired": token["expires_at"] is not None and token["expires_at"] <= time.time(),
        }
        for token in await db.fetchall(
            "SELECT id, name, created_at, last_used_at, expires_at FROM api_tokens "
            "WHERE user_id = ? ORDER BY created_at DESC",
            (user.id,),
        )
    ]
    context = {
        "has_password": bool(row["has_password"]),
        "github_linked": row["github_id"] is not None,
        "github_enabled": site(request).settings.github.enabled,
        "tokens": tokens,
        "error": None,
        "message": None,
        "new_token": None,
        "reauthenticate": False,
        **context,
    }
    status = 400 if context["error"] else 200
    return await render(request, "account.html", context, status=status)


async def change_password(request: Request) -> Response:
    user = await require_user(request)
    form = await request.form()
    current = str(form.get("current_password", ""))
    new = str(form.get("new_password", ""))
    db: Database = site(request).db
    stored = await db.fetchval("SELECT password_hash FROM users WHERE id = ?", (user.id,))
    if not site(request).settings.local_accounts:
        return await account_page(request, error="This site signs in with GitHub only.")
    if stored and not await auth.check_password(current, stored):
        return await account_page(request, error="Your current password is not right.")
    signed_in_at = request.session.get(GITHUB_SIGNED_IN_AT)
    recent = isinstance(signed_in_at, float) and time.time() - signed_in_at < GITHUB_RECENT
    if not stored and not recent:
        return await account_page(
            request,
            error="To set a password, first confirm it is you: sign in with GitHub again "
            f"(the link below), then set it within {GITHUB_RECENT // 60} minutes.",
            reauthenticate=True,
        )
    if new != str(form.get("confirm_password", "")):
        return await account_page(request, error="The two new passwords are not the same.")
    problem = auth.password_problem(new, user.username)
    if problem:
        return await account_page(request, error=f"Choose another password: {problem}.")
    await auth.set_password(db, user.id, new)
    # a new stamp ends every other session; this one goes on as it was
    kept = {
        k: v
        for k, v in request.session.items()
        if k in (GITHUB_TOKEN, GITHUB_SIGNED_IN_AT, csrf.CSRF_FIELD)
    }
    await auth.start_session(db, request.session, user.id, session_max_age(request))
    request.session.update(kept)
    return await account_page(
        request, message="Your password has been changed. Your other sessions are signed out."
    )


async def create_token(request: Request) -> Response:
    user = await require_user(request)
    form = await request.form()
    name = str(form.get("name", "")).strip()
    if not name:
        return await account_page(request, error="Give the token a name, such as the laptop.")
    lifetime = str(form.get("expires_in_days", ""))
    if lifetime not in TOKEN_LIFETIMES:
        return await account_page(
            request, error="Choose how long the token lasts: 30, 90 or 365 days, or until revoked."
        )
    days = TOKEN_LIFETIMES[lifetime]
    token = await auth.create_token(
        site(request).db, user.id, name[:100], None if days is None else days * 86400.0
    )
    return await account_page(request, new_token={"name": name, "token": token})


async def revoke_token(request: Request) -> Response:
    user = await require_user(request)
    token_id = parse_number(request.path_params["id"])
    if token_id is None or not await auth.revoke_token(site(request).db, user.id, token_id):
        raise HTTPError(404, "you have no such API token; it may have been revoked already")
    return redirect(request, "account")


# -- site admins managing users -------------------------------------------------------


USERS_PER_PAGE = 100


async def admin_users(request: Request, **context: Any) -> Response:
    await require_admin(request, "manage users")
    local_accounts = site(request).settings.local_accounts
    after = request.query_params.get("after", "")  # a page starts after this username
    users = [
        {**user, "actions": user_actions(user, local_accounts)}
        for user in await site(request).db.fetchall(
            "SELECT id, username, full_name, email, is_admin, is_active, github_id, "
            "password_hash IS NOT NULL AS has_password FROM users WHERE username > ? "
            "ORDER BY username LIMIT ?",
            (after, USERS_PER_PAGE + 1),
        )
    ]
    context = {
        "users": users[:USERS_PER_PAGE],
        "after": after,
        "next_after": users[USERS_PER_PAGE - 1]["username"]
        if len(users) > USERS_PER_PAGE
        else None,
        "error": None,
        "message": None,
        "new_password": None,
        **context,
    }
    status = 400 if context["error"] else 200
    return await render(request, "admin_users.html", context, status=status)


def user_actions(user: Row, local_accounts: bool) -> list[tuple[str, str]]:
    """The changes an admin can make to a user: (action in the URL, button label)."""
    actions = [("reset-password", "Reset password")] if local_accounts else []
    actions.append(
        ("remove-admin", "Remove admin") if user["is_admin"] else ("make-admin", "Make admin")
    )
    actions.append(
        ("deactivate", "Deactivate") if user["is_active"] else ("activate", "Reactivate")
    )
    return actions


async def admin_create_user(request: Request) -> Response:
    await require_admin(request, "manage users")
    form = await request.form()
    username = str(form.get("username", "")).strip()
    email = str(form.get("email", "")).strip() or None
    if not USERNAME.fullmatch(username):
        return await admin_users(
            request,
            error="A username is 1 to 39 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
        )
    with_password = site(request).settings.local_accounts and not form.get("github")
    password = secrets.token_urlsafe(12) if with_password else None
    try:
        await auth.create_user(
            site(request).db,
            username,
            password,
            email=email,
            full_name=str(form.get("full_name", "")).strip(),
            is_admin=bool(form.get("is_admin")),
        )
    except sqlite3.IntegrityError:
        return await admin_users(
            request, error=f"A user named {username!r} already exists; choose another name."
        )
    return await admin_users(
        request,
        message=f"Added {username}.",
        new_password={"username": username, "password": password} if password else None,
    )


async def admin_user_action(request: Request) -> Response:
    """One change to one user: reset-password, make-admin, remove-admin, deactivate, activate."""
    admin = await require_admin(request, "manage users")
    db: Database = site(request).db
    user_id = parse_number(request.path_params["id"])
    target = user_id is not None and await db.fetchone(
        "SELECT id, username FROM users WHERE id = ?", (user_id,)
    )
    if not target:
        raise HTTPError(404, "there is no such user")
    action = request.path_params["action"]
    if target["id"] == admin.id and action in ("remove-admin", "deactivate"):
        return await admin_users(
            request, error="You cannot do that to yourself; ask another site admin."
        )
    name = target["username"]
    if action == "reset-password":
        if not site(request).settings.local_accounts:
            return await admin_users(request, error="This site signs in with GitHub only.")
        password = secrets.token_urlsafe(12)
        await auth.reset_password(db, target["id"], password)
        return await admin_users(
            request,
            message=f"Reset the password of {name}: their sessions and API tokens have ended.",
            new_password={"username": name, "password": password},
        )
    changes = {
        "make-admin": ("is_admin = 1", f"{name} is now a site admin."),
        "remove-admin": ("is_admin = 0", f"{name} is no longer a site admin."),
        "deactivate": ("is_active = 0", f"Deactivated {name}: they can no longer sign in."),
        "activate": ("is_active = 1", f"Reactivated {name}."),
    }
    if action not in changes:
        raise HTTPError(404, f"there is no user action {action!r}")
    change, message = changes[action]
    await db.execute(f"UPDATE users SET {change} WHERE id = ?", (target["id"],))
    return await admin_users(request, message=message)


# -- project members ------------------------------------------------------------------


async def add_member_form(request: Request) -> Response:
    """The members form of the project page: add a member or set their roles."""
    project = await get_project(request, request.path_params["slug"])
    try:  # who may, before reading what they sent
        await check_role(request, project["id"], "developer")
    except HTTPError as e:
        return await members_answer(request, project, e)
    form = await request.form()
    username = str(form.get("username", "")).strip()
    roles = list(form.getlist("roles"))
    entered = {"username": username, "roles": roles}
    if not username:
        error = "Enter the username of the person to add."
        return await members_answer(request, project, HTTPError(400, error), entered)
    if not roles:
        error = "Tick at least one role."
        return await members_answer(request, project, HTTPError(400, error), entered)
    return await set_member(request, project, username, roles, entered)


async def remove_member_form(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    return await set_member(request, project, request.path_params["username"], [])


async def set_member(
    request: Request,
    project: Row,
    username: str,
    roles: list[Any],
    entered: dict[str, Any] | None = None,
) -> Response:
    """Managing members needs the developer role; the core checks the roles themselves."""
    try:
        user = await check_role(request, project["id"], "developer")
        await workspaces.set_member(site(request).db, user, project["id"], username, roles)
    except (HTTPError, Problem) as e:
        return await members_answer(request, project, as_http(e), entered)
    return await members_answer(request, project)


def sentence(message: str) -> str:
    return message[0].upper() + message[1:] + ("" if message.endswith(".") else ".")


async def members_answer(
    request: Request,
    project: Row,
    error: HTTPError | None = None,
    entered: dict[str, Any] | None = None,
) -> Response:
    """For htmx, the members section again (with the error, and the form as it was sent);
    otherwise back to the project page, or the error page."""
    if not is_htmx(request):
        if error is not None:
            raise error
        return redirect(request, "project", "members", slug=project["slug"])
    if error is not None and error.status == 401:
        raise error
    context = {
        "project": project,
        "members": await workspaces.members_of(site(request).db, project["id"]),
        "members_error": None if error is None else sentence(error.message),
        "member_form": entered or {},
    }
    # 200 even with an error: htmx swaps in only successful answers
    return await render(request, "_members.html", context)

"""Accounts and access pages: signing in and out (password or GitHub), a user's account
(password, API tokens), site admins managing users, and project members."""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from . import auth
from .db import Database, Row
from .server import (
    ApiError,
    app_state,
    check_role,
    current_user,
    field,
    get_project,
    json_body,
    render,
    require_user,
)
from .submit import iso

# sign-ins and refusals, for the site's operators (and tools such as fail2ban)
log = logging.getLogger("jobsite.accounts")

# GitHub logins are at most 39 letters, digits and single hyphens; local names may also
# use '.' and '_'
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,38}")
GITHUB_TOKEN = "github_token"
GITHUB_STATE = "github_state"


def in_sqlite_range(number: int) -> bool:
    """Whether a number from an address can be an SQLite row id (asking for a larger one
    is an error in SQLite, not an empty answer)."""
    return 0 <= number < 2**63


def safe_next(target: str | None) -> str:
    """Where to go after signing in: only a path on this site."""
    # browsers read "/\host" as "//host", another site
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


# -- signing in and out ---------------------------------------------------------------


async def login_page(request: Request) -> Response:
    state = app_state(request)
    error = None
    username = ""
    if request.method == "POST":
        form = await request.form()
        username = str(form.get("username", "")).strip()
        password = str(form.get("password", ""))
        limiter: auth.RateLimiter = state.login_limiter
        client = request.client.host if request.client else "unknown"
        if not state.settings.local_accounts:
            error = "This site signs in with GitHub only."
        elif not (limiter.allow(f"user:{username.lower()}") and limiter.allow(f"addr:{client}")):
            log.warning("sign-in refused, too many attempts: user %r from %s", username, client)
            error = "Too many sign-in attempts. Wait a few minutes and try again."
        else:
            user = await auth.authenticate_password(state.db, username, password)
            if user is None:
                log.warning("sign-in failed: user %r from %s", username, client)
                error = "That username and password do not match."
            else:
                log.info("signed in with a password: %s from %s", user.username, client)
                limiter.reset(f"user:{username.lower()}")
                await auth.start_session(state.db, request.session, user.id)
                return RedirectResponse(
                    safe_next(request.query_params.get("next")), status_code=303
                )
    return await render(
        request,
        "login.html",
        {
            "error": error,
            "username": username,
            "next": safe_next(request.query_params.get("next")),
        },
        status=400 if error else 200,
    )


async def logout(request: Request) -> Response:
    request.session.clear()
    return RedirectResponse("/", status_code=303)


def github(request: Request) -> auth.GitHub:
    settings = app_state(request).settings.github
    if not settings.enabled:
        raise ApiError(404, "signing in with GitHub is not set up on this site")
    return auth.GitHub(settings)


def github_callback_url(request: Request) -> str:
    return f"{app_state(request).settings.base_url}/auth/github/callback"


async def github_start(request: Request) -> Response:
    """Send the browser to GitHub, remembering a random state to check when it returns."""
    client = github(request)
    state = secrets.token_urlsafe(24)
    request.session[GITHUB_STATE] = {
        "state": state,
        "next": safe_next(request.query_params.get("next")),
    }
    return RedirectResponse(
        client.authorize_url(github_callback_url(request), state), status_code=303
    )


async def github_callback(request: Request) -> Response:
    client = github(request)
    started = request.session.pop(GITHUB_STATE, None) or {}
    params = request.query_params
    if params.get("error"):
        why = params.get("error_description") or params["error"]
        raise ApiError(400, f"GitHub did not sign you in: {why}")
    expected = started.get("state")
    if not expected or not auth.same_secret(expected, params.get("state", "")):
        raise ApiError(
            400,
            "this sign-in with GitHub did not start here or has expired; "
            "go to the sign-in page and try again",
        )
    try:
        token = await client.exchange_code(params.get("code", ""), github_callback_url(request))
        account = await client.user(token)
    except auth.GitHubError as e:
        raise ApiError(400, f"signing in with GitHub failed: {e}") from None
    user_id = await github_user(request, account)
    log.info("signed in with GitHub: %s (GitHub id %s)", account.login, account.id)
    await auth.start_session(app_state(request).db, request.session, user_id)
    request.session[GITHUB_TOKEN] = app_state(request).sealer.seal(token)
    return RedirectResponse(started.get("next") or "/", status_code=303)


async def github_user(request: Request, account: auth.GitHubUser) -> int:
    """The site's user for a GitHub account: the linked one, the signed-in user (who is
    linking their account), or a new user named after the GitHub login."""
    db: Database = app_state(request).db
    linked = await db.fetchone("SELECT id, is_active FROM users WHERE github_id = ?", (account.id,))
    if linked is not None:
        if not linked["is_active"]:
            raise ApiError(403, "this account has been deactivated; ask a site admin")
        return linked["id"]
    signed_in = await current_user(request)
    if signed_in is not None:
        await db.execute("UPDATE users SET github_id = ? WHERE id = ?", (account.id, signed_in.id))
        return signed_in.id
    # a user an admin added for this GitHub login, who has no password to sign in with
    added = await db.fetchone(
        "SELECT id FROM users WHERE username = ? AND github_id IS NULL "
        "AND password_hash IS NULL AND is_active = 1",
        (account.login,),
    )
    if added is not None:
        await db.execute("UPDATE users SET github_id = ? WHERE id = ?", (account.id, added["id"]))
        return added["id"]
    try:
        return await auth.create_user(
            db,
            account.login,
            email=account.email,
            full_name=account.name,
            github_id=account.id,
        )
    except sqlite3.IntegrityError:
        raise ApiError(
            409,
            f"a user named {account.login!r} already exists on this site and is not linked "
            "to your GitHub account. If it is yours, sign in with its password and then "
            "sign in with GitHub to link them; otherwise ask a site admin.",
        ) from None


async def github_repos(request: Request) -> list[dict[str, Any]] | None:
    """The signed-in user's GitHub repositories, or None when they did not sign in with
    GitHub. Raises auth.GitHubError when GitHub refuses or cannot be reached."""
    sealed = request.session.get(GITHUB_TOKEN)
    token = app_state(request).sealer.unseal(sealed) if sealed else None
    if token is None:
        return None
    return await github(request).repos(token)


async def api_github_repos(request: Request) -> Response:
    """The signed-in user's GitHub repositories, for the new-workspace form."""
    await require_user(request)
    try:
        repos = await github_repos(request)
    except auth.GitHubError as e:
        raise ApiError(502, str(e)) from None
    if repos is None:
        raise ApiError(400, "sign in with GitHub (in the browser) to list your repositories")
    return JSONResponse({"repos": repos})


# -- a user's own account -------------------------------------------------------------


async def account_page(request: Request, **context: Any) -> Response:
    user = await require_user(request)
    db: Database = app_state(request).db
    row = await db.fetchone(
        "SELECT password_hash IS NOT NULL AS has_password, github_id FROM users WHERE id = ?",
        (user.id,),
    )
    tokens = [
        {
            **token,
            "created_at": iso(token["created_at"]),
            "last_used_at": iso(token["last_used_at"]),
        }
        for token in await db.fetchall(
            "SELECT id, name, created_at, last_used_at FROM api_tokens WHERE user_id = ? "
            "ORDER BY created_at DESC",
            (user.id,),
        )
    ]
    context = {
        "has_password": bool(row["has_password"]),
        "github_linked": row["github_id"] is not None,
        "github_enabled": app_state(request).settings.github.enabled,
        "tokens": tokens,
        "error": None,
        "message": None,
        "new_token": None,
        **context,
    }
    status = 400 if context["error"] else 200
    return await render(request, "account.html", context, status=status)


async def change_password(request: Request) -> Response:
    user = await require_user(request)
    form = await request.form()
    current = str(form.get("current_password", ""))
    new = str(form.get("new_password", ""))
    db: Database = app_state(request).db
    stored = await db.fetchval("SELECT password_hash FROM users WHERE id = ?", (user.id,))
    if not app_state(request).settings.local_accounts:
        return await account_page(request, error="This site signs in with GitHub only.")
    if stored and not auth.verify_password(current, stored):
        return await account_page(request, error="Your current password is not right.")
    if new != str(form.get("confirm_password", "")):
        return await account_page(request, error="The two new passwords are not the same.")
    problem = auth.password_problem(new, user.username)
    if problem:
        return await account_page(request, error=f"Choose another password: {problem}.")
    await auth.set_password(db, user.id, new)
    # a new stamp ends every other session; this one goes on as it was
    kept = {k: v for k, v in request.session.items() if k in (GITHUB_TOKEN, auth.CSRF_FIELD)}
    await auth.start_session(db, request.session, user.id)
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
    token = await auth.create_token(app_state(request).db, user.id, name[:100])
    return await account_page(request, new_token={"name": name, "token": token})


async def revoke_token(request: Request) -> Response:
    user = await require_user(request)
    token_id = request.path_params["id"]
    if not in_sqlite_range(token_id) or not await auth.revoke_token(
        app_state(request).db, user.id, token_id
    ):
        raise ApiError(404, "you have no such API token; it may have been revoked already")
    return RedirectResponse("/account", status_code=303)


# -- site admins managing users -------------------------------------------------------


async def require_admin(request: Request) -> auth.User:
    user = await require_user(request)
    if not user.is_admin:
        raise ApiError(403, "only site admins can manage users")
    return user


async def admin_users(request: Request, **context: Any) -> Response:
    await require_admin(request)
    local_accounts = app_state(request).settings.local_accounts
    users = [
        {**user, "actions": user_actions(user, local_accounts)}
        for user in await app_state(request).db.fetchall(
            "SELECT id, username, full_name, email, is_admin, is_active, github_id, "
            "password_hash IS NOT NULL AS has_password FROM users ORDER BY username"
        )
    ]
    context = {"users": users, "error": None, "message": None, "new_password": None, **context}
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
    await require_admin(request)
    form = await request.form()
    username = str(form.get("username", "")).strip()
    email = str(form.get("email", "")).strip() or None
    if not USERNAME.fullmatch(username):
        return await admin_users(
            request,
            error="A username is 1 to 39 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
        )
    password = secrets.token_urlsafe(12) if app_state(request).settings.local_accounts else None
    try:
        await auth.create_user(
            app_state(request).db,
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
    admin = await require_admin(request)
    db: Database = app_state(request).db
    user_id = request.path_params["id"]
    target = in_sqlite_range(user_id) and await db.fetchone(
        "SELECT id, username FROM users WHERE id = ?", (user_id,)
    )
    if not target:
        raise ApiError(404, "there is no such user")
    action = request.path_params["action"]
    if target["id"] == admin.id and action in ("remove-admin", "deactivate"):
        return await admin_users(
            request, error="You cannot do that to yourself; ask another site admin."
        )
    name = target["username"]
    if action == "reset-password":
        if not app_state(request).settings.local_accounts:
            return await admin_users(request, error="This site signs in with GitHub only.")
        password = secrets.token_urlsafe(12)
        await auth.set_password(db, target["id"], password)
        return await admin_users(
            request,
            message=f"Reset the password of {name}.",
            new_password={"username": name, "password": password},
        )
    changes = {
        "make-admin": ("is_admin = 1", f"{name} is now a site admin."),
        "remove-admin": ("is_admin = 0", f"{name} is no longer a site admin."),
        "deactivate": ("is_active = 0", f"Deactivated {name}: they can no longer sign in."),
        "activate": ("is_active = 1", f"Reactivated {name}."),
    }
    if action not in changes:
        raise ApiError(404, f"there is no user action {action!r}")
    change, message = changes[action]
    await db.execute(f"UPDATE users SET {change} WHERE id = ?", (target["id"],))
    return await admin_users(request, message=message)


# -- project members ------------------------------------------------------------------


async def members_of(db: Database, project_id: int) -> list[Row]:
    return await db.fetchall(
        "SELECT u.username, group_concat(m.role, ', ') AS roles FROM project_members m "
        "JOIN users u ON u.id = m.user_id WHERE m.project_id = ? GROUP BY u.id "
        "ORDER BY u.username",
        (project_id,),
    )


async def set_member(request: Request, project: Row, username: str, roles: list[Any]) -> None:
    """Give a user exactly these roles on the project (none removes them). Managing
    members needs the developer role, and only roles you hold can be given or taken."""
    user = await check_role(request, project["id"], "developer")
    bad = [r for r in roles if r not in auth.ROLES]
    if bad:
        raise ApiError(400, f"unknown roles {bad}; roles are {', '.join(auth.ROLES)}")
    db: Database = app_state(request).db
    member = await db.fetchone("SELECT id FROM users WHERE username = ?", (username,))
    if member is None:
        raise ApiError(404, f"there is no user {username!r}")
    held = {
        row["role"]
        for row in await db.fetchall(
            "SELECT role FROM project_members WHERE project_id = ? AND user_id = ?",
            (project["id"], member["id"]),
        )
    }
    changed = held.symmetric_difference(roles)
    not_yours = sorted(r for r in changed if not user.has_role(project["id"], r))
    if not_yours:
        raise ApiError(403, f"you can only give or take roles you hold; you lack {not_yours}")
    async with db.transaction() as conn:
        await conn.execute(
            "DELETE FROM project_members WHERE project_id = ? AND user_id = ?",
            (project["id"], member["id"]),
        )
        await conn.executemany(
            "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, ?)",
            [(project["id"], member["id"], role) for role in set(roles)],
        )


async def api_members(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    members = await members_of(app_state(request).db, project["id"])
    return JSONResponse(
        {"members": [{"username": m["username"], "roles": roles_list(m)} for m in members]}
    )


def roles_list(member: Row) -> list[str]:
    return sorted(member["roles"].split(", "))


async def api_add_member(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    await check_role(request, project["id"], "developer")
    body = await json_body(request)
    username = field(body, "username")
    roles = field(body, "roles", list)
    if not roles:
        raise ApiError(400, "roles must name at least one role; to remove a member use DELETE")
    await set_member(request, project, username, roles)
    return JSONResponse({"username": username, "roles": sorted(set(roles))})


async def api_remove_member(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    username = request.path_params["username"]
    await check_role(request, project["id"], "developer")
    members = await members_of(app_state(request).db, project["id"])
    if username.lower() not in {m["username"].lower() for m in members}:
        raise ApiError(404, f"{username!r} is not a member of this project")
    await set_member(request, project, username, [])
    return Response(status_code=204)


async def add_member_form(request: Request) -> Response:
    """The members form of the project page: add a member or set their roles."""
    project = await get_project(request, request.path_params["slug"])
    form = await request.form()
    username = str(form.get("username", "")).strip()
    roles = list(form.getlist("roles"))
    entered = {"username": username, "roles": roles}
    if not username:
        error: ApiError | str = "Enter the username of the person to add."
        return await members_answer(request, project, error, entered)
    if not roles:
        return await members_answer(request, project, "Tick at least one role.", entered)
    try:
        await set_member(request, project, username, roles)
    except ApiError as e:
        return await members_answer(request, project, e, entered)
    return await members_answer(request, project)


async def remove_member_form(request: Request) -> Response:
    project = await get_project(request, request.path_params["slug"])
    try:
        await set_member(request, project, request.path_params["username"], [])
    except ApiError as e:
        return await members_answer(request, project, e)
    return await members_answer(request, project)


async def members_answer(
    request: Request,
    project: Row,
    error: ApiError | str | None = None,
    entered: dict[str, Any] | None = None,
) -> Response:
    """For htmx, the members section again (with the error, and the form as it was sent);
    otherwise back to the project page, or the error page."""
    if not request.headers.get("hx-request"):
        if error is not None:
            raise error if isinstance(error, ApiError) else ApiError(400, error)
        return RedirectResponse(f"/projects/{project['slug']}/#members", status_code=303)
    if isinstance(error, ApiError):
        if error.status == 401:
            raise error
        error = error.message[0].upper() + error.message[1:] + "."
    context = {
        "project": project,
        "members": await members_of(app_state(request).db, project["id"]),
        "members_error": error,
        "member_form": entered or {},
    }
    # 200 even with an error: htmx swaps in only successful answers
    return await render(request, "_members.html", context)

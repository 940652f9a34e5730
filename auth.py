"""Who is asking, and what they may do: passwords, API tokens, sessions, roles, and
signing in with GitHub. (The CSRF checks of web requests are in views.csrf.)"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.fernet import Fernet, InvalidToken

from . import config
from .db import Database, Row
from .problems import Conflict, NotAllowed

ROLES = ("developer", "collaborator", "output_viewer")
TOKEN_PREFIX = "jst_"

# scrypt cost: n=2**14, r=8 -> 16 MiB and ~50 ms per hash, as OWASP suggests for scrypt
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
MIN_PASSWORD_LENGTH = 10


def password_problem(password: str, username: str) -> str | None:
    """Why a new password will not do, or None when it is fine."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"a password needs at least {MIN_PASSWORD_LENGTH} characters"
    if password.lower() == username.lower():
        return "a password must not be the username"
    return None


# what an unknown user's password, or a user without one, is checked against: a hash of a
# secret no one knows, at the site's cost, so that every sign-in costs one scrypt
_DUMMY_HASHES: dict[tuple[int, ...], str] = {}


def dummy_hash() -> str:
    cost = tuple(_SCRYPT.values())
    if cost not in _DUMMY_HASHES:
        _DUMMY_HASHES[cost] = hash_password(secrets.token_urlsafe(32))
    return _DUMMY_HASHES[cost]


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    n, r, p = _SCRYPT["n"], _SCRYPT["r"], _SCRYPT["p"]
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    expected = base64.b64decode(digest)
    actual = hashlib.scrypt(
        password.encode(),
        salt=base64.b64decode(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(expected),
    )
    return hmac.compare_digest(actual, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class User:
    id: int
    username: str
    full_name: str = ""
    email: str | None = None
    is_admin: bool = False
    # project id -> roles held there
    roles: dict[int, set[str]] = field(default_factory=dict)

    def has_role(self, project_id: int, *roles: str) -> bool:
        if self.is_admin:
            return True
        held = self.roles.get(project_id, set())
        return any(role in held for role in roles)

    def is_member(self, project_id: int) -> bool:
        return self.is_admin or bool(self.roles.get(project_id))

    def can_run(self, project_id: int) -> bool:
        return self.has_role(project_id, "developer")

    def can_view_outputs(self, project_id: int) -> bool:
        return self.has_role(project_id, "output_viewer")


# an active user's columns and their roles ([[project id, role], ...]), to be joined in the
# query that finds the user (a session, a token): one trip to the database, not three
USER_COLUMNS = (
    "u.id, u.username, u.full_name, u.email, u.is_admin, u.password_hash, "
    "(SELECT json_group_array(json_array(m.project_id, m.role)) FROM project_members m "
    "WHERE m.user_id = u.id) AS roles"
)


def _user(row: Row | None, stamp: str | None = None) -> User | None:
    """The user of a row with USER_COLUMNS; with a session's ``stamp``, only while their
    password is the one the session was made with."""
    if row is None or (stamp is not None and stamp != session_stamp(row["password_hash"])):
        return None
    user = User(
        id=row["id"],
        username=row["username"],
        full_name=row["full_name"],
        email=row["email"],
        is_admin=bool(row["is_admin"]),
    )
    for project_id, role in json.loads(row["roles"]):
        user.roles.setdefault(project_id, set()).add(role)
    return user


async def load_user(db: Database, user_id: int, stamp: str | None = None) -> User | None:
    """The active user with this id, with their roles; with a session's ``stamp``, only
    while their password is the one the session was made with."""
    row = await db.lookup(
        f"SELECT {USER_COLUMNS} FROM users u WHERE u.id = ? AND u.is_active = 1", (user_id,)
    )
    return _user(row, stamp)


def session_stamp(password_hash: str | None) -> str:
    """A fingerprint of the user's password hash, kept in their session: when the password
    changes (or a site admin resets it), every session made before stops working."""
    return hashlib.sha256((password_hash or "").encode()).hexdigest()[:16]


SESSION_ID = "session_id"  # the session cookie's key for its server-side row


async def start_session(
    db: Database, session: dict[str, Any], user_id: int, max_age: float
) -> None:
    """Sign the session in as the user, afresh, so no session made before can be reused.

    The session is also kept on the server, so that signing out ends it there: a cookie
    copied before then is of no use after. The user's sessions older than ``max_age``
    seconds are cleared out on the way."""
    stored = await db.fetchval("SELECT password_hash FROM users WHERE id = ?", (user_id,))
    session_id = secrets.token_urlsafe(32)
    async with db.transaction() as conn:
        previous = session.get(SESSION_ID)
        if isinstance(previous, str):
            await conn.execute("DELETE FROM sessions WHERE id = ?", (hash_token(previous),))
        await conn.execute(
            "DELETE FROM sessions WHERE user_id = ? AND created_at < ?",
            (user_id, time.time() - max_age),
        )
        await conn.execute(
            "INSERT INTO sessions (id, user_id, created_at) VALUES (?, ?, ?)",
            (hash_token(session_id), user_id, time.time()),
        )
    session.clear()
    session["user_id"] = user_id
    session["stamp"] = session_stamp(stored)
    session[SESSION_ID] = session_id


async def end_session(db: Database, session: dict[str, Any], max_age: float) -> None:
    """Sign out: the session's row goes, and with it every use of its cookie; sessions of
    anyone older than ``max_age`` seconds are cleared out on the way."""
    session_id = session.get(SESSION_ID)
    session.clear()
    async with db.transaction() as conn:
        if isinstance(session_id, str):
            await conn.execute("DELETE FROM sessions WHERE id = ?", (hash_token(session_id),))
        await conn.execute("DELETE FROM sessions WHERE created_at < ?", (time.time() - max_age,))


async def load_session_user(db: Database, session: dict[str, Any], max_age: float) -> User | None:
    """The session's user while its server-side row lasts (up to ``max_age`` seconds)."""
    session_id = session.get(SESSION_ID)
    if not isinstance(session_id, str) or not isinstance(session.get("user_id"), int):
        return None
    row = await db.lookup(
        f"SELECT {USER_COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id "
        "WHERE s.id = ? AND s.created_at >= ? AND u.is_active = 1",
        (hash_token(session_id), time.time() - max_age),
    )
    if row is None or row["id"] != session["user_id"]:
        return None
    return _user(row, stamp=session.get("stamp", ""))


async def authenticate_password(db: Database, username: str, password: str) -> User | None:
    """The user whose username and password these are, or None.

    Every attempt costs one scrypt, in a thread (it takes ~50 ms of CPU): an unknown
    username, or a user who signs in with GitHub only, is checked against a dummy hash,
    so the time taken does not tell which names exist or have a password."""
    row = await db.fetchone(
        "SELECT id, password_hash FROM users WHERE username = ? AND is_active = 1", (username,)
    )
    stored = row["password_hash"] if row and row["password_hash"] else await _dummy()
    matches = await check_password(password, stored)
    if not matches or row is None or not row["password_hash"]:
        return None
    return await load_user(db, row["id"])


async def _dummy() -> str:
    return await asyncio.to_thread(dummy_hash)


async def check_password(password: str, stored: str | None) -> bool:
    """verify_password in a thread, for callers on the event loop."""
    return await asyncio.to_thread(verify_password, password, stored)


# "last used" is kept to the minute, so that a busy API client does not make every one of
# its requests wait for the database's single writer
TOKEN_USE_RESOLUTION = 60.0


async def authenticate_token(db: Database, token: str) -> User | None:
    """The user of a token that exists and has not expired."""
    now = time.time()
    row = await db.lookup(
        f"SELECT t.id AS token_id, t.last_used_at, {USER_COLUMNS} FROM api_tokens t "
        "JOIN users u ON u.id = t.user_id "
        "WHERE t.token_hash = ? AND (t.expires_at IS NULL OR t.expires_at > ?) AND u.is_active = 1",
        (hash_token(token), now),
    )
    if row is None:
        return None
    if row["last_used_at"] is None or now - row["last_used_at"] >= TOKEN_USE_RESOLUTION:
        await db.execute(
            "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, row["token_id"])
        )
    return _user(row)


async def create_user(
    db: Database,
    username: str,
    password: str | None = None,
    *,
    email: str | None = None,
    full_name: str = "",
    is_admin: bool = False,
    github_id: int | None = None,
) -> int:
    return await db.execute(
        "INSERT INTO users (username, full_name, email, password_hash, github_id, is_admin, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            username,
            full_name,
            email,
            await asyncio.to_thread(hash_password, password) if password else None,
            github_id,
            int(is_admin),
            time.time(),
        ),
    )


async def set_password(db: Database, user_id: int, password: str) -> None:
    stored = await asyncio.to_thread(hash_password, password)
    await db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (stored, user_id))


async def create_token(
    db: Database, user_id: int, name: str, expires_in: float | None = None
) -> str:
    """A new API token, valid for ``expires_in`` seconds (None: until revoked); only its
    hash is kept, so this is the one time it can be shown."""
    token = new_token()
    now = time.time()
    await db.execute(
        "INSERT INTO api_tokens (user_id, name, token_hash, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (user_id, name, hash_token(token), now, None if expires_in is None else now + expires_in),
    )
    return token


async def reset_password(db: Database, user_id: int, password: str) -> None:
    """A password set for the user by someone else (a site admin): every session and API
    token they had ends with it, as whoever asked for the reset may fear they leaked."""
    await set_password(db, user_id, password)
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM api_tokens WHERE user_id = ?", (user_id,))
        await conn.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))


async def revoke_token(db: Database, user_id: int, token_id: int) -> bool:
    """Delete one of the user's tokens; False when they have no such token."""
    async with db.transaction() as conn:
        cur = await conn.execute(
            "DELETE FROM api_tokens WHERE id = ? AND user_id = ?", (token_id, user_id)
        )
        return cur.rowcount > 0


def same_secret(expected: str, given: str) -> bool:
    """Compared in constant time; as bytes, since any text may be sent."""
    return hmac.compare_digest(expected.encode(), given.encode())


class RateLimiter:
    """At most ``limit`` attempts per key within ``window`` seconds (in memory)."""

    # past this many keys, keys with no attempt inside the window are dropped, so that
    # attempts at endless made-up usernames cannot grow memory without bound
    PRUNE_AT = 10_000

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.hits: dict[str, list[float]] = {}  # attempt times by key, newest last

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        if len(self.hits) >= self.PRUNE_AT:
            self.hits = {k: v for k, v in self.hits.items() if v and now - v[-1] < self.window}
        hits = [t for t in self.hits.get(key, []) if now - t < self.window]
        self.hits[key] = hits
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True

    def full(self, key: str) -> bool:
        """Whether the next attempt for ``key`` would be refused (it is not counted)."""
        now = time.monotonic()
        return sum(1 for t in self.hits.get(key, []) if now - t < self.window) >= self.limit

    def reset(self, key: str) -> None:
        self.hits.pop(key, None)


class SignInThrottle:
    """How often password sign-ins may be tried, such that a stranger cannot lock a user
    out: at most ``per_user`` attempts per username from one address, and ``per_address``
    in all from one address, within ``window`` seconds. Guessing one user's password from
    one address stops soon; guessing from many addresses stops each of them soon; and
    attempts from elsewhere never stop the user signing in from their own address."""

    def __init__(self, per_user: int = 10, per_address: int = 50, window: float = 300) -> None:
        self.pairs = RateLimiter(per_user, window)
        self.addresses = RateLimiter(per_address, window)

    def allow(self, username: str, address: str) -> bool:
        """Whether this attempt may go ahead; it is counted when it may."""
        pair = self._pair(username, address)
        if self.pairs.full(pair) or self.addresses.full(address):
            return False
        return self.pairs.allow(pair) and self.addresses.allow(address)

    def succeeded(self, username: str, address: str) -> None:
        """A right password forgets that user's failed attempts from that address."""
        self.pairs.reset(self._pair(username, address))

    @staticmethod
    def _pair(username: str, address: str) -> str:
        # a fixed-size key, however long a username is sent
        return f"{address} {hashlib.sha256(username.lower().encode()).hexdigest()}"


# -- GitHub ---------------------------------------------------------------------------


class GitHubError(Exception):
    """Signing in with GitHub, or asking it something, went wrong; the message says how."""


class NotAMember(GitHubError):
    """GitHub says the user is not a member of an org (or will not say they are)."""


@dataclass
class GitHubUser:
    id: int
    login: str
    name: str
    email: str | None


class GitHub:
    """The OAuth web flow and the few API calls the site needs, against github.com or a
    GitHub Enterprise server (``github.base_url`` / ``github.api_url``)."""

    TIMEOUT = 15.0
    MAX_REPO_PAGES = 10

    def __init__(self, settings: config.GitHub) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        self.api_url = settings.api_url.rstrip("/")

    @property
    def scope(self) -> str:
        """What the site asks to read: email addresses, and org memberships when it lets
        members of allowed orgs in (private memberships are hidden without read:org)."""
        return "user:email read:org" if self.settings.allowed_orgs else "user:email"

    def authorize_url(self, redirect_uri: str, state: str) -> str:
        query = urllib.parse.urlencode(
            {
                "client_id": self.settings.client_id,
                "redirect_uri": redirect_uri,
                "scope": self.scope,
                "state": state,
                "allow_signup": "false",
            }
        )
        return f"{self.base_url}/login/oauth/authorize?{query}"

    async def exchange_code(self, code: str, redirect_uri: str) -> str:
        """The access token GitHub grants for the code it sent back."""
        data = await self._call(
            "POST",
            f"{self.base_url}/login/oauth/access_token",
            data={
                "client_id": self.settings.client_id,
                "client_secret": self.settings.client_secret,
                "code": code,
                "redirect_uri": redirect_uri,
            },
        )
        if not isinstance(data, dict) or not data.get("access_token"):
            why = (
                data.get("error_description") or data.get("error")
                if isinstance(data, dict)
                else None
            )
            raise GitHubError(f"GitHub did not grant access ({why or 'no token in its answer'})")
        return str(data["access_token"])

    async def user(self, token: str) -> GitHubUser:
        data = await self._call("GET", f"{self.api_url}/user", token=token)
        email = data.get("email") or await self._verified_email(token)
        return GitHubUser(
            id=int(data["id"]), login=str(data["login"]), name=data.get("name") or "", email=email
        )

    async def _verified_email(self, token: str) -> str | None:
        """The primary verified address of a user who keeps theirs private, if GitHub says;
        an address is only nice to have, so not knowing it stops nothing."""
        try:
            emails = await self._call("GET", f"{self.api_url}/user/emails", token=token)
        except GitHubError:
            return None
        verified = [e for e in emails if isinstance(e, dict) and e.get("verified")]
        primary = [e for e in verified if e.get("primary")]
        return (primary or verified or [{}])[0].get("email")

    async def allowed_org(self, token: str) -> str | None:
        """The first of ``github.allowed_orgs`` the token's user is an active member of."""
        async with httpx.AsyncClient(timeout=self.TIMEOUT) as client:
            for org in self.settings.allowed_orgs:
                url = f"{self.api_url}/user/memberships/orgs/{urllib.parse.quote(org, safe='')}"
                try:
                    response = await self._send(client, "GET", url, token=token)
                except NotAMember:
                    continue
                if response.json().get("state") == "active":
                    return org
        return None

    async def repos(self, token: str) -> list[dict[str, Any]]:
        """The repositories the user can read, most recently pushed first."""
        url: str | None = f"{self.api_url}/user/repos?per_page=100&sort=pushed"
        found: list[dict[str, Any]] = []
        async with httpx.AsyncClient(timeout=self.TIMEOUT) as client:
            for _ in range(self.MAX_REPO_PAGES):
                if url is None:
                    break
                response = await self._send(client, "GET", url, token=token)
                found += [
                    {
                        "full_name": repo["full_name"],
                        "url": repo["html_url"],
                        "private": bool(repo.get("private")),
                        "default_branch": repo.get("default_branch"),
                    }
                    for repo in response.json()
                ]
                url = response.links.get("next", {}).get("url")
        return found

    async def _call(self, method: str, url: str, token: str | None = None, **kwargs: Any) -> Any:
        async with httpx.AsyncClient(timeout=self.TIMEOUT) as client:
            response = await self._send(client, method, url, token=token, **kwargs)
        try:
            return response.json()
        except json.JSONDecodeError:
            raise GitHubError(f"GitHub answered {url} with something other than JSON") from None

    async def _send(
        self, client: httpx.AsyncClient, method: str, url: str, token: str | None, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = await client.request(method, url, headers=headers, **kwargs)
        except httpx.HTTPError as e:
            raise GitHubError(f"cannot reach GitHub at {url}: {e}") from None
        if response.status_code == 401:
            raise GitHubError("GitHub no longer accepts the sign-in; sign in with GitHub again")
        if response.status_code in (403, 404) and "/user/memberships/orgs/" in url:
            raise NotAMember(url)  # not a member, or the org keeps this app out
        if response.status_code >= 400:
            raise GitHubError(f"GitHub answered {response.status_code} for {url}")
        return response


class Sealer:
    """Encrypts small secrets (a user's GitHub token) for keeping in the session cookie,
    which is signed but otherwise readable by whoever holds it."""

    def __init__(self, secret_key: str) -> None:
        key = hashlib.sha256(b"jobsite session secrets:" + secret_key.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, text: str) -> str:
        return self._fernet.encrypt(text.encode()).decode()

    def unseal(self, sealed: str) -> str | None:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            return None


async def user_for_github(
    db: Database,
    account: GitHubUser,
    signed_in: User | None,
    may_join: Callable[[], Awaitable[bool]],
) -> int:
    """The site's user for a GitHub account: the linked one, the signed-in user (who is
    linking their account), the user an admin added for the login, or, when ``may_join``
    says the account may have one (it is in an allowed org), a new user named after it.
    Anyone else is refused, and told to ask a site admin."""
    linked = await db.fetchone("SELECT id, is_active FROM users WHERE github_id = ?", (account.id,))
    if linked is not None:
        if not linked["is_active"]:
            raise NotAllowed("this account has been deactivated; ask a site admin")
        return linked["id"]
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
    if not await may_join():
        raise NotAllowed(
            f"there is no account on this site for the GitHub user {account.login}. "
            f"Ask a site admin to add {account.login} (on the admin's users page, or with "
            f"jobsite user add {account.login} --github), then sign in with GitHub again"
        )
    try:
        return await create_user(
            db,
            account.login,
            email=account.email,
            full_name=account.name,
            github_id=account.id,
        )
    except sqlite3.IntegrityError:
        raise Conflict(
            f"a user named {account.login!r} already exists on this site and is not linked "
            "to your GitHub account. If it is yours, sign in with its password and then "
            "sign in with GitHub to link them; otherwise ask a site admin."
        ) from None

"""Who is asking, and what they may do: passwords, API tokens, sessions, roles, CSRF."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from starlette.requests import Request

from db import Database

ROLES = ("developer", "collaborator", "output_viewer")
TOKEN_PREFIX = "jst_"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"

# scrypt cost: n=2**14, r=8 -> 16 MiB and ~50 ms per hash, as OWASP suggests for scrypt
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


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

    @property
    def display_name(self) -> str:
        return self.full_name or self.username

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


async def load_user(db: Database, user_id: int) -> User | None:
    row = await db.fetchone(
        "SELECT id, username, full_name, email, is_admin FROM users WHERE id = ? AND is_active = 1",
        (user_id,),
    )
    if row is None:
        return None
    user = User(
        id=row["id"],
        username=row["username"],
        full_name=row["full_name"],
        email=row["email"],
        is_admin=bool(row["is_admin"]),
    )
    for member in await db.fetchall(
        "SELECT project_id, role FROM project_members WHERE user_id = ?", (user_id,)
    ):
        user.roles.setdefault(member["project_id"], set()).add(member["role"])
    return user


async def authenticate_password(db: Database, username: str, password: str) -> User | None:
    row = await db.fetchone(
        "SELECT id, password_hash FROM users WHERE username = ? AND is_active = 1", (username,)
    )
    # hash even for an unknown user, so response time does not reveal which names exist
    stored = row["password_hash"] if row else hash_password("timing-equaliser")
    if not verify_password(password, stored) or row is None:
        return None
    return await load_user(db, row["id"])


async def authenticate_token(db: Database, token: str) -> User | None:
    row = await db.fetchone(
        "SELECT id, user_id FROM api_tokens WHERE token_hash = ?", (hash_token(token),)
    )
    if row is None:
        return None
    await db.execute(
        "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (time.time(), row["id"])
    )
    return await load_user(db, row["user_id"])


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
            hash_password(password) if password else None,
            github_id,
            int(is_admin),
            time.time(),
        ),
    )


async def create_token(db: Database, user_id: int, name: str) -> str:
    token = new_token()
    await db.execute(
        "INSERT INTO api_tokens (user_id, name, token_hash, created_at) VALUES (?, ?, ?, ?)",
        (user_id, name, hash_token(token), time.time()),
    )
    return token


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get(CSRF_FIELD)
    if not token:
        token = secrets.token_urlsafe(24)
        request.session[CSRF_FIELD] = token
    return token


def csrf_ok(request: Request, submitted: str | None) -> bool:
    expected = request.session.get(CSRF_FIELD)
    return bool(expected and submitted and hmac.compare_digest(expected, submitted))


class RateLimiter:
    """At most ``limit`` attempts per key within ``window`` seconds (in memory)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._hits: dict[str, list[float]] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        hits = [t for t in self._hits.get(key, []) if now - t < self.window]
        self._hits[key] = hits
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True

    def reset(self, key: str) -> None:
        self._hits.pop(key, None)

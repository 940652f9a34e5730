"""Cross-site request forgery: every unsafe request a browser sends on a signed-in
session must come from this site and carry the session's CSRF token."""

from __future__ import annotations

import secrets
import urllib.parse

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import same_secret
from .limits import answer

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get(CSRF_FIELD)
    if not token:
        token = secrets.token_urlsafe(24)
        request.session[CSRF_FIELD] = token
    return token


def csrf_ok(request: Request, submitted: str | None) -> bool:
    expected = request.session.get(CSRF_FIELD)
    return bool(expected and submitted and same_secret(expected, submitted))


CSRF_REFUSED = "the form has expired or came from another site; reload the page and try again"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class CSRFMiddleware:
    """Refuses every unsafe request that relies on the session cookie unless it comes from
    this site: its Origin (when sent) must be the site's, and it must carry the session's
    CSRF token, in the X-CSRF-Token header (htmx, fetch) or the csrf_token form field.

    Requests that carry an API token are let through: a browser never adds an
    Authorization header to a cross-site request by itself. So are requests from a
    session nobody signed in to, which act for no one (the handler asks them to sign in),
    except to the sign-in pages, so another site cannot sign a visitor in as someone else.
    Checking here, below the session middleware and above the routes, covers every
    route, including ones added later, so no handler can forget.
    """

    def __init__(self, app: ASGIApp, base_url: str, sign_in_paths: tuple[str, ...]) -> None:
        self.app = app
        self.site_origin = _origin(base_url)
        self.sign_in_paths = sign_in_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        signed_in = "user_id" in scope["session"] or scope["path"] in self.sign_in_paths
        if headers.get("authorization", "").lower().startswith("bearer ") or not signed_in:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        origin = headers.get("origin")
        own_origin = _origin(str(request.base_url))
        if origin is not None and origin not in (self.site_origin, own_origin):
            await answer(scope, receive, send, 403, CSRF_REFUSED)
            return
        submitted = headers.get(CSRF_HEADER)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if submitted is None and content_type in _FORM_TYPES:
            body = await request.body()
            try:
                async with request.form() as form:
                    value = form.get(CSRF_FIELD)
                    submitted = value if isinstance(value, str) else None
            except HTTPException as e:  # too many fields, a part too large
                await answer(scope, receive, send, 400, f"the form cannot be read: {e.detail}")
                return
            receive = _replay(body, receive)
        if not csrf_ok(request, submitted):
            await answer(scope, receive, send, 403, CSRF_REFUSED)
            return
        await self.app(scope, receive, send)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that hands the already-read body to the app once more."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

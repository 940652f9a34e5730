"""The status page: the queue in the open, for everyone when ``public_status`` is on."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..site_status import site_status
from .base import HTTPError, current_user, fragment, is_htmx, render, site


async def status_page(request: Request) -> Response:
    user = await current_user(request)
    state = site(request)
    if not state.settings.public_status and user is None:
        raise HTTPError(401, "sign in to see the status of the queue")
    context = {"status": await site_status(state.db, state.settings, state.scheduler, user)}
    if is_htmx(request):
        return await fragment(request, "_status.html", context, done=False)
    return await render(request, "status.html", context)

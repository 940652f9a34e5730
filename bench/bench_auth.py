"""What knowing who asks costs a request: API tokens, sessions, the CSRF check, scrypt.

Run from the repository root:

    python bench/bench_auth.py [--requests N]

Requests go to the app in-process (httpx over ASGI, a real SQLite file in a temp dir).
Each figure is the median of N requests; ratios are against the baseline named beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from jobsite import auth
from jobsite.config import load_settings
from jobsite.server import create_app

ROOT = Path(__file__).resolve().parent.parent

PASSWORD = "a long password"


async def median_ms(n: int, send: Callable[[], Awaitable[httpx.Response]], status: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        response = await send()
        times.append(time.perf_counter() - start)
        assert response.status_code == status, (response.status_code, response.text[:300])
    return statistics.median(times) * 1000


async def anonymous_sign_in(transport: httpx.ASGITransport, username: str) -> None:
    """A wrong password for ``username``, from a fresh browser."""
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        page = await c.get("/login")
        csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)
        response = await c.post(
            "/login", data={"username": username, "password": "wrong", "csrf_token": csrf}
        )
        assert response.status_code == 400, response.text[:300]


def median_call_ms(n: int, call: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(environ={}, data_dir=tmp, max_workers=1)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            db = app.state.db
            user_id = await auth.create_user(db, "alice", PASSWORD)
            token = await auth.create_token(db, user_id, "bench")
            bearer = {"Authorization": f"Bearer {token}"}
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                await c.post("/api/v1/projects", json={"name": "Study"}, headers=bearer)
                page = await c.get("/login")
                csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)
                await c.post(
                    "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf}
                )
                page = await c.get("/account")
                csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)
                members = "/api/v1/projects/study/members"
                anonymous = httpx.AsyncClient(transport=transport, base_url="http://testserver")
                async with anonymous:
                    figures = {
                        "GET members, anonymous": await median_ms(
                            n, lambda: anonymous.get(members), 200
                        ),
                        "GET members, API token": await median_ms(
                            n, lambda: anonymous.get(members, headers=bearer), 200
                        ),
                        "GET members, session": await median_ms(n, lambda: c.get(members), 200),
                    }
                # a refused form (no token name) renders the account page and writes nothing
                header_post = await median_ms(
                    n,
                    lambda: c.post(
                        "/account/tokens", data={"name": ""}, headers={"X-CSRF-Token": csrf}
                    ),
                    400,
                )
                form_post = await median_ms(
                    n,
                    lambda: c.post("/account/tokens", data={"name": "", "csrf_token": csrf}),
                    400,
                )
                # wrong passwords for a known and an unknown username, taken in turns: the
                # same cost (one scrypt each) is what keeps usernames from being probed
                app.state.sign_in_throttle = auth.SignInThrottle(10**9, 10**9)
                logging.getLogger("jobsite.accounts").setLevel(logging.ERROR)  # each is logged
                sign_ins: dict[str, list[float]] = {"alice": [], "nobody": []}
                for _ in range(max(5, n // 10)):
                    for name, times in sign_ins.items():
                        start = time.perf_counter()
                        await anonymous_sign_in(transport, name)
                        times.append(time.perf_counter() - start)
    base = figures["GET members, anonymous"]
    print(f"requests per figure: {n} (median)")
    for name, ms in figures.items():
        print(f"  {name:<28} {ms:7.3f} ms   x{ms / base:.2f} of anonymous")
    print(f"  {'POST, CSRF token in header':<28} {header_post:7.3f} ms")
    print(
        f"  {'POST, CSRF token in form':<28} {form_post:7.3f} ms   "
        f"x{form_post / header_post:.2f} of header (the form is read twice)"
    )
    known, unknown = (statistics.median(t) * 1000 for t in sign_ins.values())
    print(f"  {'sign-in, known username':<28} {known:7.3f} ms")
    print(
        f"  {'sign-in, unknown username':<28} {unknown:7.3f} ms   x{unknown / known:.2f} of known"
    )
    stored = auth.hash_password(PASSWORD)
    scrypt = median_call_ms(max(5, n // 20), lambda: auth.verify_password(PASSWORD, stored))
    sha = median_call_ms(n, lambda: auth.hash_token(token))
    print(f"  {'scrypt password check':<28} {scrypt:7.3f} ms   x{scrypt / sha:.0f} of a token hash")
    print(f"  {'API token hash (sha256)':<28} {sha:7.4f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    asyncio.run(main(parser.parse_args().requests))

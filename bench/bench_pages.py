"""Time the workspace page: a full load, and the htmx poll that keeps its pills live.

Run from the repository root:

    python bench/bench_pages.py [--actions N] [--repeat N]

A real git repo holds a project.yaml of N chained actions (default 60); the app runs over a
temp data dir with the scheduler paused. Printed, as medians of --repeat requests:
- the full page (fetches the repo, reads and parses project.yaml, renders table and graph);
- the poll fragment (reads the local mirror without fetching; the parsed file is cached);
- the same poll with the parse cache cleared before each request, as the baseline for what
  the cache saves;
- render_svg alone for the N actions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from jobsite import (
    auth,
    server,
)
from jobsite.config import load_settings
from jobsite.graph import Node, render_svg

ROOT = Path(__file__).resolve().parent.parent


def project_yaml(actions: int) -> str:
    lines = ['version: "4"', "actions:"]
    for i in range(actions):
        lines += [
            f"  action_{i:03d}:",
            f'    run: python:v2 -c "echo {i} > output/f{i}.csv"',
            *([f"    needs: [action_{i - 1:03d}, action_{max(0, i - 3):03d}]"] if i else []),
            "    outputs:",
            "      moderately_sensitive:",
            f"        f: output/f{i}.csv",
        ]
    return "\n".join(lines) + "\n"


def make_repo(path: Path, text: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }
    path.mkdir(parents=True)
    (path / "project.yaml").write_text(text)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(["git", "-C", str(path), *args], check=True, env=env)


async def median_ms(client: httpx.AsyncClient, url: str, repeat: int, **kwargs) -> float:
    times = []
    for _ in range(repeat):
        before = kwargs.pop("before", None)
        if before:
            before()
        start = time.perf_counter()
        response = await client.get(url, headers=kwargs.get("headers"))
        times.append(time.perf_counter() - start)
        assert response.status_code in (200, 286), response.text[:500]
        if before:
            kwargs["before"] = before
    return statistics.median(times) * 1000


async def main(actions: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repos" / "study"
        make_repo(repo, project_yaml(actions))
        settings = load_settings(
            environ={}, data_dir=str(Path(tmp) / "data"), repos={"allow": [f"{tmp}/repos/*"]}
        )
        app = server.create_app(settings)
        async with app.router.lifespan_context(app):
            await app.state.scheduler.set_paused(True)
            user_id = await auth.create_user(app.state.db, "bench", "pw-1234567")
            token = await auth.create_token(app.state.db, user_id, "bench")
            api = {"Authorization": f"Bearer {token}"}
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                await client.post("/api/v1/projects", json={"name": "Bench"}, headers=api)
                body = {"name": "ws", "repo": str(repo), "branch": "main", "database": "sample"}
                await client.post("/api/v1/projects/bench/workspaces", json=body, headers=api)
                last = f"action_{actions - 1:03d}"
                await client.post(
                    "/api/v1/workspaces/ws/job-requests", json={"actions": [last]}, headers=api
                )
                full = await median_ms(client, "/ws/", repeat)
                poll = await median_ms(client, "/ws/", repeat, headers={"HX-Request": "true"})
                uncached = await median_ms(
                    client,
                    "/ws/",
                    repeat,
                    headers={"HX-Request": "true"},
                    before=app.state.projects.parsed.clear,
                )
    nodes = [
        Node(f"action_{i:03d}", (f"action_{i - 1:03d}",) if i else (), "succeeded", "Succeeded")
        for i in range(actions)
    ]
    svg_times = []
    for _ in range(repeat):
        start = time.perf_counter()
        render_svg(nodes)
        svg_times.append(time.perf_counter() - start)
    print(f"workspace page, {actions} actions, median of {repeat} requests:")
    print(f"  full page (git fetch + parse + render):   {full:8.2f} ms")
    print(f"  htmx poll, no parse cache (baseline):     {uncached:8.2f} ms")
    print(f"  htmx poll (no fetch, cached parse):       {poll:8.2f} ms")
    print(f"  poll vs baseline: {uncached / poll:.1f}x faster; vs full page: {full / poll:.1f}x")
    print(
        f"  render_svg alone:                         {statistics.median(svg_times) * 1000:8.2f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actions", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.actions, args.repeat))

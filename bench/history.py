"""Build a site with years of history, fast: the data the load benchmarks run against.

    .venv/bin/python bench/history.py ROOT [--workspaces 20] [--actions 100]
        [--requests 10000] [--finished 50000] [--events 6] [--queued 2000]

ROOT gets ``jobsite.yaml`` (its settings: the data dir, the repos it may use, a paused
queue's site), ``repos/ws-NN`` (real git repos, each with a project.yaml of chained
actions), ``data/`` (the data dir: a real SQLite database made by jobsite itself, then
filled with direct SQL in one transaction per table, and a mirror of every repo where the
site keeps them) and ``history.json`` (who can sign in, their tokens, some ids to ask for).

The finished jobs are spread over the job requests (about five each); the queued jobs are
the jobs of the newest requests, one pending job per action of every workspace, each
waiting on the one before it. The queue is paused, so a site started over ROOT runs none
of them until a bench resumes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobsite import auth
from jobsite.db import Database
from jobsite.repos import Repos

PASSWORD = "bench-password-1"
IMAGE = "ghcr.io/opensafely-core/python:v2"
# what a finished job passed through, one event each (the last is its end)
FINISHED_PATH = ("created", "waiting_on_workers", "preparing", "executing", "finalizing")
YEAR = 365 * 86400.0


@dataclass
class History:
    """What a bench needs to know about a built history (saved as history.json)."""

    root: str
    config: str
    data_dir: str
    password: str
    admin: str
    admin_token: str
    developer: str
    developer_token: str
    workspaces: list[str]
    actions: list[str]
    # a few ids of each kind, newest first, for benches to ask for
    finished_requests: list[list] = field(default_factory=list)  # [workspace, request id]
    queued_requests: list[list] = field(default_factory=list)
    finished_jobs: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> History:
        return cls(**json.loads((root / "history.json").read_text()))


def project_yaml(actions: int) -> str:
    """A chain of ``actions`` trivial actions, each needing the one or two before it."""
    lines = ['version: "4"', "actions:"]
    for i in range(actions):
        lines += [
            f"  action_{i:03d}:",
            f'    run: python:v2 -c "mkdir -p output && echo {i} > output/f{i}.csv"',
            *([f"    needs: [action_{i - 1:03d}, action_{max(0, i - 3):03d}]"] if i else []),
            "    outputs:",
            "      moderately_sensitive:",
            f"        f: output/f{i}.csv",
        ]
    return "\n".join(lines) + "\n"


def git(*args: str, cwd: Path | None = None) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }
    done = subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env
    )
    return done.stdout.strip()


def make_repo(path: Path, text: str) -> str:
    """A real repo with one commit holding project.yaml; returns the commit's sha."""
    path.mkdir(parents=True)
    (path / "project.yaml").write_text(text)
    git("init", "-q", "-b", "main", cwd=path)
    git("add", "-A", cwd=path)
    git("commit", "-qm", "the study", cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


async def make_database(path: Path) -> None:
    """The schema, written by jobsite itself (so it is exactly what the site expects)."""
    db = await Database.open(path, readers=1)
    await db.close()


def build(
    root: Path,
    workspaces: int = 20,
    actions: int = 100,
    requests: int = 10_000,
    finished: int = 50_000,
    events: int = 6,
    queued: int = 2_000,
    users: int = 30,
    seed: int = 14,
) -> History:
    if len(FINISHED_PATH) + 1 != events:
        raise SystemExit(f"a finished job here has {len(FINISHED_PATH) + 1} events")
    rng = random.Random(seed)
    root = root.resolve()
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty: choose a new folder")
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    config = root / "jobsite.yaml"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(data_dir),
                "repos": {"allow": [f"{root}/repos/*"]},
                "max_workers": 2,
            }
        )
        + "\n"
    )
    action_names = [f"action_{i:03d}" for i in range(actions)]
    text = project_yaml(actions)
    mirrors = Repos(data_dir / "repos")
    mirrors.root.mkdir()
    repo_paths, shas = [], []
    for w in range(workspaces):
        repo = root / "repos" / f"ws-{w:02d}"
        shas.append(make_repo(repo, text))
        repo_paths.append(str(repo))
        git("clone", "--mirror", "--quiet", "--", str(repo), str(mirrors.mirror_path(str(repo))))

    db_path = data_dir / "db.sqlite"
    asyncio.run(make_database(db_path))
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    now = time.time()
    start = now - 2 * YEAR
    password_hash = auth.hash_password(PASSWORD)  # one hash: scrypt is slow on purpose

    conn.execute("BEGIN")
    usernames = ["admin", "developer"] + [f"researcher{u:02d}" for u in range(users - 2)]
    conn.executemany(
        "INSERT INTO users (id, username, full_name, email, password_hash, is_admin, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (i + 1, name, name.title(), f"{name}@example.org", password_hash, int(i == 0), start)
            for i, name in enumerate(usernames)
        ],
    )
    tokens = {name: auth.new_token() for name in ("admin", "developer")}
    conn.executemany(
        "INSERT INTO api_tokens (user_id, name, token_hash, created_at) VALUES (?, ?, ?, ?)",
        [(i + 1, "bench", auth.hash_token(tokens[n]), start) for i, n in enumerate(tokens)],
    )
    # a project per two workspaces; the developer may do anything in every project
    projects = max(1, workspaces // 2)
    conn.executemany(
        "INSERT INTO projects (id, slug, name, created_by, created_at) VALUES (?, ?, ?, 2, ?)",
        [(p + 1, f"study-{p:02d}", f"Study {p:02d}", start) for p in range(projects)],
    )
    conn.executemany(
        "INSERT INTO project_members (project_id, user_id, role) VALUES (?, ?, ?)",
        [
            (p + 1, user, role)
            for p in range(projects)
            for user in (2, 3 + p % (users - 2))
            for role in auth.ROLES
        ],
    )
    ws_names = [f"ws-{w:02d}" for w in range(workspaces)]
    conn.executemany(
        "INSERT INTO workspaces (id, name, project_id, repo, branch, database, created_by, "
        "created_at) VALUES (?, ?, ?, ?, 'main', 'full', 2, ?)",
        [(w + 1, ws_names[w], w % projects + 1, repo_paths[w], start) for w in range(workspaces)],
    )

    # the newest requests hold the queued jobs: `per` actions each, every action once per
    # workspace; the others hold the finished jobs
    per = 5
    queued_requests = -(-queued // per) if queued else 0
    if queued_requests > requests or queued > workspaces * actions:
        raise SystemExit("too many queued jobs for the requests, workspaces and actions")
    old_requests = requests - queued_requests
    span = (now - 3600 - start) / max(1, old_requests)
    request_rows = []
    request_ws: list[int] = []
    request_at: list[float] = []
    request_user: list[int] = []
    for r in range(requests):
        w = r % workspaces
        user = 2 if r % 3 == 0 else 3 + (w % projects) % (users - 2)
        at = start + r * span if r < old_requests else now - 600 + (r - old_requests)
        request_ws.append(w + 1)
        request_at.append(at)
        request_user.append(user)
        request_rows.append((r + 1, w + 1, user, shas[w], at))

    job_rows, event_rows = [], []
    finished_jobs: list[str] = []
    per_request: dict[int, list[str]] = {}
    for j in range(finished):
        r = j % max(1, old_requests)
        w = request_ws[r] - 1
        action = action_names[(j // max(1, old_requests) + r * per) % actions]
        job_id = secrets.token_hex(8)
        created = request_at[r] + (j // max(1, old_requests)) * 1e-3
        started = created + rng.uniform(1, 120)
        completed = started + rng.uniform(5, 900)
        ok = rng.random() > 0.1
        code = "succeeded" if ok else "nonzero_exit"
        job_rows.append(
            (
                job_id, r + 1, w + 1, request_user[r], action, shas[w],
                f'python:v2 -c "echo {action}"', IMAGE, json.dumps(["-c", f"echo {action}"]),
                json.dumps({"moderately_sensitive": {"f": f"output/{action}.csv"}}), "[]", "[]",
                "succeeded" if ok else "failed", code,
                "Completed successfully" if ok else "Job exited with an error code",
                0 if ok else 1, 1, created, started, completed, completed,
            )
        )  # fmt: skip
        per_request.setdefault(r + 1, []).append(action)
        times = (created, created + 0.01, started, started + 0.5, completed - 0.5, completed)
        codes = (*FINISHED_PATH, code)
        event_rows += [(job_id, c, "", t) for c, t in zip(codes, times, strict=True)]
        finished_jobs.append(job_id)

    queued_ids: dict[int, list[str]] = {}
    for q in range(queued):
        r = old_requests + q // per
        w = (q // per) % workspaces
        request_ws[r] = w + 1
        request_rows[r] = (r + 1, w + 1, request_user[r], shas[w], request_at[r])
        action = action_names[(q // per // workspaces) * per + q % per]
        before = queued_ids.setdefault(r + 1, [])
        job_id = secrets.token_hex(8)
        waiting = "waiting_on_dependencies" if before else "waiting_on_workers"
        job_rows.append(
            (
                job_id, r + 1, w + 1, request_user[r], action, shas[w],
                f'python:v2 -c "echo {action}"', IMAGE, json.dumps(["-c", f"echo {action}"]),
                json.dumps({"moderately_sensitive": {"f": f"output/{action}.csv"}}),
                "[]", json.dumps(before[-1:]), "pending", waiting, "", None, 0,
                request_at[r] + q * 1e-6, None, None, request_at[r],
            )
        )  # fmt: skip
        event_rows.append((job_id, "created", "", request_at[r]))
        before.append(job_id)
        per_request.setdefault(r + 1, []).append(action)

    conn.executemany(
        "INSERT INTO job_requests (id, workspace_id, created_by, branch, sha, "
        "requested_actions, created_at) VALUES (?, ?, ?, 'main', ?, ?, ?)",
        [(*row[:4], json.dumps(per_request.get(row[0], [])), row[4]) for row in request_rows],
    )
    conn.executemany(
        "INSERT INTO jobs (id, job_request_id, workspace_id, user_id, action, sha, "
        "run_command, image, args, outputs, needs, wait_for, state, status_code, "
        "status_message, exit_code, attempts, created_at, started_at, completed_at, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        job_rows,
    )
    conn.executemany(
        "INSERT INTO job_events (job_id, status_code, status_message, at) VALUES (?, ?, ?, ?)",
        event_rows,
    )
    conn.executemany(
        "INSERT INTO user_usage (user_id, usage, updated_at) VALUES (?, ?, ?)",
        [(u + 1, rng.uniform(0, 36_000), now - 600) for u in range(users)],
    )
    conn.execute("INSERT INTO site_state (key, value) VALUES ('paused', '1')")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {
        table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("workspaces", "job_requests", "jobs", "job_events")
    }
    counts["queued"] = conn.execute("SELECT count(*) FROM jobs WHERE state = 'pending'").fetchone()[
        0
    ]
    conn.close()

    history = History(
        root=str(root),
        config=str(config),
        data_dir=str(data_dir),
        password=PASSWORD,
        admin="admin",
        admin_token=tokens["admin"],
        developer="developer",
        developer_token=tokens["developer"],
        workspaces=ws_names,
        actions=action_names,
        finished_requests=[
            [ws_names[request_ws[r] - 1], r + 1]
            for r in range(old_requests - 1, max(-1, old_requests - 41), -1)
        ],
        queued_requests=[
            [ws_names[request_ws[r] - 1], r + 1]
            for r in range(requests - 1, max(old_requests - 1, requests - 41), -1)
        ],
        finished_jobs=finished_jobs[-40:][::-1],
        counts=counts,
    )
    (root / "history.json").write_text(json.dumps(asdict(history), indent=1) + "\n")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--workspaces", type=int, default=20)
    parser.add_argument("--actions", type=int, default=100)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--finished", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=6)
    parser.add_argument("--queued", type=int, default=2_000)
    args = parser.parse_args()
    began = time.perf_counter()
    built = build(
        args.root,
        args.workspaces,
        args.actions,
        args.requests,
        args.finished,
        args.events,
        args.queued,
    )
    print(
        f"built {built.root} in {time.perf_counter() - began:.1f} s: "
        + ", ".join(f"{n} {table}" for table, n in built.counts.items()),
        file=sys.stderr,
    )

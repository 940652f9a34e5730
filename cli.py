"""The ``jobsite`` command (DESIGN section 9)."""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import logging
import secrets
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import auth, ops, pipeline
from .config import Settings, SettingsError, load_settings
from .db import Database, DatabaseVersionError
from .units import Duration, Size, human_size, parse_duration, parse_size

SHUTDOWN_GRACE = 3  # seconds
SWITCH_INTERVAL = 0.001  # seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobsite", description="Run research pipelines on this machine, or serve a site."
    )
    parser.add_argument(
        "--config", help="settings file (YAML); default: $JOBSITE_CONFIG, else built-in defaults"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="start the site")

    run = commands.add_parser(
        "run",
        help="run a local checkout's pipeline in Docker (like `opensafely run`)",
        description="Run actions of the project.yaml in --project-dir, each in Docker as the "
        "site would, writing their outputs into the checkout (output/...) and their logs "
        "into metadata/<action>.log. Needed actions without outputs from a successful run "
        "run first.",
    )
    run.add_argument("actions", nargs="*", metavar="ACTION", help="actions to run, or run_all")
    run.add_argument("--project-dir", default=".", type=Path, help="default: this folder")
    run.add_argument(
        "-f",
        "--force-run-dependencies",
        action="store_true",
        help="run the needed actions again even when their outputs exist",
    )
    run.add_argument(
        "--continue-on-error",
        action="store_true",
        help="when an action fails, still run the actions that do not need it",
    )
    run.add_argument(
        "-c",
        "--concurrency",
        type=_concurrency,
        default=2,
        metavar="N",
        help="how many actions may run at once (default 2); actions wait for the actions "
        "they need. Try -c 1 to run one at a time, e.g. to find which one runs out of memory",
    )
    run.add_argument("--timeout", type=_duration, help="time limit of each job, e.g. 30m, 2h")
    run.add_argument("-m", "--memory", type=_size, help="memory limit of each job, e.g. 4G")
    run.add_argument("--cpus", "--cpu", type=float, help="CPUs each job may use, e.g. 2")
    run.add_argument(
        "--timestamps", action="store_true", help="start each line printed with the time"
    )
    run.add_argument(
        "--debug",
        action="store_true",
        help="keep each job's container and temporary dir after the run, and print how to "
        "remove them",
    )
    run.add_argument(
        "--format-output-for-github",
        action="store_true",
        help="print each action's output, with its log, as a collapsible group in a GitHub "
        "Actions workflow's log",
    )

    check = commands.add_parser("check", help="check a project.yaml")
    check.add_argument("--project-dir", default=".", type=Path)

    user = commands.add_parser("user", help="manage users").add_subparsers(
        dest="user_command", required=True, metavar="SUBCOMMAND"
    )
    add = user.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="make the user a site admin")
    add.add_argument("--password", help="default: a random password, printed once")
    add.add_argument(
        "--github",
        action="store_true",
        help="the user signs in with GitHub: NAME is their GitHub login, and they have no password",
    )
    add.add_argument("--email")

    token = commands.add_parser("token", help="manage API tokens").add_subparsers(
        dest="token_command", required=True, metavar="SUBCOMMAND"
    )
    create = token.add_parser("create", help="print a new API token for a user")
    create.add_argument("name", help="the user's username")
    create.add_argument("--label", default="cli", help="a name for the token")
    create.add_argument(
        "--expires",
        metavar="DAYS",
        type=int,
        help="the token stops working after DAYS days (default: when revoked)",
    )

    backup_parser = commands.add_parser(
        "backup", help="copy the database, consistently, while the site runs"
    )
    backup_parser.add_argument(
        "path", type=Path, help="a new file, or a directory to put a dated copy in"
    )

    prune_parser = commands.add_parser(
        "prune",
        help="remove old job logs and leftover temporary job dirs (never workspace outputs)",
        description="Remove the logs (data/logs) of jobs that finished more than DAYS days "
        "ago, and temporary dirs (data/jobs) of jobs that are not pending or running. "
        "Workspace outputs and each action's latest log beside them are never touched.",
    )
    prune_parser.add_argument(
        "--older-than",
        type=float,
        required=True,
        metavar="DAYS",
        help="remove the logs of jobs that finished more than DAYS days ago",
    )
    prune_parser.add_argument(
        "--dry-run", action="store_true", help="say what would go; remove nothing"
    )

    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": serve,
        "run": run_project,
        "check": check_project,
        "user": user_add,
        "token": token_create,
        "backup": backup,
        "prune": prune,
    }
    try:
        return handlers[args.command](args)
    except (SettingsError, DatabaseVersionError) as e:
        print(f"jobsite: {e}", file=sys.stderr)
        return 2


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


async def _with_db(settings: Settings, work: Callable) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = await Database.open(settings.data.db, readers=1)
    try:
        return await work(db)
    finally:
        await db.close()


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server import create_app

    settings = _settings(args)
    asyncio.run(_check_executor(settings))
    configure_logging()
    asyncio.run(_with_db(settings, lambda db: _first_admin(db, settings)))
    # The event loop gives up the GIL at every socket call and must wait for it back while
    # the database and rendering threads run Python code: hand it over more often than the
    # default 5 ms, or a busy site answers everything (even its quick 503s) late; but not
    # much more often, or the switching itself fills the core (bench/bench_overload.py:
    # 1 ms served the cheap pages best of 0.1, 0.25, 0.5, 1, 2 and 5 ms).
    sys.setswitchinterval(SWITCH_INTERVAL)
    app = create_app(settings)
    # what is loaded by now (the modules, the templates) lives as long as the process: the
    # garbage collector's full passes need not walk it again and again (about 50 ms each,
    # every request in flight held up meanwhile, under bench_overload's flood)
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        proxy_headers=True,
        log_config=log_config(),
        # on SIGTERM or Ctrl-C, requests still running after this long are stopped, so the
        # site is down within seconds even under load (running jobs' containers stay up)
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )
    return 0


def log_config() -> dict:
    """uvicorn's own logging, its access log without the requests refused as busy: a flood
    would write a line for each (views/admission.py counts them in one line instead)."""
    import uvicorn.config

    from .views.admission import QuietRefusals

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config.setdefault("filters", {})["quiet_refusals"] = {"()": QuietRefusals}
    config["handlers"]["access"]["filters"] = ["quiet_refusals"]
    return config


async def _check_executor(settings: Settings) -> None:
    """Refuse settings the site's jobs cannot run safely with, before serving (the site's
    start checks again, however it is served)."""
    from .local_docker import LocalDockerExecutor

    await LocalDockerExecutor(settings).check_settings()


def configure_logging() -> None:
    """The site's own log lines (every job state change, sign-ins, emails) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    site = logging.getLogger("jobsite")
    site.setLevel(logging.INFO)
    site.addHandler(handler)
    site.propagate = False


async def _first_admin(db: Database, settings: Settings) -> int:
    """On first start, make an admin and say how to sign in."""
    if await db.fetchval("SELECT count(*) FROM users"):
        return 0
    password = secrets.token_urlsafe(12)
    await auth.create_user(db, "admin", password, is_admin=True)
    print(
        "\n"
        "  jobsite is starting for the first time; an admin account was made.\n"
        f"  Sign in at {settings.base_url}/login\n"
        "    username: admin\n"
        f"    password: {password}\n"
        "  This password is shown only now. Add more users with: jobsite user add NAME\n",
        flush=True,
    )
    return 0


def _duration(value: str) -> Duration:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _size(value: str) -> Size:
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _concurrency(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of jobs, 1 or more")
    return int(value)


def run_project(args: argparse.Namespace) -> int:
    from . import local_run
    from .local_docker import LocalDockerExecutor

    limits = {"job_timeout": args.timeout, "job_memory": args.memory, "job_cpus": args.cpus}
    return local_run.main(
        args.project_dir,
        args.actions,
        make_executor=LocalDockerExecutor,
        config=args.config,
        force_run_dependencies=args.force_run_dependencies,
        continue_on_error=args.continue_on_error,
        overrides={key: value for key, value in limits.items() if value is not None},
        options=local_run.Options(
            concurrency=args.concurrency,
            debug=args.debug,
            timestamps=args.timestamps,
            github=args.format_output_for_github,
        ),
    )


def check_project(args: argparse.Namespace) -> int:
    path = args.project_dir / "project.yaml"
    try:
        text = path.read_text()
    except OSError as e:
        print(f"Cannot read {path}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        project = pipeline.load_pipeline(text)
    except pipeline.ProjectValidationError as e:
        print(f"{path} is not valid:", file=sys.stderr)
        for error in e.errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    print("Valid project.yaml")
    for warning in project.warnings:
        print(f"Warning: {warning}")
    return 0


def user_add(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.github and args.password:
        print("jobsite: a user who signs in with GitHub has no password", file=sys.stderr)
        return 2
    password = None if args.github else args.password or secrets.token_urlsafe(12)

    async def add(db: Database) -> int:
        try:
            await auth.create_user(db, args.name, password, email=args.email, is_admin=args.admin)
        except sqlite3.IntegrityError:
            print(f"jobsite: a user named {args.name!r} already exists", file=sys.stderr)
            return 1
        role = "admin" if args.admin else "user"
        print(f"Added {role} {args.name}.")
        if args.github:
            print(f"They sign in with GitHub as {args.name}.")
        elif not args.password:
            print(f"Password (shown only now): {password}")
        return 0

    return asyncio.run(_with_db(settings, add))


def token_create(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def create(db: Database) -> int:
        user_id = await db.fetchval("SELECT id FROM users WHERE username = ?", (args.name,))
        if user_id is None:
            print(f"jobsite: there is no user {args.name!r}", file=sys.stderr)
            return 1
        if args.expires is not None and args.expires < 1:
            print("jobsite: --expires needs a number of days, at least 1", file=sys.stderr)
            return 2
        lifetime = None if args.expires is None else args.expires * 86400.0
        print(await auth.create_token(db, user_id, args.label, lifetime))
        return 0

    return asyncio.run(_with_db(settings, create))


def backup(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        source = ops.existing_database(settings)
        dest = ops.backup_path(args.path)
        asyncio.run(_with_existing_db(source, lambda db: ops.backup(db, dest)))
    except ops.OpsError as e:
        print(f"jobsite: {e}", file=sys.stderr)
        return 1
    print(f"Backed up {source} to {dest} ({human_size(dest.stat().st_size)}).")
    return 0


def prune(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.older_than < 0:
        print("jobsite: --older-than must be 0 or more days", file=sys.stderr)
        return 2
    try:
        source = ops.existing_database(settings)
    except ops.OpsError as e:
        print(f"jobsite: {e}", file=sys.stderr)
        return 1
    found = asyncio.run(
        _with_existing_db(
            source, lambda db: ops.prunable(db, settings.data, args.older_than * 86400)
        )
    )
    return ops.remove(found, dry_run=args.dry_run)


async def _with_existing_db(path: Path, work: Callable) -> Any:
    """``work(db)`` on the database at ``path``, which must exist (no new one is made)."""
    db = await Database.open(path, readers=1)
    try:
        return await work(db)
    finally:
        await db.close()


if __name__ == "__main__":
    sys.exit(main())

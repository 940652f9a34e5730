"""Settings: embedded defaults, a YAML file, then ``JOBSITE_<KEY>`` environment overrides.

Every key is declared once, with its type, in the dataclasses below. Loading checks each
value against its declared type so that a typo or a wrong type stops the site at start with
a message naming the key, rather than surfacing later as a confusing failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .datadir import DataDir
from .units import Duration, Size, parse_duration, parse_size

ENV_PREFIX = "JOBSITE_"

DEFAULT_IMAGE_TEMPLATE = "ghcr.io/opensafely-core/{name}:{tag}"
DEFAULT_IMAGES = {
    name: DEFAULT_IMAGE_TEMPLATE.replace("{name}", name)
    for name in (
        "cohortextractor",
        "databuilder",
        "ehrql",
        "jupyter",
        "python",
        "r",
        "sqlrunner",
        "stata-mp",
    )
}


class SettingsError(Exception):
    """A setting is unknown or has the wrong type; the message names the key."""


@dataclass
class Database:
    description: str
    url: str | None = None
    network: str | None = None


@dataclass
class GitHub:
    client_id: str | None = None
    client_secret: str | None = None
    base_url: str = "https://github.com"
    api_url: str = "https://api.github.com"
    # members of these GitHub organisations get an account on their first sign-in; anyone
    # else signs in with GitHub only once a site admin has added their login
    allowed_orgs: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.client_id and self.client_secret)


@dataclass
class SMTP:
    host: str | None = None
    port: int = 587
    starttls: bool = True
    tls: bool = False
    username: str | None = None
    password: str | None = None
    from_addr: str = "jobsite@localhost"
    timeout: Duration = Duration(30)

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass
class Repos:
    # fnmatch patterns of repository URLs (or local paths) a workspace may use
    allow: list[str] = field(default_factory=lambda: ["https://github.com/*"])
    fetch_timeout: Duration = Duration(120)
    # pages showing a repo fetch it at most this often; creating a workspace or submitting a
    # job request always fetches
    fetch_interval: Duration = Duration(10)


@dataclass
class Settings:
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = 8000
    base_url: str | None = None
    site_id: str | None = None
    backend: str = "jobsite"
    max_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_jobs_per_user: int | None = None
    max_db_workers: int | None = None
    job_timeout: Duration = Duration(24 * 3600)
    job_memory: Size = Size(4 * 1024**3)
    job_cpus: float = 2.0
    job_pids_limit: int = 1024
    job_user: str = "65534:65534"
    job_disk: Size = Size(32 * 1024**3)  # a job's files (the repo, inputs, what it writes)
    max_output_files: int = 10_000  # files a job's output patterns may match
    max_output_size: Size = Size(16 * 1024**3)  # the total size of a job's outputs
    log_limit: Size = Size(8 * 1024**2)
    min_free_disk: Size = Size(1024**3)
    allow_pull: bool = True
    images: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    databases: dict[str, Database] = field(
        default_factory=lambda: {
            "full": Database("The full database: every patient"),
            "sample": Database("A random sample of about 20% of patients, for faster runs"),
        }
    )
    repos: Repos = field(default_factory=Repos)
    github: GitHub = field(default_factory=GitHub)
    smtp: SMTP = field(default_factory=SMTP)
    local_accounts: bool = True
    public_status: bool = True
    session_max_age: Duration = Duration(14 * 86400)
    project_registration: str = "users"  # who may register projects: "users" or "admins"
    # a request body larger than this is refused (413) before it is read; one that takes
    # longer than request_body_timeout to arrive is refused too (408)
    max_request_size: Size = Size(1024**2)
    request_body_timeout: Duration = Duration(30)
    # requests handled at once; past it the site answers 503 at once (views/admission.py)
    # (most of a request's time in flight is spent waiting on the database or a thread, so
    # a few dozen per core; fewer turned ordinary bursts of polls into 503s in bench/load.py
    # --writes 150: 182 of 3,840 at 8 and 2 per page, none at 64 and 32)
    max_requests: int = field(default_factory=lambda: 32 * (os.cpu_count() or 1))
    max_requests_per_page: int | None = None  # of those, for one page; default: a half

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if self.site_id is None:
            self.site_id = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
        if self.base_url is None:
            self.base_url = f"http://{self.host}:{self.port}"
        self.base_url = self.base_url.rstrip("/")
        if self.max_workers < 1:
            raise SettingsError("max_workers: must be at least 1")
        if self.project_registration not in ("users", "admins"):
            raise SettingsError(
                f"project_registration: must be users or admins, not {self.project_registration!r}"
            )
        if self.max_requests < 1:
            raise SettingsError("max_requests: must be at least 1")
        if self.max_requests_per_page is None:
            self.max_requests_per_page = max(1, self.max_requests // 2)
        if self.max_requests_per_page < 1:
            raise SettingsError("max_requests_per_page: must be at least 1")

    @property
    def data(self) -> DataDir:
        """Every path under ``data_dir`` (datadir.py)."""
        return DataDir(self.data_dir)


def load_settings(
    path: str | os.PathLike | None = None,
    environ: typing.Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings from defaults, the YAML file at ``path`` (or ``$JOBSITE_CONFIG``),
    ``JOBSITE_*`` environment variables, then keyword ``overrides`` (used by tests)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("JOBSITE_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SettingsError(f"cannot read settings file {path}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SettingsError(f"settings file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"settings file {path} must be a mapping of keys to values")
        raw = loaded or {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name != "JOBSITE_CONFIG":
            keys = name[len(ENV_PREFIX) :].lower().split("__")
            target = raw
            for key in keys[:-1]:
                target = target.setdefault(key, {})
                if not isinstance(target, dict):
                    raise SettingsError(f"{name}: {key} is not a group of settings")
            target[keys[-1]] = yaml.safe_load(value) if value != "" else None
    raw.update(overrides)
    if isinstance(raw.get("images"), dict):
        # a site's image table extends the default one; an image set to null is removed
        images = {**DEFAULT_IMAGES, **raw["images"]}
        raw["images"] = {name: tmpl for name, tmpl in images.items() if tmpl is not None}
    return _build(Settings, raw, "")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise SettingsError(f"{where.rstrip('.') or 'settings'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise SettingsError(f"unknown setting {where}{key} (known settings: {known})")
        kwargs[key] = _coerce(hints[key], value, f"{where}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise SettingsError(f"{where.rstrip('.') or 'settings'}: {e}") from e


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    try:
        if hint is Duration:
            return parse_duration(value)
        if hint is Size:
            return parse_size(value)
    except ValueError as e:
        raise SettingsError(f"{key}: {e}") from e
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{key}: expected a mapping")
        _, value_type = args
        if value_type is Database:
            value = {
                name: {"description": item} if isinstance(item, str) else item
                for name, item in value.items()
            }
        return {str(k): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise SettingsError(f"{key}: expected a list")
        return [_coerce(args[0], v, key) for v in value]
    if hint is Path:
        if not isinstance(value, str | os.PathLike):
            raise SettingsError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise SettingsError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value

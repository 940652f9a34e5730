"""Settings: defaults, a YAML file, JOBSITE_* overrides, and clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobsite.config import SettingsError, load_settings, parse_duration, parse_size


def test_defaults_need_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.data_dir == tmp_path / "data"
    assert settings.port == 8000
    assert settings.local_accounts is True
    assert set(settings.databases) == {"full", "sample"}
    assert settings.images["python"] == "ghcr.io/opensafely-core/python:{tag}"
    assert settings.base_url == "http://127.0.0.1:8000"


def test_file_then_environment_overrides(tmp_path):
    path = tmp_path / "jobsite.yaml"
    path.write_text(
        "port: 9000\nmax_workers: 3\njob_timeout: 30m\njob_memory: 512M\n"
        "smtp:\n  host: mail.example.org\n"
        "images:\n  python: registry.example.org/python:{tag}\n  r: null\n"
    )
    settings = load_settings(
        environ={"JOBSITE_CONFIG": str(path), "JOBSITE_PORT": "9100", "JOBSITE_SMTP__PORT": "25"}
    )
    assert settings.port == 9100
    assert settings.max_workers == 3
    assert settings.job_timeout == 1800
    assert settings.job_memory == 512 * 1024**2
    assert settings.smtp.host == "mail.example.org"
    assert settings.smtp.port == 25
    assert settings.images["python"] == "registry.example.org/python:{tag}"
    assert "r" not in settings.images
    assert "ehrql" in settings.images


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"JOBSITE_PORTT": "1"}, "unknown setting portt"),
        ({"JOBSITE_SOMETHING": "1"}, "unknown setting something"),
        ({"JOBSITE_REQUIRE_DOCKER": "1"}, "unknown setting require_docker"),
        ({"JOBSITE_PORT": "eighty"}, "port: expected int"),
        ({"JOBSITE_JOB_TIMEOUT": "soon"}, "job_timeout: 'soon' is not a duration"),
        ({"JOBSITE_JOB_MEMORY": "lots"}, "job_memory: 'lots' is not a size"),
        ({"JOBSITE_SMTP__HOSTNAME": "x"}, "unknown setting smtp.hostname"),
        ({"JOBSITE_MAX_WORKERS": "0"}, "max_workers: must be at least 1"),
        ({"JOBSITE_LOCAL_ACCOUNTS": "3"}, "local_accounts: expected bool"),
    ],
)
def test_a_bad_setting_is_a_clear_error_naming_the_key(environ, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_a_broken_file_is_named(tmp_path):
    path = tmp_path / "jobsite.yaml"
    path.write_text("port: [\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(path, environ={})
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(tmp_path / "missing.yaml", environ={})


def test_databases_accept_a_description_or_a_mapping():
    settings = load_settings(
        environ={},
        databases={"full": "Everything", "sample": {"description": "Some", "url": "mssql://db"}},
    )
    assert settings.databases["full"].description == "Everything"
    assert settings.databases["sample"].url == "mssql://db"


def test_units():
    assert parse_duration("90s") == 90
    assert parse_duration("24h") == 86400
    assert parse_duration(5) == 5
    assert parse_size("4G") == 4 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size(100) == 100


def test_site_id_differs_per_data_dir(tmp_path):
    a = load_settings(environ={}, data_dir=str(tmp_path / "a"))
    b = load_settings(environ={}, data_dir=str(tmp_path / "b"))
    assert a.site_id != b.site_id
    assert Path(a.data_dir).is_absolute()


def test_sizes_read_as_people_write_them():
    from jobsite.units import human_size

    assert human_size(512) == "512 bytes"
    assert human_size(16 * 1024**2) == "16 MiB"
    assert human_size(1536 * 1024**2) == "1.5 GiB"
    assert human_size(7.3 * 1024) == "7.3 KiB"

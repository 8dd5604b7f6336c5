"""Environment variables as settings: PGVAULT_<KEY>, PGVAULT_<SECTION>__<KEY>, JSON for lists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_runner import one_line_error, pgvault
from pgvault import config
from pgvault.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("PGVAULT_"):
            monkeypatch.delenv(name)


def test_nested_variables_refine_the_file_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "pgvault.toml"
    cfg.write_text('[s3]\nendpoint_url = "http://file"\nregion = "file"\n'
                   '[retention]\nkeep_daily = 1\nkeep_monthly = 5\n')
    monkeypatch.setenv("PGVAULT_S3__REGION", "env")
    monkeypatch.setenv("pgvault_s3__Path_Style", "true")  # names are case-insensitive
    monkeypatch.setenv("PGVAULT_S3__OBJECT_LOCK__DAYS", "35")
    monkeypatch.setenv("PGVAULT_RETENTION__KEEP_DAILY", "9")
    settings = config.load({}, os.environ, str(cfg))
    assert settings.s3.endpoint_url == "http://file" and settings.s3.region == "env"
    assert settings.s3.path_style is True
    assert settings.s3.object_lock is not None and settings.s3.object_lock.days == 35
    assert settings.s3.object_lock.mode == "governance"
    assert settings.retention.keep_monthly == 5 and str(settings.retention.keep_daily) == "9"


def test_lists_and_sections_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGVAULT_NOTIFY__EVENTS", '["all"]')
    monkeypatch.setenv("PGVAULT_DATABASES", '[{"name": "a"}, {"name": "b"}]')
    monkeypatch.setenv("PGVAULT_COMPRESSION", '{"algorithm": "gzip", "level": 4}')
    monkeypatch.setenv("PGVAULT_COMPRESSION__LEVEL", "6")
    settings = config.load({}, os.environ)
    assert settings.notify.events == ["all"]
    assert [entry.name for entry in settings.databases] == ["a", "b"]
    assert settings.compression.algorithm == "gzip" and settings.compression.level == 6


def test_variables_that_name_no_setting_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGVAULT_CONFIG_DIR", "PGVAULT_LOG_FORMAT", "PGVAULT_S3_SSE_C_KEY",
                 "PGVAULT_AGE_PASSPHRASE"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("PGVAULT_DATABASE", "postgresql://h/fromenv")
    assert config.load({}, os.environ).database == "postgresql://h/fromenv"


@pytest.mark.parametrize("name, value, message", [
    ("PGVAULT_S3__ENDPOINT", "http://x", "unknown setting 's3.endpoint'"),
    ("PGVAULT_NOTIFY__EVENTS", "all", "PGVAULT_NOTIFY__EVENTS must be JSON"),
    ("PGVAULT_COMPRESSION__LEVEL", "high", "setting 'compression.level'"),
    ("PGVAULT_REPO", "ftp://x", "setting 'repo'"),
])
def test_bad_variables_are_one_line_config_errors(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        config.load({}, os.environ)
    proc = pgvault("list", env={name: value}, expect=3)
    assert message in one_line_error(proc)


def test_an_in_process_run_reads_its_env_and_leaves_nothing_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """main(argv, env) takes settings from ``env`` only (not this process's environment),
    and puts back the streams, the pgvault logger and the redactor's secrets after it."""
    import logging
    import sys

    from pgvault import redact
    from pgvault.cli import main

    repo = tmp_path / "repo"
    password = "in-process-secret-4711"
    streams = sys.stdout, sys.stderr
    handlers = list(logging.getLogger("pgvault").handlers)
    assert "PGVAULT_REPO" not in os.environ
    env = {"PGVAULT_REPO": repo.as_uri(), "PGPASSWORD": password, "HOME": str(tmp_path)}
    assert main(["list"], env) == 5  # the repository env names, not the default one
    assert f"repository {repo.as_uri()} does not exist" in capsys.readouterr().err
    assert (sys.stdout, sys.stderr) == streams
    assert logging.getLogger("pgvault").handlers == handlers
    assert not redact.contains_secret(password)
    assert main(["--log-format", "json", "list"], env) == 5
    assert '"exit_code": 5' in capsys.readouterr().err
    assert main(["list"], {**env, "PGVAULT_LOG_FORMAT": "json"}) == 5
    assert '"exit_code": 5' in capsys.readouterr().err
    assert main(["list"], env) == 5  # --log-format json did not stay
    assert capsys.readouterr().err.startswith("pgvault: repository")

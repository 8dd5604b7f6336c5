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
    settings = config.load(str(cfg))
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
    settings = config.load()
    assert settings.notify.events == ["all"]
    assert [entry.name for entry in settings.databases] == ["a", "b"]
    assert settings.compression.algorithm == "gzip" and settings.compression.level == 6


def test_variables_that_name_no_setting_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGVAULT_CONFIG_DIR", "PGVAULT_LOG_FORMAT", "PGVAULT_S3_SSE_C_KEY",
                 "PGVAULT_AGE_PASSPHRASE"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("PGVAULT_DATABASE", "postgresql://h/fromenv")
    assert config.load().database == "postgresql://h/fromenv"


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
        config.load()
    proc = pgvault("list", env={name: value}, expect=3)
    assert message in one_line_error(proc)

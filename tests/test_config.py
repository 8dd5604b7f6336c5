"""Configuration: precedence flag > env > file > default, unknown keys named, secrets from files."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from cli_runner import one_line_error, pgvault
from pgvault import config, redact
from pgvault.errors import ConfigError
from pgvault.pg.conninfo import ConnInfo


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGVAULT_REPO", "PGVAULT_CONFIG", "PGVAULT_DATABASE", "DATABASE_URL",
                 "DIRECT_URL", "PGPASSWORD", "PGPASSWORD_FILE", "PGVAULT_COMPRESSION__LEVEL"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pgvault.toml"
    path.write_text(text)
    return str(path)


def test_precedence_flag_over_env_over_file_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config.load({}, os.environ).repo.startswith("file://")
    cfg = write(tmp_path, 'repo = "file:///from/file"\n[compression]\nlevel = 5\n')
    assert config.load({}, os.environ, cfg).repo == "file:///from/file"
    monkeypatch.setenv("PGVAULT_REPO", "file:///from/env")
    monkeypatch.setenv("PGVAULT_COMPRESSION__LEVEL", "7")
    settings = config.load({}, os.environ, cfg)
    assert settings.repo == "file:///from/env"
    assert settings.compression.level == 7
    assert config.load({"repo": "file:///from/flag"}, os.environ, cfg).repo == "file:///from/flag"
    monkeypatch.setenv("PGVAULT_CONFIG", cfg)
    monkeypatch.delenv("PGVAULT_REPO")
    assert config.load({}, os.environ).repo == "file:///from/file"


@pytest.mark.parametrize(
    "text, key",
    [
        ('repoo = "file:///x"\n', "repoo"),
        ('[s3]\nendpoint = "http://x"\n', "s3.endpoint"),
        ('[compression]\nalgorithm = "lz4"\n', "compression.algorithm"),
        ('[retention]\nkeep_dialy = 3\n', "retention.keep_dialy"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load({}, os.environ, write(tmp_path, text))


def test_cli_reports_bad_config_in_one_line_with_exit_3(tmp_path: Path) -> None:
    proc = pgvault("list", "--config", write(tmp_path, "colour = 'blue'\n"), expect=3)
    assert "unknown setting 'colour'" in one_line_error(proc)
    proc = pgvault("list", "--config", write(tmp_path, "not toml ["), expect=3)
    assert "cannot read config file" in one_line_error(proc)


def test_database_url_precedence(tmp_path: Path) -> None:
    file = write(tmp_path, 'database = "postgresql://h/fromfile"\n')
    environ: dict[str, str] = {}
    assert config.connection(config.load({}, environ, file)).dbname == "fromfile"
    environ["DATABASE_URL"] = "postgresql://h/fromdatabaseurl"
    assert config.connection(config.load({}, environ, file)).dbname == "fromdatabaseurl"
    environ["DIRECT_URL"] = "postgresql://h/fromdirect"
    settings = config.load({}, environ, file)
    assert config.connection(settings).dbname == "fromdirect"
    assert config.connection(settings, "fromflag").dbname == "fromflag"
    environ["PGVAULT_DATABASE"] = "postgresql://h/frompgvault"
    assert config.connection(config.load({}, environ, file)).dbname == "frompgvault"


def test_settings_are_read_once_from_the_environ_given(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """load(flags, environ, files) reads only ``environ``, once: a later change of the
    process's environment (or of the mapping) changes nothing, and load() writes nothing."""
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    environ = {"PGVAULT_REPO": "file:///from/environ", "PGPASSWORD_FILE": str(pw),
               "PGVAULT_AGE_PASSPHRASE": "correct horse", "DATABASE_URL": "postgresql://h/db",
               "HOME": str(tmp_path)}
    monkeypatch.setenv("PGVAULT_REPO", "file:///from/process")
    monkeypatch.setenv("PGPASSWORD", "from-process")
    before = dict(os.environ)
    settings = config.load({}, environ)
    assert dict(os.environ) == before
    environ["PGVAULT_REPO"] = "file:///changed"
    pw.write_text("changed\n")
    assert settings.repo == "file:///from/environ"
    assert settings.secrets.age_passphrase == "correct horse"
    assert config.connection(settings).password == "from-file"
    assert settings.environ["PGVAULT_REPO"] == "file:///from/environ"
    with pytest.raises(TypeError):
        settings.environ["X"] = "y"  # type: ignore[index]
    assert config.load({"repo": "file:///flag"}, environ).repo == "file:///flag"
    # Neither printed nor encoded: the environment holds secrets.
    assert "correct horse" not in repr(settings) + msgspec.json.encode(settings).decode()
    assert "environ" not in msgspec.structs.asdict(settings)
    # The default repository follows the HOME given, not this process's.
    del environ["PGVAULT_REPO"]
    assert config.load({}, environ).repo == (tmp_path / ".local/share/pgvault/repo").as_uri()


def test_an_unreadable_secret_file_fails_only_where_it_is_used(tmp_path: Path) -> None:
    environ = {"DATABASE_URL_FILE": str(tmp_path / "missing"), "PGVAULT_REPO": "file:///r"}
    settings = config.load({}, environ)  # list, prune, ... never need the URL
    with pytest.raises(ConfigError, match="cannot read DATABASE_URL_FILE"):
        config.connection(settings)
    assert config.connection(settings, "app").dbname == "app"


def test_secrets_from_file_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text("postgresql://app:s3cr%3At@db.example:6543/app\n")
    monkeypatch.setenv("DATABASE_URL_FILE", str(secret))
    conn = config.connection(config.load({}, os.environ))
    assert conn.password == "s3cr:t"
    assert "s3cr" not in conn.dsn() and "s3cr" not in conn.redacted()
    pw = tmp_path / "pw"
    pw.write_text("other\n")
    monkeypatch.setenv("PGPASSWORD_FILE", str(pw))
    monkeypatch.delenv("DATABASE_URL_FILE")
    assert config.connection(config.load({}, os.environ), "app").password == "other"


def test_prisma_parameters_are_stripped() -> None:
    conn = ConnInfo.parse("postgresql://u:pw@h:5432/db?schema=tenant&pgbouncer=true"
                          "&connection_limit=5&pool_timeout=3&sslmode=require")
    assert conn.schema == "tenant"
    assert conn.params["sslmode"] == "require"
    assert not {"schema", "pgbouncer", "connection_limit", "pool_timeout"} & set(conn.params)
    assert conn.password == "pw" and "pw" not in conn.dsn()


LIBPQ_CASES = [
    "postgresql://u@127.0.0.1:1/db",
    "postgres://h",
    "postgresql://h/",
    "postgresql://u:@h/db",
    "postgresql://u:p%40ss%3Aw@h:6432/d%20b?sslmode=require&application_name=a%2Bb+c",
    "postgresql:///db?host=%2Ftmp&port=5433",
    "postgresql://%2Fvar%2Frun%2Fpostgresql/db",
    "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write",  # libpq's path
    "postgresql://[::1]:5432/db",  # libpq's path
    "postgresql://h/db?ssl=true",  # libpq's path: it maps ssl=true to sslmode=require
    "",
    "plain_name",
    "host=h port=5 dbname='a b' user=o\\'k",  # libpq's path
]


@pytest.mark.parametrize("spec", LIBPQ_CASES)
def test_connection_strings_read_as_libpq_reads_them(spec: str) -> None:
    """URLs are read without psycopg when they are simple: the result must be libpq's."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    conn = ConnInfo.parse(spec, password="fallback")
    text = spec if "://" in spec or "=" in spec or not spec else f"dbname={spec}"
    expected = {k: str(v) for k, v in conninfo_to_dict(text).items() if v is not None}
    assert conn.password == expected.pop("password", None) or "fallback"
    if "ssl=true" not in spec:  # psycopg's parse keeps 'ssl'; pgvault keeps known keys
        assert dict(conn.params) == expected
    assert conninfo_to_dict(conn.dsn()) == conninfo_to_dict(make_conninfo("", **conn.params))
    assert conn.dsn() == make_conninfo("", **conn.params)


def test_password_reaches_children_through_a_private_passfile() -> None:
    conn = ConnInfo.parse("postgresql://u@h/db", password="hunter2")
    with conn.child_env() as env:
        passfile = Path(env["PGPASSFILE"])
        assert (passfile.stat().st_mode & 0o777) == 0o600
        assert "hunter2" in passfile.read_text()
        assert "PGPASSWORD" not in env
    assert not passfile.exists()  # an in-memory file, gone once closed


def test_a_connection_url_in_the_file_masks_its_password_not_its_database_name(
        tmp_path: Path) -> None:
    file = tmp_path / "pgvault.toml"
    file.write_text(
        '[notify]\nwebhook_url = "https://hooks.example/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX"\n'
        '[[databases]]\nname = "app"\n'
        'url = "postgresql://app:hunter2-hunter2@db.internal/target_61a19702a9abcdef"\n')
    file.chmod(0o600)
    settings = config.load({}, {"PGVAULT_REPO": "file:///r"}, file)
    with redact.scope():
        config.register_secrets(settings)
        shown = redact.scrub("backup of target_61a19702a9abcdef as app:hunter2-hunter2 via "
                             "https://hooks.example/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX")
    assert "target_61a19702a9abcdef" in shown, shown
    assert "hunter2" not in shown and "XXXXXXXXXXXXXXXX" not in shown, shown

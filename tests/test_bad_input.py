"""Bad input gets one clear error, and nothing is written anywhere before it is refused.

Every run goes through the real `pgvault` console script in a child process whose current
directory is an empty folder of the test's own: a typo used to become a backup in there.
The servers are real (a throwaway cluster, moto's S3 over HTTP, moto with IAM enforced for
a repository that is really read-only).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from cli_runner import PGVAULT, clean_env, one_line_error
from dbcompare import assert_databases_equal
from fixtures_iam import IamS3
from fixtures_pg import MakeDb, NewName
from pgvault import errors
from pgvault.pg.cluster import EphemeralCluster

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

SECRET = "hunter2-Zq9"  # a password that must never be printed


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    folder = tmp_path / "cwd"
    folder.mkdir()
    return folder


def run(*args: str, cwd: Path, env: dict[str, str] | None = None,
        expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    """pgvault ``args`` in ``cwd``, with nothing configured but ``env``."""
    full = clean_env()
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGSERVICE", "PGPASSFILE"):
        full.pop(name, None)
    full.update(env or {})
    proc = subprocess.run([PGVAULT, *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=300, check=False)
    if expect is not None:
        assert proc.returncode == expect, (
            f"pgvault {' '.join(args)} exited {proc.returncode}, expected {expect}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    assert SECRET not in proc.stdout + proc.stderr
    return proc


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() \
        else ["<absent>"]


def small_db(make_db: MakeDb) -> str:
    url = make_db()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE item (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO item (name) SELECT 'n' || g FROM generate_series(1, 500) g")
    return url


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"PGVAULT_S3__ENDPOINT_URL": endpoint, "PGVAULT_S3__PATH_STYLE": "true", **extra}


def bucket_keys(client: S3Client, bucket: str) -> list[str]:
    return sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket) for o in page.get("Contents", []))


def restore_and_compare(source: str, repo: str, cluster: EphemeralCluster, target: str,
                        cwd: Path, env: dict[str, str] | None = None) -> None:
    run("restore", "latest", "--dbname", source, "--to", target, "--repo", repo, cwd=cwd,
        env=env)
    assert_databases_equal(source, cluster.url(target))


# -- 1. repositories --------------------------------------------------------------------

BAD_REPOS = [
    ("", "is empty"),
    ("   ", "is empty"),
    ("s3:/bucket", "did you mean s3://bucket?"),
    ("s3:bucket/app", "did you mean s3://bucket/app?"),
    ("file:relative/path", "a relative path is not allowed"),
    ("file:/srv/backups", "did you mean file:///srv/backups?"),
    ("relative/path", "is a relative path"),
    ("./repo", "is a relative path"),
    ("repo", "is a relative path"),
    ("S3://bucket/app", "write s3://bucket/app"),
    ("file://backuphost/srv/backups", "names a host ('backuphost')"),
    ("file://~/backups", "'~' is not expanded"),
    ("file://", "has no absolute path"),
    ("s3://", "names no bucket"),
    ("s3:///app", "names no bucket"),
    ("s3://Bad_Bucket/app", "invalid bucket name 'Bad_Bucket'"),
    ("s3://ab/app", "3 to 63 characters"),
    ("s3://" + "b" * 64, "3 to 63 characters"),
    ("s3://-bucket", "begin and end with a letter or digit"),
    ("s3://my..bucket", "no two dots"),
    ("s3://192.168.10.20/app", "IP address"),
    ("s3://xn--bucket/app", "reserves the prefix 'xn--'"),
    ("s3://bucket:9000/app", "names a port"),
    ("s3://bucket/app//daily", "empty, '.' or '..' segment"),
    ("s3://bucket/app/../other", "empty, '.' or '..' segment"),
    ("s3://bucket/app?region=eu-west-1", "has a query string"),
    ("s3://bucket/app?", "has a query string"),
    ("s3://bucket/app#x", "has a fragment"),
    ("file:///srv/backups?x=1", "has a query string"),
    (f"s3://AKIAEXAMPLE:{SECRET}@bucket/app", "holds credentials"),
    ("ftp://host/backups", "unsupported scheme 'ftp'"),
    ("gs://bucket/app", "unsupported scheme 'gs'"),
]


@pytest.mark.parametrize(("repo", "problem"), BAD_REPOS, ids=[r or "empty" for r, _ in BAD_REPOS])
def test_repository_typos_are_refused_before_anything_is_written(
    make_db: MakeDb, cwd: Path, repo: str, problem: str
) -> None:
    """The database is real and reachable: before, most of these backed up into cwd, exit 0."""
    url = small_db(make_db)
    proc = run("backup", "--dbname", url, "--repo", repo, cwd=cwd, expect=3)
    line = one_line_error(proc)
    assert "setting 'repo': repository" in line and problem in line, line
    assert tree(cwd) == []


def test_a_bad_repository_from_the_environment_or_the_file_is_named_too(
    make_db: MakeDb, cwd: Path, tmp_path: Path
) -> None:
    url = small_db(make_db)
    proc = run("backup", "--dbname", url, cwd=cwd, env={"PGVAULT_REPO": "s3:/bucket"}, expect=3)
    assert "PGVAULT_REPO" in one_line_error(proc)
    config = tmp_path / "pgvault.toml"
    config.write_text('repo = "backups"\n')
    proc = run("list", "--config", str(config), cwd=cwd, expect=3)
    assert "is a relative path" in one_line_error(proc)
    # An empty variable (a CI variable that is not set) is no repository either.
    run("list", cwd=cwd, env={"PGVAULT_REPO": ""}, expect=3)
    assert tree(cwd) == []


def test_a_query_string_on_an_s3_repository_is_refused_not_dropped(
    make_db: MakeDb, cwd: Path, s3_server: str, s3_bucket: str, s3_client: S3Client
) -> None:
    """Before, ?region=... was dropped and the backup went into the bucket, exit 0."""
    url = small_db(make_db)
    proc = run("backup", "--dbname", url, "--repo", f"s3://{s3_bucket}/app?region=eu-west-1",
               cwd=cwd, env=s3_env(s3_server), expect=3)
    assert "has a query string" in one_line_error(proc)
    assert bucket_keys(s3_client, s3_bucket) == []
    assert tree(cwd) == []


def test_every_documented_repository_form_still_backs_up_and_restores(
    make_db: MakeDb, pg_cluster: EphemeralCluster, new_name: NewName, cwd: Path,
    tmp_path: Path, s3_server: str, s3_bucket: str, s3_client: S3Client
) -> None:
    """file:///absolute, a bare absolute path (the tests' and wal-push's habit), s3://bucket
    and s3://bucket/prefix; each backup is restored and compared with its source."""
    url = small_db(make_db)
    env = s3_env(s3_server)
    forms = [(tmp_path / "a").as_uri(), str(tmp_path / "b"), f"s3://{s3_bucket}",
             f"s3://{s3_bucket}/team/app"]
    for repo in forms:
        run("backup", "--dbname", url, "--repo", repo, cwd=cwd, env=env)
        restore_and_compare(url, repo, pg_cluster, new_name(), cwd, env)
    assert any(k.startswith("team/app/manifests/") for k in bucket_keys(s3_client, s3_bucket))
    assert any(k.startswith("manifests/") for k in bucket_keys(s3_client, s3_bucket))
    assert (tmp_path / "a" / "manifests").is_dir() and (tmp_path / "b" / "manifests").is_dir()
    assert tree(cwd) == []


# -- 2. databases -----------------------------------------------------------------------


def test_no_database_configured_is_an_error_not_the_os_users_database(
    pg_cluster: EphemeralCluster, cwd: Path, tmp_path: Path
) -> None:
    """libpq can reach a server (PGHOST/PGPORT/PGUSER), but nothing names a database: before,
    the backup took the user's default database (here 'postgres') and exited 0."""
    repo = tmp_path / "repo"
    reach = {"PGHOST": pg_cluster.host, "PGPORT": str(pg_cluster.port),
             "PGUSER": pg_cluster.superuser}
    proc = run("backup", "--repo", repo.as_uri(), cwd=cwd, env=reach, expect=3)
    line = one_line_error(proc)
    assert "no database given" in line
    for source in ("--dbname", "PGVAULT_DATABASE", "DATABASE_URL", "config file's database",
                   "[[databases]]", "PGDATABASE"):
        assert source in line
    assert tree(repo) == ["<absent>"] and tree(cwd) == []


def test_pgdatabase_still_names_the_database(
    make_db: MakeDb, pg_cluster: EphemeralCluster, new_name: NewName, cwd: Path, tmp_path: Path
) -> None:
    """libpq's own PGDATABASE is a documented source and keeps working."""
    url = small_db(make_db)
    repo = (tmp_path / "repo").as_uri()
    name = url.rsplit("/", 1)[1]
    env = {"PGHOST": pg_cluster.host, "PGPORT": str(pg_cluster.port),
           "PGUSER": pg_cluster.superuser, "PGDATABASE": name}
    run("backup", "--repo", repo, cwd=cwd, env=env)
    restore_and_compare(url, repo, pg_cluster, new_name(), cwd)


MALFORMED = [
    ("postgres//{host}:{port}/app", "lacks the '://'"),
    ("postgresql:/{host}:{port}/app", "lacks the '://'"),
    ("postgresql:{host}/app", "lacks the '://'"),
    ("Postgresql://{host}:{port}/app", "lower case"),
    ("mysql://app:" + SECRET + "@{host}:{port}/app", "'mysql' is not a PostgreSQL URL scheme"),
    ("jdbc:postgresql://{host}:{port}/app", "is not a PostgreSQL URL scheme"),
    ("app:" + SECRET + "@{host}:{port}/app", "lacks its scheme"),
    ("{user}@{host}:{port}/app", "lacks its scheme"),
    ("postgresql://app:" + SECRET + "@{host}:port/app", "port 'port' is not a number"),
    ("postgresql://app:hun%zz" + SECRET + "@{host}:{port}/app", "invalid percent-encoded"),
    ("postgresql://app:" + SECRET + "@[::1:{port}/app", "malformed connection URL"),
]


@pytest.mark.parametrize(("spec", "problem"), MALFORMED, ids=[s for s, _ in MALFORMED])
@pytest.mark.parametrize("source", ["--dbname", "DATABASE_URL"])
def test_malformed_database_urls_are_named_without_password_and_leave_nothing(
    pg_cluster: EphemeralCluster, cwd: Path, tmp_path: Path, spec: str, problem: str,
    source: str
) -> None:
    """Before, each was a database name: the backup failed to connect (exit 4) and left
    status/<mangled name> in the repository, or the password was printed."""
    text = spec.format(host=pg_cluster.host, port=pg_cluster.port, user=pg_cluster.superuser)
    repo = tmp_path / "repo"
    if source == "--dbname":  # a flag's value: a usage error
        proc = run("backup", "--dbname", text, "--repo", repo.as_uri(), cwd=cwd, expect=2)
    else:
        proc = run("backup", "--repo", repo.as_uri(), cwd=cwd, env={source: text}, expect=3)
    line = one_line_error(proc)
    assert line.startswith(f"pgvault: {source}: malformed connection URL"), line
    assert problem in line
    assert tree(repo) == ["<absent>"] and tree(cwd) == []


# -- 3. passwords in argv ---------------------------------------------------------------


def test_a_password_on_the_command_line_is_refused_everywhere(
    make_db: MakeDb, pg_cluster: EphemeralCluster, cwd: Path, tmp_path: Path
) -> None:
    """The cluster trusts every connection, so before, each of these ran (backup exit 0)."""
    url = small_db(make_db)
    repo = (tmp_path / "repo").as_uri()
    with_password = url.replace("://", f"://{pg_cluster.superuser}:{SECRET}@", 1) \
        if "@" not in url else url.replace("@", f":{SECRET}@", 1)
    key_value = f"host={pg_cluster.host} port={pg_cluster.port} dbname=x password={SECRET}"
    cases = [
        ("--dbname", ["backup", "--dbname", with_password]),
        ("--dbname", ["backup", "--dbname", key_value]),
        ("--dbname", ["backup", "--dbname", f"{url}?sslpassword={SECRET}"]),
        ("--dbname", ["list", "--dbname", with_password]),
        ("--dbname", ["restore", "latest", "--dbname", with_password, "--to", "x_copy"]),
        ("--to", ["restore", "latest", "--dbname", url, "--to",
                  with_password.rsplit("/", 1)[0] + "/x_copy"]),
        ("--server", ["verify", "latest", "--server", with_password]),
    ]
    for flag, args in cases:
        proc = run(*args, "--repo", repo, cwd=cwd, expect=2)
        line = one_line_error(proc)
        assert line.startswith(f"pgvault: {flag} holds a password"), line
        for where in ("PGPASSWORD", "PGPASSWORD_FILE", "~/.pgpass", "PGPASSFILE",
                      "DATABASE_URL", "config file's database"):
            assert where in line
    assert tree(tmp_path / "repo") == ["<absent>"] and tree(cwd) == []


def test_a_password_in_a_url_from_the_environment_or_the_config_file_is_allowed(
    make_db: MakeDb, pg_cluster: EphemeralCluster, new_name: NewName, cwd: Path, tmp_path: Path
) -> None:
    url = small_db(make_db)
    with_password = url.replace("@", f":{SECRET}@", 1)
    repo = (tmp_path / "repo").as_uri()
    run("backup", "--repo", repo, cwd=cwd, env={"DATABASE_URL": with_password})
    config = tmp_path / "pgvault.toml"
    config.write_text(f'repo = "{repo}"\ndatabase = "{with_password}"\n')
    config.chmod(0o600)
    run("backup", "--config", str(config), cwd=cwd)
    restore_and_compare(url, repo, pg_cluster, new_name(), cwd)
    assert len(json.loads(run("list", "--repo", repo, "--json", cwd=cwd).stdout)) == 2


CONNECTION_COMMANDS = ["backup", "list", "show", "restore", "verify", "status", "check", "prune",
                       "pin", "basebackup", "check-archive"]


@pytest.mark.parametrize("command", CONNECTION_COMMANDS)
def test_help_has_the_passwords_section_the_dbname_option_promises(
    command: str, cwd: Path
) -> None:
    out = run(command, "--help", cwd=cwd).stdout
    if "see below" not in out:
        pytest.skip(f"{command} takes no --dbname")
    assert "Passwords: never on the command line" in out
    assert "PGPASSWORD_FILE" in out and "PGPASSFILE" in out


def test_the_exit_code_table_lists_every_error_class(cwd: Path) -> None:
    out = run("--help", cwd=cwd).stdout
    table = out[out.index("Exit codes:"):]
    codes = {value.exit_code for value in vars(errors).values()
             if isinstance(value, type) and issubclass(value, errors.PgvaultError)}
    for code in codes | {0}:
        assert f"\n    {code:<4} " in table, code
    assert errors.RecordFailed.exit_code == 13 and "13   The verdict stands" in table


# -- 4. restore into a system database --------------------------------------------------


def test_restore_refuses_system_databases_before_connecting(
    make_db: MakeDb, pg_cluster: EphemeralCluster, cwd: Path, tmp_path: Path
) -> None:
    """Before: exit 4 ('connection error') after a scratch database was made and dropped."""
    url = small_db(make_db)
    repo = (tmp_path / "repo").as_uri()
    run("backup", "--dbname", url, "--repo", repo, cwd=cwd)
    before = tree(tmp_path / "repo")
    server = url.rsplit("/", 1)[0]
    for target in ("postgres", "template0", "template1", f"{server}/template1",
                   f"host={pg_cluster.host} port={pg_cluster.port} dbname=postgres"):
        for extra in ([], ["--clean"]):
            proc = run("restore", "latest", "--dbname", url, "--to", target, "--repo", repo,
                       *extra, cwd=cwd, expect=2)
            line = one_line_error(proc)
            assert "is a system database" in line and "restore into a new name" in line, line
    with psycopg.connect(pg_cluster.url()) as conn:
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'item'").fetchone() \
            == (0,)
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'pgvault_%'"
                            ).fetchone() == (0,)
    assert tree(tmp_path / "repo") == before and tree(cwd) == []


def test_restore_into_a_new_name_still_works(
    make_db: MakeDb, pg_cluster: EphemeralCluster, new_name: NewName, cwd: Path, tmp_path: Path
) -> None:
    url = small_db(make_db)
    repo = (tmp_path / "repo").as_uri()
    run("backup", "--dbname", url, "--repo", repo, cwd=cwd)
    restore_and_compare(url, repo, pg_cluster, "postgres_copy_" + new_name(), cwd)


# -- 5. verify on a read-only repository ------------------------------------------------


def _read_only(bucket: str) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": f"arn:aws:s3:::{bucket}/*"},
    ]}


def test_verify_readonly_repository_prints_the_verdict_then_the_record_failure(
    make_db: MakeDb, pg_cluster: EphemeralCluster, new_name: NewName, cwd: Path,
    iam_s3: IamS3
) -> None:
    """Before: every PASS line, then exit 5 from the failed record and no verdict line."""
    url = small_db(make_db)
    bucket = iam_s3.bucket()
    repo = f"s3://{bucket}/app"
    admin = {**s3_env(iam_s3.endpoint), **iam_s3.admin_keys}
    reader = {**s3_env(iam_s3.endpoint), **iam_s3.user(_read_only(bucket))}
    run("backup", "--dbname", url, "--repo", repo, cwd=cwd, env=admin)
    listed = json.loads(run("list", "--json", "--repo", repo, cwd=cwd, env=admin).stdout)
    backup_id = listed[0]["id"]
    before = bucket_keys(iam_s3.admin, bucket)

    proc = run("verify", "latest", "--level", "integrity", "--repo", repo, cwd=cwd, env=reader,
               expect=errors.RecordFailed.exit_code)
    assert "  PASS  integrity" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith(
        f"PASSED integrity drill of {backup_id}")
    line = one_line_error(proc)
    assert f"the PASSED drill of {backup_id} was not recorded in {repo}" in line, line
    assert bucket_keys(iam_s3.admin, bucket) == before  # really read-only

    # The same repository, writable: the drill is recorded and the run exits 0.
    run("verify", "latest", "--level", "integrity", "--repo", repo, cwd=cwd, env=admin)
    assert any(k.startswith("app/drills/") for k in bucket_keys(iam_s3.admin, bucket))

    # A damaged backup on a read-only repository: the drill's own failure decides the code,
    # after the verdict, with the record failure said first on its own line.
    dump = next(k for k in before if k.endswith("/db.dump.zst"))
    body = bytearray(iam_s3.admin.get_object(Bucket=bucket, Key=dump)["Body"].read())
    body[len(body) // 2] ^= 0x01
    iam_s3.admin.put_object(Bucket=bucket, Key=dump, Body=bytes(body))
    proc = run("verify", "latest", "--level", "integrity", "--repo", repo, cwd=cwd, env=reader,
               expect=errors.IntegrityError.exit_code)
    assert f"FAILED integrity drill of {backup_id}" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and "was not recorded" in lines[0] and "is damaged" in lines[1], lines
    assert tree(cwd) == []

    # The intact backup restores (as the admin, on a fresh copy of the bucket's state).
    body[len(body) // 2] ^= 0x01
    iam_s3.admin.put_object(Bucket=bucket, Key=dump, Body=bytes(body))
    restore_and_compare(url, repo, pg_cluster, new_name(), cwd, admin)


def test_verify_record_still_written_on_a_writable_local_repository(
    make_db: MakeDb, cwd: Path, tmp_path: Path
) -> None:
    url = small_db(make_db)
    repo = tmp_path / "repo"
    run("backup", "--dbname", url, "--repo", repo.as_uri(), cwd=cwd)
    run("verify", "latest", "--level", "integrity", "--repo", repo.as_uri(), cwd=cwd)
    assert list((repo / "drills").rglob("*.json"))
    listed = json.loads(run("list", "--json", "--repo", repo.as_uri(), cwd=cwd).stdout)
    assert listed[0]["last_drill"]["passed"] is True
    assert os.listdir(cwd) == []

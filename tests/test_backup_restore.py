"""The spine end to end: real clusters, the real CLI, every backup restored and compared."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import psycopg
import pytest
from psycopg import sql

from cli_runner import PGVAULT, one_line_error, pgvault, stalled_backup
from dbcompare import assert_databases_equal
from fixtures_pg import NewName
from pgvault.pg.cluster import EphemeralCluster
from sampledb import fill_sized_database


@pytest.fixture
def repo(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'repo'}"


def databases(cluster: EphemeralCluster) -> set[str]:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def manifests(root: Path) -> list[Path]:
    return sorted(root.glob("manifests/**/*.json"))


def test_rich_database_round_trip_local(
    rich_db: str, repo: str, new_name: NewName, pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    pgvault("backup", "--dbname", rich_db, "--repo", repo)
    listed = json.loads(pgvault("list", "--json", "--repo", repo).stdout)
    assert len(listed) == 1
    assert {"id", "database", "started_at", "finished_at", "size"} <= set(listed[0])
    shown = json.loads(pgvault("show", "latest", "--json", "--repo", repo).stdout)
    assert shown["id"] == listed[0]["id"]
    assert {a["name"] for a in shown["artifacts"]} == {"db.dump", "globals.sql"}
    assert shown["artifacts"][0]["stages"][0]["name"] == "zstd"
    assert any(t["rows"] > 0 for t in shown["facts"]["tables"])

    target = new_name()
    out = pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo",
                  repo)
    assert "verified" in out.stdout
    assert_databases_equal(rich_db, pg_cluster.url(target))
    # Backups become visible only through the manifest, and files are private.
    root = tmp_path / "repo"
    for path in root.rglob("*"):
        assert (path.stat().st_mode & 0o777) == (0o700 if path.is_dir() else 0o600), path


def test_rich_database_round_trip_s3(
    rich_db: str, new_name: NewName, pg_cluster: EphemeralCluster, s3_server: str,
    s3_bucket: str
) -> None:
    env = {"PGVAULT_S3__ENDPOINT_URL": s3_server, "PGVAULT_S3__PATH_STYLE": "true",
           "PGVAULT_REPO": f"s3://{s3_bucket}/team/app"}
    pgvault("backup", "--dbname", rich_db, env=env)
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "-j", "2",
            env=env)
    assert_databases_equal(rich_db, pg_cluster.url(target))
    client = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(k.startswith("team/app/manifests/") for k in keys)
    for key in keys:
        head = client.head_object(Bucket=s3_bucket, Key=key)
        assert head["ServerSideEncryption"] == "AES256", key


@pytest.mark.parametrize("extra", [["--compression", "gzip"], ["--compression", "none"],
                                   ["--level", "3"]])
def test_other_compressions_round_trip(
    extra: list[str], rich_db: str, repo: str, new_name: NewName, pg_cluster: EphemeralCluster,
    tmp_path: Path
) -> None:
    pgvault("backup", "--dbname", rich_db, "--repo", repo, *extra)
    suffix = {"gzip": ".gz", "none": "", "3": ".zst"}[extra[1]]
    assert list((tmp_path / "repo").rglob(f"db.dump{suffix}"))
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo)
    assert_databases_equal(rich_db, pg_cluster.url(target))


def test_stock_tools_restore_without_pgvault(
    rich_db: str, repo: str, new_name: NewName, pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    """The README's recipe: zstd -d < FILE | pg_restore -d NEWDB, no pgvault involved."""
    pgvault("backup", "--dbname", rich_db, "--repo", repo)
    (dump,) = (tmp_path / "repo").rglob("db.dump.zst")
    target = new_name()
    subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(pg_cluster.port), "-U", "postgres",
                    target], check=True)
    pg_restore = pg_cluster.bindir / "pg_restore"
    subprocess.run(f"zstd -d < '{dump}' | '{pg_restore}' --exit-on-error -d "
                   f"'{pg_cluster.url(target)}'", shell=True, check=True)
    assert_databases_equal(rich_db, pg_cluster.url(target))


def test_partial_restore_of_one_table(
    rich_db: str, repo: str, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    with psycopg.connect(rich_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.only_me (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO public.only_me SELECT g, 'v' || g FROM generate_series(1, 50) g")
    pgvault("backup", "--dbname", rich_db, "--repo", repo)
    target = new_name()
    pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
            "--table", "only_me", "--schema", "public")
    with psycopg.connect(pg_cluster.url(target)) as conn:
        tables = conn.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = "
            "'public'::regnamespace").fetchall()
        assert tables == [("only_me",)]
        assert conn.execute("SELECT count(*) FROM public.only_me").fetchone() == (50,)


def test_restore_refuses_a_non_empty_database_unless_clean(
    rich_db: str, repo: str, new_name: NewName, pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    pgvault("backup", "--dbname", rich_db, "--repo", repo)
    target = new_name()
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))
    with psycopg.connect(pg_cluster.url(target), autocommit=True) as conn:
        conn.execute("CREATE TABLE precious (x int)")
    spools = tmp_path / "spools"
    spools.mkdir()
    # -j 2 spools, and the spool starts before the target is looked at: the refusal stops it.
    proc = pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
                   "-j", "2", expect=9, env={"TMPDIR": str(spools)})
    assert "not empty" in one_line_error(proc)
    assert list(spools.iterdir()) == []
    with psycopg.connect(pg_cluster.url(target)) as conn:
        assert conn.execute("SELECT to_regclass('precious')").fetchone() == ("precious",)
    pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo, "--clean")
    assert_databases_equal(rich_db, pg_cluster.url(target))


def test_restore_into_a_hostile_database_name_and_over_it_with_clean(
    make_db: Callable[..., str], repo: str, pg_cluster: EphemeralCluster
) -> None:
    # restore's CREATE/DROP/RENAME go through psql: quotes, a semicolon, a backslash
    # command and a psql variable in the name must reach the server as one identifier.
    url = make_db()
    fill_sized_database(url, 2_000)
    pgvault("backup", "--dbname", url, "--repo", repo)
    target = f"odd 'db' \"x\"; \\echo :HOST {uuid.uuid4().hex[:6]}"
    before = databases(pg_cluster)
    try:
        pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo)
        assert databases(pg_cluster) - before == {target}
        pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
                "--clean")
        assert databases(pg_cluster) - before == {target}
        with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
            name = conn.execute("SELECT datname FROM pg_database WHERE datname = %s",
                                (target,)).fetchone()
        assert name == (target,)
        assert_databases_equal(url, pg_cluster.url(target))
    finally:
        with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(target)))


def test_restore_without_the_right_to_create_a_database_fails_in_one_line(
    make_db: Callable[..., str], repo: str, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    url = make_db()
    pgvault("backup", "--dbname", url, "--repo", repo)
    role = f"nocreate_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB").format(sql.Identifier(role)))
    before = databases(pg_cluster)
    try:
        weak = pg_cluster.url().replace("postgres@", f"{role}@")
        proc = pgvault("restore", "--to", new_name(), "--dbname", weak, "--repo", repo,
                       expect=4)
        assert "permission denied to create database" in one_line_error(proc)
        assert databases(pg_cluster) == before
    finally:
        with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_restore_of_a_damaged_backup_fails_and_leaves_no_database(
    rich_db: str, repo: str, new_name: NewName, pg_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    pgvault("backup", "--dbname", rich_db, "--repo", repo)
    (dump,) = (tmp_path / "repo").rglob("db.dump.zst")
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    before = databases(pg_cluster)
    target = new_name()
    spools = tmp_path / "spools"
    spools.mkdir()
    proc = pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
                   "-j", "2", expect=6, env={"TMPDIR": str(spools)})
    assert "db.dump" in one_line_error(proc) or "zstd" in proc.stderr
    assert databases(pg_cluster) == before
    assert list(spools.iterdir()) == []

    dump.write_bytes(bytes(data[: len(data) // 2]))
    proc = pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo,
                   expect=6)
    assert "truncated" in one_line_error(proc) or "bytes stored" in proc.stderr
    assert databases(pg_cluster) == before


def test_pg_dump_failure_leaves_no_backup_and_next_run_succeeds(
    make_db: Callable[..., str], repo: str, tmp_path: Path, pg_cluster: EphemeralCluster
) -> None:
    url = make_db()
    role = f"weak_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute("CREATE TABLE secret (x int)")
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    weak_url = url.replace("postgres@", f"{role}@")
    proc = pgvault("backup", "--dbname", weak_url, "--repo", repo, expect=8)
    line = one_line_error(proc)
    assert line.startswith("pgvault: pg_dump failed") and "permission denied" in line
    root = tmp_path / "repo"
    assert manifests(root) == []
    # Only the run history (for `pgvault status`/`check`) records the failure.
    left = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    assert [p.parts[0] for p in left] == ["status"], "no data may survive a failure"
    assert "permission denied" in json.loads((root / left[0]).read_text())["last_failure"]["error"]
    pgvault("backup", "--dbname", url, "--repo", repo)
    assert len(manifests(root)) == 1
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_interrupt_during_backup_leaves_nothing_and_exits_130(
    make_db: Callable[..., str], tmp_path: Path, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    url = make_db()
    fill_sized_database(url, 400_000)
    repo_dir = tmp_path / "repo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    proc = subprocess.Popen([PGVAULT, "backup", "--dbname", url, "--repo", f"file://{repo_dir}",
                             "--level", "19"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # The dump's own temp file, not the lock's: then data is in flight.
    while time.monotonic() < deadline and not list(repo_dir.glob("backups/**/.tmp-*")):
        time.sleep(0.02)
    assert proc.poll() is None, "backup finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert manifests(repo_dir) == []
    # Only the run history remains, recording the interrupted run.
    left = [p.relative_to(repo_dir) for p in repo_dir.rglob("*") if p.is_file()]
    assert [p.parts[0] for p in left] == ["status"], (left, err)
    pgvault("backup", "--dbname", url, "--repo", f"file://{repo_dir}")
    target = new_name()
    pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo",
            f"file://{repo_dir}")
    assert_databases_equal(url, pg_cluster.url(target))


def test_lock_held_by_live_process_then_stale(
    make_db: Callable[..., str], repo: str, tmp_path: Path
) -> None:
    url = make_db()
    dbname = url.rsplit("/", 1)[1]
    lock = tmp_path / "repo" / "locks" / f"{dbname}.lock"
    lock.parent.mkdir(parents=True)
    holder = {"host": os.uname().nodename, "pid": os.getpid(), "operation": "backup",
              "since": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "token": "x"}
    lock.write_text(json.dumps(holder))
    # A real process: the lock's holder (this test) must be another live process.
    proc = pgvault("backup", "--dbname", url, "--repo", repo, expect=7, subprocess=True)
    assert f"pid {os.getpid()}" in one_line_error(proc)
    # A lock whose process is gone is stale: the next backup takes it over.
    holder["pid"] = 2**22 + 12345  # above pid_max's default: no such process
    lock.write_text(json.dumps(holder))
    pgvault("backup", "--dbname", url, "--repo", repo)
    assert not lock.exists(), "the lock is released after the backup"


def test_two_backups_at_once_the_second_fails_fast(
    make_db: Callable[..., str], tmp_path: Path
) -> None:
    url = make_db()
    repo_dir = tmp_path / "repo"
    # The first backup's pg_dump waits on a table lock while it holds the repository lock.
    with stalled_backup(url, f"file://{repo_dir}") as first:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(repo_dir.rglob("*.lock")):
            time.sleep(0.02)
        started = time.monotonic()
        proc = pgvault("backup", "--dbname", url, "--repo", f"file://{repo_dir}", expect=7)
        assert time.monotonic() - started < 10
        assert "locked by backup" in one_line_error(proc)
        assert first.poll() is None
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert len(manifests(repo_dir)) == 1


def test_prisma_style_url_is_accepted_and_schema_limits_the_backup(
    rich_db: str, repo: str, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    # pg_dump --schema leaves out extensions, so the schema must not depend on one.
    with psycopg.connect(rich_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA tenant; CREATE TABLE tenant.t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO tenant.t SELECT g, md5(g::text) FROM generate_series(1, 99) g")
    url = rich_db + "?schema=tenant&pgbouncer=true&connection_limit=1&pool_timeout=10"
    pgvault("backup", env={"DATABASE_URL": url, "PGVAULT_REPO": repo})
    shown = json.loads(pgvault("show", "--json", "--repo", repo).stdout)
    assert {(t["schema_name"], t["rows"]) for t in shown["facts"]["tables"]} == {("tenant", 99)}
    target = new_name()
    pgvault("restore", "--to", target, "--dbname", pg_cluster.url(), "--repo", repo)
    with psycopg.connect(pg_cluster.url(target)) as conn:
        schemas = {r[0] for r in conn.execute(
            "SELECT DISTINCT table_schema FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()}
    assert schemas == {"tenant"}


def test_direct_url_wins_over_database_url(rich_db: str, repo: str) -> None:
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "DIRECT_URL": rich_db,
           "PGVAULT_REPO": repo}
    pgvault("backup", "--no-globals", env=env)
    assert len(json.loads(pgvault("list", "--json", "--repo", repo).stdout)) == 1


def test_backup_ids_sort_in_time_order_and_are_unique(
    make_db: Callable[..., str], repo: str
) -> None:
    url = make_db()
    for _ in range(3):
        pgvault("backup", "--dbname", url, "--repo", repo, "--no-globals")
    ids = [b["id"] for b in json.loads(pgvault("list", "--json", "--repo", repo).stdout)]
    assert len(set(ids)) == 3 and ids == sorted(ids)


def test_unreachable_database_is_a_one_line_connection_error(repo: str) -> None:
    proc = pgvault("backup", "--dbname", "postgresql://u@127.0.0.1:1/db", "--repo", repo,
                   expect=4)
    assert "cannot connect" in one_line_error(proc)


@pytest.mark.parametrize("command", ["backup", "restore", "list", "show", "demo"])
def test_help_teaches_with_examples(command: str) -> None:
    out = pgvault(command, "--help").stdout
    assert "Usage: pgvault " + command in out
    if command != "demo":
        assert "Example" in out


def test_restore_jobs_default_to_the_cpus_and_fall_back_to_streaming_without_room(
    caplog: pytest.LogCaptureFixture
) -> None:
    from pgvault.ops.restore import MAX_AUTO_JOBS, restore_jobs

    assert restore_jobs(0, 1 << 20) == min(os.cpu_count() or 1, MAX_AUTO_JOBS)
    assert restore_jobs(3, 1 << 20) == 3
    assert restore_jobs(1, 1 << 60) == 1
    # An exabyte does not fit in TMPDIR: one job, streamed, and the log says why.
    assert restore_jobs(3, 1 << 60) == 1
    assert "restoring with one job, streamed" in caplog.text


def test_a_default_restore_streams_when_one_table_holds_most_of_the_data(
    make_db: Callable[..., str], repo: str, new_name: NewName, pg_cluster: EphemeralCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing to load beside one big table: the default restore saves the spool."""
    from pgvault.catalog import Catalog
    from pgvault.ops.restore import SOLO_SHARE, largest_table_share, restore_jobs
    from pgvault.storage.local import LocalStorage

    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE big AS SELECT g AS id, md5(g::text) AS v "
                     "FROM generate_series(1, 200000) g")
        conn.execute("CREATE TABLE small AS SELECT g AS id FROM generate_series(1, 100) g")
    pgvault("backup", "--dbname", url, "--repo", repo)
    storage = LocalStorage(Path(repo.removeprefix("file://")))
    artifact = Catalog(storage).get("latest", None).artifact("db.dump")
    share = largest_table_share(artifact)
    assert 0.99 < share <= 1.0
    caplog.set_level(logging.INFO, logger="pgvault")
    assert restore_jobs(0, artifact.raw_size, share) == 1
    assert "one table holds 100% of the data" in caplog.text
    assert restore_jobs(2, artifact.raw_size, share) == 2  # asked for: done as asked
    assert restore_jobs(0, artifact.raw_size, SOLO_SHARE - 0.01) > 1 or os.cpu_count() == 1
    target = new_name()
    out = pgvault("--log-format", "json", "restore", "latest", "--to", target,
                  "--dbname", pg_cluster.url(), "--repo", repo)
    assert "restoring with one job, streamed" in out.stderr  # the real restore took that path
    assert_databases_equal(url, pg_cluster.url(target))


def test_restore_limits_index_build_workers_while_it_runs_and_leaves_no_setting(
    make_db: Callable[..., str], repo: str, new_name: NewName, pg_cluster: EphemeralCluster
) -> None:
    """One job per CPU leaves one parallel worker per index build (for the build that runs
    alone at the end): pg_restore's sessions run with exactly that, and the restored database
    keeps no trace of the setting."""
    from pgvault.ops.restore import index_build_workers
    from pgvault.pg.conninfo import ConnInfo

    jobs = os.cpu_count() or 1
    workers = index_build_workers(ConnInfo.parse(pg_cluster.url()), jobs)
    assert workers == (1 if jobs >= 2 else 0)
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SHOW max_parallel_maintenance_workers").fetchone() == ("2",)
        # The constraint holds only in a session with the setting pgvault gives pg_restore's.
        conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, CHECK (id > 0 AND "
                     f"current_setting('max_parallel_maintenance_workers') = '{workers}'))")
        conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
    pgvault("backup", "--dbname", url, "--repo", repo)
    target = new_name()
    pgvault("restore", "latest", "--to", target, "--jobs", str(jobs),
            "--dbname", pg_cluster.url(), "--repo", repo)
    assert_databases_equal(url, pg_cluster.url(target))
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
            " WHERE d.datname = %s", (target,)).fetchone() == (0,)


def test_a_failed_parallel_restore_names_the_workers_error_not_its_death() -> None:
    import io

    from pgvault.pg.process import StderrTail, describe_exit

    stderr = io.BytesIO(
        b'pg_restore: error: COPY failed for table "t": ERROR:  new row for relation "t" '
        b'violates check constraint "t_check"\n'
        b"pg_restore: error: a worker process died unexpectedly\n")
    tail = StderrTail(stderr)
    tail.join()
    assert describe_exit("pg_restore", 1, tail) == (
        'pg_restore failed (exit 1): pg_restore: error: COPY failed for table "t": ERROR:  '
        'new row for relation "t" violates check constraint "t_check"')
    alone = StderrTail(io.BytesIO(b"pg_restore: error: a worker process died unexpectedly\n"))
    alone.join()
    assert alone.last_error().endswith("died unexpectedly")


def test_index_build_workers_only_for_a_server_on_this_host() -> None:
    from pgvault.ops.restore import index_build_workers
    from pgvault.pg.conninfo import ConnInfo

    cpus = os.cpu_count() or 1
    for local in ("postgresql://u@127.0.0.1:5432/db", "postgresql://u@localhost/db",
                  "host=/var/run/postgresql dbname=db", "postgresql://u@[::1]/db"):
        assert ConnInfo.parse(local).on_this_host(), local
        assert index_build_workers(ConnInfo.parse(local), 1) == max(0, cpus - 1)
        # One job per CPU still leaves a build that runs alone a worker to share it with.
        assert index_build_workers(ConnInfo.parse(local), cpus) == (1 if cpus >= 2 else 0)
        assert index_build_workers(ConnInfo.parse(local), 2 * cpus) == (1 if cpus >= 2 else 0)
    for remote in ("postgresql://u@db.example.com/db", "host=10.0.0.5 dbname=db",
                   "host=localhost,db.example.com dbname=db"):
        assert not ConnInfo.parse(remote).on_this_host(), remote
        assert index_build_workers(ConnInfo.parse(remote), 2) is None


def test_psql_session_reports_a_failed_statement_and_stays_usable(
    pg_cluster: EphemeralCluster,
) -> None:
    from pgvault.errors import DatabaseError
    from pgvault.pg.conninfo import ConnInfo
    from pgvault.pg.psql import PsqlSession, text_literal

    session = PsqlSession(ConnInfo.parse(pg_cluster.url()))
    try:
        session.preflight()
        # A message over two lines must not leak into the next statement's rows.
        with pytest.raises(DatabaseError, match="first line"):
            session.run("DO $$BEGIN RAISE EXCEPTION E'first line\\nsecond line'; END$$")
        assert session.run("SELECT 42, 'x'") == [["42", "x"]]
        odd = "it's a \"name\"; \\echo :HOST"
        assert session.run("SELECT " + text_literal(odd)) == [[odd]]
        assert session.run("SELECT 1 WHERE false") == []
    finally:
        session.close()

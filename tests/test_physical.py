"""Physical backups, WAL archiving and point-in-time recovery, on real archiving clusters.

The clusters archive with the real `pgvault wal-push` as their archive_command and
restores replay through the real `pgvault wal-fetch`, both run by the server as the
postgres OS user. WAL segments are 1 MB (initdb --wal-segsize=1) to keep runs short.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cli_runner import PGVAULT, one_line_error, pgvault
from dbcompare import assert_databases_equal
from pgvault.catalog import Catalog, wal_file_prefix
from pgvault.ops.physical_restore import _kernel_at_least, verify_physical
from pgvault.ops.wal import archived, push_failures, versions
from pgvault.pg.cluster import EphemeralCluster
from pgvault.storage import open_storage

Archiving = Callable[..., EphemeralCluster]
# FILE_COPY: a few WAL records instead of the whole template copied through the WAL.
CREATE_APP = "CREATE DATABASE app STRATEGY FILE_COPY"


def _as_root() -> bool:
    return os.geteuid() == 0


def _postgres_owned_dir(prefix: str) -> Path:
    """A private folder under /tmp that the postgres OS user (the server) can use."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if _as_root():
        owner = pwd.getpwnam("postgres")
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def _postgres_can_run(program: str) -> bool:
    try:
        return subprocess.run([program, "--version"], user="postgres", capture_output=True,
                              check=False).returncode == 0
    except OSError:
        return False


@pytest.fixture(scope="session")
def server_pgvault() -> Iterator[str]:
    """A pgvault program the postgres OS user can run, for archive/restore_command.

    Usually the venv's own. When that venv's interpreter lives where postgres cannot
    reach it (e.g. pyenv under /root), a tiny venv of a system Python of the same
    version is made that loads this venv's packages.
    """
    if not _as_root() or _postgres_can_run(PGVAULT):
        yield PGVAULT
        return
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = shutil.which(version, path="/usr/bin:/usr/local/bin")
    assert python, f"the postgres user cannot run {PGVAULT} and there is no system {version}"
    folder = Path(tempfile.mkdtemp(prefix="pgvault-server-venv-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        subprocess.run([python, "-m", "venv", "--without-pip", str(folder)], check=True)
        site = next(folder.glob("lib/python*/site-packages"))
        ours = next(Path(sys.prefix).glob("lib/python*/site-packages"))
        (site / "pgvault-tests.pth").write_text(
            f"import site; site.addsitedir({str(ours)!r})\n")
        program = folder / "bin" / "pgvault"
        program.write_text(f"#!{folder}/bin/python\nimport sys\nfrom pgvault.cli import main\n"
                           "sys.exit(main())\n")
        program.chmod(0o755)
        yield str(program)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def repo_dir() -> Iterator[Path]:
    """A local repository folder owned by the server's OS user (it writes the WAL)."""
    path = _postgres_owned_dir("pgvault-repo-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pitr_dir() -> Iterator[Path]:
    """Where restored data folders go; their servers are stopped afterwards."""
    path = _postgres_owned_dir("pgvault-pitr-")
    yield path
    for pid_file in path.glob("*/postmaster.pid"):
        _stop_server(pid_file.parent)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def archiving(server_pgvault: str, repo_dir: Path) -> Iterator[Archiving]:
    """Factory: a running cluster whose archive_command is `pgvault wal-push %p ARGS`.

    It depends on ``repo_dir`` so that its clusters stop before that folder is removed
    (a cluster still archiving would create it again).
    """
    clusters: list[EphemeralCluster] = []

    def start(args: str, prefix: str = "") -> EphemeralCluster:
        command = f"{prefix}{server_pgvault} wal-push %p {args}"
        cluster = EphemeralCluster(
            settings={"archive_mode": True, "archive_command": command, "fsync": False,
                      "wal_level": "replica"},
            initdb_args=["--wal-segsize=1"],
        )
        clusters.append(cluster.start())
        return cluster

    yield start
    for cluster in clusters:
        # Shutting down archives every pending segment first; the test needs none of them.
        with contextlib.suppress(psycopg.Error):
            sql(cluster.url(), "ALTER SYSTEM SET archive_command = 'true'",
                "SELECT pg_reload_conf()")
        cluster.stop()


def _stop_server(pgdata: Path) -> None:
    """Fast shutdown of a server `restore --start` left running (in-process: our child,
    reaped here, or it would linger as a zombie that still answers kill 0)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not (pgdata / "postmaster.pid").exists():
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sql(url: str, *statements: str) -> Any:
    """Run each statement in its own transaction; the first column of the last row."""
    result = None
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            cur = conn.execute(statement)
            if cur.description:
                row = cur.fetchone()
                result = row[0] if row else None
    return result


def insert(first: int, last: int) -> str:
    return (f"INSERT INTO orders SELECT g, 'order ' || g FROM generate_series({first}, {last}) g")


def order_ids(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id").fetchall()]


def restore_pitr(pgdata: Path, server_pgvault: str, *args: str) -> tuple[str, Any]:
    """`pgvault restore --physical latest ARGS --start`; the restored server's URL prefix."""
    port = _free_port()
    proc = pgvault("restore", "--physical", "latest", "--pgdata", str(pgdata), *args,
                   "--start", "--port", str(port), "--pgvault-bin", server_pgvault)
    return f"postgresql://postgres@127.0.0.1:{port}/", proc


def test_point_in_time_recovery_to_a_time_a_restore_point_and_an_lsn(
    archiving: Archiving, repo_dir: Path, pitr_dir: Path, server_pgvault: str, tmp_path: Path
) -> None:
    repo = f"file://{repo_dir}"
    cluster = archiving(f"--repo {repo}")
    admin = cluster.url()
    out = pgvault("basebackup", "-d", admin, "--repo", repo, "--fast-checkpoint", "--json")
    manifest = json.loads(out.stdout)
    assert manifest["kind"] == "physical" and manifest["database"] == "main"
    facts = manifest["physical"]
    # auto: the server archives with wal-push, so the WAL comes from the archive.
    assert facts["wal_included"] is False
    assert facts["system_identifier"] == str(sql(admin, "SELECT system_identifier "
                                                        "FROM pg_control_system()"))
    assert facts["start_wal"].startswith("00000001") and facts["timeline"] == 1
    assert {a["name"] for a in manifest["artifacts"]} == {"base.tar", "backup_manifest"}

    sql(admin, CREATE_APP)
    app = cluster.url("app")
    copy = "CREATE DATABASE {} TEMPLATE app STRATEGY FILE_COPY"
    sql(app, "CREATE TABLE orders (id int PRIMARY KEY, note text)", insert(1, 100))
    noted_time = sql(app, "SELECT clock_timestamp()")
    sql(admin, copy.format("at_time"))
    sql(app, insert(101, 200))
    sql(app, "SELECT pg_create_restore_point('before_batch_3')")
    sql(admin, copy.format("at_name"))
    sql(app, insert(201, 300))
    noted_lsn = str(sql(app, "SELECT pg_current_wal_insert_lsn()"))
    sql(admin, copy.format("at_lsn"))
    sql(app, insert(301, 400), "DROP TABLE orders")  # the mistake
    checked = pgvault("check-archive", "-d", admin, "--repo", repo, "--json")
    report = json.loads(checked.stdout)
    assert report["checked"]["walfile"] and report["timelines"][0]["gaps"] == []
    assert report["recoverable_from"] and report["recoverable_to"]

    storage = open_storage(repo)
    backup = Catalog(storage).get("latest", "main")
    verified = verify_physical(storage, backup, "main")
    assert any("pg_verifybackup" in check for check in verified.checks)
    # Standard formats: the README's stock-tool recipes read the base backup and the WAL.
    base = repo_dir / backup.artifact("base.tar").key
    listing = subprocess.run(f"zstd -dc < {base} | tar -t", shell=True, check=True,
                             capture_output=True, text=True).stdout.splitlines()
    assert {"backup_label", "backup_manifest", "global/pg_control"} <= set(listing)
    assert backup.physical is not None
    first = backup.physical.start_wal
    subprocess.run(f"zstd -dqc {repo_dir}/wal/main/*/{first}/*.zst > {tmp_path / 'stock'}",
                   shell=True, check=True)
    pgvault("wal-fetch", first, str(tmp_path / "fetched"), "--repo", repo)
    assert (tmp_path / "stock").read_bytes() == (tmp_path / "fetched").read_bytes()

    targets = [("at_time", ["--target-time", noted_time.isoformat()], 100),
               # Paused at the target: still in (hot standby) recovery, readable, not promoted.
               ("at_name", ["--target-name", "before_batch_3", "--target-action", "pause"], 200),
               ("at_lsn", ["--target-lsn", noted_lsn, "--target-exclusive"], 300)]
    for snapshot, target, last_id in targets:
        pgdata = pitr_dir / snapshot
        server, proc = restore_pitr(pgdata, server_pgvault, "--repo", repo, *target)
        paused = "pause" in target
        assert ("recovery paused" if paused else "recovery promoted") in proc.stdout
        # The dropped table is back, with exactly the rows committed before the target.
        assert order_ids(server + "app") == list(range(1, last_id + 1))
        assert_databases_equal(cluster.url(snapshot), server + "app")
        later = sql(server + "postgres", "SELECT array_agg(datname::text) FROM pg_database")
        assert snapshot not in later  # made just after the target: absent
        assert (pgdata / "recovery.signal").exists() is paused  # promoted: recovery is over
        assert sql(server + "postgres", "SELECT pg_is_in_recovery()") is paused
        assert "archive_mode = 'off'" in (pgdata / "postgresql.auto.conf").read_text()
        # The unpacked files were made durable with one syncfs() (Linux 5.8+), for this start
        # only: the folder's config keeps the server's default.
        syncfs = _kernel_at_least(5, 8)  # older kernels do not report write-back errors
        assert sql(server + "postgres", "SHOW recovery_init_sync_method") == (
            "syncfs" if syncfs else "fsync")
        assert "recovery_init_sync_method" not in (pgdata / "postgresql.auto.conf").read_text()
        _stop_server(pgdata)

    refused = pgvault("restore", "--physical", "latest", "--repo", repo, "--pgdata",
                      str(pitr_dir / "at_lsn"), expect=9)
    assert "is not empty" in one_line_error(refused)


def test_wal_push_is_idempotent_refuses_other_content_and_foreign_systems(
    pg_cluster: EphemeralCluster, repo_dir: Path, tmp_path: Path
) -> None:
    """wal-push's contract, on real segments of two clusters (two system identifiers)."""
    segment = _completed_segment(pg_cluster, tmp_path)
    with EphemeralCluster(initdb_args=["--wal-segsize=1"]) as other_cluster:
        foreign = _completed_segment(other_cluster, tmp_path / "foreign")
        series = [_completed_segment(other_cluster, tmp_path / "pg_wal") for _ in range(4)]
    repo = str(repo_dir)
    env = {"PGVAULT_REPO": repo}

    first = pgvault("wal-push", str(segment), env=env)
    assert first.stderr == ""
    again = pgvault("wal-push", str(segment), env=env)
    assert "already archived" in again.stderr
    (stored,) = versions(open_storage(repo), "main", segment.name)

    damaged = tmp_path / "damaged" / segment.name
    damaged.parent.mkdir()
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    refused = pgvault("wal-push", str(damaged), env=env, expect=6)
    assert "REFUSED" in one_line_error(refused) and "different content" in refused.stderr
    assert versions(open_storage(repo), "main", segment.name) == [stored]

    other = pgvault("wal-push", str(foreign), env=env, expect=3)
    assert "database system" in one_line_error(other)
    assert not versions(open_storage(repo), "main", foreign.name)
    # Refusals reach monitoring through the repository, not only the server's log.
    failures = push_failures(open_storage(repo), "main")
    assert failures.total == 2 and failures.last_wal == foreign.name
    assert failures.last_error and "database system" in failures.last_error

    fetched = tmp_path / "fetched"
    pgvault("wal-fetch", segment.name, str(fetched), env=env)
    assert fetched.read_bytes() == segment.read_bytes()
    # Damage in the archive must stop recovery (status above 125), not end it quietly.
    stored_path = repo_dir / stored.key
    saved = stored_path.read_bytes()
    stored_path.write_bytes(saved[:-9] + bytes([saved[-9] ^ 0xFF]) + saved[-8:])
    damaged_fetch = pgvault("wal-fetch", segment.name, str(tmp_path / "bad"), env=env,
                            expect=126)
    assert "damaged" in one_line_error(damaged_fetch) or "corrupt" in damaged_fetch.stderr
    assert not (tmp_path / "bad").exists()
    stored_path.write_bytes(saved)
    missing = pgvault("wal-fetch", "0000000100000000000000FF", str(tmp_path / "x"), env=env,
                      expect=1)
    assert missing.stderr == "" and not (tmp_path / "x").exists()
    assert pgvault("wal-fetch", "00000002.history", str(tmp_path / "h"), env=env,
                   expect=1).stderr == ""
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    pgvault("wal-push", str(history), env=env)
    pgvault("wal-fetch", history.name, str(tmp_path / "h"), env=env)
    assert (tmp_path / "h").read_text() == history.read_text()

    # Push-ahead: the segments the server marked ready go along, each marked done once
    # stored; the segment asked for is left to the server to mark.
    status = tmp_path / "pg_wal" / "archive_status"
    status.mkdir()
    for segment_file in series:
        (status / f"{segment_file.name}.ready").touch()
    ahead_repo = str(tmp_path / "ahead-repo")
    pgvault("wal-push", str(series[0]), "--repo", ahead_repo,
            env={"PGVAULT_PHYSICAL__PUSH_AHEAD": "2", "PGVAULT_PHYSICAL__PUSH_BUDGET": "3"})
    stored = open_storage(ahead_repo)
    assert [bool(versions(stored, "main", s.name)) for s in series] == [True, True, True, False]
    assert sorted(p.name for p in status.iterdir()) == sorted(
        [f"{series[0].name}.ready", f"{series[1].name}.done", f"{series[2].name}.done",
         f"{series[3].name}.ready"])

    not_wal = tmp_path / "notes.txt"
    not_wal.write_text("x")
    assert pgvault("wal-push", str(not_wal), env=env, expect=2).returncode <= 125


def _completed_segment(cluster: EphemeralCluster, folder: Path) -> Path:
    """Copy of a WAL segment the server has just finished (after a forced switch)."""
    folder.mkdir(parents=True, exist_ok=True)
    url = cluster.url()
    sql(url, "CREATE TABLE IF NOT EXISTS filler (x text)",
        "INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 2000)")
    name = sql(url, "SELECT pg_walfile_name(pg_switch_wal())")
    target = folder / name
    shutil.copyfile(cluster.data_dir / "pg_wal" / name, target)
    return target


def test_wal_push_killed_midway_leaves_nothing_under_the_final_name(
    pg_cluster: EphemeralCluster, repo_dir: Path, tmp_path: Path
) -> None:
    # A 16 MB segment at zstd level 19 takes seconds to compress: time to kill the push
    # while its temp file is being written.
    segment = _completed_segment(pg_cluster, tmp_path)
    env = {**os.environ, "PGVAULT_REPO": str(repo_dir), "PGVAULT_COMPRESSION__LEVEL": "19",
           "PGVAULT_COMPRESSION__THREADS": "1"}
    proc = subprocess.Popen([PGVAULT, "wal-push", str(segment)], env=env,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(repo_dir.rglob(".tmp-*")):
        assert proc.poll() is None, "the push finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    proc.stderr.close()  # type: ignore[union-attr]
    storage = open_storage(str(repo_dir))
    assert versions(storage, "main", segment.name) == []
    assert not [i for i in storage.list(wal_file_prefix("main", segment.name))]
    pgvault("wal-fetch", segment.name, str(tmp_path / "x"), env={"PGVAULT_REPO": str(repo_dir)},
            expect=1)
    # The archiver retries; this time it gets through and the bytes come back unchanged.
    pgvault("wal-push", str(segment), env={"PGVAULT_REPO": str(repo_dir)})
    pgvault("wal-fetch", segment.name, str(tmp_path / "back"),
            env={"PGVAULT_REPO": str(repo_dir)})
    assert (tmp_path / "back").read_bytes() == segment.read_bytes()


def test_encrypted_archive_and_base_backup_on_s3_restore_to_the_end(
    archiving: Archiving, pitr_dir: Path, server_pgvault: str, s3_server: str, s3_bucket: str,
    tmp_path: Path
) -> None:
    keys = _postgres_owned_dir("pgvault-keys-")
    try:
        identity = keys / "identity.txt"
        recipient = pgvault("keygen", "-o", str(identity)).stdout.strip()
        config = keys / "pgvault.toml"
        config.write_text(
            f'repo = "s3://{s3_bucket}/pg"\ncompression.algorithm = "zstd"\n'
            f'[s3]\nendpoint_url = "{s3_server}"\npath_style = true\n'
            f'[encryption]\nrecipients = ["{recipient}"]\n')
        if _as_root():
            owner = pwd.getpwnam("postgres")
            for path in (identity, config):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        credentials = " ".join(f"{k}={os.environ[k]}" for k in
                               ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                "AWS_DEFAULT_REGION"))
        cluster = archiving(f"--config {config}", prefix=f"{credentials} ")
        app = cluster.url("app")
        sql(cluster.url(), CREATE_APP)
        sql(app, "CREATE TABLE orders (id int PRIMARY KEY, note text)", insert(1, 500))
        pgvault("basebackup", "-d", cluster.url(), "--config", str(config), "--fast-checkpoint")
        sql(app, insert(501, 1000), "UPDATE orders SET note = 'changed' WHERE id % 7 = 0")
        pgvault("check-archive", "-d", cluster.url(), "--config", str(config))
        storage = open_storage(f"s3://{s3_bucket}/pg", _s3_options(s3_server))
        wal_keys = [f.key for f in archived(storage, "main")]
        assert wal_keys and all(key.endswith(".zst.age") for key in wal_keys)
        assert Catalog(storage).get("latest", "main").artifacts[0].key.endswith(
            "base.tar.zst.age")

        pgdata = pitr_dir / "end"
        server, _ = restore_pitr(pgdata, server_pgvault, "--config", str(config),
                                 "--identity-file", str(identity))
        # No target: replay to the end of the archive; the source is quiet, so equal.
        assert order_ids(server + "app") == list(range(1, 1001))
        assert_databases_equal(app, server + "app")
    finally:
        shutil.rmtree(keys, ignore_errors=True)


def test_self_contained_base_backup_restores_without_an_archive_and_failures_leave_nothing(
    pg_cluster: EphemeralCluster, repo_dir: Path, pitr_dir: Path, server_pgvault: str,
    tmp_path: Path
) -> None:
    repo = str(repo_dir)
    with EphemeralCluster(initdb_args=["--wal-segsize=1"], settings={"fsync": False}) as source:
        sql(source.url(), CREATE_APP)
        app = source.url("app")
        sql(app, "CREATE TABLE orders (id int PRIMARY KEY, note text)", insert(1, 250),
            "CREATE ROLE reader LOGIN")
        # Without the REPLICATION attribute pg_basebackup is refused: one line, nothing stored.
        failed = pgvault("basebackup", "-d", source.url().replace("postgres@", "reader@"),
                         "--repo", repo, expect=8)
        assert "replication" in one_line_error(failed)
        # Only the run history says it failed (status/main/), as for a logical backup.
        assert not list(repo_dir.rglob("*.zst"))
        assert [p.relative_to(repo_dir) for p in repo_dir.rglob("*.json")] == [
            Path("status/main/backup.json")]

        out = pgvault("basebackup", "-d", source.url(), "--repo", repo, "--wal-method", "fetch",
                      "--fast-checkpoint", "--compression", "gzip", "--json")
        manifest = json.loads(out.stdout)
        assert manifest["physical"]["wal_included"] is True
        assert manifest["artifacts"][0]["key"].endswith("base.tar.gz")
        pgdata = pitr_dir / "self-contained"
        server, _ = restore_pitr(pgdata, server_pgvault, "--repo", repo, "--target",
                                 "immediate")
        assert_databases_equal(app, server + "app")
        # --target-action shutdown: replay to the target, then the server stops by itself.
        stopped = pgvault("restore", "--physical", "latest", "--repo", repo, "--pgdata",
                          str(pitr_dir / "shutdown"), "--target", "immediate",
                          "--target-action", "shutdown", "--start", "--pgvault-bin",
                          server_pgvault)
        assert "shut down" in stopped.stdout
        assert not (pitr_dir / "shutdown" / "postmaster.pid").exists()

        # A repository cluster name is bound to one system: another server is refused.
        foreign = _completed_segment(pg_cluster, tmp_path)
        other_repo = tmp_path / "other"
        pgvault("wal-push", str(foreign), "--repo", str(other_repo))
        refused = pgvault("basebackup", "-d", source.url(), "--repo", str(other_repo),
                          "--wal-method", "fetch", expect=3)
        assert "REFUSED" in one_line_error(refused) and "--cluster" in refused.stderr


def test_check_archive_fails_loudly_when_archiving_is_broken(
    archiving: Archiving, tmp_path: Path
) -> None:
    cluster = archiving("--repo /proc/no-such-repository")
    failed = pgvault("check-archive", "-d", cluster.url(), "--repo", str(tmp_path / "repo"),
                     "--timeout", "3", expect=8)
    line = one_line_error(failed)
    assert "did not arrive" in line and "last archive failure" in line


def _s3_options(endpoint: str) -> Any:
    from pgvault.storage.s3 import S3Options

    return S3Options(endpoint_url=endpoint, region="us-east-1", path_style=True)


def test_prune_keeps_the_wal_of_kept_base_backups_and_the_oldest_still_restores(
    archiving: Archiving, repo_dir: Path
) -> None:
    repo = f"file://{repo_dir}"
    cluster = archiving(f"--repo {repo}")
    sql(cluster.url(), CREATE_APP)
    app = cluster.url("app")
    sql(app, "CREATE TABLE orders (id int PRIMARY KEY, note text)")
    rows_at = []
    for batch in range(3):
        sql(app, insert(batch * 300 + 1, batch * 300 + 300))
        rows_at.append((batch + 1) * 300)
        pgvault("basebackup", "-d", cluster.url(), "--repo", repo, "--fast-checkpoint")
    sql(app, insert(901, 1000))
    pgvault("check-archive", "-d", cluster.url(), "--repo", repo)
    storage = open_storage(repo)
    first, oldest_kept, _newest = Catalog(storage).list("main")
    before = {f.wal.name for f in archived(storage, "main")}

    env = {"PGVAULT_RETENTION__KEEP_LAST": "2", "PGVAULT_RETENTION__KEEP_DAILY": "0",
           "PGVAULT_RETENTION__KEEP_WEEKLY": "0", "PGVAULT_RETENTION__KEEP_MONTHLY": "0"}
    pruned = json.loads(pgvault("prune", "--repo", repo, "--json", env=env).stdout)
    assert [d["id"] for d in pruned["databases"]["main"]["remove"]] == [first.id]
    assert oldest_kept.physical is not None and first.physical is not None
    after = {f.wal.name for f in archived(storage, "main")}
    removed = before - after
    assert removed and all(name < oldest_kept.physical.start_wal for name in removed)
    assert all(name >= oldest_kept.physical.start_wal for name in after
               if not name.endswith(".history"))
    # From the oldest kept backup's start on, the archive is whole.
    pgvault("check-archive", "--no-switch", "--repo", repo)

    # Restoring the oldest kept base backup to its end still works: the restore drill
    # unpacks it, runs pg_verifybackup, replays its WAL from the pruned archive, starts it
    # and reads every row back.
    drill = json.loads(pgvault("verify", oldest_kept.id, "--repo", repo, "--level", "facts",
                               "--json").stdout)
    assert {c["name"]: c["status"] for c in drill["checks"]} == {
        "base.tar": "pass", "restore": "pass", "rto": "pass", "rows": "pass"}
    assert f"{rows_at[1]} rows" in next(c["detail"] for c in drill["checks"]
                                         if c["name"] == "rows")
    (status,) = json.loads(pgvault("status", "--repo", repo, "--json").stdout)
    assert status["database"] == "main" and status["archive"]["gaps"] == []
    assert status["archive"]["recoverable_from"] == oldest_kept.physical.stop_time.isoformat()

"""What a killed pgvault leaves (scratch clusters, private folders, scratch databases) is
found by the next run, removed only when its process is provably dead, and reported."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import sql

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from fixtures_kill import kill_when, start, wait_gone
from pgvault import leftovers
from pgvault.pg.cluster import EphemeralCluster

REPORT = "of dead pgvault processes: "


@pytest.fixture
def own_tmp() -> Iterator[Path]:
    """TMPDIR of this test's pgvault runs (the postgres OS user must reach clusters in it)."""
    path = Path(tempfile.mkdtemp(prefix="leftovers-test-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def small_db(make_db: Callable[..., str]) -> str:
    url = make_db()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t (v) SELECT 'row ' || g FROM generate_series(1, 2000) g")
    return url


def _servers_in(folder: Path) -> list[psutil.Process]:
    """PostgreSQL processes working in ``folder`` (their cwd is their PGDATA)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "postgres" and proc.status() != psutil.STATUS_ZOMBIE \
                    and proc.cwd().startswith(str(folder)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _databases(cluster: EphemeralCluster) -> set[str]:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def _create(cluster: EphemeralCluster, *names: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _drop(cluster: EphemeralCluster, *names: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def _backup_and_restore(url: str, cluster: EphemeralCluster, env: dict[str, str]
                        ) -> subprocess.CompletedProcess[str]:
    """A backup (whose start sweeps), restored and compared with its source."""
    proc = pgvault("backup", "--dbname", url, env=env)
    target = f"restored_{uuid.uuid4().hex[:10]}"
    try:
        pgvault("restore", "latest", "--to", target, "--dbname", cluster.url(), env=env)
        assert_databases_equal(url, cluster.url(target))
    finally:
        _drop(cluster, target)
    return proc


def _dead_owner() -> leftovers.Owner:
    """A process of this host that has just ended (its pid and start time)."""
    child = subprocess.Popen(["sleep", "30"])
    start_time = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    child.kill()
    child.wait()
    return leftovers.Owner(child.pid, start_time, leftovers.me().host)


# -- a killed verify: its scratch cluster -------------------------------------------------


def test_a_verify_killed_in_its_drill_leaves_no_server_after_the_next_run(
    small_db: str, own_tmp: Path, tmp_path: Path, pg_cluster: EphemeralCluster
) -> None:
    """kill -9 of `verify` while its drill's command runs against the restored copy on an
    ephemeral cluster: the server goes with pgvault (the kernel's parent-death signal), and
    the next run removes the cluster's folder, restored data and all, and says so."""
    started = tmp_path / "started"
    env = {"TMPDIR": str(own_tmp), "PGVAULT_REPO": f"file://{tmp_path / 'repo'}"}
    _backup_and_restore(small_db, pg_cluster, env)
    drill = start("verify", "--level", "command", env={
        **env, "PGVAULT_VERIFY__COMMAND": f"touch {started}; exec sleep 300"})
    # Names are read before the kill: the server may be gone (as it should) by the time the
    # test looks again.
    names: dict[int, str] = {}

    def ready(me: psutil.Process) -> bool:
        if not started.exists():
            return False
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                names[child.pid] = child.name()
        return True

    family = kill_when(drill, ready)
    for child in family:  # the drill's own command is the user's: not what this is about
        if names.get(child.pid) in ("sleep", "sh"):
            with contextlib.suppress(psutil.Error):
                child.kill()
    clusters = list(own_tmp.glob("pgvault-pg-*"))
    assert len(clusters) == 1, clusters
    servers = [p for p in family if names.get(p.pid) == "postgres"]
    assert servers, "the drill's server was not running when pgvault was killed"
    wait_gone(servers, timeout=30)  # it dies with pgvault, not at the next run
    proc = pgvault("verify", "--level", "integrity", env=env)
    assert f"removed 1 leftover {REPORT}scratch cluster {clusters[0]} (pid {drill.pid})" \
        in proc.stderr, proc.stderr
    assert not clusters[0].exists()
    assert _servers_in(own_tmp) == []


def _cluster_in_child(tmp: Path, keep: bool) -> tuple[subprocess.Popen[str], Path, int]:
    """A cluster started by another Python process, the way a drill starts one (no
    parent-death signal); with ``keep``, detached and its process ended normally."""
    script = ("import sys, time\n"
              "from pgvault.pg.cluster import EphemeralCluster\n"
              "c = EphemeralCluster().start()\n"
              "print(c.root, c.postmaster_pid, flush=True)\n"
              f"if {keep}:\n    c.detach()\n    sys.exit(0)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None
    root, pid = proc.stdout.readline().split()
    return proc, Path(root), int(pid)


def test_the_next_run_stops_a_dead_owners_server_and_leaves_kept_and_live_ones(
    small_db: str, own_tmp: Path, tmp_path: Path, pg_cluster: EphemeralCluster
) -> None:
    """The orphan server of the issue (parent 1, restored data in it) is stopped by the next
    backup; a cluster kept on purpose (verify --keep) and one whose owner lives are not
    touched; dead owners' private folders and an old version's stale password folder go."""
    killed, orphan_root, orphan_pid = _cluster_in_child(own_tmp, keep=False)
    kept_proc, kept_root, kept_pid = _cluster_in_child(own_tmp, keep=True)
    kept_proc.wait()
    live = EphemeralCluster(base_dir=own_tmp).start()
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    time.sleep(0.5)
    assert psutil.Process(orphan_pid).ppid() != killed.pid  # an orphan now, still serving
    assert psutil.Process(orphan_pid).status() != psutil.STATUS_ZOMBIE
    dead = _dead_owner()
    spool_folder = own_tmp / f"pgvault-restore-{dead.token()}-abcd1234"
    spool_folder.mkdir()
    (spool_folder / "db.dump").write_bytes(b"PGDMP plaintext rows")
    old_pass = own_tmp / "pgvault-pass-ab12cd34"  # an older pgvault's random name
    old_pass.mkdir()
    (old_pass / "pgpass").write_text("*:*:*:*:old-password\n")
    hours_ago = time.time() - 2 * leftovers.LEGACY_AGE
    os.utime(old_pass / "pgpass", (hours_ago, hours_ago))
    os.utime(old_pass, (hours_ago, hours_ago))
    fresh_pass = own_tmp / "pgvault-pass-ef56gh78"
    fresh_pass.mkdir()
    (fresh_pass / "pgpass").write_text("*:*:*:*:in-use\n")
    live_folder = Path(leftovers.private_folder("restore"))  # this (living) process's
    try:
        env = {"TMPDIR": str(own_tmp), "PGVAULT_REPO": f"file://{tmp_path / 'repo'}"}
        proc = _backup_and_restore(small_db, pg_cluster, env)
        report = [line for line in proc.stderr.splitlines() if REPORT in line]
        assert len(report) == 1 and report[0].startswith("warning: removed 3 leftovers "), \
            proc.stderr
        assert f"scratch cluster {orphan_root} (pid {killed.pid}), its server (pid " \
               f"{orphan_pid}) stopped" in report[0]
        assert f"restore spool folder {spool_folder} (pid {dead.pid})" in report[0]
        assert f"password folder {old_pass} (an older pgvault's)" in report[0]
        assert not orphan_root.exists() and not spool_folder.exists() and not old_pass.exists()
        assert not psutil.pid_exists(orphan_pid) or \
            psutil.Process(orphan_pid).status() == psutil.STATUS_ZOMBIE
        assert kept_root.exists() and psutil.Process(kept_pid).is_running()
        assert live.running and live.root.exists()
        assert fresh_pass.exists() and live_folder.exists()
    finally:
        live.stop()
        shutil.rmtree(live_folder, ignore_errors=True)
        with psycopg.connect(f"postgresql://postgres@127.0.0.1/postgres?host={kept_root}&port="
                             + _port_of(kept_root)) as conn:
            conn.execute("SELECT 1")
        os.kill(kept_pid, signal.SIGQUIT)
        psutil.wait_procs([psutil.Process(kept_pid)], timeout=30)
        shutil.rmtree(kept_root, ignore_errors=True)


def _port_of(root: Path) -> str:
    return (root / "data" / "postmaster.pid").read_text().splitlines()[3]


# -- scratch databases on a server ----------------------------------------------------------


def test_the_next_restore_and_verify_drop_only_dead_processes_databases(
    small_db: str, own_tmp: Path, tmp_path: Path, pg_cluster: EphemeralCluster
) -> None:
    """pgvault_tmp_/pgvault_verify_ databases of dead processes of this host are dropped by
    the next restore (and verify, which restores) against that server, and named; a live
    process's, another host's and an older version's (no owner in the name) stay."""
    dead, me = _dead_owner(), leftovers.me()
    other_host = "0" * 8 if me.host != "0" * 8 else "1" * 8

    def name(prefix: str, owner: leftovers.Owner, host: str | None = None) -> str:
        return f"{prefix}{owner.pid}_{owner.start}_{host or owner.host}_{uuid.uuid4().hex[:4]}"

    doomed = [name("pgvault_tmp_", dead), name("pgvault_verify_", dead),
              name("pgvault_tmp_", leftovers.Owner(me.pid, me.start + 1, me.host))]  # reused pid
    spared = [name("pgvault_tmp_", me), name("pgvault_tmp_", dead, other_host),
              f"pgvault_tmp_{uuid.uuid4().hex[:12]}"]
    _create(pg_cluster, *doomed, *spared)
    env = {"TMPDIR": str(own_tmp), "PGVAULT_REPO": f"file://{tmp_path / 'repo'}"}
    try:
        proc = _backup_and_restore(small_db, pg_cluster, env)
        assert REPORT not in proc.stderr  # a backup does not touch the server's databases
        databases = _databases(pg_cluster)
        assert not set(doomed) & databases and set(spared) <= databases
        # The restore said what it dropped: this runs it again to read its output.
        late = name("pgvault_verify_", dead)
        _create(pg_cluster, late)
        proc = pgvault("verify", "--level", "restore", "--server", pg_cluster.url(), env=env)
        assert f"removed 1 leftover {REPORT}database {late} (pid {dead.pid})" in proc.stderr, \
            proc.stderr
        assert late not in _databases(pg_cluster) and set(spared) <= _databases(pg_cluster)
    finally:
        _drop(pg_cluster, *doomed, *spared)


def test_a_restore_names_the_dropped_databases(
    small_db: str, own_tmp: Path, tmp_path: Path, pg_cluster: EphemeralCluster
) -> None:
    dead = _dead_owner()
    left = f"pgvault_tmp_{dead.pid}_{dead.start}_{dead.host}_beef"
    env = {"TMPDIR": str(own_tmp), "PGVAULT_REPO": f"file://{tmp_path / 'repo'}"}
    pgvault("backup", "--dbname", small_db, env=env)
    _create(pg_cluster, left)
    target = f"restored_{uuid.uuid4().hex[:10]}"
    try:
        proc = pgvault("restore", "latest", "--to", target, "--dbname", pg_cluster.url(),
                       env=env)
        report = [line for line in proc.stderr.splitlines() if REPORT in line]
        assert report == [f"warning: removed 1 leftover {REPORT}database {left} "
                          f"(pid {dead.pid})"], proc.stderr
        assert left not in _databases(pg_cluster)
        assert_databases_equal(small_db, pg_cluster.url(target))
    finally:
        _drop(pg_cluster, target, left)

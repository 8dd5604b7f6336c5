"""Incremental base backups: a chain restores equal to its source, by pgvault and by the
documented stock-tools recipe; a missing or damaged parent is refused before anything is
written; retention keeps what a kept backup depends on.

The cluster has data checksums and archives with the real `pgvault wal-push`; segments are
1 MB. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from cli_runner import clean_env, one_line_error, pgvault
from dbcompare import assert_databases_equal
from pgvault.catalog import Catalog
from pgvault.engines import datadir
from pgvault.pg.cluster import EphemeralCluster
from pgvault.retention import Candidate, Policy, plan
from pgvault.storage import open_storage
from test_physical import (  # noqa: F401  (fixtures)
    _stop_server,
    pitr_dir,
    repo_dir,
    restore_pitr,
    server_pgvault,
    sql,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def source(server_pgvault: str, repo_dir: Path) -> Iterator[EphemeralCluster]:  # noqa: F811
    """A cluster with data checksums archiving into ``repo_dir`` with `pgvault wal-push`."""
    cluster = EphemeralCluster(
        settings={"archive_mode": True, "fsync": False, "wal_level": "replica",
                  "archive_command": f"{server_pgvault} wal-push %p --repo {repo_dir}"},
        initdb_args=["--wal-segsize=1", "--data-checksums"])
    cluster.start()
    yield cluster
    with contextlib.suppress(psycopg.Error):
        sql(cluster.url(), "ALTER SYSTEM SET archive_command = 'true'", "SELECT pg_reload_conf()")
    cluster.stop()


def _backup(repo: str, url: str, *extra: str) -> dict[str, object]:
    out = pgvault("basebackup", "-d", url, "--repo", repo, "--fast-checkpoint", "--json", *extra)
    manifest: dict[str, object] = json.loads(out.stdout)
    return manifest


def _checked_server(pgdata: Path, url: str) -> None:
    """amcheck on every index of the restored ``url``; then, stopped, pg_checksums --check."""
    sql(url, "CREATE EXTENSION IF NOT EXISTS amcheck")
    with psycopg.connect(url, autocommit=True) as conn:
        indexes = [r[0] for r in conn.execute(
            "SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree'")]
        for index in indexes:
            conn.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
    assert len(indexes) > 50  # the catalogs' and the tables'
    _stop_server(pgdata)
    subprocess.run(["runuser", "-u", "postgres", "--", str(BIN / "pg_checksums"), "--check",
                    "-D", str(pgdata)], check=True, capture_output=True)


def test_a_chain_of_incrementals_restores_equal_to_the_source_also_by_the_stock_recipe(
    source: EphemeralCluster, repo_dir: Path, pitr_dir: Path,  # noqa: F811
    server_pgvault: str,  # noqa: F811
) -> None:
    repo = str(repo_dir)
    sql(source.url(), "CREATE DATABASE app STRATEGY FILE_COPY")
    app = source.url("app")
    sql(app, "CREATE TABLE orders (id int PRIMARY KEY, note text, n int)",
        "INSERT INTO orders SELECT g, repeat('x', 80), 0 FROM generate_series(1, 30000) g",
        "CREATE TABLE gone (x int)", "INSERT INTO gone VALUES (1)")
    full = _backup(repo, source.url())
    # One row in every 20th page of orders changes; a table goes, one is rewritten, one is
    # new, and a database made by copying files (old LSNs, new paths) appears.
    sql(app, "UPDATE orders SET n = n + 1 WHERE ctid = ANY(ARRAY(SELECT format('(%s,1)', b)"
             "::tid FROM generate_series(0, pg_relation_size('orders') / 8192 - 1, 20) b))",
        "DROP TABLE gone", "CREATE TABLE fresh AS SELECT g AS id FROM generate_series(1, 500) g")
    sql(source.url(), "CREATE DATABASE copied TEMPLATE app STRATEGY FILE_COPY")
    first = _backup(repo, source.url(), "--incremental")
    physical = first["physical"]
    assert isinstance(physical, dict) and physical["parent"] == full["id"]
    sql(app, "UPDATE orders SET note = 'changed' WHERE id % 1000 = 0", "VACUUM FULL fresh",
        "DELETE FROM orders WHERE id > 29000", "VACUUM orders")
    second = _backup(repo, source.url(), "--incremental")
    assert second["physical"]["parent"] == first["id"]  # type: ignore[index]
    sizes = [sum(a["size"] for a in m["artifacts"]) for m in (full, first, second)]  # type: ignore[attr-defined]
    # The first one holds the copied database whole; the second only the changed pages.
    assert sizes[1] < sizes[0] and sizes[2] < sizes[0] * 0.15, sizes
    sql(app, "INSERT INTO orders VALUES (0, 'after the backups', 0)")
    pgvault("check-archive", "-d", source.url(), "--repo", repo)

    # pgvault: the whole chain, then replay to the end of the archive.
    restored = pitr_dir / "chain"
    server, proc = restore_pitr(restored, server_pgvault, "--repo", repo)
    assert "recovery promoted" in proc.stdout
    assert_databases_equal(app, server + "app")
    assert_databases_equal(source.url("copied"), server + "copied")
    _checked_server(restored, server + "app")

    # The documented recipe, run as written, with only stock tools.
    script = (ROOT / "docs" / "incremental.md").read_text().split("<!-- stock-recipe -->")[1]
    match = re.search(r"```sh\n(.*?)```", script, re.S)
    assert match is not None
    storage = open_storage(repo)
    keys = {m.id: m.artifact("base.tar").key for m in Catalog(storage).list("main")}
    stock = pitr_dir / "stock"
    subprocess.run(["sh", "-c", match.group(1)], check=True, env={
        **os.environ, "PGDATA": str(stock), "FULL": str(repo_dir / keys[str(full["id"])]),
        "INCREMENTALS": " ".join(str(repo_dir / keys[str(m["id"])]) for m in (first, second)),
        "WAL": str(repo_dir / "wal" / "main")})
    subprocess.run(["chown", "-R", "postgres:postgres", str(stock)], check=True)
    with EphemeralCluster.existing(stock, settings={"archive_mode": "off"}) as by_hand:
        assert_databases_equal(app, by_hand.url("app"))
        assert_databases_equal(source.url("copied"), by_hand.url("copied"))


def test_a_missing_or_damaged_parent_is_refused_before_anything_is_written(
    source: EphemeralCluster, repo_dir: Path, pitr_dir: Path,  # noqa: F811
) -> None:
    repo = str(repo_dir)
    sql(source.url(), "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    full = _backup(repo, source.url())
    sql(source.url(), "UPDATE t SET g = g + 1 WHERE g < 10")
    incremental = _backup(repo, source.url(), "--incremental")
    sql(source.url(), "SELECT pg_switch_wal()")
    # A drill of an incremental restores its chain, replays and counts every row.
    drill = json.loads(pgvault("verify", str(incremental["id"]), "--repo", repo, "--level",
                               "facts", "--json").stdout)
    assert {c["name"]: c["status"] for c in drill["checks"]} == {
        "base.tar": "pass", "restore": "pass", "rto": "pass", "rows": "pass"}, drill
    assert "1000 rows" in next(c["detail"] for c in drill["checks"] if c["name"] == "rows")
    storage = open_storage(repo)
    base = repo_dir / Catalog(storage).get(str(full["id"]), "main").artifact("base.tar").key
    saved = base.read_bytes()
    base.write_bytes(saved[:100] + bytes([saved[100] ^ 1]) + saved[101:])
    target = pitr_dir / "never"
    damaged = pgvault("restore", "--physical", "latest", "--repo", repo, "--pgdata",
                      str(target), expect=None)
    assert damaged.returncode != 0
    assert "damaged" in one_line_error(damaged) and str(full["id"]) in damaged.stderr
    assert not target.exists()
    base.write_bytes(saved)
    manifest = repo_dir / "manifests" / "main" / f"{full['id']}.json"
    manifest.unlink()
    missing = pgvault("restore", "--physical", "latest", "--repo", repo, "--pgdata",
                      str(target), expect=None)
    assert missing.returncode != 0
    assert "cannot be restored" in one_line_error(missing) and not target.exists()


# ---------------------------------------------------------------- pure parts


def _at(hours: int) -> datetime:
    return datetime(2026, 12, 1, tzinfo=UTC) + timedelta(hours=hours)


def test_retention_keeps_every_parent_of_a_kept_backup_and_a_bad_parent_spoils_its_children(
) -> None:
    # F0 <- I1 <- I2   F3 <- I4   (hours); keep_last 1 keeps I4, and F3 because I4 needs it.
    backups = [Candidate("F0", _at(0)), Candidate("I1", _at(1), parent="F0"),
               Candidate("I2", _at(2), parent="I1"), Candidate("F3", _at(3)),
               Candidate("I4", _at(4), parent="F3")]
    last = Policy(daily=0, weekly=0, monthly=0, last=1)
    planned = plan(backups, last)
    assert planned.keep == ["I4", "F3"] and planned.remove == ["I2", "I1", "F0"]
    assert planned.reasons["F3"] == ["parent of I4"]
    # keep_last 3 keeps I2 (and with it I1 and F0, which no rule keeps).
    planned = plan(backups, Policy(daily=0, weekly=0, monthly=0, last=3))
    assert planned.keep == ["I4", "F3", "I2", "I1", "F0"]
    assert planned.reasons["I1"] == ["parent of I2"] and planned.reasons["F0"] == ["parent of I1"]
    # A pinned incremental keeps its chain too.
    pinned = [*backups[:2], Candidate("I2", _at(2), pinned=True, parent="I1"), *backups[3:]]
    assert plan(pinned, last).keep == ["I4", "F3", "I2", "I1", "F0"]
    # A bad full makes its incrementals bad: none of them fills a slot or is "newest".
    spoiled = [Candidate("F0", _at(0)), Candidate("F3", _at(3), bad="sha256 mismatch"),
               Candidate("I4", _at(4), parent="F3")]
    planned = plan(spoiled, last)
    assert planned.keep == ["F0"] and planned.reasons["F0"] == ["last 1/1", "newest"]
    assert planned.explain("I4") == "known bad: its parent F3 is known bad"
    orphaned = plan([Candidate("F0", _at(0)), Candidate("I4", _at(4), parent="F3")], last)
    assert orphaned.explain("I4") == "known bad: its parent F3 is missing"


def test_an_incremental_pushes_its_own_wal_ahead_of_a_slow_archiver_as_the_archivers_user(
    source: EphemeralCluster, repo_dir: Path, server_pgvault: str,  # noqa: F811
) -> None:
    """The segments pg_backup_stop completed are pushed by the backup itself (the archiver's
    later push of the same bytes finds them stored), and, the backup run as root, what it
    writes into the local repository belongs to the archiver's user, who must list it."""
    repo = str(repo_dir)
    _backup(repo, source.url())
    sql(source.url(), f"ALTER SYSTEM SET archive_command = 'sleep 15 && {server_pgvault} "
                      f"wal-push %p --repo {repo}'", "SELECT pg_reload_conf()")
    started = time.monotonic()
    inc = _backup(repo, source.url(), "--incremental")
    assert time.monotonic() - started < 12  # not behind the sleeping archiver
    assert inc["physical"]["parent"]  # type: ignore[index]
    owner = source.data_dir.stat().st_uid
    assert {p.stat().st_uid for p in (repo_dir / "wal").rglob("*")} == {owner}
    sql(source.url(), f"ALTER SYSTEM SET archive_command = '{server_pgvault} wal-push %p "
                      f"--repo {repo}'", "SELECT pg_reload_conf()")
    pgvault("check-archive", "-d", source.url(), "--repo", repo)  # the archiver agrees
    with psycopg.connect(source.url()) as conn:
        row = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()
    assert row == (0,)


def test_an_incremental_pushes_nothing_around_a_failing_archiver(
    source: EphemeralCluster, repo_dir: Path, server_pgvault: str,  # noqa: F811
) -> None:
    """pg_stat_archiver shows a failure since its last success: the backup pushes none of
    its WAL itself (it would succeed while archiving is down) and fails once archive_wait
    has passed, with nothing new in the archive."""
    repo = str(repo_dir)
    _backup(repo, source.url())
    sql(source.url(), f"ALTER SYSTEM SET archive_command = '{server_pgvault} wal-push %p "
                      "--repo /proc/no-such-repository'", "SELECT pg_reload_conf()",
        "CREATE TABLE filler AS SELECT generate_series(1, 1000) AS x",
        "SELECT pg_switch_wal()")
    deadline = time.monotonic() + 60
    with psycopg.connect(source.url(), autocommit=True) as conn:
        while conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone() == (0,):
            assert time.monotonic() < deadline, "the archiver never failed"
            time.sleep(0.1)
    before = sorted(p.name for p in (repo_dir / "wal").rglob("*"))
    failed = pgvault("basebackup", "-d", source.url(), "--repo", repo, "--fast-checkpoint",
                     "--incremental", expect=8,
                     env={"PGVAULT_PHYSICAL__ARCHIVE_WAIT_SECONDS": "2"})
    assert "did not reach the archive" in one_line_error(failed)
    assert sorted(p.name for p in (repo_dir / "wal").rglob("*")) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="the owner's push runs only for root")
def test_the_owners_push_is_a_process_of_its_own_and_is_killed_within_its_bound(
    repo_dir: Path,  # noqa: F811
) -> None:
    """The push as the data directory's owner is a new process (not a fork of a backup with
    threads alive), under the owner's ids, and one that hangs is killed within the bound
    it is given, leaving nothing stored. Its segment is a FIFO: the read blocks."""
    from pgvault.ops.incremental import _OwnerPush
    from pgvault.storage.local import LocalStorage

    owner = pwd.getpwnam("postgres")
    data_dir = Path(tempfile.mkdtemp(prefix="pgvault-owner-push-", dir="/tmp"))
    try:
        status = data_dir / "pg_wal" / "archive_status"
        status.mkdir(parents=True)
        name = "000000010000000000000003"
        os.mkfifo(data_dir / "pg_wal" / name)
        (status / f"{name}.ready").touch()
        for path in [data_dir, *data_dir.rglob("*")]:
            os.chown(path, owner.pw_uid, owner.pw_gid)
        storage = LocalStorage(repo_dir)
        push = _OwnerPush.start(storage, data_dir)
        assert push is not None
        child = Path(f"/proc/{push.process.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{owner.pw_uid}\s", child, re.M), child
        assert re.search(r"^Groups:\s*$", child, re.M), child  # none but its own gid
        started = time.monotonic()
        push.push(storage, "main", data_dir / "pg_wal", [name], [], timeout=2)
        assert time.monotonic() - started < 4
        assert push.process.returncode == -signal.SIGKILL
        assert not list(repo_dir.rglob("*"))
        push.close()  # twice is harmless: take() closes it on its way out too
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the owner's push runs only for root")
def test_an_interpreter_the_owner_cannot_reach_leaves_the_wal_to_the_archiver(
    source: EphemeralCluster, repo_dir: Path,  # noqa: F811
) -> None:
    """pgvault run by root from a Python in a folder only root may enter (pyenv under
    /root, say): the backup's own push cannot run as the owner, so it waits for the
    archiver instead, says why in its debug log, and succeeds; nothing in the repository
    belongs to root."""
    repo = str(repo_dir)
    _backup(repo, source.url())
    locked = Path(tempfile.mkdtemp(prefix="pgvault-locked-", dir="/tmp"))  # 0700, root's
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(locked / "venv")],
                       check=True)
        site = next(locked.glob("venv/lib/python*/site-packages"))
        ours = next(Path(sys.prefix).glob("lib/python*/site-packages"))
        (site / "pgvault-tests.pth").write_text(
            f"import site; site.addsitedir({str(ours)!r})\n")
        done = subprocess.run(
            [str(locked / "venv" / "bin" / "python"), "-c",
             "import sys; from pgvault.cli import main; sys.exit(main())", "--debug",
             "--log-format", "json", "basebackup", "-d", source.url(), "--repo", repo,
             "--fast-checkpoint", "--incremental", "--json"],
            capture_output=True, text=True, timeout=120, check=False, env=clean_env())
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["physical"]["parent"]
        why = [json.loads(line)["message"] for line in done.stderr.splitlines()
               if "left to the archiver" in line]
        assert why == [f"incremental: the WAL push is left to the archiver: user "
                       f"{source.data_dir.stat().st_uid} cannot reach {locked}"], done.stderr
    finally:
        shutil.rmtree(locked, ignore_errors=True)
    owner = source.data_dir.stat().st_uid
    assert {p.stat().st_uid for p in (repo_dir / "wal").rglob("*")} == {owner}


def test_page_lsns_decide_what_a_delta_holds_and_applying_it_rebuilds_the_file(
    tmp_path: Path,
) -> None:
    def page(lsn: int, fill: int) -> bytes:
        return (lsn >> 32).to_bytes(4, "little") + (lsn & 0xFFFFFFFF).to_bytes(4, "little") + \
            bytes([fill]) * (datadir.BLCKSZ - 8)

    since = 0x1_0000_0000  # 1/0
    old = [page(since - 5, 1), page(since - 1, 2), page(since - 9, 3), page(5, 4)]
    new = [page(since - 5, 1), page(since, 9), page(since - 9, 3), page(0, 0),
           page(since - 100, 7)]  # block 4: beyond the parent's length, stored
    parent, current = tmp_path / "parent", tmp_path / "current"
    parent.write_bytes(b"".join(old))
    current.write_bytes(b"".join(new) + b"half")  # a page being extended, as far as read
    fd = os.open(current, os.O_RDONLY)
    try:
        ranges, size = datadir.changed_ranges(fd, since, parent_blocks=4)
    finally:
        os.close(fd)
    assert ranges == ((1, 1), (3, 3)) and size == 5 * datadir.BLCKSZ + 4
    entry = datadir.Entry("delta", "base/1/2", size, ranges)
    assert datadir.parse_listing(datadir.format_listing([entry], "t")) == [entry]
    data = current.read_bytes()
    delta = b"".join(data[f * datadir.BLCKSZ:(f + c) * datadir.BLCKSZ] for f, c in ranges)
    import io

    datadir.apply_delta(io.BytesIO(delta), parent, entry)
    assert parent.read_bytes() == data
    with pytest.raises(Exception, match="OP SIZE RANGES PATH"):
        datadir.parse_listing(b"delta 12 x+y base/1/2\n")

"""The test harness itself: throwaway clusters, binary lookup, sample data and the comparator."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

import sampledb
from dbcompare import assert_databases_equal, database_fingerprint
from pgvault.errors import DatabaseError
from pgvault.pg import binaries
from pgvault.pg import cluster as cluster_module
from pgvault.pg.binaries import bindir_for, installed_majors, tool, tool_version
from pgvault.pg.cluster import EphemeralCluster

MakeDb = Callable[..., str]

_HOSTILE = f'"{sampledb.HOSTILE_SCHEMA}"."{sampledb.HOSTILE_TABLE.replace(chr(34), 2 * chr(34))}"'


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """An empty folder the postgres OS user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="pgvault-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _exists(pid: int) -> bool:
    """Whether any process entry, zombies included, still has this pid."""
    return Path(f"/proc/{pid}").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry.name))
    return kids


def _execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


# -- cluster ------------------------------------------------------------------------------


def test_cluster_starts_and_leaves_nothing_behind() -> None:
    with EphemeralCluster() as cluster:
        root, pid = cluster.root, cluster.postmaster_pid
        assert pid is not None and _exists(pid)
        assert cluster.url("x y") == f"postgresql://postgres@127.0.0.1:{cluster.port}/x%20y"
        with psycopg.connect(cluster.url()) as conn:
            row = conn.execute("SELECT current_user, current_setting('server_version_num')")
            user, version = row.fetchone() or ("", "0")
        assert user == cluster.superuser
        assert int(version) // 10000 == cluster.major
        assert (cluster.socket_dir / f".s.PGSQL.{cluster.port}").exists()
        backends = _children(pid)
        assert backends, "a running postmaster has auxiliary processes"
    assert not root.exists()
    assert not _exists(pid), "the postmaster is stopped and reaped, not left a zombie"
    assert not [p for p in backends if _exists(p)]
    cluster.stop()  # idempotent


def test_cluster_is_stopped_at_exit_when_the_owner_forgets() -> None:
    script = (
        "from pgvault.pg.cluster import EphemeralCluster\n"
        "c = EphemeralCluster().start()\n"
        "print(c.root, c.postmaster_pid)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    root, pid = Path(out[0]), int(out[1])
    assert not root.exists()
    assert not _exists(pid)


def test_cluster_failed_start_cleans_up(shared_tmp: Path) -> None:
    cluster = EphemeralCluster(base_dir=shared_tmp, settings={"shared_buffers": "not a size"})
    with pytest.raises(DatabaseError) as excinfo:
        cluster.start()
    message = str(excinfo.value)
    assert "did not start" in message
    assert "shared_buffers" in message, "the server log tail explains why"
    assert cluster.postmaster_pid is None
    assert list(shared_tmp.iterdir()) == []


def test_two_clusters_get_distinct_ports() -> None:
    with EphemeralCluster() as one, EphemeralCluster() as two:
        assert one.port != two.port
        assert one.root != two.root


def test_cluster_retries_when_its_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken, cluster_module._free_port()])
        monkeypatch.setattr(cluster_module, "_free_port", lambda: next(ports))
        with EphemeralCluster() as cluster:
            assert cluster.port != taken
            assert "could not bind" in cluster.log_path.read_text()


def test_cluster_rejects_base_dir_the_server_user_cannot_reach(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to another OS user")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(DatabaseError, match="cannot reach"):
        EphemeralCluster(base_dir=private).start()
    assert list(private.iterdir()) == []


def test_cluster_with_long_base_dir_uses_short_socket_dir(shared_tmp: Path) -> None:
    base = shared_tmp / ("long-" + "d" * 90)
    base.mkdir(mode=0o755)
    with EphemeralCluster(base_dir=base) as cluster:
        assert cluster.root.parent == base
        assert not cluster.socket_dir.is_relative_to(base)
        socket_dir = cluster.socket_dir
        with psycopg.connect(cluster.url()) as conn:
            conn.execute("SELECT 1")
    assert not socket_dir.exists()
    assert list(base.iterdir()) == []


# -- binaries -----------------------------------------------------------------------------


def test_bindir_for_installed_major() -> None:
    majors = installed_majors()
    if 15 not in majors:
        pytest.skip("PostgreSQL 15 is not installed here")
    assert bindir_for(15) == Path("/usr/lib/postgresql/15/bin")
    # An older server is served by the lowest newer installed client.
    assert bindir_for(9) == Path(f"/usr/lib/postgresql/{majors[0]}/bin")
    pg_dump = tool("pg_dump", 15)
    assert pg_dump == Path("/usr/lib/postgresql/15/bin/pg_dump")
    assert tool_version(pg_dump)[0] == 15


def test_bindir_for_future_major_is_one_clear_line() -> None:
    with pytest.raises(DatabaseError) as excinfo:
        bindir_for(99)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "PostgreSQL 99" in message
    assert "install postgresql-client-99" in message


def test_tool_missing_is_clear() -> None:
    with pytest.raises(DatabaseError, match="no_such_tool not found"):
        tool("no_such_tool", max(installed_majors(), default=15))


def test_bindir_falls_back_to_pg_dump_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 16.2 (Homebrew)'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(binaries, "PG_LIB_DIR", tmp_path / "nothing-here")
    monkeypatch.setenv("PATH", str(tmp_path))
    tool_version.cache_clear()
    try:
        assert tool_version(fake) == (16, 2)
        assert bindir_for(16) == tmp_path
        assert bindir_for(12) == tmp_path
        with pytest.raises(DatabaseError, match="newest pg_dump here is 16; install"):
            bindir_for(17)
    finally:
        tool_version.cache_clear()


# -- sample data --------------------------------------------------------------------------


def test_rich_database_fills(rich_db: str) -> None:
    fingerprint = database_fingerprint(rich_db)
    tables = fingerprint["tables"]
    assert tables[_HOSTILE]["rows"] == 250
    assert tables["app.measurements_2024"]["rows"] > 0
    assert tables["app.not_populated"]["hash"] == "not populated"
    assert len(fingerprint["large_objects"]) == 4
    assert fingerprint["large_objects"][424242]["comment"] == "an orphan large object"
    assert fingerprint["sequences"]["app.reset_not_called"] == (77, False)
    with psycopg.connect(rich_db) as conn:
        row = conn.execute("SELECT b FROM app.types WHERE id = 1").fetchone()
        assert row is not None and bytes(row[0]) == bytes(range(256))
        extensions = {r[0] for r in conn.execute("SELECT extname FROM pg_extension")}
    assert {"citext", "hstore", "pgcrypto"} <= extensions


def test_sized_database_fills(make_db: MakeDb) -> None:
    url = make_db()
    sampledb.fill_sized_database(url, 2000)
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT user_id) FROM events").fetchone()
    assert row is not None and row[0] == 2000 and row[1] > 10


# -- comparator ---------------------------------------------------------------------------


def test_template_copy_compares_equal(rich_db: str, make_db: MakeDb) -> None:
    copy = make_db(rich_db)
    assert_databases_equal(rich_db, copy)


def test_dump_and_restore_compares_equal(rich_db: str, make_db: MakeDb, tmp_path: Path) -> None:
    # A real pg_dump/pg_restore round trip must not trip the comparator (no false alarms).
    major = _server_major(rich_db)
    archive = tmp_path / "rich.dump"
    subprocess.run(
        [str(tool("pg_dump", major)), "-Fc", f"--file={archive}", f"--dbname={rich_db}"],
        check=True,
    )
    target = make_db()
    subprocess.run(
        [str(tool("pg_restore", major)), "--exit-on-error", f"--dbname={target}", str(archive)],
        check=True,
    )
    assert_databases_equal(rich_db, target)


def _server_major(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.info.server_version // 10000


MUTATIONS = {
    "row": (
        ["UPDATE app.customers SET name = name || '!' WHERE id = 7"],
        "table app.customers differs",
    ),
    "hostile row": (
        [f'UPDATE {_HOSTILE} SET "Ünïcödé 表" = NULL WHERE id = 3'],
        f"table {_HOSTILE} differs",
    ),
    "extra duplicate row": (
        ["INSERT INTO app.no_columns DEFAULT VALUES"],
        "table app.no_columns differs: rows 2 vs 3",
    ),
    "bytea byte": (
        ["UPDATE app.types SET b = set_byte(b, 200, 0) WHERE id = 1"],
        "table app.types differs",
    ),
    "sequence value": (["SELECT nextval('app.untouched')"], "sequence app.untouched differs"),
    "sequence is_called": (
        ["SELECT setval('app.reset_not_called', 77, true)"],
        "sequence app.reset_not_called differs",
    ),
    "large object byte": (
        ["SELECT lo_put(424242, 0, '\\x46'::bytea)"],
        "large object 424242 differs",
    ),
    "large object missing": (["SELECT lo_unlink(424242)"], "large object 424242 exists only in a"),
    "column type": (
        ["ALTER TABLE app.players ALTER COLUMN team_id TYPE bigint"],
        "team_id bigint",
    ),
    "dropped index": (["DROP INDEX app.orders_brin"], "orders_brin"),
    "missing table": (['DROP TABLE "odd schema"."-dash table"'], '"-dash table" exists only in a'),
    "materialized view refreshed": (
        ["REFRESH MATERIALIZED VIEW app.not_populated"],
        "table app.not_populated differs",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_compare_detects_difference(rich_db: str, make_db: MakeDb, mutation: str) -> None:
    statements, expected = MUTATIONS[mutation]
    copy = make_db(rich_db)
    _execute(copy, *statements)
    with pytest.raises(AssertionError) as excinfo:
        assert_databases_equal(rich_db, copy)
    assert expected in str(excinfo.value)

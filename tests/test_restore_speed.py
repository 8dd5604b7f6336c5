"""What a restore asks of the server's sessions to be fast, and that none of it stays behind.

Each property is checked by the server itself: a CHECK constraint that holds only in a
session with the setting fails the restore's COPY when pg_restore's session lacks it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cli_runner import pgvault
from dbcompare import assert_databases_equal
from pgvault.pg.cluster import EphemeralCluster


@pytest.fixture(scope="module")
def durable_cluster() -> Iterator[EphemeralCluster]:
    """A server whose sessions commit synchronously, as production ones do (the suite's
    shared cluster runs with synchronous_commit off, where this could not fail)."""
    with EphemeralCluster(settings={"fsync": False, "full_page_writes": False}) as cluster:
        yield cluster


def _settings_left(url: str, database: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d"
            " ON d.oid = s.setdatabase WHERE d.datname = %s", (database,)).fetchone()
    assert row is not None
    return int(row[0])


def test_restore_sessions_commit_without_waiting_for_each_flush_and_keep_no_setting(
    durable_cluster: EphemeralCluster, tmp_path: Path
) -> None:
    """pg_restore's commits do not wait for their own WAL flush (the final rename's
    synchronous commit flushes them all); the restored database keeps the server's default."""
    cluster, repo = durable_cluster, f"file://{tmp_path / 'repo'}"
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE source")
    url = cluster.url("source")
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        conn.execute("SET synchronous_commit = off")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, "
                     "CHECK (id > 0 AND current_setting('synchronous_commit') = 'off'))")
        conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
    pgvault("backup", "--dbname", url, "--repo", repo)
    for jobs in ("1", "2"):  # streamed, and spooled with --jobs
        target = f"restored_{jobs}"
        pgvault("restore", "latest", "--to", target, "--jobs", jobs,
                "--dbname", cluster.url(), "--repo", repo)
        assert_databases_equal(url, cluster.url(target))
        assert _settings_left(cluster.url(), target) == 0
        with psycopg.connect(cluster.url(target)) as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)

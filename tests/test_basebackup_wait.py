"""basebackup keeps its own bound on the wait for the archive, also while the server waits.

Without WAL in the tar, the server itself waits inside pg_basebackup (pg_backup_stop) until
the backup's WAL is archived, with no end of its own: with archive_command failing, a
basebackup once ran until pytest's 300 s timeout. Real cluster, real failing wal-push.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import test_physical as physical
from cli_runner import one_line_error, pgvault

# Archiving clusters as tests/test_physical.py sets them up: its fixtures, requested by name.
from test_physical import archiving, pitr_dir, repo_dir, server_pgvault  # noqa: F401

BOUND = 4.0
# A fast checkpoint and a fresh cluster's few MB before the wait begins, then the cancel.
SLACK = 12.0


def test_basebackup_gives_up_within_archive_wait_seconds_when_archiving_fails(
    request: pytest.FixtureRequest,
) -> None:
    start_archiving = request.getfixturevalue("archiving")
    restores: Path = request.getfixturevalue("pitr_dir")
    server_bin: str = request.getfixturevalue("server_pgvault")
    repo = f"file://{request.getfixturevalue('repo_dir')}"
    cluster = start_archiving("--repo /proc/no-such-repository")  # every wal-push fails
    admin = cluster.url()
    physical.sql(admin, physical.CREATE_APP)
    physical.sql(cluster.url("app"), "CREATE TABLE orders (id int PRIMARY KEY, note text)",
                 physical.insert(1, 300))

    started = time.monotonic()
    failed = pgvault("basebackup", "-d", admin, "--repo", repo, "--wal-method", "archive",
                     "--fast-checkpoint", expect=8, timeout=BOUND + 60,
                     env={"PGVAULT_PHYSICAL__ARCHIVE_WAIT_SECONDS": str(BOUND)})
    elapsed = time.monotonic() - started
    line = one_line_error(failed)
    assert elapsed < BOUND + SLACK, f"basebackup took {elapsed:.1f}s for a {BOUND}s bound"
    assert "did not reach the archive within 4s (archive_wait_seconds)" in line, line
    assert "archive_command has failed" in line and "--wal-method fetch" in line, line
    assert "Traceback" not in failed.stderr
    assert pgvault("list", "--repo", repo, "--json").stdout.strip() == "[]"

    # Once archiving works, the server (its cancelled backup behind it) backs up again.
    physical.sql(admin, f"ALTER SYSTEM SET archive_command = '{server_bin} wal-push %p "
                        f"--repo {repo}'", "SELECT pg_reload_conf()")
    pgvault("basebackup", "-d", admin, "--repo", repo, "--wal-method", "archive",
            "--fast-checkpoint")
    url, _ = physical.restore_pitr(restores / "restored", server_bin, "--repo", repo)
    try:
        restored = physical.order_ids(url + "app")
        assert restored == physical.order_ids(cluster.url("app")) == list(range(1, 301))
    finally:
        physical._stop_server(restores / "restored")
